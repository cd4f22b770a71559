"""Property tests for openai_proxy.audio: formats, G.711, streaming conversion, batching."""

from __future__ import annotations

import base64
import io
import json
import struct
import warnings
import wave
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.audio import (
    INPUT_RESAMPLER_QUALITY,
    MAX_APPEND_AUDIO_BYTES,
    RESAMPLER_MAX_LAG_MS,
    SUPPORTED_INPUT_ENCODINGS,
    SUPPORTED_OUTPUT_ENCODINGS,
    AppendBatcher,
    ClientAudioFormat,
    InputConverter,
    OutputConverter,
    UnsupportedAudioFormat,
    alaw_decode,
    alaw_encode,
    bytes_per_ms,
    input_resampler_quality,
    mulaw_decode,
    mulaw_encode,
    parse_input_format,
    parse_output_format,
    upstream_format_for,
    wav_header,
)

audioop: ModuleType | None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop  # removed in Python 3.13; an independent reference where it exists
except ImportError:  # pragma: no cover - depends on the Python version
    audioop = None

# Every conversion runs in well under a millisecond per example; timing is not what is tested.
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PCM24K: dict[str, object] = {"type": "audio/pcm", "rate": 24000}
PCMU: dict[str, object] = {"type": "audio/pcmu"}
PCMA: dict[str, object] = {"type": "audio/pcma"}
UPSTREAM_FORMATS = (PCM24K, PCMU, PCMA)
UPSTREAM_CODECS = {
    "audio/pcm": ("linear16", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}

LINEAR16_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
CLIENT_FORMATS = tuple(ClientAudioFormat("linear16", r) for r in LINEAR16_RATES) + (
    ClientAudioFormat("mulaw", 8000),
    ClientAudioFormat("alaw", 8000),
)


class Path:
    """One conversion path: a direction, a client format and an upstream format."""

    def __init__(self, direction: str, client: ClientAudioFormat, upstream: dict[str, object]) -> None:
        self.direction = direction
        self.client = client
        self.upstream = upstream
        client_codec = (client.encoding, client.sample_rate)
        upstream_codec = UPSTREAM_CODECS[str(upstream["type"])]
        if direction == "input":
            self.source, self.target = client_codec, upstream_codec
        else:
            self.source, self.target = upstream_codec, client_codec

    def __repr__(self) -> str:
        return f"{self.direction} {self.source[0]}@{self.source[1]} -> {self.target[0]}@{self.target[1]}"

    def converter(self) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
        """(feed, finish) of a fresh converter for this path."""
        if self.direction == "input":
            conv = InputConverter(self.client, self.upstream)
            return conv.feed, conv.flush
        out = OutputConverter(self.upstream, self.client)
        return out.feed, out.end_reply

    def convert(self, pieces: list[bytes]) -> bytes:
        feed, finish = self.converter()
        return b"".join(feed(p) for p in pieces) + finish()


PATHS = tuple(
    Path(direction, client, upstream)
    for direction in ("input", "output")
    for client in CLIENT_FORMATS
    for upstream in UPSTREAM_FORMATS
)


def width(encoding: str) -> int:
    return 2 if encoding == "linear16" else 1


def decode(encoding: str, data: bytes) -> np.ndarray:
    if encoding == "linear16":
        return np.frombuffer(data, dtype="<i2").astype(np.int16)
    if encoding == "mulaw":
        return mulaw_decode(data)
    return alaw_decode(data)


def encode(encoding: str, samples: np.ndarray) -> bytes:
    samples = np.asarray(samples, dtype=np.int16)
    if encoding == "linear16":
        return samples.astype("<i2").tobytes()
    if encoding == "mulaw":
        return mulaw_encode(samples)
    return alaw_encode(samples)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def sine(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)


def middle(x: np.ndarray, rate: int, margin_s: float = 0.06) -> np.ndarray:
    m = int(rate * margin_s)
    return x[m : len(x) - m].astype(np.float64)


def rms_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x)) + 1e-12))


