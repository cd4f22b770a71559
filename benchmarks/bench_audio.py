"""CPU cost of every audio conversion path, per second of audio.

Run from the repository root after installing the package::

    python benchmarks/bench_audio.py [--seconds 10] [--chunk-ms 20] [--repeat 5]

Each path converts a speech-like test signal (a few harmonics plus noise, about -18 dBFS) cut into
chunks of ``--chunk-ms`` (20 ms is what browsers and telephony bridges send), the way a session
does: one ``feed`` per chunk, then the end-of-stream drain.  The figure is process CPU time divided
by the seconds of audio converted, best of ``--repeat`` runs.  ``lag`` is how far the output trails
the input in steady state (the resampler's delay).  These are figures, not assertions.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from openai_proxy.audio import (
    AppendBatcher,
    ClientAudioFormat,
    InputConverter,
    OutputConverter,
    alaw_encode,
    bytes_per_ms,
    mulaw_encode,
    upstream_format_for,
)

PCM24K: dict[str, object] = {"type": "audio/pcm", "rate": 24000}
PCMU: dict[str, object] = {"type": "audio/pcmu"}
PCMA: dict[str, object] = {"type": "audio/pcma"}
UPSTREAM_NAMES = {"audio/pcm": "pcm24k", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}
UPSTREAM_CODECS = {
    "audio/pcm": ("linear16", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}
LINEAR16_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


def speech_like(rate: int, seconds: float, seed: int = 7) -> np.ndarray:
    """A voiced-sound stand-in: a 140 Hz fundamental with harmonics, an envelope and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    signal = sum(
        (0.25 / k) * np.sin(2 * np.pi * 140 * k * t + k) for k in range(1, 25) if 140 * k < 0.45 * rate
    )
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
    noise = 0.02 * rng.standard_normal(len(t))
    return np.clip(np.rint((signal * envelope + noise) * 16384), -32768, 32767).astype(np.int16)


def encoded(encoding: str, rate: int, seconds: float) -> bytes:
    samples = speech_like(rate, seconds)
    if encoding == "mulaw":
        return mulaw_encode(samples)
    if encoding == "alaw":
        return alaw_encode(samples)
    return samples.astype("<i2").tobytes()


def describe(upstream: dict[str, object]) -> str:
    return UPSTREAM_NAMES[str(upstream["type"])]


def client_name(client: ClientAudioFormat) -> str:
    return f"{client.encoding}@{client.sample_rate}"


class Path:
    """One conversion path and how to build a fresh converter for it."""

    def __init__(
        self,
        label: str,
        source: tuple[str, int],
        target: tuple[str, int],
        make: Callable[[], tuple[Callable[[bytes], bytes], Callable[[], bytes]]],
    ) -> None:
        self.label = label
        self.source = source
        self.target = target
        self.make = make


def input_path(client: ClientAudioFormat, upstream: dict[str, object]) -> Path:
    def make() -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
        conv = InputConverter(client, upstream)
        return conv.feed, conv.flush

    label = f"in   {client_name(client)} -> {describe(upstream)}"
    target = UPSTREAM_CODECS[str(upstream["type"])]
    return Path(label, (client.encoding, client.sample_rate), target, make)


def output_path(upstream: dict[str, object], client: ClientAudioFormat) -> Path:
    def make() -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
        conv = OutputConverter(upstream, client)
        return conv.feed, conv.end_reply

    label = f"out  {describe(upstream)} -> {client_name(client)}"
    source = UPSTREAM_CODECS[str(upstream["type"])]
    return Path(label, source, (client.encoding, client.sample_rate), make)


def all_paths() -> list[Path]:
    clients = [ClientAudioFormat("linear16", r) for r in LINEAR16_RATES]
    g711 = [ClientAudioFormat("mulaw", 8000), ClientAudioFormat("alaw", 8000)]
    paths = [input_path(c, upstream_format_for(c)) for c in clients + g711]
    # G.711 clients against a pcm16 upstream (for a session that chose pcm for both directions).
    paths += [input_path(c, PCM24K) for c in g711]
    paths += [input_path(ClientAudioFormat("mulaw", 8000), PCMA)]
    paths += [output_path(PCM24K, c) for c in clients + g711]
    paths += [output_path(PCMU, c) for c in clients]
    paths += [output_path(PCMU, g711[0]), output_path(PCMU, g711[1]), output_path(PCMA, g711[0])]
    return paths


def cpu_ms_per_audio_second(path: Path, data: bytes, chunk: int, seconds: float, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        feed, finish = path.make()
        start = time.process_time()
        for i in range(0, len(data), chunk):
            feed(data[i : i + chunk])
        finish()
        best = min(best, time.process_time() - start)
    return best * 1000 / seconds


def width(encoding: str) -> int:
    return 2 if encoding == "linear16" else 1


def steady_lag_ms(path: Path, data: bytes, chunk: int) -> float:
    """How far output trails input after a second of streaming, in ms."""
    feed, _ = path.make()
    encoding, rate = path.source
    one_second = data[: rate * width(encoding)]
    produced = sum(len(feed(one_second[i : i + chunk])) for i in range(0, len(one_second), chunk))
    target_encoding, target_rate = path.target
    return 1000.0 - produced / width(target_encoding) / target_rate * 1000


def batcher_cost(seconds: float, repeat: int) -> float:
    """AppendBatcher over pcm16 24 kHz in 20 ms pieces, per second of audio."""
    piece = bytes(960)
    count = int(seconds * 50)
    best = float("inf")
    for _ in range(repeat):
        batcher = AppendBatcher(bytes_per_ms(PCM24K))
        start = time.process_time()
        for _ in range(count):
            batcher.add(piece)
        batcher.flush()
        best = min(best, time.process_time() - start)
    return best * 1000 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per run (default 10)")
    parser.add_argument("--chunk-ms", type=int, default=20, help="chunk length (default 20)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per path, best kept (default 5)")
    args = parser.parse_args()

    print(f"{args.seconds:g} s of audio per run, {args.chunk_ms} ms chunks, best of {args.repeat}")
    print(f"{'path':<32} {'CPU per s of audio':>18} {'lag':>9}")
    for path in all_paths():
        encoding, rate = path.source
        data = encoded(encoding, rate, args.seconds)
        chunk = rate * args.chunk_ms // 1000 * width(encoding)
        cost = cpu_ms_per_audio_second(path, data, chunk, args.seconds, args.repeat)
        lag = steady_lag_ms(path, data, chunk)
        print(f"{path.label:<32} {cost:>11.3f} ms CPU {lag:>6.1f} ms")
    cost = batcher_cost(args.seconds, args.repeat)
    print(f"{'batch pcm24k 20 ms -> appends':<32} {cost:>11.3f} ms CPU {'':>9}")


if __name__ == "__main__":
    main()
