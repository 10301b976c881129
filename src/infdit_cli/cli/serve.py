"""`infdit serve`: a local job server with a web page (the optional extra `infdit[serve]`)."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from .._version import __version__
from ..errors import BadRequest, InfditError
from ..serve.hosts import LOOPBACK_NAMES, bare_host
from ..settings import settings
from ..units import parse_bytes
from ..weights.hub import DEFAULT_MODEL, registry, resolve_weights
from . import _options as O
from ._progress import FirstLines, device_note

EXAMPLES = """Examples:

  infdit serve                                   # http://127.0.0.1:7860/ on this machine only

  infdit serve --host 0.0.0.0 --port 8080        # the network too: prints the address with its token

  infdit serve --jobs /data/infdit-jobs --allow-paths /data/photos --mem-budget 20GB
"""

INSTALL_HINT = ('infdit serve needs the web server packages: pip install fastapi uvicorn python-multipart '
                '(the serve extra: pip install ".[serve]" in the infdit clone)')


def default_jobs() -> Path:
    base = settings().data_home or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "infdit" / "jobs"


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def any_address(host: str) -> bool:
    """A bind to every address (0.0.0.0, ::, empty): its Host check takes any IP address."""
    return host.strip().strip("[]") in ("0.0.0.0", "::", "")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, made here so a port in use is one clear line (exit 1), not a server log."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BadRequest(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        taken = " (another server is there; choose another --port)" if e.errno == 98 else ""
        raise InfditError(f"cannot listen on {host}:{port}: {e.strerror or e}{taken}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but this machine's loopback needs "
                                           "a token (given, or made and printed once).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one, printed).")] = 7860,
    jobs: Annotated[Path | None, typer.Option(help=(
        "The jobs folder: inputs, run folders, previews and results, kept across restarts. "
        "Default: ~/.local/share/infdit/jobs."))] = None,
    token: Annotated[str | None, typer.Option(
        envvar="INFDIT_TOKEN", help="Every request must carry it (Authorization: Bearer, or ?token= in the "
                                    "page's address). Default: none on loopback, a new one otherwise.")]
        = None,
    allow_paths: Annotated[Path | None, typer.Option(help=(
        "Also accept jobs naming an image file under this folder on the server (JSON {\"path\": ...}), "
        "not only uploads."))] = None,
    allow_host: Annotated[list[str] | None, typer.Option(help=(
        "Also answer to this host name (the Host header; repeatable), e.g. the machine's name on the "
        "network. Always answered: 127.0.0.1, localhost, [::1]; on a network bind also its address."))]
        = None,
    max_bytes: Annotated[str, typer.Option(help="Largest upload, e.g. 100MB.")] = "100MB",
    max_pixels: Annotated[int, typer.Option(min=1, help="Refuse uploads with more pixels than this.")]
        = 16 * 2**20,
    max_queue: Annotated[int, typer.Option(min=1, help="Most queued jobs; more are refused (429) until "
                                                       "some have run.")] = 100,
    mem_budget: O.MemBudget = None,
    block_batch: O.BlockBatch = None,
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    weights: O.Weights = None,
    repo: O.Repo = None,
    offline: O.Offline = False,
    quiet: O.Quiet = False,
) -> None:
    """Serve a web page and a JSON API for upscaling jobs: a queue, plans with predicted time, live
    previews, results to download; jobs continue after a restart.

    The model is loaded once and runs one job at a time. Jobs live in the jobs folder: stop the server
    (Ctrl-C, SIGTERM, a crash) and start it again, and the job that was running continues from its last
    step, then the queue.
    """
    limit, names = check_serve_args(host=host, token=token, allow_paths=allow_paths,
                                    allow_host=allow_host or [], max_bytes=max_bytes, mem_budget=mem_budget,
                                    device=device, dtype=dtype)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise BadRequest(INSTALL_HINT) from None
    made_token = token is None and not loopback(host)
    if made_token:
        token = secrets.token_urlsafe(24)
    sock = bind(host, port)  # before the weights: a taken port is said at once
    if not any_address(host):  # the address it prints: always one it answers to (box.lan -> its IP)
        names.add(bare_host(sock.getsockname()[0]))

    from ..plan.device import resolve_device
    from ..serve import server
    from ..serve.app import create_app
    from ..serve.jobs import JobRunner, JobStore
    from .upscale import load_upscaler

    store = JobStore(jobs or default_jobs())  # UnsafePath, Busy (another server on it): before the weights
    try:
        options = O.make_options(20, 0, mem_budget, block_batch, O.ColorFix.none)
        # why --device auto is the CPU: said before any download starts
        first = FirstLines([device_note(device, resolve_device(device, check=False).type)], quiet)
        up = load_upscaler(weights, repo, offline, device, dtype, options, quiet, first)
        first()  # (said already where a download came first)
        _ = up.rates  # calibrated now (cached per device), not during the first request's plan
        runner = JobRunner(store, up, max_pixels=max_pixels, max_queue=max_queue,
                           on_error=None if quiet else _say)
        app = create_app(runner, token=token, max_bytes=limit, allow_paths=allow_paths,
                         info={"version": _version(), "device": up.device.type,
                               "dtype": str(up.model.dtype).removeprefix("torch."),
                               "model": model_label(weights, repo)},
                         hosts=names, any_ip=any_address(host))
        for line in store.skipped:
            print(f"warning: {line}", file=sys.stderr)

        def started() -> None:
            if not quiet or made_token:
                waiting = len(runner.queue())
                url = server.address(sock) + (f"?token={token}" if made_token else "")
                _say(f"{url}  (jobs in {store.root}{f'; {waiting} queued' if waiting else ''}; "
                     f"{up.device.type} {str(up.model.dtype).removeprefix('torch.')}; Ctrl-C stops, jobs "
                     "continue at the next start)")

        server.run(app, runner, sock, on_started=started)
    finally:
        store.close()
        sock.close()


def _say(line: str) -> None:
    print(f"infdit serve: {line}", file=sys.stderr, flush=True)


def model_label(weights, repo) -> dict:
    """What the page says of the loaded model: {"name", "kind", "warning"}. `kind` is "demo model" (the tiny
    model that ships with the package), "official" (a registry model, or a file converted from its
    release), "converted" (a file `infdit convert`/`download` made from another checkpoint) or "random
    test model" (a file with no conversion record, as the test and benchmark models are: its output is
    noise)."""
    name = str(weights if weights is not None else settings().weights or DEFAULT_MODEL)
    meta: dict = {}
    try:
        from safetensors import safe_open  # kept off start-up (--help, usage errors)

        path = resolve_weights(name, repo=repo, offline=True)  # loaded already: a cache look-up
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - the label only; the model itself is loaded
        path = None
    known = registry()
    releases = {spec.release_url: n for n, spec in known.items() if spec.release_url}
    if name in known:
        return {"name": name, "kind": "demo model" if known[name].packaged else "official", "warning": None}
    shown = path.name if path is not None else name
    if meta.get("infdit_source") in releases:
        return {"name": f"{shown} ({releases[meta['infdit_source']]})", "kind": "official", "warning": None}
    if meta.get("infdit_converter"):
        return {"name": shown, "kind": "converted", "warning": None}
    return {"name": shown, "kind": "random test model",
            "warning": "a random test model (no conversion record): it makes noise, not an upscaled image; "
                       "start the server with the official model (infdit-4x) for real results"}


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def check_serve_args(*, host: str, token: str | None, allow_paths: Path | None, allow_host: list[str],
                     max_bytes: str, mem_budget: str | None, device: str, dtype: str) -> tuple[int, set[str]]:
    """The serve options typer does not check itself, before anything is bound, made or loaded:
    (--max-bytes in bytes, the host names the server answers to).

    Raises:
        BadRequest: one line naming the option (exit 2).
    """
    try:
        limit = parse_bytes(max_bytes)
    except ValueError:
        raise BadRequest(f"--max-bytes must be a size like 100MB or 2GB, got {max_bytes!r}") from None
    if limit < 1:
        raise BadRequest(f"--max-bytes must be at least 1 byte, got {max_bytes!r}")
    if mem_budget is not None:
        try:
            parse_bytes(mem_budget)
        except ValueError as e:
            raise BadRequest(f"--mem-budget: {e}") from None
    if not host.strip():
        raise BadRequest("--host must be an address or a name, e.g. 127.0.0.1 or 0.0.0.0")
    if token is not None and len(token) < 8:
        raise BadRequest("--token must be at least 8 characters")
    if token is not None and not token.isprintable() or token is not None and " " in token:
        raise BadRequest("--token must be printable characters without spaces")
    if allow_paths is not None and not allow_paths.is_dir():
        raise BadRequest(f"--allow-paths {allow_paths} is not a folder")
    from ..jobs.upscaler import (  # kept off start-up (torch): after the checks above
        resolve_device,
        resolve_dtype,
    )

    resolve_dtype(dtype, resolve_device(device, check=False))  # BadRequest: an unknown device or dtype
    names = set(LOOPBACK_NAMES)
    for name in allow_host:
        bare = bare_host(name)
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            if not _HOST_NAME.fullmatch(bare) or len(bare) > 253:
                raise BadRequest(f"--allow-host takes a host name or an IP address without a port or scheme, "
                                 f"got {name!r}") from None
        names.add(bare)
    if not any_address(host):
        names.add(bare_host(host))  # the name given (a loopback address too: 127.0.0.2 is answered)
    return limit, names


def _version() -> str:
    return __version__