def peak_frequency(x: np.ndarray, rate: int) -> tuple[float, float]:
    """(frequency of the largest FFT bin, bin width) of a Hann-windowed signal."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x)), rate / len(x)


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


class ConversionTests(SynchronousTestCase):
    """Streaming conversion, for every path in both directions."""

    def test_paths_cover_every_pair(self) -> None:
        """The table of paths holds every client format against every upstream format, both ways."""
        self.assertEqual(len(PATHS), 2 * len(CLIENT_FORMATS) * len(UPSTREAM_FORMATS))

    @FAST
    @given(
        data=st.binary(max_size=2400), points=st.lists(st.integers(min_value=0, max_value=2400), max_size=12)
    )
    def test_chunking_invariance(self, data: bytes, points: list[int]) -> None:
        """Any split of the input, odd byte splits of linear16 included, gives the same bytes.

        libsoxr in float32 is bit-identical across chunkings, so no tolerance is needed.
        """
        pieces = cut(data, points)
        for path in PATHS:
            self.assertEqual(path.convert(pieces), path.convert([data]), path)

    @FAST
    @given(data=st.binary(max_size=1600), size=st.integers(min_value=1, max_value=400))
    def test_output_is_whole_samples(self, data: bytes, size: int) -> None:
        """Every chunk produced holds whole samples of the target encoding."""
        for path in PATHS:
            feed, finish = path.converter()
            for piece in [*chunks_of(data, size)]:
                self.assertEqual(len(feed(piece)) % width(path.target[0]), 0, path)
            self.assertEqual(len(finish()) % width(path.target[0]), 0, path)

    @FAST
    @given(
        samples=st.integers(min_value=0, max_value=6000),
        chunk_ms=st.integers(min_value=1, max_value=120),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
    )
    def test_duration_preserved(self, samples: int, chunk_ms: int, seed: int) -> None:
        """After the end of the stream the output lasts as long as the input, to one sample; while
        streaming it never runs ahead and never trails by more than RESAMPLER_MAX_LAG_MS."""
        rng = np.random.default_rng(seed)
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, dst_rate) = path.source, path.target
            data = encode(src_enc, rng.integers(-20000, 20000, samples))
            feed, finish = path.converter()
            step = max(1, src_rate * chunk_ms // 1000) * width(src_enc)
            produced = 0
            for i in range(0, len(data), step):
                produced += len(feed(data[i : i + step])) // width(dst_enc)
                expected = min(i + step, len(data)) // width(src_enc) * dst_rate / src_rate
                self.assertLessEqual(produced, expected + 1, path)
                self.assertLessEqual(expected - produced, RESAMPLER_MAX_LAG_MS * dst_rate / 1000, path)
            produced += len(finish()) // width(dst_enc)
            self.assertLessEqual(abs(produced - samples * dst_rate / src_rate), 1, path)

    @FAST
    @given(position=st.floats(min_value=0.0, max_value=1.0))
    def test_sine_keeps_frequency_and_energy(self, position: float) -> None:
        """A tone well inside both bands keeps its frequency (within two FFT bins) and its level
        (within 1 dB; G.711 quantisation noise included).  Well inside means up to 40 % of the
        lower rate, and up to 25 % of it on the quick (cubic) input resampler, which is within
        1 dB to there and rolls off above (docs/audio.md)."""
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, dst_rate) = path.source, path.target
            quick = (
                path.direction == "input"
                and src_rate != dst_rate
                and input_resampler_quality(src_rate, dst_rate) == INPUT_RESAMPLER_QUALITY
            )
            top = (0.25 if quick else 0.4) * min(src_rate, dst_rate)
            frequency = 100 + position * (top - 100)
            tone = sine(frequency, src_rate, 0.5)
            data = encode(src_enc, tone)
            out = decode(dst_enc, path.convert(chunks_of(data, src_rate // 50 * width(src_enc))))
            self.assertLessEqual(abs(len(out) - len(tone) * dst_rate / src_rate), 1, path)
            found, bin_width = peak_frequency(middle(out, dst_rate), dst_rate)
            self.assertLessEqual(abs(found - frequency), 2 * bin_width, (path, frequency))
            loss = rms_db(middle(tone, src_rate)) - rms_db(middle(out, dst_rate))
            self.assertLess(abs(loss), 1.0, (path, frequency))

    @FAST
    @given(level=st.integers(min_value=-32768, max_value=32767))
    def test_steady_level_is_exact(self, level: int) -> None:
        """A constant signal comes out at exactly its level once the filter has settled: the
        resampler has unity gain at DC and conversion back to integers rounds to nearest (and
        clips at full scale) rather than truncating."""
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, _) = path.source, path.target
            data = encode(src_enc, np.full(src_rate // 4, level))
            held = decode(src_enc, data[: width(src_enc)])
            expected = decode(dst_enc, encode(dst_enc, held))[0]
            out = decode(dst_enc, path.convert(chunks_of(data, src_rate // 50 * width(src_enc))))
            settled = out[len(out) // 4 : 3 * len(out) // 4]
            self.assertTrue(np.all(settled == expected), (path, level, np.unique(settled)))

    @FAST
    @given(period_ms=st.integers(min_value=2, max_value=40))
    def test_overshoot_clips_instead_of_wrapping(self, period_ms: int) -> None:
        """A full-scale square wave between 0 and 32767 rings past full scale when resampled; the
        overshoot is clipped, never wrapped round to large negative values."""
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, dst_rate) = path.source, path.target
            if src_enc != "linear16" or dst_enc != "linear16" or src_rate == dst_rate:
                continue
            half = max(1, src_rate * period_ms // 2000)
            square = np.tile(np.r_[np.zeros(half), np.full(half, 32767)], src_rate // (2 * half) // 4 + 1)
            out = decode(dst_enc, path.convert([encode(src_enc, square)]))
            self.assertEqual(out.max(), 32767, path)
            # A wrapped sample would land near -32768.  Ringing below zero is the filter's: up to
            # 29 % of full scale on the minimum-phase input paths (openai_proxy/resample.py).
            self.assertGreater(out.min(), -16384, path)

    @FAST
    @given(position=st.floats(min_value=0.0, max_value=1.0))
    def test_downsampling_removes_tones_above_the_new_band(self, position: float) -> None:
        """A tone between the target's Nyquist frequency and the source's is filtered out (at least
        50 dB down) rather than folded back into the band as an alias."""
        checked = 0
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, dst_rate) = path.source, path.target
            low, high = 0.56 * dst_rate, 0.45 * src_rate
            if src_enc != "linear16" or high <= low:
                continue
            checked += 1
            frequency = low + position * (high - low)
            tone = sine(frequency, src_rate, 0.5)
            out = decode(dst_enc, path.convert(chunks_of(encode(src_enc, tone), src_rate // 50 * 2)))
            level = rms_db(middle(out, dst_rate)) - rms_db(middle(tone, src_rate))
            self.assertLess(level, -50.0, (path, frequency))
        self.assertGreater(checked, 0)

    @FAST
    @given(
        data=st.binary(max_size=2000), points=st.lists(st.integers(min_value=0, max_value=2000), max_size=8)
    )
    def test_same_format_is_a_byte_copy(self, data: bytes, points: list[int]) -> None:
        """linear16@24k against audio/pcm, and G.711 against the same law, pass bytes through
        unchanged (a trailing half sample of linear16 is dropped at the end)."""
        for path in PATHS:
            if path.source != path.target:
                continue
            expected = data[: len(data) - len(data) % width(path.source[0])]
            self.assertEqual(path.convert(cut(data, points)), expected, path)

    @FAST
    @given(data=st.binary(max_size=2000))
    def test_same_rate_transcodes_sample_for_sample(self, data: bytes) -> None:
        """At equal rates (µ-law against A-law, linear16@8k against G.711) conversion is decode
        then encode, sample for sample, with no resampler in between."""
        checked = 0
        for path in PATHS:
            (src_enc, src_rate), (dst_enc, dst_rate) = path.source, path.target
            if src_enc == dst_enc or src_rate != dst_rate:
                continue
            checked += 1
            whole = data[: len(data) - len(data) % width(src_enc)]
            self.assertEqual(path.convert([data]), encode(dst_enc, decode(src_enc, whole)), path)
        self.assertEqual(checked, 8)

    @FAST
    @given(data=st.binary(max_size=1600))
    def test_input_converter_can_be_reused_after_flush(self, data: bytes) -> None:
        """After flush the input converter behaves like a new one."""
        for path in PATHS:
            if path.direction != "input":
                continue
            conv = InputConverter(path.client, path.upstream)
            conv.feed(data + b"\x01\x02\x03")
            conv.flush()
            again = conv.feed(data) + conv.flush()
            self.assertEqual(again, path.convert([data]), path)


class OutputReplyTests(SynchronousTestCase):
    """Reply boundaries of the output converter."""

    @FAST
    @given(first=st.binary(max_size=1200), second=st.binary(max_size=1200), discard=st.booleans())
    def test_each_reply_is_converted_as_if_alone(self, first: bytes, second: bytes, discard: bool) -> None:
        """After end_reply or discard_reply, the next reply comes out exactly as it would from a
        fresh converter: no tail of the previous reply, no half sample, no resampler history."""
        for path in PATHS:
            if path.direction != "output":
                continue
            out = OutputConverter(path.upstream, path.client)
            out.feed(first + b"\x7f")
            if discard:
                out.discard_reply()
            else:
                out.end_reply()
            self.assertEqual(out.feed(second) + out.end_reply(), path.convert([second]), path)

    @FAST
    @given(data=st.binary(max_size=2400), size=st.integers(min_value=1, max_value=500))
    def test_emitted_ms_counts_client_audio(self, data: bytes, size: int) -> None:
        """emitted_ms is the duration of the client audio produced in the current reply."""
        for path in PATHS:
            if path.direction != "output":
                continue
            out = OutputConverter(path.upstream, path.client)
            produced = b"".join(out.feed(piece) for piece in chunks_of(data, size))
            rate = path.client.sample_rate
            self.assertAlmostEqual(out.emitted_ms, len(produced) // width(path.target[0]) * 1000 / rate)
            produced += out.end_reply()
            self.assertEqual(out.emitted_ms, 0.0)
            self.assertLessEqual(
                len(produced) // width(path.target[0]) * 1000 / rate,
                len(data) // width(path.source[0]) * 1000 / path.source[1] + 1000 / rate,
            )

    def test_raw_output_has_no_header(self) -> None:
        """Container none: nothing precedes a reply's audio."""
        for client in CLIENT_FORMATS:
            self.assertEqual(OutputConverter(PCM24K, client).reply_header(), b"")

    def test_wav_header_describes_the_client_format(self) -> None:
        """Container wav: each reply starts with a RIFF/WAVE header of the client's encoding and
        rate, with the sizes marked unknown."""
        tags = {"linear16": 1, "alaw": 6, "mulaw": 7}
        for base in CLIENT_FORMATS:
            client = ClientAudioFormat(base.encoding, base.sample_rate, "wav")
            header = OutputConverter(upstream_format_for(client), client).reply_header()
            self.assertEqual(header, wav_header(client))
            self.assertEqual(header[:4], b"RIFF")
            self.assertEqual(header[8:12], b"WAVE")
            chunks = {}
            offset = 12
            while offset < len(header):
                name, size = (
                    header[offset : offset + 4],
                    struct.unpack("<I", header[offset + 4 : offset + 8])[0],
                )
                chunks[name] = header[offset + 8 : offset + 8 + size] if name != b"data" else size
                offset += 8 + (size if name != b"data" else 0)
            self.assertEqual(offset, len(header), "the data chunk comes last")
            self.assertEqual(chunks[b"data"], 0xFFFFFFFF)
            tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", chunks[b"fmt "][:16])
            w = width(client.encoding)
            self.assertEqual(
                (tag, channels, rate, byte_rate, align, bits),
                (tags[client.encoding], 1, client.sample_rate, client.sample_rate * w, w, 8 * w),
            )
            if client.encoding != "linear16":
                self.assertIn(b"fact", chunks)

    def test_wav_linear16_reads_back_with_the_wave_module(self) -> None:
        """A linear16 WAV reply (header + audio) is readable by the standard library."""
        client = ClientAudioFormat("linear16", 16000, "wav")
        out = OutputConverter(PCM24K, client)
        tone = encode("linear16", sine(440, 24000, 0.2))
        body = out.reply_header() + out.feed(tone) + out.end_reply()
        with wave.open(io.BytesIO(body)) as w:
            self.assertEqual((w.getnchannels(), w.getsampwidth(), w.getframerate()), (1, 2, 16000))
            frames = w.readframes(100000)
        self.assertEqual(len(frames), 2 * 3200)


