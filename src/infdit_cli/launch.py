"""`python -m infdit_cli.launch [TORCHRUN OPTIONS] -- COMMAND ...`: torchrun, with infdit's exit code.

torchrun reports any rank's failure in its own words and exits 1, so a script cannot tell a wrong
command line (2) from out of memory (3) or Ctrl-C (130). This runs torchrun (`torch.distributed.run`, in
this process) on `python -m infdit_cli COMMAND ...`; every rank records its exit code in
`$INFDIT_EXIT_FILE.RANK` (`distributed.ExitRecord`: the code, whether it only followed another rank's
failure, whether it printed the line), and the launcher exits with the job's code:

- 130, 143 or 129 when the launcher itself got SIGINT, SIGTERM or SIGHUP (torchrun passes it on to every
  rank, which stops as one process would);
- else the code of a rank's own failure: rank 0's (rank 0 reports what every rank met alike: usage, a
  collective out of memory), else the first other rank's. A rank that failed only because another did
  (it lost contact with it, or torchrun stopped it with SIGTERM once the other failed) stays silent and
  counts last;
- else 1 when torchrun failed without any rank saying why (a rank killed by a signal), 0 otherwise.

torchrun's own log lines and failure report are left out (set INFDIT_DEBUG=1 to see them); the ranks'
output is untouched. Where no rank printed a line for how the job ended (a signal that arrived while the
ranks were still starting, a rank killed outright), the launcher says it, in one line. A launcher usage
error exits 2.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .errors import signal_name, stopped_by
from .settings import settings

if TYPE_CHECKING:  # the launcher imports torch only after its signal handlers are in place
    from .distributed.world import ExitRecord

__all__ = ["launch", "job_code", "unreported", "main"]

USAGE = ("usage: python -m infdit_cli.launch [TORCHRUN OPTIONS] -- COMMAND [ARGS]...\n"
         "  e.g. python -m infdit_cli.launch --standalone --nproc-per-node 8 -- upscale map.png --res 16384")

_SIGNAL_CODES = {2: 130, 15: 143, 1: 129}  # SIGINT, SIGTERM, SIGHUP: as one infdit process exits


def job_code(records: dict[int, ExitRecord], torchrun_failed: bool, signum: int | None = None) -> int:
    """The job's exit code from each rank's record (`records`, by rank; a rank that wrote none is absent)."""
    if signum is not None:
        return _SIGNAL_CODES.get(signum, 128 + signum)
    for after in (False, True):  # a rank's own failure before one that only followed it
        failed = {rank: r.code for rank, r in records.items() if r.code and r.after == after}
        if failed:
            return failed.get(0) or failed[min(failed)]
    return 1 if torchrun_failed else 0


class _Stopped(Exception):
    """SIGTERM or SIGHUP before torchrun's own handlers are in place (the launcher still starting)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    raise _Stopped(signum)


def unreported(records: dict[int, ExitRecord], killed: dict[int, int], signum: int | None) -> str | None:
    """The launcher's own line, where the ranks' records say none printed one for how the job ended: the
    launcher's signal (as the ranks would say it), a rank stopped by a signal sent to it alone; and always a
    rank killed by a signal (`killed`: rank -> signal number), which no rank could report. None otherwise."""
    said = any(r.said for r in records.values())
    if signum is not None:
        return None if said else stopped_by(signum)
    if killed:
        rank = min(killed)
        return (f"rank {rank} was killed by {signal_name(killed[rank])} (out of host memory? see the "
                f"system log); set INFDIT_DEBUG=1 for torchrun's report")
    code = job_code(records, False)
    if said or not code:
        return None
    rank = min(rank for rank, r in records.items() if r.code == code)
    if code in _SIGNAL_CODES.values():  # 128 + the signal's number
        return f"rank {rank} was {stopped_by(code - 128)}"
    return f"rank {rank} failed with exit code {code}"


def _quiet_torchrun() -> None:
    """torchrun's loggers (rendezvous, 'Setting OMP_NUM_THREADS', 'failed (exitcode: 2)'): errors only
    in INFDIT_DEBUG, nothing otherwise; the ranks say what went wrong."""
    level = logging.ERROR if settings().debug else logging.CRITICAL + 1
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(level)


def launch(torchrun_args: Sequence[str], command: Sequence[str], *,
           entry: Sequence[str] = ("-m", "infdit_cli")) -> int:
    """Run torchrun with `torchrun_args` on `entry` (`-m infdit_cli`, or a script) with `command`; the
    job's exit code (`job_code`)."""
    # torch (and distributed.world, which imports it): kept off the launcher's start-up
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .distributed.world import read_exit_codes

    _quiet_torchrun()
    with tempfile.TemporaryDirectory(prefix="infdit-launch-") as folder:
        base = os.path.join(folder, "exit")
        old = os.environ.get("INFDIT_EXIT_FILE")
        os.environ["INFDIT_EXIT_FILE"] = base  # the ranks inherit it
        failed, signum, killed = False, None, {}
        try:
            args = parse_args([*torchrun_args, *entry, *command])
            _quiet_torchrun()
            run(args)
        except ChildFailedError as e:
            failed = True
            killed = {rank: -f.exitcode for rank, f in e.failures.items() if f.exitcode < 0}
        except SignalException as e:
            signum = int(e.sigval)
        except _Stopped as e:
            signum = e.signum
        except KeyboardInterrupt:
            signum = 2
        finally:
            if old is None:
                os.environ.pop("INFDIT_EXIT_FILE", None)
            else:
                os.environ["INFDIT_EXIT_FILE"] = old
        records = read_exit_codes(base)
        # A rank that recorded how it ended and then died by torchrun's SIGTERM on its way out (once another
        # rank failed, torchrun stops the rest) was not killed: its record stands.
        killed = {rank: sig for rank, sig in killed.items() if rank not in records}
        line = unreported(records, killed, signum)
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return job_code(records, failed, signum)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        print(f"error: give torchrun's options, then --, then the infdit command\n{USAGE}", file=sys.stderr)
        return 2
    cut = argv.index("--")
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # until torchrun's handlers take over (they raise alike)
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)
    try:
        return launch(argv[:cut], argv[cut + 1:])
    except SystemExit as e:  # torchrun's argparse: a wrong option, already printed
        return e.code if isinstance(e.code, int) else 2
    except (_Stopped, KeyboardInterrupt) as e:  # before torchrun began (the launcher importing torch)
        signum = getattr(e, "signum", 2)
        print(f"error: {stopped_by(signum)}", file=sys.stderr, flush=True)
        return job_code({}, False, signum)


if __name__ == "__main__":
    sys.exit(main())
