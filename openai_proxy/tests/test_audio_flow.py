"""
Audio end to end: a Deepgram v1 client ↔ the daemon ↔ the strict simulator, over loopback sockets.

Every test streams audio in the client's declared format and checks, by length and spectrum (numpy
FFT), what reached the upstream (the simulator's ``received`` appends) and what came back to the
client.  User speech is the simulator's word code (:mod:`openai_proxy.simulator.voice`): a steady
tone per word, synthesized here at the client's own rate, so the simulated transcript proves the
tones survived the trip.  The reference for the agent's audio is what the simulator itself sent
(its events are recorded), never a copy of the daemon's converters.
"""

from __future__ import annotations

import base64
import copy
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from openai_proxy import errors
from openai_proxy.audio import MAX_APPEND_AUDIO_BYTES, RESAMPLER_MAX_LAG_MS
from openai_proxy.config import Limits
from openai_proxy.simulator import voice
from openai_proxy.tests.helpers import Daemon, TestClient, connect_client, default_settings, wait

Samples = npt.NDArray[np.int16]

PCM24K: dict[str, Any] = {"type": "audio/pcm", "rate": 24000}
PCMU: dict[str, Any] = {"type": "audio/pcmu"}
PCMA: dict[str, Any] = {"type": "audio/pcma"}
G711_FORMATS = {"mulaw": PCMU, "alaw": PCMA}
FRAME_MS = 20
#: Audio the input resampler may still hold when a client stops sending: between 16 or 48 kHz and
#: 24 kHz its lag oscillates between about 4 and 42 ms with 20 ms frames (docs/audio.md).
RESAMPLER_LAG_SLACK_MS = 45.0
#: A stretch of user speech: 20 ms frames at least this loud are a word's tone, not silence.
VOICED_RMS = 1000.0
#: Tone frequencies must come back this close (the word code's slots are 50 Hz apart).
FREQUENCY_TOLERANCE_HZ = 3.0


# -- signals ---------------------------------------------------------------------------------------