class G711Tests(SynchronousTestCase):
    """µ-law and A-law codecs."""

    ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)

    def test_matches_audioop(self) -> None:
        """Bit-exact with the standard library's G.711 (where Python still has audioop)."""
        if audioop is None:
            raise self.skipTest("audioop is not available on this Python")
        pcm = self.ALL_SAMPLES.astype("<i2").tobytes()
        codes = bytes(range(256))
        self.assertEqual(mulaw_encode(self.ALL_SAMPLES), audioop.lin2ulaw(pcm, 2))
        self.assertEqual(alaw_encode(self.ALL_SAMPLES), audioop.lin2alaw(pcm, 2))
        self.assertEqual(mulaw_decode(codes).astype("<i2").tobytes(), audioop.ulaw2lin(codes, 2))
        self.assertEqual(alaw_decode(codes).astype("<i2").tobytes(), audioop.alaw2lin(codes, 2))

    @MODEST
    @given(st.lists(st.integers(min_value=-32768, max_value=32767), max_size=200))
    def test_mulaw_round_trip_within_quantisation(self, values: list[int]) -> None:
        """µ-law: error at most half a step of the sample's segment, (|x| + 132) / 32, plus the
        4 of the 14-bit input; at full scale that covers clipping to ±32124."""
        x = np.array(values, dtype=np.int16)
        y = mulaw_decode(mulaw_encode(x)).astype(np.int64)
        bound = (np.abs(x.astype(np.int64)) + 132) / 32 + 4
        self.assertTrue(np.all(np.abs(y - x) <= bound), (x, y))

    @MODEST
    @given(st.lists(st.integers(min_value=-32768, max_value=32767), max_size=200))
    def test_alaw_round_trip_within_quantisation(self, values: list[int]) -> None:
        """A-law: error at most half a step, max(8, |x| / 32)."""
        x = np.array(values, dtype=np.int16)
        y = alaw_decode(alaw_encode(x)).astype(np.int64)
        bound = np.maximum(8, np.abs(x.astype(np.int64)) / 32)
        self.assertTrue(np.all(np.abs(y - x) <= bound), (x, y))

    def test_whole_range_round_trip(self) -> None:
        """The quantisation bounds hold for every int16 value, not only sampled ones."""
        x = self.ALL_SAMPLES.astype(np.int64)
        mu = mulaw_decode(mulaw_encode(self.ALL_SAMPLES)).astype(np.int64)
        a = alaw_decode(alaw_encode(self.ALL_SAMPLES)).astype(np.int64)
        self.assertTrue(np.all(np.abs(mu - x) <= (np.abs(x) + 132) / 32 + 4))
        self.assertTrue(np.all(np.abs(a - x) <= np.maximum(8, np.abs(x) / 32)))

    def test_codes_survive_decode_encode(self) -> None:
        """Every code decodes to a value that encodes back to it (µ-law's two zeros become one)."""
        codes = np.arange(256, dtype=np.uint8)
        a = np.frombuffer(alaw_encode(alaw_decode(codes.tobytes())), dtype=np.uint8)
        self.assertTrue(np.array_equal(a, codes))
        mu = np.frombuffer(mulaw_encode(mulaw_decode(codes.tobytes())), dtype=np.uint8)
        expected = codes.copy()
        expected[0x7F] = 0xFF  # "negative zero" decodes to 0, which encodes as positive zero
        self.assertTrue(np.array_equal(mu, expected))

    def test_decoding_is_monotonic_in_level(self) -> None:
        """Larger magnitudes encode to larger decoded magnitudes: the laws are monotonic."""
        for enc, dec in ((mulaw_encode, mulaw_decode), (alaw_encode, alaw_decode)):
            y = dec(enc(self.ALL_SAMPLES)).astype(np.int64)
            self.assertTrue(np.all(np.diff(y) >= 0))


