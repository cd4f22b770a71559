"""Audio for the simulated upstream: formats, G.711, a synthetic voice, a word code, and VAD.

Formats are the GA session formats: ``{"type": "audio/pcm", "rate": 24000}`` (16-bit signed
little-endian mono at 24 kHz) and ``{"type": "audio/pcmu"}`` / ``{"type": "audio/pcma"}`` (G.711
µ-law / A-law at 8 kHz).  The G.711 tables here are derived on their own (decode by the law's
formula, encode by nearest decoded level) rather than shared with the daemon's converters, so
that the simulator stays an independent check of them.

User speech is "understood" through a word code: every word of :data:`VOCABULARY` is a steady
tone at its own frequency (:func:`word_frequency`: 300 Hz for the first word, then 50 Hz apart).
:func:`speak_words` synthesizes a sentence of such tones (200 ms a word, 60 ms pauses), and
:func:`transcribe` turns audio back into words: every voiced stretch is one word, named by its
dominant frequency; stretches that match no word are left out, and audio with no word at all
transcribes as :data:`UNINTELLIGIBLE`.  The code survives resampling and G.711.

The assistant's voice (:func:`synthesize_reply`) is a buzzy, vowel-like harmonic tone, one
syllable-shaped burst per word, whose length grows with the text (about 60 ms a character) and
whose pitch depends on the voice name.

:class:`VoiceActivityDetector` is the server VAD: 20 ms frames, speech while the frame RMS is
above a level set by ``turn_detection.threshold`` (:func:`speech_level`), all in audio time.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MIN_SPEECH_MS",
    "PCM_RATE",
    "UNINTELLIGIBLE",
    "VOCABULARY",
    "Reply",
    "VadEvent",
    "VoiceActivityDetector",
    "bytes_per_ms",
    "decode",
    "encode",
    "format_rate",
    "silence",
    "speak_words",
    "speech_level",
    "synthesize_reply",
    "transcribe",
    "word_frequency",
]

Samples = npt.NDArray[np.int16]

PCM_RATE: Final = 24000
G711_RATE: Final = 8000
FRAME_MS: Final = 20
#: Voiced audio needed before speech is reported, so that clicks do not start a turn.
MIN_SPEECH_MS: Final = 60

#: Words the simulated transcription knows, in tone order (see :func:`word_frequency`).
VOCABULARY: Final = (
    "hello", "what", "is", "the", "weather", "in", "paris", "london",
    "tokyo", "time", "please", "thanks", "yes", "no", "stop", "tell",
    "me", "a", "joke", "today", "tomorrow", "goodbye", "how", "are",
    "you", "search", "for", "news", "order", "status", "help", "it",
)  # fmt: skip
WORD_BASE_HZ: Final = 300.0
WORD_STEP_HZ: Final = 50.0
#: The transcript of speech in which no word of the vocabulary was recognized.
UNINTELLIGIBLE: Final = "(unintelligible)"


# --------------------------------------------------------------------------- formats and G.711


def format_rate(audio_format: Mapping[str, object]) -> int:
    """Sample rate of a GA audio format object."""
    return PCM_RATE if audio_format.get("type", "audio/pcm") == "audio/pcm" else G711_RATE


def bytes_per_ms(audio_format: Mapping[str, object]) -> int:
    """Bytes per millisecond of a GA audio format: 48 for pcm16 24 kHz, 8 for G.711."""
    return 48 if format_rate(audio_format) == PCM_RATE else 8


def _mulaw_levels() -> npt.NDArray[np.int32]:
    code = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (code >> 4) & 0x07
    magnitude = ((((code & 0x0F) << 3) + 0x84) << exponent) - 0x84
    return np.where(code & 0x80, -magnitude, magnitude)


def _alaw_levels() -> npt.NDArray[np.int32]:
    code = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (code >> 4) & 0x07
    mantissa = ((code & 0x0F) << 4) + 8
    magnitude = np.where(exponent == 0, mantissa, (mantissa + 0x100) << np.maximum(exponent - 1, 0))
    return np.where(code & 0x80, magnitude, -magnitude)


@dataclass(frozen=True)
class _Law:
    levels: npt.NDArray[np.int32]  # decoded value of each code
    order: npt.NDArray[np.intp]  # codes sorted by level
    edges: npt.NDArray[np.float64]  # midpoints between neighbouring levels

    @classmethod
    def from_levels(cls, levels: npt.NDArray[np.int32]) -> _Law:
        order = np.argsort(levels, kind="stable")
        ordered = levels[order].astype(np.float64)
        return cls(levels, order, (ordered[1:] + ordered[:-1]) / 2)

    def decode(self, data: bytes) -> Samples:
        return self.levels[np.frombuffer(data, dtype=np.uint8)].astype(np.int16)

    def encode(self, samples: Samples) -> bytes:
        codes = self.order[np.searchsorted(self.edges, samples.astype(np.float64))]
        return codes.astype(np.uint8).tobytes()


_LAWS: Final = {
    "audio/pcmu": _Law.from_levels(_mulaw_levels()),
    "audio/pcma": _Law.from_levels(_alaw_levels()),
}


def decode(audio_format: Mapping[str, object], data: bytes) -> Samples:
    """Linear int16 samples (at :func:`format_rate`) of audio bytes in a GA format.

    For pcm16 an odd trailing byte is ignored; callers that stream carry it themselves.
    """
    law = _LAWS.get(str(audio_format.get("type")))
    if law is not None:
        return law.decode(data)
    usable = len(data) - len(data) % 2
    return np.frombuffer(data[:usable], dtype="<i2").astype(np.int16)


def encode(audio_format: Mapping[str, object], samples: Samples) -> bytes:
    """Audio bytes in a GA format for int16 samples already at :func:`format_rate`."""
    law = _LAWS.get(str(audio_format.get("type")))
    if law is not None:
        return law.encode(samples)
    return np.asarray(samples, dtype=np.int16).astype("<i2").tobytes()


def silence(ms: int, audio_format: Mapping[str, object] | None = None) -> bytes:
    """``ms`` milliseconds of digital silence in a GA format (pcm16 24 kHz by default)."""
    audio_format = audio_format or {"type": "audio/pcm", "rate": PCM_RATE}
    return encode(audio_format, np.zeros(format_rate(audio_format) * ms // 1000, dtype=np.int16))


# --------------------------------------------------------------------------- user speech


def word_frequency(word: str) -> float:
    """The tone frequency that stands for ``word`` in simulated user speech."""
    return WORD_BASE_HZ + WORD_STEP_HZ * VOCABULARY.index(word.lower())


def _fade(length: int, ramp: int) -> npt.NDArray[np.float64]:
    envelope = np.ones(length)
    ramp = min(ramp, length // 2)
    if ramp:
        envelope[:ramp] = np.linspace(0.0, 1.0, ramp, endpoint=False)
        envelope[length - ramp :] = np.linspace(1.0, 0.0, ramp, endpoint=False)
    return envelope


def speak_words(
    text: str,
    audio_format: Mapping[str, object] | None = None,
    *,
    word_ms: int = 200,
    gap_ms: int = 60,
    amplitude: float = 0.3,
) -> bytes:
    """Simulated user speech that :func:`transcribe` hears as ``text``.

    Every word must be in :data:`VOCABULARY` (case and punctuation are ignored). The audio has no
    leading or trailing silence; append :func:`silence` to end the turn under server VAD.
    """
    audio_format = audio_format or {"type": "audio/pcm", "rate": PCM_RATE}
    rate = format_rate(audio_format)
    words = re.findall(r"[a-z']+", text.lower())
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(f"not in the simulated vocabulary: {', '.join(unknown)}")
    n_word, n_gap = rate * word_ms // 1000, rate * gap_ms // 1000
    t = np.arange(n_word) / rate
    pieces: list[npt.NDArray[np.float64]] = []
    for index, word in enumerate(words):
        if index:
            pieces.append(np.zeros(n_gap))
        tone = np.sin(2 * np.pi * word_frequency(word) * t) * _fade(n_word, rate // 100)
        pieces.append(tone * amplitude * 32767)
    signal = np.concatenate(pieces) if pieces else np.zeros(0)
    return encode(audio_format, np.round(signal).astype(np.int16))


def speech_level(threshold: float) -> float:
    """Frame RMS (int16 units) above which a frame counts as speech.

    ``turn_detection.threshold`` 0..1 maps linearly to -60..-10 dBFS: 0.5 (the default) is
    -35 dBFS, RMS 583, so a tone at a third of full scale is speech and digital silence or faint
    noise is not.
    """
    return float(32768.0 * 10 ** ((-60.0 + 50.0 * threshold) / 20.0))


def _frame_rms(samples: Samples, frame: int) -> npt.NDArray[np.float64]:
    usable = len(samples) - len(samples) % frame
    frames = samples[:usable].astype(np.float64).reshape(-1, frame)
    return np.sqrt(np.mean(frames * frames, axis=1)) if len(frames) else np.zeros(0)


def _dominant_frequency(samples: Samples, rate: int) -> float:
    signal = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(signal, n=max(len(signal), rate // 5)))
    peak = int(np.argmax(spectrum[1:]) + 1)
    if 1 <= peak < len(spectrum) - 1:  # parabolic interpolation between bins
        left, centre, right = spectrum[peak - 1 : peak + 2]
        denominator = left - 2 * centre + right
        offset = 0.5 * (left - right) / denominator if denominator else 0.0
    else:
        offset = 0.0
    return (peak + offset) * rate / (2 * (len(spectrum) - 1))


def transcribe(samples: Samples, rate: int, threshold: float = 0.5) -> str:
    """The deterministic transcript of simulated user speech (see the module docstring)."""
    frame = rate * FRAME_MS // 1000
    voiced = _frame_rms(samples, frame) >= speech_level(threshold)
    words: list[str] = []
    start = None
    for index, is_voiced in enumerate([*voiced, False]):
        if is_voiced and start is None:
            start = index
        elif not is_voiced and start is not None:
            # Drop the stretch's edge frames: they hold the fades, not the steady tone.
            first, last = (start + 1, index - 1) if index - start > 3 else (start, index)
            frequency = _dominant_frequency(samples[first * frame : last * frame], rate)
            slot = round((frequency - WORD_BASE_HZ) / WORD_STEP_HZ)
            in_tune = abs(frequency - (WORD_BASE_HZ + slot * WORD_STEP_HZ)) < WORD_STEP_HZ / 3
            if 0 <= slot < len(VOCABULARY) and in_tune:
                words.append(VOCABULARY[slot])
            start = None
    return " ".join(words) if words else UNINTELLIGIBLE


# --------------------------------------------------------------------------- the assistant's voice


@dataclass(frozen=True)
class Reply:
    """Synthesized assistant speech: the audio bytes and when each word of the text starts."""

    audio: bytes
    duration_ms: int
    words: tuple[tuple[int, str], ...]  # (start ms, word with its trailing space)


def _pitch(voice: object) -> float:
    """A stable base pitch (90..250 Hz) per voice, so different voices sound different."""
    return 90.0 + zlib.crc32(str(voice).encode()) % 160


def synthesize_reply(
    text: str,
    audio_format: Mapping[str, object],
    voice: object = "alloy",
    *,
    ms_per_char: int = 60,
    max_ms: int = 20_000,
) -> Reply:
    """Speech-like audio for ``text``: one voiced burst per word, ``ms_per_char`` a character.

    The total is capped at ``max_ms``; longer texts are spoken proportionally faster.
    """
    rate = format_rate(audio_format)
    tokens = re.findall(r"\S+\s*", text) or [text]
    total_chars = sum(len(t) for t in tokens) or 1
    scale = min(1.0, max_ms / (ms_per_char * total_chars))
    base = _pitch(voice)
    pieces: list[npt.NDArray[np.float64]] = []
    words: list[tuple[int, str]] = []
    position = 0
    for index, token in enumerate(tokens):
        words.append((position * 1000 // rate, token))
        n = max(1, round(len(token) * ms_per_char * scale * rate / 1000))
        voiced = max(1, int(n * 0.8))  # the rest of the word's time is a pause
        t = np.arange(voiced) / rate
        # Falling intonation through the sentence, a little pitch movement inside each word.
        f0 = base * (1.1 - 0.2 * index / len(tokens)) * (1 + 0.03 * np.sin(2 * np.pi * 3 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        burst = sum(np.sin(h * phase) / h for h in (1, 2, 3, 4)) * np.hanning(voiced)
        pieces.extend([burst * 0.25 * 32767, np.zeros(n - voiced)])
        position += n
    signal = np.concatenate(pieces) if pieces else np.zeros(0)
    audio = encode(audio_format, np.clip(np.round(signal), -32768, 32767).astype(np.int16))
    return Reply(audio, position * 1000 // rate, tuple(words))


# --------------------------------------------------------------------------- voice activity


@dataclass(frozen=True)
class VadEvent:
    """A VAD transition at a sample position of the detector's input."""

    kind: str  # "started" or "stopped"
    sample: int  # speech start (before prefix padding) or the end including the silence