def speech(text: str, rate: int, *, word_ms: int = 200, gap_ms: int = 60) -> Samples:
    """The simulator's word code (a tone per word) synthesized at ``rate``, as int16 samples."""
    words = text.split()
    n_word, n_gap = rate * word_ms // 1000, rate * gap_ms // 1000
    t = np.arange(n_word) / rate
    ramp = rate // 100
    envelope = np.ones(n_word)
    envelope[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
    envelope[n_word - ramp :] = np.linspace(1.0, 0.0, ramp, endpoint=False)
    pieces: list[npt.NDArray[np.float64]] = []
    for index, word in enumerate(words):
        if index:
            pieces.append(np.zeros(n_gap))
        pieces.append(np.sin(2 * np.pi * voice.word_frequency(word) * t) * envelope * 0.3 * 32767)
    return np.round(np.concatenate(pieces)).astype(np.int16)


def quiet(ms: int, rate: int) -> Samples:
    return np.zeros(rate * ms // 1000, dtype=np.int16)


def encode(encoding: str, samples: Samples) -> bytes:
    """Client bytes; G.711 through the simulator's own tables, independent of the daemon's."""
    if encoding in G711_FORMATS:
        return voice.encode(G711_FORMATS[encoding], samples)
    return samples.astype("<i2").tobytes()


def decode(encoding: str, data: bytes) -> Samples:
    if encoding in G711_FORMATS:
        return voice.decode(G711_FORMATS[encoding], data)
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def width(encoding: str) -> int:
    return 2 if encoding == "linear16" else 1


def frame_rms(samples: Samples, rate: int) -> npt.NDArray[np.float64]:
    frame = rate * FRAME_MS // 1000
    usable = len(samples) - len(samples) % frame
    frames = samples[:usable].astype(np.float64).reshape(-1, frame)
    return np.sqrt(np.mean(frames * frames, axis=1))


def voiced_stretches(samples: Samples, rate: int) -> list[Samples]:
    """The steady middle of every voiced stretch (its first and last frame hold the fades)."""
    frame = rate * FRAME_MS // 1000
    voiced = frame_rms(samples, rate) >= VOICED_RMS
    stretches: list[Samples] = []
    start: int | None = None
    for index, is_voiced in enumerate([*voiced, False]):
        if is_voiced and start is None:
            start = index
        elif not is_voiced and start is not None:
            if index - start > 3:
                stretches.append(samples[(start + 1) * frame : (index - 1) * frame])
            start = None
    return stretches


def dominant_frequency(samples: Samples, rate: int) -> float:
    """Peak of the Hann-windowed spectrum, zero-padded to 0.5 Hz bins, parabolically refined."""
    signal = samples.astype(np.float64) * np.hanning(len(samples))
    n = max(len(signal), 2 * rate)
    spectrum = np.abs(np.fft.rfft(signal, n=n))
    peak = int(np.argmax(spectrum[1:-1])) + 1
    left, centre, right = spectrum[peak - 1 : peak + 2]
    denominator = left - 2 * centre + right
    offset = 0.5 * (left - right) / denominator if denominator else 0.0
    return float((peak + offset) * rate / n)


def rms(samples: Samples) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def spectrum_correlation(a: Samples, rate_a: int, b: Samples, rate_b: int, up_to_hz: float) -> float:
    """Correlation of two magnitude spectra on a common 1/T Hz grid below ``up_to_hz``."""
    seconds = math.ceil(max(len(a) / rate_a, len(b) / rate_b)) + 1
    bins = int(up_to_hz * seconds)
    spectra = [
        np.abs(np.fft.rfft(x.astype(np.float64), n=rate * seconds))[:bins]
        for x, rate in ((a, rate_a), (b, rate_b))
    ]
    return float(np.corrcoef(spectra[0], spectra[1])[0, 1])


# -- the session around the audio ---------------------------------------------------------------


def audio_settings(
    input_encoding: str,
    input_rate: int,
    output_encoding: str,
    output_rate: int,
    container: str = "none",
) -> dict[str, Any]:
    """Settings with the given audio formats and no functions (so every turn is a spoken reply)."""
    settings = copy.deepcopy(default_settings())
    settings["audio"] = {
        "input": {"encoding": input_encoding, "sample_rate": input_rate},
        "output": {"encoding": output_encoding, "sample_rate": output_rate, "container": container},
    }
    del settings["agent"]["think"]["functions"]
    return settings


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def frame_bytes(encoding: str, rate: int) -> int:
    return rate * FRAME_MS // 1000 * width(encoding)


@defer.inlineCallbacks
def stream(client: TestClient, frames: list[bytes], interval: float) -> Any:
    """Send binary frames, ``interval`` seconds apart (0: all at once)."""
    for frame in frames:
        client.sendMessage(frame, isBinary=True)
        if interval:
            yield wait(interval)


def appends(daemon: Daemon) -> list[bytes]:
    """The audio of every ``input_audio_buffer.append`` the simulator received, in order."""
    return [
        base64.b64decode(event["audio"])
        for event in daemon.upstream_events()
        if event["type"] == "input_audio_buffer.append"
    ]


def session_update(daemon: Daemon) -> dict[str, Any]:
    [update] = [e for e in daemon.upstream_events() if e["type"] == "session.update"]
    return update["session"]


def kinds(client: TestClient) -> list[str]:
    """The client's frames in arrival order: message types, and ``audio`` for binary frames."""
    return ["audio" if isinstance(f, bytes) else f["type"] for f in client.frames]


def replies(client: TestClient) -> list[bytes]:
    """Each reply's binary audio: the frames after one ``AgentStartedSpeaking`` and before the next
    ``AgentAudioDone``, ``UserStartedSpeaking`` or ``AgentStartedSpeaking``."""
    out: list[bytes] = []
    current: bytearray | None = None
    for frame in client.frames:
        if isinstance(frame, bytes):
            if current is not None:
                current += frame
            continue
        if frame["type"] == "AgentStartedSpeaking":
            if current is not None:
                out.append(bytes(current))
            current = bytearray()
        elif frame["type"] in ("AgentAudioDone", "UserStartedSpeaking") and current is not None:
            out.append(bytes(current))
            current = None
    if current is not None:
        out.append(bytes(current))
    return out


class SimulatorRecorder:
    """Every event the simulated session sends from now on (the daemon forwards none of them raw)."""

    def __init__(self, daemon: Daemon) -> None:
        assert daemon.simulator is not None
        [protocol] = daemon.simulator.sessions
        assert protocol.session is not None
        self.session = protocol.session
        self.events: list[dict[str, Any]] = []
        emit: Callable[[dict[str, Any]], None] = self.session._emit

        def record(event: dict[str, Any]) -> None:
            self.events.append(event)
            emit(event)

        self.session._emit = record

    def of_type(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def item_audio(self, item_id: str) -> bytes:
        """The agent audio the simulator sent for one assistant item."""
        return b"".join(
            base64.b64decode(e["delta"])
            for e in self.of_type("response.output_audio.delta")
            if e["item_id"] == item_id
        )

    def reply_items(self) -> list[str]:
        """Assistant audio items, in the order the simulator started them."""
        ids: list[str] = []
        for event in self.of_type("response.output_audio.delta"):
            if event["item_id"] not in ids:
                ids.append(event["item_id"])
        return ids


class _AudioFlowTestCase(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def start(self, **config: Any) -> Any:
        config.setdefault("limits", Limits(handshake_timeout=5.0, ping_interval=0))
        self.daemon = Daemon()
        yield self.daemon.start(**config)
        self.addCleanup(self.daemon.stop)
        return self.daemon

    @defer.inlineCallbacks
    def connect(self) -> Any:
        client = yield connect_client(self.daemon.url)
        self.addCleanup(self._close, client)
        yield client.expect("Welcome")
        return client

    @defer.inlineCallbacks
    def configured_client(self, settings: dict[str, Any]) -> Any:
        client = yield self.connect()
        client.send_json(settings)
        yield client.expect("SettingsApplied")
        self.recorder = SimulatorRecorder(self.daemon)
        return client

    @defer.inlineCallbacks
    def _close(self, client: TestClient) -> Any:
        if getattr(client.transport, "connected", False):
            client.dropConnection(abort=True)
        yield wait(0.01)

    @defer.inlineCallbacks
    def settle(self, seconds: float = 0.15) -> Any:
        """Wait until the simulator has received nothing new for ``seconds``."""
        assert self.daemon.simulator is not None
        count = -1
        while count != len(self.daemon.simulator.received):
            count = len(self.daemon.simulator.received)
            yield wait(seconds)

    @defer.inlineCallbacks
    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> Any:
        """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            yield wait(0.05)
        self.fail("the condition never held")

    def assertClose(self, first: float, second: float, delta: float, msg: str | None = None) -> None:
        """``|first - second| <= delta`` (trial's assertAlmostEqual has no ``delta``)."""
        if not abs(first - second) <= delta:
            self.fail(msg or f"{first!r} != {second!r} within {delta!r}")

    def assertNoErrors(self, client: TestClient) -> None:
        problems = [m for m in client.messages if m["type"] in ("Error", "Warning")]
        self.assertEqual(problems, [])

    def assertWords(self, samples: Samples, rate: int, text: str) -> None:
        """``samples`` hold exactly the tones of ``text``, each at its frequency and level."""
        stretches = voiced_stretches(samples, rate)
        words = text.split()
        self.assertEqual(len(stretches), len(words), f"voiced stretches for {text!r}")
        for word, stretch in zip(words, stretches, strict=True):
            frequency = dominant_frequency(stretch, rate)
            self.assertLess(
                abs(frequency - voice.word_frequency(word)),
                FREQUENCY_TOLERANCE_HZ,
                f"{word!r}: {frequency:.1f} Hz",
            )
            # A steady tone at 0.3 of full scale; the resampler's passband is flat.
            self.assertClose(rms(stretch) / (0.3 * 32767 / math.sqrt(2)), 1.0, delta=0.03)

    def assertReplyMatches(
        self,
        client_audio: bytes,
        encoding: str,
        rate: int,
        upstream_audio: bytes,
        upstream_format: dict[str, Any],
    ) -> None:
        """The client's reply audio is the upstream's, converted: same duration, same spectrum."""
        self.assertEqual(len(client_audio) % width(encoding), 0)
        got = decode(encoding, client_audio)
        reference = voice.decode(upstream_format, upstream_audio)
        reference_rate = voice.format_rate(upstream_format)
        # Each reply is drained at its end, so no audio is lost to the resampler (one sample).
        self.assertClose(len(got) / rate, len(reference) / reference_rate, delta=1.5 / rate)
        self.assertClose(
            dominant_frequency(got, rate), dominant_frequency(reference, reference_rate), delta=0.5
        )
        # Below the lower Nyquist frequency the spectra are the same; G.711 only adds its
        # quantisation noise.
        band = 0.45 * min(rate, reference_rate)
        self.assertGreater(spectrum_correlation(got, rate, reference, reference_rate, band), 0.999)
        self.assertClose(rms(got) / rms(reference), 1.0, delta=0.03)

    @defer.inlineCallbacks
    def spoken_turn(
        self,
        client: TestClient,
        encoding: str,
        rate: int,
        text: str,
        *,
        lead_ms: int = 200,
        tail_ms: int = 800,
        interval: float = 0.005,
    ) -> Any:
        """Stream ``lead_ms`` of silence, ``text`` as speech, then ``tail_ms`` of silence."""
        samples = np.concatenate([quiet(lead_ms, rate), speech(text, rate), quiet(tail_ms, rate)])
        data = encode(encoding, samples)
        yield stream(client, split(data, frame_bytes(encoding, rate)), interval)
        return data

    @defer.inlineCallbacks
    def spoken_exchange(
        self,
        given: tuple[str, int],
        wanted: tuple[str, int],
        upstream: tuple[dict[str, Any], dict[str, Any]],
        text: str,
    ) -> Any:
        """
        A session with input format ``given`` and output format ``wanted`` (encoding, rate), whose
        ``session.update`` must ask for the ``upstream`` (input, output) formats; the client says
        ``text`` and the whole reply comes back.  Returns the client, the bytes it sent and the
        reply's audio as the client got it and as the simulator sent it.
        """
        yield self.start()
        client = yield self.configured_client(audio_settings(*given, *wanted))
        session = session_update(self.daemon)
        self.assertEqual(session["audio"]["input"]["format"], upstream[0])
        self.assertEqual(session["audio"]["output"]["format"], upstream[1])
        sent = yield self.spoken_turn(client, *given, text)
        user = yield client.wait_for("ConversationText", role="user")
        self.assertEqual(user["content"], text)
        yield client.wait_for("AgentAudioDone")
        assistant = yield client.wait_for("ConversationText", role="assistant")
        self.assertEqual(assistant["content"], f"You said: {text}")
        yield self.settle()
        self.assertNoErrors(client)
        [item_id] = self.recorder.reply_items()
        [reply] = replies(client)
        return client, sent, reply, self.recorder.item_audio(item_id)

    def assertUpstreamSpeech(self, sent: bytes, client_rate: int, text: str) -> None:
        """The appends hold pcm16 24 kHz as long as ``sent`` (less the resampler's lag), with
        every word's tone where it belongs."""
        upstream = b"".join(appends(self.daemon))
        self.assertEqual(len(upstream) % 2, 0)
        samples = voice.decode(PCM24K, upstream)
        lag_ms = len(sent) / 2 / client_rate * 1000 - len(samples) / 24
        self.assertGreaterEqual(lag_ms, 0.0)
        self.assertLessEqual(lag_ms, RESAMPLER_LAG_SLACK_MS)
        self.assertWords(samples, 24000, text)


class Linear16Tests(_AudioFlowTestCase):
    @defer.inlineCallbacks
    def test_16k_in_and_out(self) -> Any:
        client, sent, reply, upstream_reply = yield self.spoken_exchange(
            ("linear16", 16000), ("linear16", 16000), (PCM24K, PCM24K), "hello what time"
        )
        self.assertUpstreamSpeech(sent, 16000, "hello what time")
        end = yield client.wait_for("UtteranceEnd")
        started = yield client.wait_for("AgentStartedSpeaking")
        # The speech sits at the same audio time upstream: 200 ms lead + 720 ms of words + the
        # simulator's 500 ms of silence, to its 20 ms VAD frame.
        self.assertClose(end["last_word_end"], 1.42, delta=0.025)
        self.assertEqual(end["channel"], [0, 1])

        # The client: the order of the turn, then the reply at 16 kHz.
        order = kinds(client)
        self.assertLess(order.index("UserStartedSpeaking"), order.index("UtteranceEnd"))
        self.assertLess(order.index("UtteranceEnd"), order.index("ConversationText"))
        self.assertLess(order.index("UtteranceEnd"), order.index("AgentStartedSpeaking"))
        first_audio = order.index("audio")
        last_audio = len(order) - 1 - order[::-1].index("audio")
        self.assertLess(order.index("AgentStartedSpeaking"), first_audio)
        self.assertEqual(order[last_audio + 1], "AgentAudioDone")
        self.assertEqual(order.count("AgentAudioDone"), 1)
        texts = [m for m in client.messages if m["type"] == "ConversationText"]
        self.assertEqual([t["role"] for t in texts].count("assistant"), 1)
        self.assertReplyMatches(reply, "linear16", 16000, upstream_reply, PCM24K)

        # Latencies are measured from the end of the user's turn (speech_stopped).
        for key in ("total_latency", "tts_latency", "ttt_latency"):
            self.assertIsInstance(started[key], float)
            self.assertGreaterEqual(started[key], 0.0)
        self.assertClose(
            started["total_latency"], started["tts_latency"] + started["ttt_latency"], delta=2e-4
        )

    @defer.inlineCallbacks
    def test_appends_follow_frames_and_are_bounded(self) -> Any:
        yield self.start()
        client = yield self.configured_client(audio_settings("linear16", 16000, "linear16", 16000))
        # Real-time pace: one 20 ms frame every 20 ms.
        data = yield self.spoken_turn(
            client, "linear16", 16000, "yes", lead_ms=300, tail_ms=700, interval=FRAME_MS / 1000
        )
        frames = -(-len(data) // frame_bytes("linear16", 16000))
        yield client.wait_for("AgentAudioDone")
        yield self.settle()
        payloads = appends(self.daemon)
        durations = [len(p) / 48 for p in payloads]  # ms of pcm16 at 24 kHz
        # Each frame's audio goes upstream as soon as it is converted: one append per frame, none
        # waits for the next frame (the first may be a few samples short, the resampler's lag).
        self.assertEqual(len(payloads), frames)
        off = [(n, round(ms, 3)) for n, ms in enumerate(durations[:-1]) if abs(ms - FRAME_MS) > 0.25]
        self.assertEqual(off, [], f"appends not of one frame (index, ms) of {len(payloads)}")
        self.assertEqual([len(p) % 2 for p in payloads], [0] * len(payloads))
        self.assertLessEqual(max(len(p) for p in payloads), MAX_APPEND_AUDIO_BYTES)
        self.assertNoErrors(client)

    @defer.inlineCallbacks
    def test_a_frame_above_the_append_limit_is_split(self) -> Any:
        # 8 MiB of 8 kHz linear16 becomes 24 MiB at 24 kHz: more than one 15 MiB event can carry.
        big = 8 * 1024 * 1024
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0, max_message_bytes=big + 1024))
        client = yield self.configured_client(audio_settings("linear16", 8000, "linear16", 24000))
        client.sendMessage(bytes(big), isBinary=True)
        expected_ms = big / 2 / 8
        yield self.wait_until(
            lambda: sum(len(p) for p in appends(self.daemon)) / 48 >= expected_ms - RESAMPLER_MAX_LAG_MS
        )
        yield self.settle()
        payloads = appends(self.daemon)
        self.assertGreaterEqual(len(payloads), 3)
        self.assertLessEqual(max(len(p) for p in payloads), MAX_APPEND_AUDIO_BYTES)
        total_ms = sum(len(p) for p in payloads) / 48
        self.assertClose(total_ms, expected_ms, delta=RESAMPLER_MAX_LAG_MS)
        self.assertNoErrors(client)


class G711Tests(_AudioFlowTestCase):
    @defer.inlineCallbacks
    def test_mulaw_8k_passes_through_both_ways(self) -> Any:
        _, sent, reply, upstream_reply = yield self.spoken_exchange(
            ("mulaw", 8000), ("mulaw", 8000), (PCMU, PCMU), "yes please"
        )
        # Passthrough: the upstream got the client's bytes, all of them, in order.
        self.assertEqual(b"".join(appends(self.daemon)), sent)
        # And the client got the simulator's µ-law bytes unchanged.
        self.assertEqual(reply, upstream_reply)
        self.assertReplyMatches(reply, "mulaw", 8000, upstream_reply, PCMU)

    @defer.inlineCallbacks
    def test_linear16_48k_in_mulaw_out(self) -> Any:
        _, sent, reply, upstream_reply = yield self.spoken_exchange(
            ("linear16", 48000), ("mulaw", 8000), (PCM24K, PCMU), "tell me a joke"
        )
        self.assertUpstreamSpeech(sent, 48000, "tell me a joke")
        self.assertEqual(reply, upstream_reply)

    @defer.inlineCallbacks
    def test_alaw_8k_in_linear16_24k_out(self) -> Any:
        _, sent, reply, upstream_reply = yield self.spoken_exchange(
            ("alaw", 8000), ("linear16", 24000), (PCMA, PCM24K), "what is the time"
        )
        self.assertEqual(b"".join(appends(self.daemon)), sent)
        self.assertWords(voice.decode(PCMA, sent), 8000, "what is the time")
        self.assertEqual(reply, upstream_reply)
        self.assertReplyMatches(reply, "linear16", 24000, upstream_reply, PCM24K)

    @defer.inlineCallbacks
    def test_mulaw_8k_in_linear16_16k_out(self) -> Any:
        yield self.start()
        client = yield self.configured_client(audio_settings("mulaw", 8000, "linear16", 16000))
        session = session_update(self.daemon)
        self.assertEqual(session["audio"]["input"]["format"], PCMU)
        self.assertEqual(session["audio"]["output"]["format"], PCM24K)
        client.send_json({"type": "InjectUserMessage", "content": "Good morning"})
        yield client.expect("AgentAudioDone")
        yield self.settle()
        self.assertNoErrors(client)
        [item_id] = self.recorder.reply_items()
        [reply] = replies(client)
        self.assertReplyMatches(reply, "linear16", 16000, self.recorder.item_audio(item_id), PCM24K)


def parse_wav_header(data: bytes) -> tuple[dict[str, int], int]:
    """The ``fmt`` fields of a streaming WAV header and the offset where its ``data`` starts."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE header")
    offset = 12
    fmt: dict[str, int] = {}
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        body = offset + 8
        if chunk == b"fmt ":
            tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", data[body : body + 16])
            fmt = {
                "tag": tag,
                "channels": channels,
                "rate": rate,
                "byte_rate": byte_rate,
                "align": align,
                "bits": bits,
            }
        elif chunk == b"data":
            return fmt, body
        offset = body + size
    raise ValueError("no data chunk")


class WavContainerTests(_AudioFlowTestCase):
    @defer.inlineCallbacks
    def check_wav_replies(self, encoding: str, rate: int, tag: int) -> Any:
        yield self.start()
        client = yield self.configured_client(
            audio_settings("linear16", 16000, encoding, rate, container="wav")
        )
        for text in ("First question", "Second question"):
            client.send_json({"type": "InjectUserMessage", "content": text})
            yield client.expect("AgentAudioDone")
            yield client.expect("ConversationText", role="assistant")
        yield self.settle()
        self.assertNoErrors(client)
        upstream_format = G711_FORMATS.get(encoding, PCM24K)
        items = self.recorder.reply_items()
        got = replies(client)
        self.assertEqual(len(got), 2)
        for reply, item_id in zip(got, items, strict=True):
            fmt, data_start = parse_wav_header(reply)
            self.assertEqual(fmt["tag"], tag)
            self.assertEqual((fmt["channels"], fmt["rate"]), (1, rate))
            self.assertEqual(fmt["bits"], 8 * width(encoding))
            self.assertEqual(fmt["byte_rate"], rate * width(encoding))
            self.assertReplyMatches(
                reply[data_start:],
                encoding,
                rate,
                self.recorder.item_audio(item_id),
                upstream_format,
            )
        # The header travels in its own frame, right after AgentStartedSpeaking.
        order = kinds(client)
        for index, kind in enumerate(order):
            if kind == "AgentStartedSpeaking":
                frame = client.frames[index + 1]
                self.assertIsInstance(frame, bytes)
                self.assertEqual(frame[:4], b"RIFF")
                self.assertEqual(parse_wav_header(frame)[1], len(frame))

    def test_linear16_wav(self) -> Any:
        return self.check_wav_replies("linear16", 16000, 1)

    def test_mulaw_wav(self) -> Any:
        return self.check_wav_replies("mulaw", 8000, 7)


class HeldAudioTests(_AudioFlowTestCase):
    @defer.inlineCallbacks
    def test_audio_before_settings_applied_arrives_in_order(self) -> Any:
        yield self.start()
        client = yield self.connect()
        audio = encode("mulaw", np.concatenate([quiet(200, 8000), speech("hello", 8000), quiet(800, 8000)]))
        frames = split(audio, frame_bytes("mulaw", 8000))
        # Some before Settings, some between Settings and SettingsApplied, the rest after.
        yield stream(client, frames[:10], 0)
        client.send_json(audio_settings("mulaw", 8000, "mulaw", 8000))
        yield stream(client, frames[10:20], 0)
        yield client.expect("SettingsApplied")
        yield stream(client, frames[20:], 0.002)
        user = yield client.wait_for("ConversationText", role="user")
        self.assertEqual(user["content"], "hello")
        yield self.settle()
        self.assertNoErrors(client)
        events = self.daemon.upstream_events()
        types = [e["type"] for e in events]
        self.assertEqual(types[0], "session.update")
        # Passthrough makes order visible: the upstream got exactly the client's bytes.
        self.assertEqual(b"".join(appends(self.daemon)), audio)

    @defer.inlineCallbacks
    def test_overflow_drops_the_oldest_audio_with_one_warning(self) -> Any:
        yield self.start(limits=Limits(handshake_timeout=5.0, ping_interval=0, audio_buffer_seconds=0.2))
        client = yield self.connect()
        old = speech("hello", 16000)  # 200 ms of one tone, then 800 ms of another
        new = speech("stop stop stop", 16000)
        audio = encode("linear16", np.concatenate([old, old, old, new]))
        client.send_json(audio_settings("linear16", 16000, "linear16", 16000))
        yield stream(client, split(audio, frame_bytes("linear16", 16000)), 0)
        yield client.expect("SettingsApplied")
        yield self.settle()
        warnings = [m for m in client.messages if m["type"] == "Warning"]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["code"], errors.AUDIO_BUFFER_OVERFLOW)
        upstream = voice.decode(PCM24K, b"".join(appends(self.daemon)))
        # At most the buffer's 200 ms went up, and only the newest audio.
        self.assertLessEqual(len(upstream) / 24, 200.0)
        self.assertGreater(len(upstream) / 24, 200.0 - RESAMPLER_LAG_SLACK_MS)
        stretches = voiced_stretches(upstream, 24000)
        self.assertTrue(stretches)
        for stretch in stretches:
            self.assertLess(
                abs(dominant_frequency(stretch, 24000) - voice.word_frequency("stop")),
                FREQUENCY_TOLERANCE_HZ,
            )
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])


class BargeInTests(_AudioFlowTestCase):
    LONG_TEXT = "Please read me a long story about a quiet harbour town and its lighthouse keeper"

    @defer.inlineCallbacks
    def barge_in(self, **simulator_options: Any) -> Any:
        yield self.start(simulator_options=simulator_options)
        client = yield self.configured_client(audio_settings("linear16", 16000, "linear16", 16000))
        client.send_json({"type": "InjectUserMessage", "content": self.LONG_TEXT})
        yield client.expect("AgentStartedSpeaking")
        # Let some of the reply reach the client, then talk over it.
        while len(client.audio) < 16000 * 2 * 0.3:
            yield wait(0.01)
        yield self.spoken_turn(client, "linear16", 16000, "stop", lead_ms=0, tail_ms=600, interval=0.002)
        yield client.expect("UserStartedSpeaking")
        yield client.expect("AgentStartedSpeaking", timeout=10)  # the answer to "stop"
        yield client.expect("AgentAudioDone", timeout=10)
        yield self.settle()

        order = kinds(client)
        barge = order.index("UserStartedSpeaking")
        # No frame of the interrupted reply after UserStartedSpeaking.
        next_reply = order.index("AgentStartedSpeaking", barge)
        self.assertNotIn("audio", order[barge:next_reply])
        delivered = b"".join(f for f in client.frames[:barge] if isinstance(f, bytes))
        delivered_ms = len(delivered) / 32

        interrupted = self.recorder.reply_items()[0]
        truncates = [e for e in self.daemon.upstream_events() if e["type"] == "conversation.item.truncate"]
        self.assertEqual(len(truncates), 1)
        [truncate] = truncates
        self.assertEqual(truncate["item_id"], interrupted)
        self.assertEqual(truncate["content_index"], 0)
        self.assertIsInstance(truncate["audio_end_ms"], int)
        self.assertGreater(truncate["audio_end_ms"], 0)
        self.assertLessEqual(
            truncate["audio_end_ms"],
            delivered_ms,
            f"audio_end_ms {truncate['audio_end_ms']} is more than the {delivered_ms:.1f} ms of "
            "audio the client received for the item",
        )
        # The simulator accepted it, and cancelled the reply on speech_started.
        self.assertEqual(self.recorder.of_type("error"), [])
        [truncated] = self.recorder.of_type("conversation.item.truncated")
        self.assertEqual(truncated["audio_end_ms"], truncate["audio_end_ms"])
        done = self.recorder.of_type("response.done")
        self.assertEqual(done[0]["response"]["status"], "cancelled")
        self.assertEqual(done[0]["response"]["status_details"]["reason"], "turn_detected")
        self.assertEqual(done[1]["response"]["status"], "completed")
        self.assertNoErrors(client)
        # The reply was cut short: the client got less than the simulator had sent when it cancelled.
        reference = self.recorder.item_audio(interrupted)
        self.assertLess(len(delivered) / 2 / 16000, len(reference) / 2 / 24000)

    def test_barge_in_while_the_reply_streams_faster_than_real_time(self) -> Any:
        return self.barge_in()

    def test_barge_in_while_the_reply_streams_at_real_time(self) -> Any:
        return self.barge_in(audio_chunk_ms=20, chunk_interval=0.02)

    def test_barge_in_while_the_reply_streams_slower_than_real_time(self) -> Any:
        # An overloaded upstream: the client has heard everything it was given.
        return self.barge_in(audio_chunk_ms=20, chunk_interval=0.04)

    @defer.inlineCallbacks
    def test_no_truncate_when_no_audio_reached_the_client(self) -> Any:
        # One 20 ms delta every half second: the first is still inside the resampler (which needs
        # about 30 ms of 24 kHz audio before its first 16 kHz output) when the user talks.
        yield self.start(simulator_options={"audio_chunk_ms": 20, "chunk_interval": 0.5})
        client = yield self.configured_client(audio_settings("linear16", 16000, "linear16", 16000))
        client.send_json({"type": "InjectUserMessage", "content": self.LONG_TEXT})
        yield client.expect("AgentStartedSpeaking")
        # Speech with no trailing silence: the turn stays open, so no new reply starts.
        yield self.spoken_turn(client, "linear16", 16000, "stop", lead_ms=0, tail_ms=0, interval=0)
        yield client.expect("UserStartedSpeaking")
        yield self.settle()
        self.assertEqual(len(self.recorder.item_audio(self.recorder.reply_items()[0])), 20 * 48)
        self.assertEqual(len(client.audio), 0)
        truncates = [e for e in self.daemon.upstream_events() if e["type"] == "conversation.item.truncate"]
        self.assertEqual(truncates, [], "an item none of whose audio reached the client was truncated")
        [done] = self.recorder.of_type("response.done")
        self.assertEqual(done["response"]["status"], "cancelled")
        self.assertEqual(self.recorder.of_type("error"), [])
        self.assertNoErrors(client)


class GarbageTests(_AudioFlowTestCase):
    @defer.inlineCallbacks
    def test_random_bytes_and_odd_frames_do_not_break_the_session(self) -> Any:
        yield self.start()
        client = yield self.configured_client(audio_settings("linear16", 16000, "linear16", 16000))
        rng = np.random.default_rng(3)
        sizes = [1, 3, 333, 517, 1001, 7, 2049, 5]  # odd sizes, an even total
        self.assertEqual(sum(sizes) % 2, 0)
        for size in sizes:
            client.sendMessage(rng.integers(0, 256, size, dtype=np.uint8).tobytes(), isBinary=True)
        client.sendMessage(encode("linear16", quiet(800, 16000)), isBinary=True)
        # A clean word cut at odd byte counts still arrives whole.
        word = encode("linear16", np.concatenate([speech("hello", 16000), quiet(800, 16000)]))
        offset = 0
        for size in (101, 999, 3333, 77777):
            client.sendMessage(word[offset : offset + size], isBinary=True)
            offset += size
        yield client.wait_for("ConversationText", role="user", content="hello", timeout=10)
        client.send_json({"type": "InjectUserMessage", "content": "Are you still there"})
        reply = yield client.wait_for(
            "ConversationText", role="assistant", content="You said: Are you still there", timeout=10
        )
        self.assertTrue(reply)
        yield self.settle()
        self.assertEqual([m for m in client.messages if m["type"] == "Error"], [])
        for payload in appends(self.daemon):
            self.assertEqual(len(payload) % 2, 0)
