"""Progress lines from inside Ray Train workers."""
from __future__ import annotations

import sys


def say(line: str) -> None:
    """Write one line to this process's stdout, once. Not `print`: Ray Train patches print in its workers to
    tee to stdout and also log to the console (stderr), so every printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def phases(startup: dict[str, float]) -> str:
    """{"startup/<phase>_s": seconds} as "<phase> 1.2 s, ..." (the start-up lines of the driver and of rank 0)."""
    return ", ".join(f"{k.removeprefix('startup/').removesuffix('_s')} {v:.1f} s" for k, v in startup.items())
