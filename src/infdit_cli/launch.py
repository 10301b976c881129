"""`python -m infdit_cli.launch [TORCHRUN OPTIONS] -- COMMAND ...`: torchrun, with infdit's exit code.

torchrun reports any rank's failure in its own words and exits 1, so a script cannot tell a wrong
command line (2) from out of memory (3) or Ctrl-C (130). This runs torchrun (`torch.distributed.run`, in
this process) on `python -m infdit_cli COMMAND ...`; every rank writes its exit code to
`$INFDIT_EXIT_FILE.RANK` (`distributed.write_exit_code`), and the launcher exits with the job's code:

- rank 0's code when it is not 0 (rank 0 reports what every rank met alike: usage, a collective out of
  memory, an interrupt);
- else the first other rank's non-zero code (a failure of that rank alone);
- else 1 when torchrun failed without any rank saying why (a rank killed by a signal), 0 otherwise;
- 130, 143 or 129 when the launcher itself got SIGINT, SIGTERM or SIGHUP (torchrun passes it on to every
  rank, which stops as one process would).

torchrun's own log lines and failure report are left out (set INFDIT_DEBUG=1 to see them); the ranks'
output is untouched. Where no rank could say why the job ended (a signal that arrived while the ranks were
still starting, a rank killed outright), the launcher says it, in one line. A launcher usage error exits 2.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence

from .errors import signal_name, stopped_by

__all__ = ["launch", "job_code", "unreported", "main"]

USAGE = ("usage: python -m infdit_cli.launch [TORCHRUN OPTIONS] -- COMMAND [ARGS]...\n"
         "  e.g. python -m infdit_cli.launch --standalone --nproc-per-node 8 -- upscale map.png --res 16384")

_SIGNAL_CODES = {2: 130, 15: 143, 1: 129}  # SIGINT, SIGTERM, SIGHUP: as one infdit process exits


def job_code(codes: dict[int, int], torchrun_failed: bool, signum: int | None = None) -> int:
    """The job's exit code from each rank's (`codes`, by rank; a rank that wrote none is absent)."""
    if signum is not None:
        return _SIGNAL_CODES.get(signum, 128 + signum)
    if codes.get(0, 0) != 0:
        return codes[0]
    for rank in sorted(codes):
        if codes[rank] != 0:
            return codes[rank]
    return 1 if torchrun_failed else 0


class _Stopped(Exception):
    """SIGTERM or SIGHUP before torchrun's own handlers are in place (the launcher still starting)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame) -> None:
    raise _Stopped(signum)


def unreported(codes: dict[int, int], killed: dict[int, int], signum: int | None) -> str | None:
    """The launcher's own line where no rank wrote an exit code to go with the job's end (each rank writes
    it after its own error line): the launcher's signal (the ranks' message for it), else a rank that died
    by a signal (`killed`: rank -> signal number); None where a rank has already said it."""
    if signum is not None:
        if 0 in codes:
            return None
        return stopped_by(signum)
    if killed and not any(codes.values()):
        rank = min(killed)
        return (f"rank {rank} was killed by {signal_name(killed[rank])} (out of host memory? see the "
                f"system log); set INFDIT_DEBUG=1 for torchrun's report")
    return None


def _read_codes(base: str) -> dict[int, int]:
    out = {}
    folder, stem = os.path.split(base)
    for name in os.listdir(folder):
        rank = name.removeprefix(stem + ".")
        if name.startswith(stem + ".") and rank.isdigit():
            try:
                with open(os.path.join(folder, name)) as f:
                    out[int(rank)] = int(f.read().strip())
            except (OSError, ValueError):
                pass
    return out


def _quiet_torchrun() -> None:
    """torchrun's loggers (rendezvous, 'Setting OMP_NUM_THREADS', 'failed (exitcode: 2)'): errors only
    in INFDIT_DEBUG, nothing otherwise; the ranks say what went wrong."""
    level = logging.ERROR if os.environ.get("INFDIT_DEBUG") else logging.CRITICAL + 1
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(level)


def launch(torchrun_args: Sequence[str], command: Sequence[str], *, entry: Sequence[str] = ("-m", "infdit_cli")
           ) -> int:
    """Run torchrun with `torchrun_args` on `entry` (`-m infdit_cli`, or a script) with `command`; the
    job's exit code (`job_code`)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

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
        codes = _read_codes(base)
        line = unreported(codes, killed, signum)
        if line:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return job_code(codes, failed, signum)


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
        print(f"error: {unreported({}, {}, signum)}", file=sys.stderr, flush=True)
        return job_code({}, False, signum)


if __name__ == "__main__":
    sys.exit(main())
