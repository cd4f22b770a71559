"""Delay, quality and cost of each resampler setting on the daemon's rate conversions.

Run from the repository root after installing the package::

    python benchmarks/bench_resampler.py [--paths 16000:24000,8000:24000,48000:24000,24000:16000]

For each path and each setting, streaming in 20 ms frames in float32 as the daemon does: libsoxr's
qualities (``QQ``, ``LQ``, ``MQ``, ``HQ``) through ``soxr.ResampleStream``, and the daemon's own
low-delay resampler (``openai_proxy.resample.LowDelayResampler``) where it serves the path: ``LD``
with the minimum-phase filter the daemon uses, ``LDlin`` with the linear-phase one:

- ``lag``: how far the output released so far trails the input fed so far, sampled after every
  frame once the stream has settled, min/mean/max in ms.  This is the algorithmic delay a streaming
  relay adds: a block resampler holds output back until a block is full.
- ``delay``: the constant delay of the signal that best fits the output to the ideal sweep (a
  minimum-phase filter's group delay; 0 where the resampler compensates its delay).
- ``sweep SNR``: a logarithmic sine sweep over the speech band (100 Hz-3.4 kHz) and over the whole
  shared band (100 Hz to 45 % of the lower rate), compared with the ideal sweep computed at the
  output rate and delayed by ``delay``; everything that is not the sweep (imaging, aliasing,
  ripple, roll-off, phase beyond a constant delay) is noise.
- ``gain@f``: level change of a tone at 3 kHz and at 40 % of the lower rate.
- ``alias``: downsampling only, the level that a full-scale tone 15 % above the output's Nyquist
  frequency leaves in the output (0 dB: not filtered at all).
- ``µs/frame``: CPU per 20 ms frame (best of several runs).

These are figures, not assertions.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import soxr

from openai_proxy import resample

QUALITIES = ("QQ", "LQ", "MQ", "HQ", "LD", "LDlin")
FRAME_MS = 20


def resampler(source_rate: int, target_rate: int, quality: str) -> Any:
    if quality.startswith("LD"):
        return resample.LowDelayResampler(source_rate, target_rate, minimum_phase=quality == "LD")
    return soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality=quality)


def stream(source_rate: int, target_rate: int, quality: str, x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    rs = resampler(source_rate, target_rate, quality)
    step = source_rate * FRAME_MS // 1000
    out, lags, fed, got = [], [], 0, 0
    for i in range(0, len(x), step):
        chunk = x[i : i + step].astype(np.float32)
        y = rs.resample_chunk(chunk)
        out.append(y)
        fed += len(chunk)
        got += len(y)
        lags.append(fed * 1000 / source_rate - got * 1000 / target_rate)
    out.append(rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    return np.concatenate(out).astype(np.float64), lags


def sweep(rate: int, seconds: float, f0: float, f1: float) -> tuple[np.ndarray, object]:
    k = np.log(f1 / f0) / seconds

    def at(t: np.ndarray) -> np.ndarray:
        return 0.5 * np.sin(2 * np.pi * f0 * (np.exp(k * t) - 1) / k)

    return at(np.arange(int(rate * seconds)) / rate), at


def sweep_snr(source_rate: int, target_rate: int, quality: str, f1: float) -> tuple[float, float]:
    """(SNR in dB, delay in ms): the output against the ideal sweep delayed by the constant delay
    (0 to 1 ms, 5 µs steps) that fits it best.  A linear-phase resampler that compensates its delay
    fits best at 0; a minimum-phase one at its group delay, and what its phase does beyond a constant
    delay counts as error."""
    seconds = 3.0
    x, ideal = sweep(source_rate, seconds, 100.0, f1)
    y, _ = stream(source_rate, target_rate, quality, x)
    t = np.arange(len(y)) / target_rate
    keep = (t > 0.05) & (t < seconds - 0.05)
    best = (-np.inf, 0.0)
    for delay in np.arange(0.0, 0.001, 0.000005):
        reference = ideal(t[keep] - delay)  # type: ignore[operator]
        error = y[keep] - reference
        snr = float(10 * np.log10(np.sum(reference**2) / np.sum(error**2)))
        best = max(best, (snr, delay * 1000))
    return best


def tone_gain(source_rate: int, target_rate: int, quality: str, frequency: float) -> float:
    x = 0.5 * np.sin(2 * np.pi * frequency * np.arange(source_rate) / source_rate)
    y, _ = stream(source_rate, target_rate, quality, x)
    middle = y[len(y) // 4 : 3 * len(y) // 4]
    return float(20 * np.log10(np.sqrt(np.mean(middle**2)) / (0.5 / np.sqrt(2))))


def alias_level(source_rate: int, target_rate: int, quality: str) -> float:
    frequency = 1.15 * target_rate / 2
    x = 0.5 * np.sin(2 * np.pi * frequency * np.arange(2 * source_rate) / source_rate)
    y, _ = stream(source_rate, target_rate, quality, x)
    middle = y[len(y) // 4 : 3 * len(y) // 4]
    return float(20 * np.log10(np.sqrt(np.mean(middle**2)) / (0.5 / np.sqrt(2)) + 1e-12))


def cost_us(source_rate: int, target_rate: int, quality: str) -> float:
    step = source_rate * FRAME_MS // 1000
    frame = (np.sin(np.arange(step) / 5) * 8000).astype(np.float32)
    best = float("inf")
    for _ in range(5):
        rs = resampler(source_rate, target_rate, quality)
        start = time.process_time()
        for _ in range(500):
            rs.resample_chunk(frame)
        best = min(best, (time.process_time() - start) / 500 * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--paths", default="16000:24000,8000:24000,48000:24000,24000:16000",
                        help="source:target rates, comma-separated")
    args = parser.parse_args()
    print(f"{'path':<14} {'q':<5} {'lag min/mean/max ms':>20} {'delay ms':>8} {'sweep SNR 0.1-3.4k':>18} "
          f"{'full band':>9} {'gain@3k':>8} {'gain@0.4':>8} {'alias':>7} {'µs/frame':>8}")
    for path in args.paths.split(","):
        source_rate, target_rate = (int(r) for r in path.split(":"))
        lower = min(source_rate, target_rate)
        for quality in QUALITIES:
            if quality.startswith("LD") and not resample.supports(source_rate, target_rate):
                continue
            _, lags = stream(source_rate, target_rate, quality, np.zeros(source_rate * 3))
            settled = np.array(lags[25:])
            speech, delay = sweep_snr(source_rate, target_rate, quality, min(3400.0, 0.45 * lower))
            full, _ = sweep_snr(source_rate, target_rate, quality, 0.45 * lower)
            g3 = tone_gain(source_rate, target_rate, quality, min(3000.0, 0.375 * lower))
            g4 = tone_gain(source_rate, target_rate, quality, 0.4 * lower)
            alias = f"{alias_level(source_rate, target_rate, quality):>5.0f}dB" if target_rate < source_rate else "-"
            print(
                f"{source_rate}->{target_rate:<6} {quality:<5} "
                f"{settled.min():>6.1f}/{settled.mean():>5.1f}/{settled.max():>5.1f} {delay:>6.3f}  "
                f"{speech:>14.1f} dB {full:>6.1f} dB {g3:>+6.2f}dB {g4:>+6.2f}dB {alias:>7} "
                f"{cost_us(source_rate, target_rate, quality):>8.1f}"
            )


if __name__ == "__main__":
    main()
