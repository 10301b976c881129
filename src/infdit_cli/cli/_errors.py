"""One error funnel: every exception becomes one line on stderr and an exit code."""

from __future__ import annotations

import sys
from enum import IntEnum
from typing import NamedTuple

from ..errors import Interrupted, explain, lost_contact
from ..settings import settings
from ._text import safe

__all__ = ["ExitCode", "Reported", "report"]


class ExitCode(IntEnum):
    OK = 0
    # a file that cannot be read, decoded or written, or a failure during the work; batch: some failed
    ERROR = 1
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
    s = settings()
    if s.rank in (None, "0") or s.world_size in (None, "", "1"):
        return False  # one process: no torch import for this (a usage error answers at once)
    from ..distributed.world import joined

    return (not joined() or code in (ExitCode.USAGE, ExitCode.INTERRUPTED, ExitCode.HANGUP,
                                     ExitCode.TERMINATED)
            or getattr(exc, "collective", False))


class Reported(NamedTuple):
    """What `report` did: the exit code; `said`: it printed the line; `after`: this rank's failure followed
    another rank's own (see `_after_another_rank`)."""

    code: int
    said: bool = False
    after: bool = False


LOST_CONTACT_WAIT = 5.0  # seconds a rank that lost contact looks for the failed rank's own record


def _after_another_rank(exc: BaseException, code: int) -> bool:
    """Under `infdit_cli.launch`, whether this rank failed only because another had failed on its own first,
    which that rank has reported: torchrun stops the others with SIGTERM once one rank fails, and a rank
    waiting on the failed one meets a closed connection. Such a rank stays silent (the cause is the one
    line) and its record says so (the launcher exits with the cause's code)."""
    if settings().world_size in (None, "", "1") or not settings().exit_file:
        return False  # one process, or no launcher to read the records (and no torch import for this)
    from ..distributed.world import STOP_CODES, another_rank_failed, joined

    if not joined():
        return False
    if code in STOP_CODES:  # a SIGTERM from torchrun after another rank's failure (not the launcher's own)
        return another_rank_failed(stops=False)
    if lost_contact(exc):
        return another_rank_failed(stops=True, wait=LOST_CONTACT_WAIT)
    return False


def _stop(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM or SIGHUP (raw, or as the `Interrupted` line with the resume hint): a stop is no
    failure of infdit's, and has no traceback, INFDIT_DEBUG or not."""
    return isinstance(exc, (KeyboardInterrupt, Interrupted))


def report(exc: BaseException) -> Reported:
    """Print `exc` as one line (plus the traceback with INFDIT_DEBUG=1), unless another rank says it."""
    from rich.console import Console
    from rich.text import Text

    msg, code = explain(exc)
    after = _after_another_rank(exc, code)
    if after or _said_by_rank_0(exc, code):
        return Reported(int(code), after=after)
    msg = safe(msg.strip())  # one line, always: a newline in a name (or a library's message) shows as \n
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if settings().debug and not _stop(exc) and exc.__traceback__ is not None:
        from rich.traceback import Traceback  # the exception's own: report may run outside its except block

        console.print(Traceback.from_exception(type(exc), exc, exc.__traceback__))
    console.print(Text.assemble(("error:", "bold red"), " ", msg))  # literal: names like [b]x.png stay
    if code == ExitCode.ERROR and not settings().debug and msg.startswith("internal error"):
        console.print("set INFDIT_DEBUG=1 for the traceback")
    sys.stderr.flush()
    return Reported(int(code), said=True)
