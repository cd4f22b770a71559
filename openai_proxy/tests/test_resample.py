"""
openai_proxy.resample: the low-delay resampler of client audio, alone and as the input converter of
every linear16 rate that libsoxr's quick setting does not serve (docs/audio.md).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from openai_proxy.audio import (
    LOW_DELAY_RESAMPLER,
    RESAMPLER_QUALITY,
    UPSTREAM_PCM_RATE,
    ClientAudioFormat,
    InputConverter,
    input_resampler_quality,
)
from openai_proxy.resample import MAX_LAG_MS, MAX_PHASES, LowDelayResampler, supports

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PCM24K: dict[str, object] = {"type": "audio/pcm", "rate": UPSTREAM_PCM_RATE}

#: Client rates whose audio goes upstream through the low-delay resampler: below 16 kHz and above 24 kHz,
#: the common ones and odd ones in between.
LOW_DELAY_RATES = (8000, 11025, 12000, 15000, 25000, 32000, 44100, 48000)
#: Conversions the resampler must also handle on its own (any pair of supported rates).
OTHER_PAIRS = ((16000, 8000), (48000, 8000), (22050, 8000), (24000, 16000), (8000, 48000))


def tone(frequency: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def stream(resampler: LowDelayResampler, x: np.ndarray, size: int) -> np.ndarray:
    pieces = [resampler.resample_chunk(x[i : i + size]) for i in range(0, len(x), size)]
    pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    return np.concatenate(pieces)


class ChoiceTests(SynchronousTestCase):
    def test_every_rate_outside_the_quick_range_uses_it(self) -> None:
        for rate in LOW_DELAY_RATES:
            self.assertEqual(input_resampler_quality(rate, UPSTREAM_PCM_RATE), LOW_DELAY_RESAMPLER, rate)
        for rate in (16000, 22050, 23999):
            self.assertNotEqual(input_resampler_quality(rate, UPSTREAM_PCM_RATE), LOW_DELAY_RESAMPLER, rate)

    def test_rates_it_cannot_convert_are_refused(self) -> None:
        for source, target in ((8000, 8000), (7999, 24000), (24000, 48001), (0, 24000), (15999, 24000)):
            self.assertFalse(supports(source, target), (source, target))
            with self.assertRaises(ValueError, msg=(source, target)):
                LowDelayResampler(source, target)

    @FAST
    @given(rate=st.integers(min_value=8000, max_value=48000))
    def test_odd_rates_fall_back_to_libsoxr(self, rate: int) -> None:
        """A rate whose ratio to 24 kHz needs more filter phases than MAX_PHASES (24,001 Hz: 24,000
        of them) is converted by libsoxr's HQ filter instead, and still converts."""
        phases = UPSTREAM_PCM_RATE // np.gcd(rate, UPSTREAM_PCM_RATE)
        quality = input_resampler_quality(rate, UPSTREAM_PCM_RATE)
        if rate == UPSTREAM_PCM_RATE:
            pass  # a byte copy: no resampler at all
        elif 16000 <= rate < UPSTREAM_PCM_RATE:
            self.assertNotIn(quality, (LOW_DELAY_RESAMPLER, RESAMPLER_QUALITY), rate)
        elif phases > MAX_PHASES:
            self.assertEqual(quality, RESAMPLER_QUALITY, rate)
        else:
            self.assertEqual(quality, LOW_DELAY_RESAMPLER, rate)
        converter = InputConverter(ClientAudioFormat("linear16", rate), PCM24K)
        samples = rate // 50
        produced = len(converter.feed(bytes(samples * 2))) + len(converter.flush())
        self.assertLessEqual(abs(produced // 2 - samples * UPSTREAM_PCM_RATE / rate), 1, rate)


class StreamingTests(SynchronousTestCase):
    @FAST
    @given(frame_ms=st.sampled_from([5, 10, 20, 40, 100]), seed=st.integers(0, 2**16))
    def test_lag_stays_within_the_budget_through_the_input_converter(self, frame_ms: int, seed: int) -> None:
        """After every frame the upstream has all the audio except the one sample a frame boundary
        can split, from the first frame on: the minimum-phase filter looks no sample ahead."""
        rng = np.random.default_rng(seed)
        for rate in LOW_DELAY_RATES:
            converter = InputConverter(ClientAudioFormat("linear16", rate), PCM24K)
            samples = max(1, rate * frame_ms // 1000)
            fed = produced = 0
            for _ in range(max(3, 300 // frame_ms)):
                frame = rng.integers(-20000, 20000, samples).astype("<i2").tobytes()
                produced += len(converter.feed(frame)) // 2
                fed += samples
                expected = fed * UPSTREAM_PCM_RATE / rate
                lag_ms = (expected - produced) * 1000 / UPSTREAM_PCM_RATE
                self.assertLessEqual(lag_ms, 1000 / UPSTREAM_PCM_RATE, (rate, frame_ms))
                self.assertLessEqual(produced, expected + 1, rate)
            produced += len(converter.flush()) // 2
            self.assertLessEqual(abs(produced - fed * UPSTREAM_PCM_RATE / rate), 1, rate)

    @FAST
    @given(
        pair=st.sampled_from([(r, UPSTREAM_PCM_RATE) for r in LOW_DELAY_RATES] + list(OTHER_PAIRS)),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
        seed=st.integers(0, 2**16),
        minimum_phase=st.booleans(),
    )
    def test_output_does_not_depend_on_the_cuts(
        self, pair: tuple[int, int], cuts: list[int], seed: int, minimum_phase: bool
    ) -> None:
        source, target = pair
        x = (np.random.default_rng(seed).standard_normal(4000) * 8000).astype(np.float32)
        whole = LowDelayResampler(source, target, minimum_phase)
        expected = stream(whole, x, len(x))
        resampler = LowDelayResampler(source, target, minimum_phase)
        bounds = [0, *sorted(cuts), len(x)]
        pieces = [resampler.resample_chunk(x[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        self.assertTrue(np.array_equal(np.concatenate(pieces), expected), (pair, cuts))
        self.assertEqual(len(expected), -(-len(x) * target // source))

    def test_a_megabyte_frame_converts_in_bounded_memory(self) -> None:
        """A client may send one large frame (1 MiB by default): the conversion's working memory
        stays proportional to the frame, never to the frame times the filter's length (a copy of
        every window at once took 117-273 MB at 44.1 and 11.025 kHz)."""
        data = (np.random.default_rng(1).standard_normal(512 * 1024) * 3000).astype("<i2").tobytes()
        for rate in LOW_DELAY_RATES:
            converter = InputConverter(ClientAudioFormat("linear16", rate), PCM24K)
            tracemalloc.start()
            try:
                out = converter.feed(data)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertGreater(len(out), 0, rate)
            self.assertLess(peak, 32 * 1024 * 1024, rate)

    def test_clear_starts_a_new_stream(self) -> None:
        x = tone(440, 8000, 0.1)
        resampler = LowDelayResampler(8000, UPSTREAM_PCM_RATE)
        first = stream(resampler, x, 160)
        resampler.resample_chunk(x[:333])
        resampler.clear()
        self.assertTrue(np.array_equal(stream(resampler, x, 160), first))


class FilterTests(SynchronousTestCase):
    @FAST
    @given(position=st.floats(min_value=0.0, max_value=1.0), minimum_phase=st.booleans())
    def test_images_and_aliases_are_removed(self, position: float, minimum_phase: bool) -> None:
        """A tone anywhere in the passband (to 40 % of the lower rate) comes out as that tone: everything
        else in the output (upsampling's images, downsampling's aliases, ripple) is at least 50 dB
        below it."""
        for source, target in [(r, UPSTREAM_PCM_RATE) for r in LOW_DELAY_RATES] + list(OTHER_PAIRS):
            lower = min(source, target)
            frequency = 100 + position * (0.4 * lower - 100)
            resampler = LowDelayResampler(source, target, minimum_phase)
            out = stream(resampler, tone(frequency, source, 0.5), source // 50)
            middle = out[len(out) // 8 : -len(out) // 8].astype(np.float64)
            spectrum = np.abs(np.fft.rfft(middle * np.blackman(len(middle)))) ** 2
            peak = int(round(frequency * len(middle) / target))
            signal = spectrum[max(0, peak - 4) : peak + 5].sum()
            rest = spectrum.sum() - signal
            self.assertLess(10 * np.log10(rest / signal), -50.0, (source, target, frequency))
            level = 10 * np.log10(np.mean(middle**2) / np.mean(tone(frequency, source, 0.5) ** 2))
            self.assertLess(abs(level), 0.1, (source, target, frequency))

    def test_lag_and_delay_stay_within_the_budget(self) -> None:
        """The minimum-phase filter looks no sample ahead and delays the signal by its group delay,
        less than the linear-phase filter looks ahead (a click's peak comes out within it); the
        linear-phase one looks half its length ahead, within MAX_LAG_MS, and delays nothing (a click
        comes out at its own position)."""
        for source, target in [(r, UPSTREAM_PCM_RATE) for r in LOW_DELAY_RATES] + list(OTHER_PAIRS):
            click = np.zeros(source // 10, dtype=np.float32)
            click[0] = 30000.0
            minimum = LowDelayResampler(source, target)
            self.assertEqual(minimum.lag_ms, 0.0, (source, target))
            linear = LowDelayResampler(source, target, minimum_phase=False)
            self.assertGreater(minimum.delay_ms, 0.0, (source, target))
            # Energy first: the signal's delay stays below the linear-phase filter's look-ahead.
            self.assertLess(minimum.delay_ms, linear.lag_ms, (source, target))
            peak = int(np.argmax(np.abs(stream(minimum, click, source // 50))))
            self.assertLessEqual(peak * 1000 / target, minimum.delay_ms + 1000 / min(source, target),
                                 (source, target))
            self.assertGreater(linear.lag_ms, 0.0, (source, target))
            self.assertLessEqual(linear.lag_ms, MAX_LAG_MS, (source, target))
            self.assertEqual(linear.delay_ms, 0.0, (source, target))
            peak = int(np.argmax(np.abs(stream(linear, click, source // 50))))
            self.assertEqual(peak, 0, (source, target))
