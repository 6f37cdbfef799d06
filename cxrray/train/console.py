"""Progress lines from inside Ray Train workers."""
from __future__ import annotations

import sys


def say(line: str) -> None:
    """Write one line to this process's stdout, once. Not `print`: Ray Train patches print in its workers to
    tee to stdout and also log to the console (stderr), so every printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
