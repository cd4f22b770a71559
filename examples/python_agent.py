"""
A complete Deepgram Voice Agent client, written with the official Python SDK (``pip install deepgram-sdk``),
talking to openai-proxy instead of Deepgram: one text turn, then one spoken turn streamed from a WAV file.

    python examples/python_agent.py --url ws://127.0.0.1:8080 --wav question.wav --out reply.wav

``--wav`` is a mono 16-bit PCM WAV file (any rate from 8 to 48 kHz); it is sent in 20 ms chunks at the
pace of a microphone, followed by a second of silence so that the upstream's voice activity detection
sees the end of the turn. The agent's speech is written to ``--out`` (mono, 16-bit, 24 kHz). Exits 0
when both turns were answered, 1 otherwise.

Nothing here is specific to openai-proxy but the URL: the same code runs against Deepgram.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
import wave
from typing import Any

from deepgram import DeepgramClient
from deepgram.agent.v1.types import (
    AgentV1InjectUserMessage,
    AgentV1Settings,
    AgentV1SettingsAgent,
    AgentV1SettingsAudio,
    AgentV1SettingsAudioInput,
    AgentV1SettingsAudioOutput,
)
from deepgram.core.events import EventType
from deepgram.environment import DeepgramClientEnvironment
from deepgram.types import (
    SpeakSettingsV1,
    SpeakSettingsV1Provider_OpenAi,
    ThinkSettingsV1,
    ThinkSettingsV1Provider_OpenAi,
)

OUTPUT_RATE = 24000
CHUNK_MS = 20


def settings(input_rate: int, model: str, voice: str) -> AgentV1Settings:
    """The session's Settings, built from the SDK's own types."""
    return AgentV1Settings(
        audio=AgentV1SettingsAudio(
            input=AgentV1SettingsAudioInput(encoding="linear16", sample_rate=input_rate),
            output=AgentV1SettingsAudioOutput(encoding="linear16", sample_rate=OUTPUT_RATE,
                                              container="none"),
        ),
        agent=AgentV1SettingsAgent(
            language="en",
            # A realtime model: a Deepgram-style model such as gpt-4o-mini is replaced by the
            # daemon's default, with a MODEL_REPLACED warning.
            think=ThinkSettingsV1(
                provider=ThinkSettingsV1Provider_OpenAi(model=model),
                prompt="You are a helpful voice assistant. Keep your answers short.",
            ),
            speak=SpeakSettingsV1(provider=SpeakSettingsV1Provider_OpenAi(model="tts-1", voice=voice)),
        ),
    )


class Conversation:
    """Receives on a background thread (the SDK's ``start_listening``); the main thread waits on turns."""

    def __init__(self, out: wave.Wave_write) -> None:
        self.out = out
        self.events: queue.Queue[Any] = queue.Queue()
        self.failed = False

    def on_message(self, message: Any) -> None:
        if isinstance(message, bytes):
            self.out.writeframes(message)
            return
        kind = getattr(message, "type", None)
        if kind == "ConversationText":
            print(f"{message.role}: {message.content}", flush=True)
        elif kind in ("Error", "Warning"):
            print(f"{kind.lower()} {message.code}: {message.description}", file=sys.stderr, flush=True)
            self.failed = self.failed or kind == "Error"
        self.events.put(message)

    def on_close(self, _: Any) -> None:
        self.events.put(None)

    def wait_for(self, kind: str, timeout: float, **fields: Any) -> Any:
        """The next message of ``kind`` (with ``fields``), or None on a close, an Error or the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                print(f"timeout: no {kind} within {timeout:g} s", file=sys.stderr)
                return None
            if message is None or getattr(message, "type", None) == "Error":
                return None
            if getattr(message, "type", None) == kind and all(
                    getattr(message, k, None) == v for k, v in fields.items()):
                return message

    def reply(self, timeout: float, *, spoken_turn: bool = False) -> bool:
        """Wait for one spoken reply: its text and the end of its audio (and for a spoken turn, the
        user's transcript), in whatever order they come."""
        expected = {"text", "audio", "user"} if spoken_turn else {"text", "audio"}
        got: set[str] = set()
        deadline = time.monotonic() + timeout
        while not expected <= got:
            try:
                message = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                print(f"timeout: no reply within {timeout:g} s", file=sys.stderr)
                return False
            kind = getattr(message, "type", None)
            if message is None or kind == "Error":
                return False
            if kind == "ConversationText":
                got.add("text" if message.role == "assistant" else "user")
            elif kind == "AgentAudioDone":
                got.add("audio")
        return True


def stream_wav(agent: Any, path: str) -> None:
    """Send a mono 16-bit WAV file as a microphone would, then a second of silence."""
    with wave.open(path, "rb") as source:
        rate = source.getframerate()
        chunk = rate * CHUNK_MS // 1000
        start = time.monotonic()
        sent = 0
        while frames := source.readframes(chunk):
            agent.send_media(frames)
            sent += len(frames) // 2
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    silence = b"\0\0" * chunk
    for _ in range(1000 // CHUNK_MS):
        agent.send_media(silence)
        time.sleep(CHUNK_MS / 1000)


def wav_rate(path: str) -> int:
    with wave.open(path, "rb") as source:
        if source.getnchannels() != 1 or source.getsampwidth() != 2:
            raise SystemExit(f"{path}: expected a mono 16-bit PCM WAV file")
        return source.getframerate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8080", help="the daemon (default: %(default)s)")
    parser.add_argument("--token", default="unused", help="a client token, if the daemon requires one")
    parser.add_argument("--text", default="Hello there", help="the text turn (default: %(default)r)")
    parser.add_argument("--wav", required=True, help="the spoken turn: a mono 16-bit WAV file")
    parser.add_argument("--out", default="reply.wav", help="where to write the agent's speech")
    parser.add_argument("--model", default="gpt-realtime", help="the realtime model (default: %(default)s)")
    parser.add_argument("--voice", default="marin", help="an OpenAI voice (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    options = parser.parse_args()
    input_rate = wav_rate(options.wav)

    # The SDK's agent socket goes to environment.agent + /v1/agent/converse.
    http = options.url.replace("ws://", "http://", 1).replace("wss://", "https://", 1)
    environment = DeepgramClientEnvironment(base=http, production=options.url, agent=options.url,
                                            agent_rest=http)
    client = DeepgramClient(api_key=options.token, environment=environment)

    with wave.open(options.out, "wb") as out, client.agent.v1.connect() as agent:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(OUTPUT_RATE)
        conversation = Conversation(out)
        agent.on(EventType.MESSAGE, conversation.on_message)
        agent.on(EventType.CLOSE, conversation.on_close)
        threading.Thread(target=agent.start_listening, daemon=True).start()

        if conversation.wait_for("Welcome", options.timeout) is None:
            return 1
        agent.send_settings(settings(input_rate, options.model, options.voice))
        if conversation.wait_for("SettingsApplied", options.timeout) is None:
            return 1

        # A text turn.
        agent.send_inject_user_message(AgentV1InjectUserMessage(content=options.text))
        if not conversation.reply(options.timeout):
            return 1

        # A spoken turn: the user's words come back as ConversationText role "user".
        stream_wav(agent, options.wav)
        if not conversation.reply(options.timeout, spoken_turn=True):
            return 1
    return 1 if conversation.failed else 0


if __name__ == "__main__":
    sys.exit(main())
