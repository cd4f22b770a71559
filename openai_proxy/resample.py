"""
A streaming rational resampler with a short minimum-phase filter: client audio at rates where
libsoxr's streaming would hold output back for tens of milliseconds (docs/audio.md).

libsoxr filters in blocks: at its high quality it releases 8 kHz → 24 kHz audio 43 ms late on average
and 48 kHz → 24 kHz audio 21 ms late, and every such millisecond is added to what the user says.  This
resampler is the textbook polyphase form instead: the source is (notionally) upsampled by ``L``,
low-pass filtered and downsampled by ``M`` (``L / M`` is the rate ratio in lowest terms), and every
output sample is computed as soon as the input it needs has arrived.

The filter is designed per conversion, from the lower of the two rates ``f``, as a Kaiser-windowed
sinc:

- flat (within 0.01 dB) to ``0.4 f``, the band the daemon's audio tests hold every path to;
- at least :data:`STOPBAND_DB` down from ``0.56 f``: what downsampling would fold back into the band,
  and the images upsampling creates, are removed;
- unity gain at DC in every phase, so a steady level comes out exactly.

The daemon uses its minimum-phase form (same magnitude response, energy first): it needs no sample
beyond the output's position, so nothing waits for the next frame, and the signal comes out delayed by
its group delay, 0.05-0.55 ms across the passband.  The linear-phase form (``minimum_phase=False``)
keeps the waveform's phase exactly but looks half its length ahead (0.5-1.6 ms), so the end of every
frame waits for the next one.

Every output sample is the same sum of the same products however the input is cut into chunks, so the
output is bit-identical for any framing.
"""

from __future__ import annotations

import functools
import math
from typing import Final

import numpy as np
import numpy.typing as npt

#: Attenuation of the stopband (dB).
STOPBAND_DB: Final = 65.0
#: Edges of the transition band, as fractions of the lower of the two rates.
PASSBAND_EDGE: Final = 0.40
STOPBAND_EDGE: Final = 0.56
#: The most the output may trail its input (ms): the linear-phase filter's look-ahead, or the
#: minimum-phase filter's group delay, stays below it.
MAX_LAG_MS: Final = 2.0
#: The most filter phases a conversion may need (the rates' ratio ``L / M`` in lowest terms has
#: ``L`` phases): 320 serves 11.025, 22.05 and 44.1 kHz against 8 and 24 kHz.  Odd rates beyond it
#: (15,999 Hz to 24 kHz needs 8,000) are not served: :func:`supports`.
MAX_PHASES: Final = 320
#: Up to this many filter phases, each phase's outputs are one product of a strided view of the
#: source with the phase's taps; beyond it (rates related like 44.1 and 24 kHz) the windows are
#: gathered per output.
_STRIDED_PHASES: Final = 8
#: Outputs computed together when the windows are gathered: at most 4,096 x (2 x half + 1) float32
#: of windows and as many of taps at a time (a few hundred KiB), whatever the chunk's size.
_GATHER_BLOCK: Final = 4096

Float32Array = npt.NDArray[np.float32]


def _half_taps(source_rate: int, lower_rate: int) -> int:
    """Taps on each side of the centre, counted at the source rate (Kaiser's length formula)."""
    transition = (STOPBAND_EDGE - PASSBAND_EDGE) * lower_rate
    taps = (STOPBAND_DB - 7.95) * source_rate / (14.36 * transition)
    return max(1, math.ceil(taps / 2))


def supports(source_rate: int, target_rate: int) -> bool:
    """Whether :class:`LowDelayResampler` converts ``source_rate`` to ``target_rate`` (Hz)."""
    if not (8000 <= source_rate <= 48000 and 8000 <= target_rate <= 48000) or source_rate == target_rate:
        return False
    return target_rate // math.gcd(source_rate, target_rate) <= MAX_PHASES


