"""One error funnel: every exception becomes one line on stderr and an exit code."""

from __future__ import annotations

import os
import sys
from enum import IntEnum

from ..errors import describe
from ._text import safe

__all__ = ["ExitCode", "report"]


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # a file that cannot be read, decoded or written, or a failure during the work; batch: some failed
    USAGE = 2  # bad arguments or an impossible request, found before any work (click's code)
    OUT_OF_MEMORY = 3  # out of device memory even under the leanest plan; no partial output
    INTERRUPTED = 130  # Ctrl-C; partial outputs were removed
    HANGUP = 129  # SIGHUP, handled as Ctrl-C
    TERMINATED = 143  # SIGTERM, handled as Ctrl-C


def _said_by_rank_0(exc: BaseException, code: int) -> bool:
    """Under torchrun, what every rank meets alike is reported by rank 0 alone: anything before the ranks
    joined (the same command line and files on every rank), the command line, an out-of-memory all ranks
    stepped down to together (`collective`), Ctrl-C and SIGTERM (torchrun passes them to every rank).
    Another rank's own failure is still printed by it."""
    from ..distributed import joined

    rank, size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if rank == "0" or size in ("", "1"):
        return False
    return (not joined() or code in (ExitCode.USAGE, ExitCode.INTERRUPTED, ExitCode.HANGUP, ExitCode.TERMINATED)
            or getattr(exc, "collective", False))


def report(exc: BaseException) -> int:
    """Print `exc` as one line (plus the traceback with INFDIT_DEBUG=1) and return the exit code."""
    from rich.console import Console
    from rich.text import Text

    msg, code = describe(exc)
    if _said_by_rank_0(exc, code):
        return int(code)
    msg = safe(msg.strip())  # one line, always: a newline in a name (or a library's message) shows as \n
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if os.environ.get("INFDIT_DEBUG"):
        console.print_exception()
    console.print(Text.assemble(("error:", "bold red"), " ", msg))  # literal: names like [b]x.png stay
    if code == ExitCode.ERROR and not os.environ.get("INFDIT_DEBUG") and msg.startswith("internal error"):
        console.print("set INFDIT_DEBUG=1 for the traceback")
    sys.stderr.flush()
    return int(code)
