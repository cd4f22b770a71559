"""
A long fuzzing campaign against the whole daemon (the target of ``openai_proxy/tests/test_fuzz.py``:
client frames, upstream events and time driven into the in-memory daemon).

    python fuzz/fuzz_daemon.py --examples 5000          # hypothesis alone, random
    python fuzz/fuzz_daemon.py --atheris -max_total_time=3600   # coverage-guided (pip install atheris)

With ``--atheris``, arguments after it go to libFuzzer (``-max_total_time=S``, ``-runs=N``, a corpus
directory).  A failing example is printed with the failure, and hypothesis stores it in
``.hypothesis/`` so that the suite's short run replays it.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="examples for a hypothesis run [2000]")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, with atheris")
    args, rest = parser.parse_known_args()
    # The working copy, not an installed one.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ["OPENAI_PROXY_FUZZ_EXAMPLES"] = str(args.examples)
    if args.atheris:
        import atheris

        with atheris.instrument_imports():
            from openai_proxy.tests.test_fuzz import fuzz_daemon

        atheris.Setup([sys.argv[0], *rest], fuzz_daemon.hypothesis.fuzz_one_input)
        atheris.Fuzz()
        return
    from twisted.scripts.trial import run

    sys.argv = [sys.argv[0], "openai_proxy.tests.test_fuzz"]
    run()


if __name__ == "__main__":
    main()