class ParseFormatTests(SynchronousTestCase):
    """Settings.audio.input / audio.output validation."""

    def assertRefused(
        self, parse: Callable[[object], ClientAudioFormat], obj: object, field: str, *mentions: str
    ) -> None:
        with self.assertRaises(UnsupportedAudioFormat) as caught:
            parse(obj)
        error = caught.exception
        self.assertIsInstance(error, ValueError)
        self.assertEqual(error.field, field)
        self.assertIn(field, error.description)
        self.assertEqual(str(error), error.description)
        for text in mentions:
            self.assertIn(text, error.description)

    def test_defaults(self) -> None:
        """No declaration means linear16 at 24 kHz, raw."""
        for obj in (None, {}, {"encoding": None, "sample_rate": None}):
            self.assertEqual(parse_input_format(obj), ClientAudioFormat("linear16", 24000))
            self.assertEqual(parse_output_format(obj), ClientAudioFormat("linear16", 24000, "none"))

    def test_g711_defaults_to_8khz(self) -> None:
        """G.711 without a rate is 8 kHz."""
        for encoding in ("mulaw", "alaw"):
            self.assertEqual(parse_input_format({"encoding": encoding}), ClientAudioFormat(encoding, 8000))
            self.assertEqual(parse_output_format({"encoding": encoding}), ClientAudioFormat(encoding, 8000))

    @MODEST
    @given(
        rate=st.integers(min_value=8000, max_value=48000),
        container=st.sampled_from(["none", "wav", None]),
        bitrate=st.one_of(st.none(), st.integers(), st.text(max_size=5)),
    )
    def test_linear16_any_rate_in_range(self, rate: int, container: str | None, bitrate: object) -> None:
        """linear16 is accepted at every integer rate from 8000 to 48000; bitrate is ignored."""
        self.assertEqual(
            parse_input_format({"encoding": "linear16", "sample_rate": rate}),
            ClientAudioFormat("linear16", rate),
        )
        out = parse_output_format(
            {"encoding": "linear16", "sample_rate": rate, "container": container, "bitrate": bitrate}
        )
        self.assertEqual(out, ClientAudioFormat("linear16", rate, container or "none"))

    def test_integral_float_rate_is_accepted(self) -> None:
        """16000.0 (as some JSON encoders write it) is the integer 16000."""
        self.assertEqual(
            parse_input_format({"encoding": "linear16", "sample_rate": 16000.0}),
            ClientAudioFormat("linear16", 16000),
        )

    @MODEST
    @given(rate=st.one_of(st.integers(max_value=7999), st.integers(min_value=48001)))
    def test_rates_out_of_range_are_refused(self, rate: int) -> None:
        """Rates outside 8000..48000 name the field and the bad value."""
        self.assertRefused(
            parse_input_format,
            {"encoding": "linear16", "sample_rate": rate},
            "audio.input.sample_rate",
            str(rate),
            "8000",
            "48000",
        )
        self.assertRefused(parse_output_format, {"sample_rate": rate}, "audio.output.sample_rate", str(rate))

    @MODEST
    @given(
        rate=st.integers(min_value=1, max_value=200000).filter(lambda r: r != 8000),
        encoding=st.sampled_from(["mulaw", "alaw"]),
    )
    def test_g711_only_at_8khz(self, rate: int, encoding: str) -> None:
        """mulaw/alaw at any rate but 8000 are refused, naming the field."""
        self.assertRefused(
            parse_input_format,
            {"encoding": encoding, "sample_rate": rate},
            "audio.input.sample_rate",
            str(rate),
            "8000",
        )
        self.assertRefused(
            parse_output_format,
            {"encoding": encoding, "sample_rate": rate},
            "audio.output.sample_rate",
            str(rate),
            "8000",
        )

    def test_unsupported_encodings(self) -> None:
        """Compressed and other encodings are refused, with the supported list."""
        for encoding in (
            "linear32",
            "flac",
            "opus",
            "ogg-opus",
            "speex",
            "amr-nb",
            "amr-wb",
            "g729",
            "LINEAR16",
        ):
            self.assertRefused(
                parse_input_format,
                {"encoding": encoding, "sample_rate": 16000},
                "audio.input.encoding",
                repr(encoding),
                ", ".join(SUPPORTED_INPUT_ENCODINGS),
            )
        for encoding in ("mp3", "opus", "flac", "aac"):
            self.assertRefused(
                parse_output_format,
                {"encoding": encoding, "sample_rate": 24000},
                "audio.output.encoding",
                repr(encoding),
                ", ".join(SUPPORTED_OUTPUT_ENCODINGS),
            )

    def test_ogg_container_refused(self) -> None:
        """Only none and wav containers exist here."""
        for container in ("ogg", "mp4", "WAV"):
            self.assertRefused(
                parse_output_format,
                {"encoding": "linear16", "sample_rate": 24000, "container": container},
                "audio.output.container",
                repr(container),
                "none, wav",
            )

    NOT_STRINGS = st.one_of(
        st.integers(),
        st.floats(allow_nan=False),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
    NOT_RATES = st.one_of(
        st.text(max_size=6),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )
    NOT_OBJECTS = st.one_of(
        st.text(max_size=6), st.integers(), st.booleans(), st.lists(st.integers(), max_size=2)
    )

    @MODEST
    @given(value=NOT_STRINGS)
    def test_wrong_type_encoding(self, value: object) -> None:
        """A non-string encoding names the encoding field."""
        self.assertRefused(
            parse_input_format, {"encoding": value, "sample_rate": 16000}, "audio.input.encoding"
        )
        self.assertRefused(parse_output_format, {"encoding": value}, "audio.output.encoding")

    @MODEST
    @given(value=NOT_RATES)
    def test_wrong_type_sample_rate(self, value: object) -> None:
        """A sample rate that is not an integer names the sample_rate field."""
        self.assertRefused(
            parse_input_format, {"encoding": "linear16", "sample_rate": value}, "audio.input.sample_rate"
        )
        self.assertRefused(
            parse_output_format, {"encoding": "mulaw", "sample_rate": value}, "audio.output.sample_rate"
        )

    @MODEST
    @given(value=NOT_STRINGS)
    def test_wrong_type_container(self, value: object) -> None:
        """A non-string container names the container field."""
        self.assertRefused(parse_output_format, {"container": value}, "audio.output.container")

    @MODEST
    @given(value=NOT_OBJECTS)
    def test_section_not_an_object(self, value: object) -> None:
        """audio.input / audio.output that are not objects are refused as a whole."""
        self.assertRefused(parse_input_format, value, "audio.input")
        self.assertRefused(parse_output_format, value, "audio.output")


class UpstreamFormatTests(SynchronousTestCase):
    """The GA formats chosen for a client, and their byte rates."""

    def test_g711_passes_through_everything_else_is_pcm24k(self) -> None:
        """8 kHz G.711 stays in its law; linear16 at any rate goes through pcm16 24 kHz."""
        self.assertEqual(upstream_format_for(ClientAudioFormat("mulaw", 8000)), {"type": "audio/pcmu"})
        self.assertEqual(upstream_format_for(ClientAudioFormat("alaw", 8000, "wav")), {"type": "audio/pcma"})
        for rate in (8000, 16000, 24000, 44100, 48000):
            self.assertEqual(upstream_format_for(ClientAudioFormat("linear16", rate)), PCM24K)

    def test_formats_validate_against_the_openai_types(self) -> None:
        """Each chosen format is one of the GA SDK's audio format models, with no unknown field."""
        try:
            from openai.types.realtime.realtime_audio_formats import AudioPCM, AudioPCMA, AudioPCMU
        except ImportError:  # pragma: no cover - the openai package is a test extra
            raise self.skipTest("openai is not installed") from None
        models: dict[str, Any] = {"audio/pcm": AudioPCM, "audio/pcmu": AudioPCMU, "audio/pcma": AudioPCMA}
        for client in CLIENT_FORMATS:
            fmt = upstream_format_for(client)
            model = models[str(fmt["type"])]
            self.assertLessEqual(set(fmt), set(model.model_fields))
            self.assertEqual(model.model_validate(fmt).model_dump(exclude_none=True), fmt)

    def test_bytes_per_ms(self) -> None:
        """48 bytes per ms for pcm16 24 kHz, 8 for G.711; unknown formats are an error."""
        self.assertEqual(bytes_per_ms(PCM24K), 48)
        self.assertEqual(bytes_per_ms({"type": "audio/pcm"}), 48)
        self.assertEqual(bytes_per_ms(PCMU), 8)
        self.assertEqual(bytes_per_ms(PCMA), 8)
        self.assertRaises(ValueError, bytes_per_ms, {"type": "audio/pcm", "rate": 16000})
        self.assertRaises(ValueError, bytes_per_ms, {"type": "audio/opus"})
        self.assertRaises(
            ValueError, InputConverter, ClientAudioFormat("linear16", 16000), {"type": "audio/wav"}
        )


class AppendBatcherTests(SynchronousTestCase):
    """Batching of converted audio into input_audio_buffer.append payloads."""

    @MODEST
    @given(
        data=st.data(),
        per_ms=st.sampled_from([48, 8]),
        target_ms=st.integers(min_value=1, max_value=60),
        max_factor=st.integers(min_value=1, max_value=6),
        extra=st.integers(min_value=0, max_value=47),
    )
    def test_batches(
        self, data: st.DataObject, per_ms: int, target_ms: int, max_factor: int, extra: int
    ) -> None:
        """Concatenated output equals the input; every payload from add is at least the minimum and
        at most max_bytes, cut at whole samples; pending_ms tracks what is held back, and audio of
        an earlier frame is only held while less than the minimum is pending."""
        sample = 2 if per_ms == 48 else 1
        max_bytes = target_ms * per_ms * max_factor + extra
        batcher = AppendBatcher(per_ms, target_ms=target_ms, max_bytes=max_bytes,
                                sample_bytes=sample)
        sizes = data.draw(
            st.lists(st.integers(min_value=0, max_value=target_ms * per_ms * 8 // sample), max_size=30)
        )
        sent: list[bytes] = []
        given_in = b""
        for i, size in enumerate(sizes):
            chunk = bytes((i + j) % 251 for j in range(size * sample))
            given_in += chunk
            for payload in batcher.add(chunk):
                self.assertGreaterEqual(len(payload), min(10, target_ms) * per_ms)
                self.assertLessEqual(len(payload), max_bytes)
                self.assertEqual(len(payload) % sample, 0)
                sent.append(payload)
            held = len(given_in) - sum(map(len, sent))
            self.assertEqual(batcher.pending_ms, held / per_ms)
            self.assertLess(held, target_ms * per_ms)
            if held > len(chunk):
                self.assertLess(held, min(10, target_ms) * per_ms)
        rest = batcher.flush()
        self.assertLessEqual(len(rest), max_bytes)
        self.assertEqual(b"".join(sent) + rest, given_in)
        self.assertEqual(batcher.pending_ms, 0)
        self.assertEqual(batcher.flush(), b"")

    def test_default_limit_keeps_events_under_15_mib(self) -> None:
        """A full-size payload, base64-encoded in its JSON event, stays within the API's 15 MiB."""
        batcher = AppendBatcher(48)
        payloads = batcher.add(bytes(MAX_APPEND_AUDIO_BYTES * 2 + 240))
        self.assertEqual([len(p) for p in payloads], [MAX_APPEND_AUDIO_BYTES] * 2)
        event = {
            "type": "input_audio_buffer.append",
            "event_id": "event_" + "x" * 64,
            "audio": base64.b64encode(payloads[0]).decode(),
        }
        self.assertLessEqual(len(json.dumps(event)), 15 * 1024 * 1024)
        # The 5 ms left over is below the default 10 ms target: it waits for more or for flush.
        self.assertEqual(len(batcher.flush()), 240)

    def test_default_sends_each_frame_at_once(self) -> None:
        """With the defaults a frame of 10 ms or more goes out whole, at once; smaller ones are
        gathered until 10 ms are pending."""
        batcher = AppendBatcher(48)
        self.assertEqual([len(p) for p in batcher.add(bytes(960))], [960])
        self.assertEqual([len(p) for p in batcher.add(bytes(480))], [480])
        self.assertEqual(batcher.add(bytes(240)), [])
        self.assertEqual(batcher.pending_ms, 5.0)
        self.assertEqual([len(p) for p in batcher.add(bytes(240))], [480])
        self.assertEqual(batcher.pending_ms, 0.0)

    def test_target_above_limit_is_an_error(self) -> None:
        """A target that can never fit in max_bytes is refused at construction."""
        self.assertRaises(ValueError, AppendBatcher, 48, target_ms=40, max_bytes=40 * 48 - 1)
        self.assertRaises(ValueError, AppendBatcher, 0)
