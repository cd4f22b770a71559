"""Audio formats, G.711 codecs and streaming resamplers for both directions of a session.

A Deepgram v1 client declares its formats in ``Settings.audio``: ``input {encoding, sample_rate}``
and ``output {encoding, sample_rate, bitrate, container}``.  OpenAI Realtime (GA) accepts only
``audio/pcm`` (16-bit signed little-endian mono at 24 kHz), ``audio/pcmu`` (G.711 µ-law, 8 kHz) and
``audio/pcma`` (G.711 A-law, 8 kHz).  This module validates the client's declaration, picks the
upstream format (:func:`upstream_format_for`) and converts the audio, one converter object per
direction per session.

Supported client formats: ``linear16`` (16-bit signed little-endian mono) at any integer rate from
8000 to 48000 Hz, and ``mulaw`` / ``alaw`` at 8000 Hz.  Output may be wrapped in a streaming WAV
container (``container: "wav"``); ``ogg``, ``mp3``, ``opus``, ``flac`` and ``aac`` are refused.

Cheap paths: ``linear16`` at 24 kHz against ``audio/pcm``, and G.711 at 8 kHz against the same law
upstream, are byte copies (a linear16 byte split between two frames is carried to the next one, so
the upstream never sees half a sample).  A-law against µ-law upstream (or the reverse) is a table
transcode with no resampling.

Resampler
---------
Client audio upsampled from 16 kHz or more (16 or 22.05 kHz to 24 kHz) goes through libsoxr's quality
``"QQ"`` (cubic interpolation): it holds nothing back (0.1 ms of algorithmic delay), is flat within
1 dB to about 4.5 kHz and keeps its imaging 43 dB below the speech band.  Client audio at other rates
(8-15.999 kHz, above 24 kHz) needs a real filter, and libsoxr's filters release their output in
blocks 21-48 ms late, so it goes through :class:`openai_proxy.resample.LowDelayResampler`, a
minimum-phase polyphase filter that needs no sample ahead and delays the signal by at most 0.57 ms.
Agent audio uses libsoxr's ``"HQ"`` (20-bit precision, passband flat to 91 % of the lower Nyquist
frequency, linear phase): it is what people hear, and replies arrive faster than real time (:func:`input_resampler_quality`; docs/audio.md has the
measurements).  Everything runs in float32 on the int16 scale: libsoxr's int16 mode adds random dither,
so the same audio cut into different chunks would not give the same bytes; in float32 the output is
bit-identical however the input is chunked, and the conversion back to int16 rounds to nearest and
clips.

Delay: the resamplers compensate their filter delay, so after :meth:`InputConverter.flush` or
:meth:`OutputConverter.end_reply` the output holds exactly the input's duration (to one sample).
While streaming, output trails input.  Measured with 20 ms frames (min-max, mean):

- ``QQ`` paths (16 or 22.05 kHz -> 24 kHz): 0.1 ms;
- low-delay paths (8-15.999 kHz and 24.001-48 kHz -> 24 kHz): none (the filter's group delay,
  0.16-0.53 ms across the passband, delays the signal itself);
- ``HQ`` from 24 kHz to 16, 22.05, 32, 44.1 or 48 kHz: 4-42 ms (21-23 ms), oscillating with
  libsoxr's block phase;
- ``HQ`` from 24 kHz to 8 or 11.025 kHz: 10-84 ms (43-48 ms);
- passthrough paths: 0.

At the start of a stream the lag of libsoxr's paths is larger (up to about 175 ms); it
never exceeds :data:`RESAMPLER_MAX_LAG_MS` whatever the chunk sizes.  Every path costs well under 2 ms
of CPU per second of audio (``benchmarks/bench_audio.py``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import soxr

from openai_proxy import resample

__all__ = [
    "SUPPORTED_INPUT_ENCODINGS",
    "SUPPORTED_OUTPUT_ENCODINGS",
    "SUPPORTED_OUTPUT_CONTAINERS",
    "MIN_SAMPLE_RATE",
    "MAX_SAMPLE_RATE",
    "G711_SAMPLE_RATE",
    "UPSTREAM_PCM_RATE",
    "RESAMPLER_QUALITY",
    "INPUT_RESAMPLER_QUALITY",
    "QUICK_RESAMPLER_MIN_RATE",
    "LOW_DELAY_RESAMPLER",
    "input_resampler_quality",
    "RESAMPLER_MAX_LAG_MS",
    "MAX_APPEND_AUDIO_BYTES",
    "UnsupportedAudioFormat",
    "ClientAudioFormat",
    "parse_input_format",
    "parse_output_format",
    "upstream_format_for",
    "bytes_per_ms",
    "mulaw_encode",
    "mulaw_decode",
    "alaw_encode",
    "alaw_decode",
    "wav_header",
    "InputConverter",
    "OutputConverter",
    "AppendBatcher",
]

SUPPORTED_INPUT_ENCODINGS: Final = ("linear16", "mulaw", "alaw")
SUPPORTED_OUTPUT_ENCODINGS: Final = ("linear16", "mulaw", "alaw")
SUPPORTED_OUTPUT_CONTAINERS: Final = ("none", "wav")
MIN_SAMPLE_RATE: Final = 8000
MAX_SAMPLE_RATE: Final = 48000
G711_SAMPLE_RATE: Final = 8000
UPSTREAM_PCM_RATE: Final = 24000
#: Agent audio to the client: libsoxr's high quality (it is what people hear; see module doc).
RESAMPLER_QUALITY: Final = "HQ"
#: Client audio upsampled from 16 kHz or more to the upstream's rate: libsoxr's quick cubic
#: interpolation, which holds nothing back (module doc); see :func:`input_resampler_quality`.
INPUT_RESAMPLER_QUALITY: Final = "QQ"
#: The lowest source rate that :data:`INPUT_RESAMPLER_QUALITY` serves.
QUICK_RESAMPLER_MIN_RATE: Final = 16000
#: Every other rate change of client audio: :class:`openai_proxy.resample.LowDelayResampler`, a short
#: minimum-phase filter that holds nothing back instead of libsoxr's blocks (module doc).
LOW_DELAY_RESAMPLER: Final = "low-delay"
#: Upper bound on how far converted output may trail its input while streaming (see module doc).
RESAMPLER_MAX_LAG_MS: Final = 200.0
#: Largest raw audio payload of one ``input_audio_buffer.append``: its base64 text plus the JSON
#: envelope stays under the API's 15 MiB per event (1 KiB is left for the envelope).
MAX_APPEND_AUDIO_BYTES: Final = (15 * 1024 * 1024 - 1024) * 3 // 4

_LINEAR16: Final = "linear16"
_MULAW: Final = "mulaw"
_ALAW: Final = "alaw"
_G711: Final = (_MULAW, _ALAW)
_DEFAULT_LINEAR16_RATE: Final = 24000

Int16Array = npt.NDArray[np.int16]


class UnsupportedAudioFormat(ValueError):
    """A ``Settings.audio`` declaration the daemon cannot serve.

    ``field`` is the dotted path of the offending setting (``audio.output.container``);
    ``description`` names the field, the bad value and what is supported, fit for a client
    ``Error``.
    """

    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


@dataclass(frozen=True)
class ClientAudioFormat:
    """Audio as one side of the client connection carries it.

    ``encoding`` is ``linear16``, ``mulaw`` or ``alaw``; ``sample_rate`` in Hz; ``container`` is
    ``"none"`` (raw) or ``"wav"`` (output only).
    """

    encoding: str
    sample_rate: int
    container: str = "none"


# --- Settings.audio parsing --------------------------------------------------------------------


def _choices(values: tuple[str, ...]) -> str:
    return ", ".join(values)


def _parse_encoding(prefix: str, section: Mapping[object, object], supported: tuple[str, ...]) -> str:
    field = f"{prefix}.encoding"
    value = section.get("encoding")
    if value is None:
        return _LINEAR16
    if not isinstance(value, str):
        raise UnsupportedAudioFormat(
            field, f"{field} must be a string, got {value!r}; supported values: {_choices(supported)}"
        )
    if value not in supported:
        raise UnsupportedAudioFormat(
            field, f"{field} {value!r} is not supported; supported values: {_choices(supported)}"
        )
    return value


def _parse_sample_rate(prefix: str, section: Mapping[object, object], encoding: str) -> int:
    field = f"{prefix}.sample_rate"
    value = section.get("sample_rate")
    if encoding in _G711:
        allowed = f"{encoding} supports only {G711_SAMPLE_RATE}"
        default = G711_SAMPLE_RATE
    else:
        allowed = f"{encoding} supports integers from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}"
        default = _DEFAULT_LINEAR16_RATE
    if value is None:
        # G.711 is 8 kHz by definition, so that is its only sensible default.
        return default
    # bool is an int subclass, and JSON `true` is no rate.  An integral float (16000.0, as some
    # JSON encoders write numbers) is accepted as the integer it denotes.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedAudioFormat(field, f"{field} must be an integer, got {value!r}; {allowed}")
    if isinstance(value, float):
        if not value.is_integer():
            raise UnsupportedAudioFormat(field, f"{field} must be an integer, got {value!r}; {allowed}")
        value = int(value)
    if encoding in _G711:
        ok = value == G711_SAMPLE_RATE
    else:
        ok = MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE
    if not ok:
        raise UnsupportedAudioFormat(field, f"{field} {value!r} is not supported; {allowed}")
    return value


def _section(prefix: str, obj: object) -> Mapping[object, object]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise UnsupportedAudioFormat(prefix, f"{prefix} must be an object, got {obj!r}")
    return obj


def parse_input_format(obj: object) -> ClientAudioFormat:
    """Validate ``Settings.audio.input`` and return the client's input format.

    ``None`` (or missing fields) means ``linear16`` at 24000 Hz, Deepgram's default; a missing rate
    for ``mulaw``/``alaw`` means 8000 Hz.  Fields other than ``encoding`` and ``sample_rate`` are
    ignored.  Raises :class:`UnsupportedAudioFormat` naming the first bad field.
    """
    prefix = "audio.input"
    section = _section(prefix, obj)
    encoding = _parse_encoding(prefix, section, SUPPORTED_INPUT_ENCODINGS)
    rate = _parse_sample_rate(prefix, section, encoding)
    return ClientAudioFormat(encoding, rate)


def parse_output_format(obj: object) -> ClientAudioFormat:
    """Validate ``Settings.audio.output`` and return the format agent audio must reach the client in.

    ``None`` or missing fields mean ``linear16``, 24000 Hz (8000 Hz for ``mulaw``/``alaw``) and
    container ``none``.  ``container`` may be ``none`` or ``wav``; ``bitrate`` only concerns
    compressed encodings, none of which is supported, so it is ignored.  Raises
    :class:`UnsupportedAudioFormat` naming the first bad field.
    """
    prefix = "audio.output"
    section = _section(prefix, obj)
    encoding = _parse_encoding(prefix, section, SUPPORTED_OUTPUT_ENCODINGS)
    rate = _parse_sample_rate(prefix, section, encoding)
    field = f"{prefix}.container"
    container = section.get("container")
    if container is None:
        container = "none"
    if not isinstance(container, str):
        raise UnsupportedAudioFormat(
            field,
            f"{field} must be a string, got {container!r}; "
            f"supported values: {_choices(SUPPORTED_OUTPUT_CONTAINERS)}",
        )
    if container not in SUPPORTED_OUTPUT_CONTAINERS:
        raise UnsupportedAudioFormat(
            field,
            f"{field} {container!r} is not supported; "
            f"supported values: {_choices(SUPPORTED_OUTPUT_CONTAINERS)}",
        )
    return ClientAudioFormat(encoding, rate, container)


# --- upstream formats --------------------------------------------------------------------------


def upstream_format_for(client: ClientAudioFormat) -> dict[str, object]:
    """The GA ``audio.*.format`` to ask OpenAI for, given what the client speaks or wants.

    8 kHz G.711 passes through in the same law; everything else goes through pcm16 at 24 kHz.
    """
    if client.sample_rate == G711_SAMPLE_RATE:
        if client.encoding == _MULAW:
            return {"type": "audio/pcmu"}
        if client.encoding == _ALAW:
            return {"type": "audio/pcma"}
    return {"type": "audio/pcm", "rate": UPSTREAM_PCM_RATE}


def _upstream_codec(upstream_format: Mapping[str, object]) -> tuple[str, int]:
    """(encoding, sample rate) of a GA format dict."""
    kind = upstream_format.get("type")
    if kind == "audio/pcm":
        rate = upstream_format.get("rate", UPSTREAM_PCM_RATE)
        if rate != UPSTREAM_PCM_RATE:
            raise ValueError(f"audio/pcm is only defined at {UPSTREAM_PCM_RATE} Hz, got {rate!r}")
        return _LINEAR16, UPSTREAM_PCM_RATE
    if kind == "audio/pcmu":
        return _MULAW, G711_SAMPLE_RATE
    if kind == "audio/pcma":
        return _ALAW, G711_SAMPLE_RATE
    raise ValueError(f"unknown upstream audio format {kind!r}")


def bytes_per_ms(upstream_format: Mapping[str, object]) -> int:
    """Bytes of one millisecond of audio in a GA format: 48 for ``audio/pcm``, 8 for G.711."""
    encoding, rate = _upstream_codec(upstream_format)
    return _sample_width(encoding) * rate // 1000


def sample_bytes(upstream_format: Mapping[str, object]) -> int:
    """Bytes of one sample in a GA format: 2 for ``audio/pcm``, 1 for G.711."""
    return _sample_width(_upstream_codec(upstream_format)[0])


def _sample_width(encoding: str) -> int:
    return 2 if encoding == _LINEAR16 else 1


# --- G.711 (ITU-T G.711: µ-law on 14-bit, A-law on 13-bit magnitudes) ---------------------------


def _build_mulaw_encoder() -> npt.NDArray[np.uint8]:
    """Code for every int16 value, indexed by the value's 16-bit pattern."""
    x = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    v = x >> 2  # the law is defined on 14 bits
    negative = v < 0
    magnitude = np.minimum(np.where(negative, -v, v), 8159) + 33  # clip, then add the bias
    magnitude = np.minimum(magnitude, 0x1FFF)  # the one value past segment 7 codes as its top
    segment = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), magnitude)
    mantissa = (magnitude >> (segment + 1)) & 0x0F
    mask = np.where(negative, 0x7F, 0xFF)
    return (((segment << 4) | mantissa) ^ mask).astype(np.uint8)