def _minimum_phase(h: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """
    The minimum-phase filter with the magnitude response of ``h`` (the homomorphic method: fold the
    real cepstrum of ``log |H|`` onto positive quefrencies), cut to ``h``'s length.  Its energy comes
    first, so it needs no samples ahead of the output position.
    """
    size = 1 << math.ceil(math.log2(4 * len(h)))
    magnitude = np.abs(np.fft.rfft(h, size))
    # A floor far below the stopband keeps the logarithm finite.
    cepstrum = np.fft.irfft(np.log(np.maximum(magnitude, magnitude.max() * 1e-9)), size)
    cepstrum[1 : size // 2] *= 2
    cepstrum[size // 2 + 1 :] = 0
    return np.fft.irfft(np.exp(np.fft.rfft(cepstrum, size)), size)[: len(h)]


def _group_delay(h: npt.NDArray[np.float64], frequency: float) -> float:
    """Group delay of ``h`` at ``frequency`` (cycles per sample), in samples."""
    n = np.arange(len(h))
    turn = np.exp(-2j * np.pi * frequency * n)
    return float(np.real(np.sum(n * h * turn) / np.sum(h * turn)))


@functools.lru_cache(maxsize=16)
def _filter_bank(source_rate: int, target_rate: int, minimum_phase: bool) -> tuple[int, Float32Array, float]:
    """
    (``half``, the polyphase filter bank, the signal's delay in source samples) of a conversion,
    shared by every session that makes it.

    The bank has ``L`` rows of ``2 * half + 1`` taps, reversed so that row ``r`` dotted with the
    source window that ends at ``x[q + ahead]`` gives the output whose position is ``q + r / L``
    source samples; ``ahead`` is ``half`` for the linear-phase filter (centred, no delay of the
    signal) and 0 for the minimum-phase one (nothing ahead, the signal delayed by its group delay).
    """
    up = target_rate // math.gcd(source_rate, target_rate)
    lower = min(source_rate, target_rate)
    half = _half_taps(source_rate, lower)
    length = 2 * up * half + 1
    centre = up * half
    # Cut-off midway through the transition band, as a fraction of the upsampled rate.
    cutoff = (PASSBAND_EDGE + STOPBAND_EDGE) / 2 * lower / (source_rate * up)
    n = np.arange(length) - centre
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    prototype = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(length, beta)
    delay = 0.0
    if minimum_phase:
        prototype = _minimum_phase(prototype)
        # The signal's delay is the largest group delay in the passband (it grows towards the edge).
        delay = max(
            _group_delay(prototype, f / (source_rate * up))
            for f in np.linspace(0.0, PASSBAND_EDGE * lower, 33)
        ) / up
    bank = np.zeros((up, 2 * half + 1))
    for r in range(up):
        taps = prototype[r::up][: 2 * half + 1]
        bank[r, : len(taps)] = taps
        # Unity gain at DC in every phase: a steady level comes out unchanged.
        bank[r] /= bank[r].sum()
    phases = np.ascontiguousarray(bank[:, ::-1], dtype=np.float32)
    phases.flags.writeable = False
    return half, phases, delay


class LowDelayResampler:
    """
    Streaming conversion of mono samples from ``source_rate`` to ``target_rate`` (Hz, 8,000-48,000).

    The interface is the part of ``soxr.ResampleStream`` the daemon uses: :meth:`resample_chunk`
    takes float32 samples (any scale) and returns what is ready; with ``last=True`` it also returns the
    tail, so that ``n`` samples in give ``ceil(n * target_rate / source_rate)`` out; :meth:`clear` starts
    afresh.

    @raise ValueError: a pair of rates it does not serve (:func:`supports`): outside 8,000-48,000 Hz,
        equal, or needing more than :data:`MAX_PHASES` filter phases.
    """

    def __init__(self, source_rate: int, target_rate: int, minimum_phase: bool = True) -> None:
        if not supports(source_rate, target_rate):
            raise ValueError(f"no low-delay conversion from {source_rate} Hz to {target_rate} Hz")
        g = math.gcd(source_rate, target_rate)
        self._up = target_rate // g
        self._down = source_rate // g
        self._half, self._phases, delay = _filter_bank(source_rate, target_rate, minimum_phase)
        #: Source samples each output needs beyond its own position, and before it.
        self._ahead = 0 if minimum_phase else self._half
        self._behind = 2 * self._half - self._ahead
        #: How far the output released trails the input received while streaming (ms): the samples
        #: the filter looks ahead.
        self.lag_ms = self._ahead * 1000 / source_rate
        #: How late the signal itself comes out relative to its position (ms): the minimum-phase
        #: filter's largest group delay in the passband; 0 for the linear-phase filter.
        self.delay_ms = delay * 1000 / source_rate
        self.clear()

    def clear(self) -> None:
        """Forget the stream: the next chunk starts a new one."""
        # The buffer starts with zeros standing for the samples before the stream.
        self._buffer: Float32Array = np.zeros(self._behind, dtype=np.float32)
        self._first = -self._behind  # stream index of _buffer[0]
        self._consumed = 0  # source samples taken in
        self._produced = 0  # output samples given out

    def resample_chunk(self, x: Float32Array, last: bool = False) -> Float32Array:
        """Take ``x`` (1-D float32); return the output samples now complete (all of them if ``last``)."""
        if len(x):
            self._buffer = np.concatenate((self._buffer, x))
            self._consumed += len(x)
        up, down, ahead = self._up, self._down, self._ahead
        if last:
            # Samples after the end of the stream are zeros; every remaining position is computed.
            end = -(-self._consumed * up // down)
            self._buffer = np.concatenate((self._buffer, np.zeros(ahead + 1, dtype=np.float32)))
        else:
            # Output t needs source samples up to floor(t * down / up) + ahead.
            newest = self._consumed - 1 - ahead
            end = ((newest + 1) * up - 1) // down + 1 if newest >= 0 else 0
        if end <= self._produced:
            out = np.zeros(0, dtype=np.float32)
        else:
            out = self._outputs(self._produced, end)
            self._produced = end
        if last:
            self.clear()
        else:
            # Keep what the next output needs: source samples from floor(next * down / up) - behind.
            keep_from = (self._produced * down) // up - self._behind - self._first
            if keep_from > 0:
                self._buffer = self._buffer[keep_from:]
                self._first += keep_from
        return out

    def _outputs(self, start: int, end: int) -> Float32Array:
        """Output samples ``start`` to ``end - 1`` of the stream, from the buffer."""
        up, down, half = self._up, self._down, self._half
        width = 2 * half + 1
        buffer = self._buffer
        item = buffer.itemsize
        count = end - start
        out = np.empty(count, dtype=np.float32)
        if up <= _STRIDED_PHASES:
            # Outputs t, t + up, t + 2 up ... share a phase, and their windows start ``down`` source
            # samples apart: one strided view of the buffer each, no copies.
            for offset in range(min(up, count)):
                t = start + offset
                rows = (count - offset + up - 1) // up
                first = (t * down) // up - self._behind - self._first
                windows = np.ndarray(
                    (rows, width), np.float32, buffer=buffer, offset=first * item,
                    strides=(down * item, item),
                )
                # einsum sums each row in the same order whatever the number of rows: the output
                # does not depend on how the input was cut.
                out[offset::up] = np.einsum("ij,j->i", windows, self._phases[(t * down) % up])
            return out
        every = np.ndarray(
            (len(buffer) - width + 1, width), np.float32, buffer=buffer, strides=(item, item)
        )
        # The windows and taps are gathered per output, a block at a time: a large chunk (a client
        # may send a megabyte) must not gather a copy of every window at once.
        for block in range(start, end, _GATHER_BLOCK):
            positions = np.arange(block, min(block + _GATHER_BLOCK, end)) * down
            windows = every[positions // up - self._behind - self._first]
            np.einsum("ij,ij->i", windows, self._phases[positions % up],
                      out=out[block - start : block - start + len(positions)])
        return out
