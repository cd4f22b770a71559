"""``python -m openai_proxy.simulator.speak TEXT OUT.wav``: speech the simulator understands, as a WAV file.

The simulated upstream transcribes only its own word code (:mod:`.voice`): each word of
:data:`~.voice.VOCABULARY` is a tone of its own. This writes TEXT in that code as a mono 16-bit WAV file
(``--rate`` Hz, 24000 by default), with ``--lead`` seconds of silence before the words and ``--tail``
seconds after, so that server VAD sees the turn end. Feed it to any client as microphone audio; the
simulator transcribes it back to TEXT and answers it.
"""

from __future__ import annotations

import argparse
import sys
import wave
from collections.abc import Sequence

import numpy as np
import soxr

from . import voice


def speech_wav(text: str, path: str, *, rate: int = voice.PCM_RATE, lead: float = 0.5,
               tail: float = 1.5) -> None:
    """Write ``text`` (words of the simulator's vocabulary) to ``path``: mono 16-bit PCM at ``rate`` Hz.

    @raise ValueError: a word is not in :data:`~.voice.VOCABULARY`.
    """
    pcm = (voice.silence(int(lead * 1000)) + voice.speak_words(text) + voice.silence(int(tail * 1000)))
    if rate != voice.PCM_RATE:
        # The word code is pitch, so it survives resampling (the daemon resamples it back anyway).
        samples = np.frombuffer(pcm, dtype="<i2")
        pcm = soxr.resample(samples, voice.PCM_RATE, rate).astype("<i2").tobytes()
    frames = pcm
    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(frames)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m openai_proxy.simulator.speak",
        description="Write speech the simulated upstream understands to a WAV file. "
                    f"Words: {' '.join(voice.VOCABULARY)}.",
    )
    parser.add_argument("text", help="the words to say, e.g. 'what is the weather in paris'")
    parser.add_argument("output", help="the WAV file to write")
    parser.add_argument("--rate", type=int, default=voice.PCM_RATE, help="sample rate in Hz (default 24000)")
    parser.add_argument("--lead", type=float, default=0.5, help="seconds of silence before (default 0.5)")
    parser.add_argument("--tail", type=float, default=1.5, help="seconds of silence after (default 1.5)")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not 8000 <= options.rate <= 48000:
        parser.error("--rate must be within 8000..48000")
    try:
        speech_wav(options.text, options.output, rate=options.rate, lead=options.lead, tail=options.tail)
    except ValueError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