def _build_mulaw_decoder() -> Int16Array:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _build_alaw_encoder() -> npt.NDArray[np.uint8]:
    x = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32)
    v = x >> 3  # the law is defined on 13 bits
    positive = v >= 0
    magnitude = np.where(positive, v, -v - 1)
    segment = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), magnitude)
    mantissa = np.where(segment < 2, magnitude >> 1, magnitude >> segment) & 0x0F
    mask = np.where(positive, 0xD5, 0x55)  # even bits inverted, as the law transmits them
    return (((segment << 4) | mantissa) ^ mask).astype(np.uint8)


def _build_alaw_decoder() -> Int16Array:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    segment = (a & 0x70) >> 4
    t = np.where(segment == 0, t + 8, (t + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


_MULAW_ENCODE: Final = _build_mulaw_encoder()
_MULAW_DECODE: Final = _build_mulaw_decoder()
_ALAW_ENCODE: Final = _build_alaw_encoder()
_ALAW_DECODE: Final = _build_alaw_decoder()
#: One law's code to the other's, through the linear value each denotes.
_G711_TRANSCODE: Final = {
    (_ALAW, _MULAW): _MULAW_ENCODE[_ALAW_DECODE.view(np.uint16)],
    (_MULAW, _ALAW): _ALAW_ENCODE[_MULAW_DECODE.view(np.uint16)],
}


def mulaw_encode(samples: Int16Array) -> bytes:
    """G.711 µ-law bytes for int16 samples."""
    return _MULAW_ENCODE[np.asarray(samples, dtype=np.int16).view(np.uint16)].tobytes()


def mulaw_decode(data: bytes) -> Int16Array:
    """int16 samples for G.711 µ-law bytes."""
    return _MULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(samples: Int16Array) -> bytes:
    """G.711 A-law bytes for int16 samples."""
    return _ALAW_ENCODE[np.asarray(samples, dtype=np.int16).view(np.uint16)].tobytes()


def alaw_decode(data: bytes) -> Int16Array:
    """int16 samples for G.711 A-law bytes."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def _decode(encoding: str, data: bytes) -> Int16Array:
    if encoding == _LINEAR16:
        return np.frombuffer(data, dtype="<i2")
    if encoding == _MULAW:
        return mulaw_decode(data)
    return alaw_decode(data)


def _encode(encoding: str, samples: Int16Array) -> bytes:
    if encoding == _LINEAR16:
        return samples.astype("<i2", copy=False).tobytes()
    if encoding == _MULAW:
        return mulaw_encode(samples)
    return alaw_encode(samples)


# --- WAV ---------------------------------------------------------------------------------------

_WAV_FORMAT_TAGS: Final = {_LINEAR16: 1, _ALAW: 6, _MULAW: 7}
_WAV_UNKNOWN_SIZE: Final = 0xFFFFFFFF


def wav_header(client: ClientAudioFormat) -> bytes:
    """Header of a streaming WAV file: mono, the client's encoding and rate, sizes unknown.

    RIFF and data sizes are 0xFFFFFFFF, the usual mark of a stream whose length is not known when
    the header is written.  G.711 gets the 18-byte ``fmt`` chunk and the ``fact`` chunk that
    non-PCM WAV requires.
    """
    tag = _WAV_FORMAT_TAGS[client.encoding]
    width = _sample_width(client.encoding)
    fmt = struct.pack("<HHIIHH", tag, 1, client.sample_rate, client.sample_rate * width, width, 8 * width)
    chunks = b""
    if tag == 1:
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
    else:
        fmt += struct.pack("<H", 0)  # cbSize: no extra format bytes
        chunks += b"fmt " + struct.pack("<I", len(fmt)) + fmt
        chunks += b"fact" + struct.pack("<II", 4, _WAV_UNKNOWN_SIZE)
    chunks += b"data" + struct.pack("<I", _WAV_UNKNOWN_SIZE)
    return b"RIFF" + struct.pack("<I", _WAV_UNKNOWN_SIZE) + b"WAVE" + chunks


# --- conversion --------------------------------------------------------------------------------


class _Transcoder:
    """Streaming conversion between two (encoding, rate) pairs; the engine of both converters."""

    def __init__(self, source: tuple[str, int], target: tuple[str, int], quality: str) -> None:
        self._source_encoding, self._source_rate = source
        self._target_encoding, self._target_rate = target
        self._source_width = _sample_width(self._source_encoding)
        self._target_width = _sample_width(self._target_encoding)
        self._copy = source == target
        self._resampler: soxr.ResampleStream | resample.LowDelayResampler | None = None
        if self._source_rate != self._target_rate:
            if quality == LOW_DELAY_RESAMPLER:
                self._resampler = resample.LowDelayResampler(self._source_rate, self._target_rate)
            else:
                self._resampler = soxr.ResampleStream(
                    self._source_rate, self._target_rate, 1, dtype="float32", quality=quality
                )
        # Byte-for-byte table transcodes (A-law <-> µ-law at 8 kHz) need no int16 step.
        self._table: npt.NDArray[np.uint8] | None = None
        if self._resampler is None and not self._copy and "linear16" not in (
            self._source_encoding, self._target_encoding
        ):
            self._table = _G711_TRANSCODE[(self._source_encoding, self._target_encoding)]
        # A linear16 sample split across two chunks waits here for its second byte.
        self._carry = b""
        self.samples_out = 0

    def feed(self, data: bytes) -> bytes:
        if self._carry:
            data = self._carry + data
            self._carry = b""
        if self._source_width == 2 and len(data) % 2:
            self._carry = bytes(data[-1:])
            data = data[:-1]
        if not data:
            return b""
        if self._copy:
            self.samples_out += len(data) // self._target_width
            return bytes(data)
        if self._table is not None:
            self.samples_out += len(data)
            return self._table[np.frombuffer(data, dtype=np.uint8)].tobytes()
        samples = _decode(self._source_encoding, data)
        if self._resampler is not None:
            # int16 -> float32 is exact, so only the resampler itself alters the signal.  The
            # filter is linear, so it runs on the int16 scale: no scaling either way.
            samples = _to_int16(self._resampler.resample_chunk(samples.astype(np.float32)))
        return self._emit(samples)

    def drain(self) -> bytes:
        """Everything still inside the resampler; then the state is fresh again."""
        out = b""
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            out = self._emit(_to_int16(np.array(tail, dtype=np.float32)))
        self.reset()
        return out

    def reset(self) -> None:
        # A dangling half sample can never be played: it is dropped.
        self._carry = b""
        if self._resampler is not None:
            self._resampler.clear()

    def _emit(self, samples: Int16Array) -> bytes:
        self.samples_out += len(samples)
        return _encode(self._target_encoding, samples)


def _to_int16(x: npt.NDArray[np.float32]) -> Int16Array:
    """Round to nearest and clip, in place (``x`` is the resampler's fresh output array)."""
    np.rint(x, out=x)
    np.minimum(x, 32767, out=x)
    np.maximum(x, -32768, out=x)
    return x.astype(np.int16)


def input_resampler_quality(source_rate: int, target_rate: int) -> str:
    """The resampler for client audio at ``source_rate`` Hz going upstream at ``target_rate`` Hz.

    Upsampling from 16 kHz or more uses libsoxr's ``"QQ"``: no block delay (0.1 ms), flat within
    1 dB to 4.5 kHz and imaging products 30-50 dB down in the speech band, at the lowest cost.
    Downsampling needs a real anti-aliasing filter and 8-11.025 kHz sources lose too much treble to
    cubic interpolation; libsoxr's filters for those hold output back for 21-48 ms, so they use
    :data:`LOW_DELAY_RESAMPLER` (at most 2 ms).  Odd rates whose ratio to the target would need
    more filter phases than it keeps (:func:`openai_proxy.resample.supports`) stay on ``"HQ"``.
    The measurements are in docs/audio.md.
    """
    if target_rate > source_rate >= QUICK_RESAMPLER_MIN_RATE:
        return INPUT_RESAMPLER_QUALITY
    if resample.supports(source_rate, target_rate):
        return LOW_DELAY_RESAMPLER
    return RESAMPLER_QUALITY


class InputConverter:
    """Client audio (``Settings.audio.input``) to the upstream input format, one per session.

    Chunks may be of any size, including linear16 split in the middle of a sample; the output is
    the same bytes however the input is cut.
    """

    def __init__(self, client: ClientAudioFormat, upstream_format: Mapping[str, object]) -> None:
        target = _upstream_codec(upstream_format)
        self._transcoder = _Transcoder(
            (client.encoding, client.sample_rate),
            target,
            input_resampler_quality(client.sample_rate, target[1]),
        )

    def feed(self, data: bytes) -> bytes:
        """Convert one chunk; returns what is ready (possibly ``b""``)."""
        return self._transcoder.feed(data)

    def flush(self) -> bytes:
        """The resampler's remaining output at the end of the stream; the converter starts afresh."""
        return self._transcoder.drain()


class OutputConverter:
    """Upstream agent audio to ``Settings.audio.output``, one per session, reply by reply.

    Each reply is a stream of its own: :meth:`end_reply` delivers its tail, :meth:`discard_reply`
    (barge-in) throws the rest away, and either leaves the converter ready for the next reply.
    """

    def __init__(self, upstream_format: Mapping[str, object], client: ClientAudioFormat) -> None:
        self._client = client
        self._transcoder = _Transcoder(
            _upstream_codec(upstream_format), (client.encoding, client.sample_rate), RESAMPLER_QUALITY
        )

    @property
    def emitted_ms(self) -> float:
        """Milliseconds of client audio produced for the current reply so far.

        Because of resampler lag this may be a little less than the upstream audio fed; it is what
        the client has actually been given, the bound for ``conversation.item.truncate``.
        """
        return self._transcoder.samples_out * 1000 / self._client.sample_rate

    def feed(self, data: bytes) -> bytes:
        """Convert one ``response.output_audio.delta`` payload (decoded from base64)."""
        return self._transcoder.feed(data)

    def end_reply(self) -> bytes:
        """The current reply's remaining audio; then the state is reset for the next reply."""
        out = self._transcoder.drain()
        self._transcoder.samples_out = 0
        return out

    def discard_reply(self) -> None:
        """Drop the current reply's pending audio without output (barge-in)."""
        self._transcoder.reset()
        self._transcoder.samples_out = 0

    def reply_header(self) -> bytes:
        """Bytes to send before each reply's audio: a streaming WAV header, or ``b""`` for raw."""
        if self._client.container == "wav":
            return wav_header(self._client)
        return b""


class AppendBatcher:
    """Groups converted upstream-format audio into ``input_audio_buffer.append`` payloads.

    A payload is sent as soon as ``target_ms`` is pending, or as soon as audio of an earlier frame
    has waited for one more frame and at least ``min_ms`` is pending.  The defaults (10 ms both)
    send each client frame of 10 ms or more in its own append the moment it is converted, so
    batching adds no delay to the usual 10-20 ms frames; only smaller frames are gathered until
    10 ms are pending (the session flushes a tail from a short timer when the client pauses).
    Coalescing 20 ms frames into 40 ms appends would halve the events but delay half of the audio
    by a frame, 20 ms (docs/performance.md has the measurements).  Payloads are cut at whole
    samples and never exceed ``max_bytes``.
    """

    def __init__(
        self,
        bytes_per_ms: int,
        target_ms: int = 10,
        max_bytes: int = MAX_APPEND_AUDIO_BYTES,
        min_ms: int = 10,
        sample_bytes: int = 2,
    ) -> None:
        if bytes_per_ms <= 0 or target_ms <= 0 or min_ms <= 0 or sample_bytes <= 0:
            raise ValueError("bytes_per_ms, target_ms, min_ms and sample_bytes must be positive")
        self._bytes_per_ms = bytes_per_ms
        self._sample = sample_bytes
        self._target = target_ms * bytes_per_ms
        self._min = min(min_ms, target_ms) * bytes_per_ms
        self._max = max_bytes - max_bytes % bytes_per_ms
        if self._max < self._target:
            raise ValueError(f"max_bytes {max_bytes} is below the target of {self._target} bytes")
        self._pending = bytearray()

    @property
    def pending_ms(self) -> float:
        """Milliseconds of audio held back, waiting for more or for :meth:`flush`."""
        return len(self._pending) / self._bytes_per_ms

    def add(self, data: bytes) -> list[bytes]:
        """Take one frame of converted audio; return the payloads ready now."""
        waited = len(self._pending) > 0  # an earlier frame's audio is pending
        self._pending += data
        threshold = self._min if waited else self._target
        if len(self._pending) < threshold:
            return []
        ready: list[bytes] = []
        start = 0
        end = len(self._pending)
        while end - start >= self._max:
            ready.append(bytes(self._pending[start : start + self._max]))
            start += self._max
        rest = end - start
        if rest >= threshold:
            # Whole samples only, so a pcm16 sample is never split between two events.
            cut = rest - rest % self._sample
            ready.append(bytes(self._pending[start : start + cut]))
            start += cut
        del self._pending[:start]
        return ready

    def flush(self) -> bytes:
        """Everything pending (possibly ``b""``), regardless of the target."""
        out = bytes(self._pending)
        self._pending.clear()
        return out
