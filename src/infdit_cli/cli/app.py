"""Wiring only: the Typer app, its commands, and `main()` with the error funnel."""

from __future__ import annotations

import signal
import sys

import typer

from . import batch as batch_cmd
from . import bench as bench_cmd
from . import convert as convert_cmd
from . import hub_cmds
from . import selftest as selftest_cmd
from . import serve as serve_cmd
from . import upscale as upscale_cmd
from ..errors import BadRequest
from ._errors import Reported, report

app = typer.Typer(
    name="infdit",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command(epilog=upscale_cmd.EXAMPLES)(upscale_cmd.upscale)
app.command(epilog=batch_cmd.EXAMPLES)(batch_cmd.batch)
app.command(epilog=convert_cmd.EXAMPLES)(convert_cmd.convert)
app.command(epilog=hub_cmds.DOWNLOAD_EXAMPLES)(hub_cmds.download)
app.command()(hub_cmds.info)
app.command(epilog=bench_cmd.EXAMPLES)(bench_cmd.bench)
app.command(epilog=selftest_cmd.EXAMPLES)(selftest_cmd.selftest)
app.command(epilog=serve_cmd.EXAMPLES)(serve_cmd.serve)


@app.callback()
def _root() -> None:
    """Upscale images with Inf-DiT, block by block in bounded memory.

    Exit codes: 0 done; 1 a file that cannot be read, decoded or written, or a failure during the work
    (batch: some file failed, after finishing the others); 2 a wrong command line or an impossible request,
    found before any work; 3 out of device memory even at the smallest plan; 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM), 129 hung up (SIGHUP): no partial output is left, the last checkpoint is kept. Errors are one line on stderr; set INFDIT_DEBUG=1 (or -v) for the traceback.
    """


def _usage_error(e: typer.TyperException) -> BadRequest:
    ctx = getattr(e, "ctx", None)
    err = BadRequest(e.format_message() + (f" (see {ctx.command_path} --help)" if ctx is not None else ""))
    err.exit_code = getattr(e, "exit_code", 2)
    return err


def _on_signal(signum, frame) -> None:
    from ..errors import Signalled

    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise Signalled(signum)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> None:
    before = {sig: signal.getsignal(sig) for sig in _STOPS}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # timeout, systemd, Slurm, docker stop; a closed terminal
        if before[sig] is signal.SIG_DFL:  # SIG_IGN stays (nohup)
            try:
                signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread: signals stay as they are
                pass
    try:
        done = _main()
        _hold_stops()  # the work is over: a stop now must not turn the exit into a traceback
        from ..distributed import write_exit_code

        write_exit_code(done.code, after=done.after, said=done.said)  # under infdit_cli.launch, for it to read
        sys.exit(done.code)
    finally:  # main() run in-process (tests, embedding) leaves the handlers as it found them
        for sig, old in before.items():
            if old is not None:
                try:
                    signal.signal(sig, old)
                except ValueError:
                    pass


def _main() -> Reported:
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit (Ctrl-C arrives as Exit(130))
        if rc == 130:
            return _failed(KeyboardInterrupt())
        return Reported(rc if isinstance(rc, int) else 0)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            return Reported(e.code or 0)
        print(e.code, file=sys.stderr)
        return Reported(1, said=True)
    except typer.Exit as e:
        return Reported(e.exit_code)
    except typer.Abort as e:  # click turns KeyboardInterrupt (and our Signalled) into Abort
        return _failed(e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt())
    except typer.TyperException as e:  # click's usage errors: one line like every other error, exit 2
        return _failed(_usage_error(e))
    except BaseException as e:  # noqa: BLE001 - the one place every error becomes one line
        return _failed(e)


def _failed(exc: BaseException) -> Reported:
    """The error funnel, with the stops held off first (`_hold_stops`)."""
    _hold_stops()
    return report(exc)


def _hold_stops() -> None:
    """Ctrl-C, SIGTERM and SIGHUP ignored until the process ends (`main` restores them): a stop while the
    error line is printed (a second Ctrl-C; torchrun stopping the ranks once one has failed) must not turn
    it into a traceback."""
    for sig in _STOPS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
