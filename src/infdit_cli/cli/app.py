"""Wiring only: the Typer app, its commands, and `main()` with the error funnel.

`main` installs the SIGTERM / SIGHUP handlers before anything heavy is imported (as `infdit_cli.launch`
does): this module imports only the standard library and infdit's own light modules at its top, the app is
built on first use (`_application`), and torch loads only inside the commands that compute. A stop at any
phase after the handlers are in place (typer loading, the plan, the weights) is 143 / 129 and one line.
"""

from __future__ import annotations

import os
import signal
import sys

from .._version import __version__
from ..errors import BadRequest, Signalled  # light (no third-party import): nothing here may import torch
from ..settings import clear_overrides, settings
from ._errors import Reported, report

_APP = None


def _application():
    """The Typer app with its commands, built once, after `main` has its signal handlers in place: typer,
    rich and the command modules load here; torch and the other heavy modules only inside the commands that
    compute (`infdit --help`, `infdit --version` and a usage error never import them)."""
    global _APP
    if _APP is not None:
        return _APP
    import typer

    from . import batch as batch_cmd
    from . import bench as bench_cmd
    from . import convert as convert_cmd
    from . import hub_cmds
    from . import selftest as selftest_cmd
    from . import serve as serve_cmd
    from . import train as train_cmd
    from . import upscale as upscale_cmd

    made = typer.Typer(
        name="infdit",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
        add_completion=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def show_version(value: bool) -> None:
        if value:
            typer.echo(version_line())
            raise typer.Exit(0)

    def root(version: bool = typer.Option(False, "--version", is_eager=True, callback=show_version,
                                          help="Print infdit's and torch's versions and whether CUDA is "
                                               "available, and exit.")) -> None:
        pass

    root.__doc__ = _ROOT_HELP
    made.callback()(root)
    made.command(epilog=upscale_cmd.EXAMPLES)(upscale_cmd.upscale)
    made.command(epilog=batch_cmd.EXAMPLES)(batch_cmd.batch)
    made.command(epilog=convert_cmd.EXAMPLES)(convert_cmd.convert)
    made.command(epilog=hub_cmds.DOWNLOAD_EXAMPLES)(hub_cmds.download)
    made.command()(hub_cmds.info)
    made.command(epilog=bench_cmd.EXAMPLES)(bench_cmd.bench)
    made.command(epilog=selftest_cmd.EXAMPLES)(selftest_cmd.selftest)
    made.command(epilog=serve_cmd.EXAMPLES)(serve_cmd.serve)
    made.command(epilog=train_cmd.EXAMPLES)(train_cmd.train)
    _APP = made
    return made


def __getattr__(name: str):
    """`from infdit_cli.cli.app import app`: the Typer app (built on first use)."""
    if name == "app":
        return _application()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_ROOT_HELP = """Upscale images with Inf-DiT, block by block in bounded memory.

    Exit codes: 0 done; 1 a file that cannot be read, decoded or written, or a failure during the work
    (batch: some file failed, after finishing the others); 2 a wrong command line or an impossible request,
    found before any work; 3 out of device memory even at the smallest plan; 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM), 129 hung up (SIGHUP): no partial output is left, the last checkpoint is kept.
    Errors are one line on stderr; set INFDIT_DEBUG=1 (or -v) for the traceback.
    """


def version_line() -> str:
    """`infdit --version`: infdit's version, torch's, and whether CUDA is available, without importing torch
    (it would take seconds): torch's version and CUDA build from its `version.py`, the devices from the
    NVIDIA driver (`cuda_devices`)."""
    torch_version, cuda_build = _torch_build()
    if torch_version is None:
        return f"infdit {__version__}; torch not installed"
    if cuda_build is None:
        cuda = "CUDA not available (this torch is built without CUDA)"
    else:
        n, why = cuda_devices()
        cuda = (f"CUDA available ({n} device{'s' if n != 1 else ''}; torch built for CUDA {cuda_build})" if n
                else f"CUDA not available ({why}; torch built for CUDA {cuda_build})")
    return f"infdit {__version__}; torch {torch_version}; {cuda}"


def _torch_build() -> tuple[str | None, str | None]:
    """torch's (version, CUDA version it was built for, None for a CPU build) read from torch/version.py,
    a file of plain assignments; (None, None) when torch is not installed."""
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec("torch")
        folder = list(spec.submodule_search_locations or [])[0] if spec else None
        with open(os.path.join(folder, "version.py"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, ImportError, IndexError, TypeError, ValueError):
        return None, None
    found = {}
    for key in ("__version__", "cuda"):
        m = re.search(rf"^{key}\s*(?::[^=\n]*)?=\s*(?:'([^']*)'|\"([^\"]*)\"|None)", text, re.MULTILINE)
        found[key] = (m.group(1) or m.group(2)) if m and (m.group(1) or m.group(2)) else None
    return found["__version__"] or "(unknown version)", found["cuda"]


def cuda_devices() -> tuple[int, str]:
    """(CUDA devices the NVIDIA driver shows this process, why none): `cuInit` and `cuDeviceGetCount`
    through the driver library, as torch's own check does underneath; CUDA_VISIBLE_DEVICES is honoured by
    the driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver found"
    rc = lib.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return 0, "no CUDA device"
    if rc != 0:
        return 0, f"the NVIDIA driver failed to start (CUDA error {rc})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return 0, "no CUDA device"
    return count.value, ""


def _usage_error(e) -> BadRequest:
    ctx = getattr(e, "ctx", None)
    err = BadRequest(e.format_message() + (f" (see {ctx.command_path} --help)" if ctx is not None else ""))
    err.exit_code = getattr(e, "exit_code", 2)
    return err


_STOPPED: list[int] = []  # the signal `_on_signal` got: typer turns any KeyboardInterrupt into Exit(130)


def _on_signal(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _STOPPED.append(signum)
    raise Signalled(signum)


_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main() -> None:
    before = {sig: signal.getsignal(sig) for sig in _STOPS}
    clear_overrides()  # -v of an earlier run in this process (tests, embedding) does not carry over
    _STOPPED.clear()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # timeout, systemd, Slurm, docker stop; a closed terminal
        if before[sig] is signal.SIG_DFL:  # SIG_IGN stays (nohup)
            try:
                signal.signal(sig, _on_signal)
            except ValueError:  # not the main thread: signals stay as they are
                pass
    try:
        done = _main()
        _hold_stops()  # the work is over: a stop now must not turn the exit into a traceback
        if settings().exit_file:  # under infdit_cli.launch, for it to read (torch is loaded)
            from ..distributed.world import write_exit_code

            write_exit_code(done.code, after=done.after, said=done.said)
        if "infdit_cli.distributed.world" in sys.modules:  # torch is loaded: a rank may have joined a group
            from ..distributed import world

            if world.joined():
                world.leave(done.code)
        sys.exit(done.code)
    finally:  # main() run in-process (tests, embedding) leaves the handlers as it found them
        for sig, old in before.items():
            if old is not None:
                try:
                    signal.signal(sig, old)
                except ValueError:
                    pass


def _stop(exc: BaseException | None = None) -> BaseException:
    """What stopped the run: the Signalled our handler raised (typer and click hide it behind Exit(130) or
    Abort), else `exc` when it is a KeyboardInterrupt, else Ctrl-C."""
    if _STOPPED:
        return Signalled(_STOPPED[0])
    return exc if isinstance(exc, KeyboardInterrupt) else KeyboardInterrupt()


def _main() -> Reported:
    try:
        application = _application()  # a stop while typer loads is a stop like any other
    except BaseException as e:  # noqa: BLE001
        return _failed(_stop(e) if isinstance(e, KeyboardInterrupt) else e)
    import typer

    try:
        rc = application(standalone_mode=False)  # the code of a typer.Exit (Ctrl-C arrives as Exit(130))
        if rc == 130:
            return _failed(_stop())
        return Reported(rc if isinstance(rc, int) else 0)
    except SystemExit as e:
        if isinstance(e.code, int) or e.code is None:
            return Reported(e.code or 0)
        print(e.code, file=sys.stderr)
        return Reported(1, said=True)
    except typer.Exit as e:
        return Reported(e.exit_code)
    except typer.Abort as e:  # click turns EOFError into Abort
        return _failed(_stop(e.__cause__))
    except typer.TyperException as e:  # click's usage errors: one line like every other error, exit 2
        return _failed(_usage_error(e))
    except KeyboardInterrupt as e:  # raised outside typer's invoke (while it parses, say)
        return _failed(_stop(e))
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
