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
from ._errors import report

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


def main() -> None:
    before = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):  # timeout, systemd, Slurm, docker stop; a closed terminal
        if signal.getsignal(sig) is signal.SIG_DFL:  # SIG_IGN stays (nohup)
            try:
                before[sig] = signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread: signals stay as they are
                pass
    try:
        try:
            _main()
        except SystemExit as e:  # under infdit_cli.launch: the code where the launcher reads it
            from ..distributed import write_exit_code

            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            write_exit_code(code)
            raise
    finally:  # main() run in-process (tests, embedding) leaves the handlers as it found them
        for sig, old in before.items():
            signal.signal(sig, old)


def _main() -> None:
    try:
        rc = app(standalone_mode=False)  # returns the code of a typer.Exit (Ctrl-C arrives as Exit(130))
        if rc == 130:
            sys.exit(report(KeyboardInterrupt()))
        sys.exit(rc if isinstance(rc, int) else 0)
    except SystemExit:
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort as e:  # click turns KeyboardInterrupt (and our Signalled) into Abort
        cause = e.__cause__ if isinstance(e.__cause__, KeyboardInterrupt) else KeyboardInterrupt()
        sys.exit(report(cause))
    except typer.TyperException as e:  # click's usage errors: one line like every other error, exit 2
        sys.exit(report(_usage_error(e)))
    except BaseException as e:  # noqa: BLE001 - the one place every error becomes one line
        sys.exit(report(e))