class VoiceActivityDetector:
    """Server VAD over linear samples, in audio time.

    Speech starts after :data:`MIN_SPEECH_MS` of consecutive voiced 20 ms frames (reported at the
    first of them) and stops once ``silence_duration_ms`` of unvoiced frames followed it (reported
    at the end of that silence, as the real API does).
    """

    def __init__(self, rate: int, threshold: float, silence_duration_ms: int) -> None:
        self.rate = rate
        self.frame = rate * FRAME_MS // 1000
        self.level = speech_level(threshold)
        self.silence_frames = max(1, -(-silence_duration_ms // FRAME_MS))
        self.min_speech_frames = MIN_SPEECH_MS // FRAME_MS
        self.position = 0  # samples consumed, including the partial frame held back
        self.speaking = False
        self._pending = np.zeros(0, dtype=np.int16)
        self._run = 0  # voiced frames in a row (idle) or unvoiced frames in a row (speaking)

    def reset(self) -> None:
        """Forget any speech in progress (after a commit or a clear)."""
        self.speaking = False
        self._run = 0

    def feed(self, samples: Samples) -> list[VadEvent]:
        """Consume samples; return the transitions they caused, in order."""
        start = self.position - len(self._pending)
        audio = np.concatenate([self._pending, samples]) if len(self._pending) else samples
        self.position += len(samples)
        usable = len(audio) - len(audio) % self.frame
        self._pending = audio[usable:]
        events: list[VadEvent] = []
        for index, rms in enumerate(_frame_rms(audio[:usable], self.frame)):
            frame_end = start + (index + 1) * self.frame
            voiced = rms >= self.level
            if not self.speaking:
                self._run = self._run + 1 if voiced else 0
                if self._run >= self.min_speech_frames:
                    self.speaking, self._run = True, 0
                    onset = frame_end - self.min_speech_frames * self.frame
                    events.append(VadEvent("started", onset))
            else:
                self._run = 0 if voiced else self._run + 1
                if self._run >= self.silence_frames:
                    self.speaking, self._run = False, 0
                    events.append(VadEvent("stopped", frame_end))
        return events
