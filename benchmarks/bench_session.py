"""What the session core itself costs per message, in memory: no network, no reactor, no framing.

Run from the repository root after installing the package::

    python benchmarks/bench_session.py [--sessions 1,200] [--rates 16000,24000]

For each client rate and session count it configures that many :class:`openai_proxy.session.Session`
objects as ``bench_load.py``'s clients do (linear16 in at the rate, linear16 24 kHz out), then feeds
them round-robin:

- ``up``: 20 ms client audio frames (``client_binary``: conversion to 24 kHz, append batching,
  the ``input_audio_buffer.append`` event built and encoded);
- ``down``: 50 ms ``response.output_audio.delta`` events of one long reply (``upstream_event``:
  base64 decoding, conversion to the client's format, the binary frame), the event already parsed
  from JSON as the relay hands it over.

It prints microseconds per message and the outputs per message.  Round-robin over many sessions
shows what each session's state going cold between its messages costs.  Figures, not assertions.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import time
from typing import Any

import numpy as np

from openai_proxy import session as s
from openai_proxy.config import Config
from openai_proxy.relay import session_options

OUTPUT_RATE = 24000


def configured(options: s.SessionOptions, rate: int) -> s.Session:
    """A session past its Settings and ``session.updated``, ready for audio both ways."""
    session = s.Session(options, now=time.monotonic)
    session.start()
    session.client_text(json.dumps({
        "type": "Settings",
        "audio": {
            "input": {"encoding": "linear16", "sample_rate": rate},
            "output": {"encoding": "linear16", "sample_rate": OUTPUT_RATE, "container": "none"},
        },
        "agent": {
            "listen": {"provider": {"type": "deepgram", "model": "nova-3"}},
            "think": {"provider": {"type": "open_ai", "model": "gpt-realtime"}, "prompt": "bench"},
            "speak": {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}},
        },
    }))
    session.upstream_opened(0)
    info = {"type": "realtime", "id": "sess_bench", "model": "gpt-realtime"}
    session.upstream_event({"type": "session.created", "event_id": "event_1", "session": info}, 0)
    session.upstream_event({"type": "session.updated", "event_id": "event_2", "session": info}, 0)
    return session


def start_reply(session: s.Session) -> None:
    """Open one response whose audio the ``down`` measurement then streams."""
    session.upstream_event({
        "type": "response.created", "event_id": "event_3",
        "response": {"id": "resp_bench", "object": "realtime.response", "status": "in_progress",
                     "output": []},
    }, 0)
    session.upstream_event({
        "type": "response.output_item.added", "event_id": "event_4", "response_id": "resp_bench",
        "output_index": 0,
        "item": {"id": "item_bench", "type": "message", "role": "assistant", "status": "in_progress",
                 "content": []},
    }, 0)


def per_message(sessions: list[s.Session], feed: Any, rounds: int) -> tuple[float, float]:
    """(µs per message, outputs per message) of ``feed(session)`` round-robin over ``sessions``."""
    for session in sessions:
        feed(session)
    outputs = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for session in sessions:
            outputs += len(feed(session))
    messages = rounds * len(sessions)
    return (time.perf_counter() - start) / messages * 1e6, outputs / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,200", help="comma-separated session counts")
    parser.add_argument("--rates", default="16000,24000", help="client input rates, Hz")
    parser.add_argument("--messages", type=int, default=40000, help="messages timed per row")
    args = parser.parse_args()
    config = Config(api_key="sk-bench", upstream_url="ws://127.0.0.1:9/v1/realtime")
    options = session_options(config)
    rng = np.random.default_rng(1)
    delta_audio = (rng.standard_normal(OUTPUT_RATE // 20) * 3000).astype("<i2").tobytes()
    delta = {"type": "response.output_audio.delta", "event_id": "event_d", "response_id": "resp_bench",
             "item_id": "item_bench", "output_index": 0, "content_index": 0,
             "delta": base64.b64encode(delta_audio).decode("ascii")}
    print(f"{platform.machine()}, Python {platform.python_version()}; µs per message, round-robin")
    print(f"{'rate':>6} {'sessions':>8} {'up µs':>7} {'out/msg':>7} {'down µs':>8} {'out/msg':>7}")
    for rate in (int(r) for r in args.rates.split(",")):
        frame = (rng.standard_normal(rate // 50) * 3000).astype("<i2").tobytes()
        for count in (int(n) for n in args.sessions.split(",")):
            sessions = [configured(options, rate) for _ in range(count)]
            rounds = max(5, args.messages // count)
            up, up_outputs = per_message(sessions, lambda x, frame=frame: x.client_binary(frame), rounds)
            for session in sessions:
                start_reply(session)
            down, down_outputs = per_message(sessions, lambda x: x.upstream_event(delta, 0), rounds)
            print(f"{rate:>6} {count:>8} {up:>7.2f} {up_outputs:>7.2f} {down:>8.2f} {down_outputs:>7.2f}")


if __name__ == "__main__":
    main()
