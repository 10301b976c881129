"""The HTTP side of `infdit serve`: a JSON API, a server-sent-events stream and the web page, over a
`jobs.JobRunner` (FastAPI; the optional extra `infdit[serve]`).

Rules every request meets (`_Guard`, a plain ASGI middleware in front of the app):
- its Host is one of this server's names (127.0.0.1, localhost, [::1], any port; on a network bind also
  the bind address and the `--allow-host` names), else 403: a web page whose name was rebound to this
  machine's address (DNS rebinding) cannot drive the server;
- the token, where the server has one: `Authorization: Bearer T` or `?token=T` (for the page's images,
  links and event stream), compared in constant time; else 401;
- a request that changes something (POST, DELETE) from a page of another origin is refused (403): a web
  page elsewhere cannot submit or cancel jobs through a browser on this machine;
- a body over `max_bytes` is refused (413) while it arrives, before it is stored.
Errors are JSON `{"error": one line, "exit_code": the CLI's code for it}`; a client's mistake is a 4xx,
a full disk 507, and no answer names a server path (docs/threat-model.md).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    BadImage,
    BadRequest,
    Busy,
    DiskFull,
    InfditError,
    TooManyPixels,
    UnsafePath,
    explain,
    no_space,
)
from ..jobs.pipeline import plan_json
from .hosts import LOOPBACK_NAMES, bare_host
from .jobs import JobOptions, JobRunner, QueueFull

__all__ = ["LOOPBACK_NAMES", "EventStream", "ServerSettings", "create_app", "router"]

KEEPALIVE_S = 15.0
MAX_DECODES = 2  # uploads decoded at once, at most (and within the pixel budget)
DECODE_WAIT_S = 60.0  # how long an upload waits for the decode budget before it is answered 503
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")
_MEDIA = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "tiff": "image/tiff"}
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class EventStream:
    """Server-sent events: what the worker thread publishes goes to every connected stream's queue."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def publish(self, kind: str, data: dict) -> None:  # any thread
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        item = f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        try:
            loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def _put(self, item: str | None) -> None:
        for q in list(self.queues):
            if q.qsize() > 1000:  # a client that stopped reading: it reconnects and gets a fresh snapshot
                self.queues.discard(q)
                q.put_nowait(None)
            else:
                q.put_nowait(item)

    def close(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._put, None)


async def in_thread(fn, *args):
    """`fn(*args)` in a new thread that ends with it. Not a pool's: a thread that lives on after torch ran
    in it keeps its OpenMP team, and the job thread's CPU work ran 4-5 % slower beside one
    (benchmarks/serve_overhead.py). Decoding and planning an upload run torch."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def call() -> None:
        try:
            result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
            loop.call_soon_threadsafe(lambda err=e: done.cancelled() or done.set_exception(err))
        else:
            loop.call_soon_threadsafe(lambda: done.cancelled() or done.set_result(result))

    threading.Thread(target=call, name="infdit-upload", daemon=True).start()
    return await done


class _TooLarge(Exception):
    pass


class _NotFound(Exception):
    pass


class _Overloaded(InfditError):
    """Uploads wait for the decode budget longer than DECODE_WAIT_S."""


def _error(status: int, message: str, code: int = 2) -> JSONResponse:
    # One line, always encodable: a client's text in it (a path with a lone surrogate, a newline) is escaped.
    message = " ".join(message.encode("utf-8", "backslashreplace").decode("utf-8").splitlines())
    return JSONResponse({"error": message, "exit_code": code}, status_code=status)


_STATUS = ((DiskFull, 507), (QueueFull, 429), (_Overloaded, 503), (TooManyPixels, 413), (BadImage, 415),
           (Busy, 409))  # the first that matches: TooManyPixels before BadImage, its base


def _status(exc: BaseException) -> int:
    code = next((status for kind, status in _STATUS if isinstance(exc, kind)), None)
    if code is not None:
        return code
    if isinstance(exc, InfditError):
        return 400 if exc.exit_code == 2 else 422
    return 500


def host_name(value: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case, brackets off;
    None when it is not of that form."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, _, port = value.partition(":")
        rest = ":" + port if _ else ""
        if not name or not re.fullmatch(r"[a-z0-9._-]+", name):
            return None
    if rest and not (rest[0] == ":" and rest[1:].isdigit() and len(rest) <= 6):
        return None
    return name


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Guard:
    """Host, token, same-origin writes and the body's byte limit, before the app sees a request."""

    def __init__(self, app, *, token: str | None, max_bytes: int, hosts: Iterable[str] = LOOPBACK_NAMES,
                 any_ip: bool = False) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes
        self.hosts, self.any_ip = frozenset(bare_host(h) for h in hosts), any_ip

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refused = self._host_refused(headers.get("host"))
        if refused:
            return await _error(403 if headers.get("host") else 400, refused, 2)(scope, receive, send)
        if self.token is not None and not self._authorised(scope, headers):
            return await _error(401, "this server needs its token: open the address it printed, or send "
                                "'Authorization: Bearer TOKEN'", 2)(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and not self._same_origin(headers):
            refusal = _error(403, "refused: a request from a page of another site", 2)
            return await refusal(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _error(413, f"the upload is {int(length)} bytes; this server takes at most "
                                f"{self.max_bytes} (--max-bytes)", 2)(scope, receive, send)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        async def sending(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"referrer-policy", b"no-referrer")]}
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:  # the app answers 413 itself (its handler); this is for a body read outside it
            if not started:
                await _error(413, f"the upload is over {self.max_bytes} bytes; this server takes at most "
                             f"{self.max_bytes} (--max-bytes)", 2)(scope, receive, sending)

    def _host_refused(self, host: str | None) -> str | None:
        """None for a Host this server answers to, else the one line that refuses it."""
        if not host:
            return "refused: the request has no Host header"
        name = host_name(host)
        if name is not None and (bare_host(name) in self.hosts or self.any_ip and _is_ip(name)):
            return None
        shown = "".join(c for c in host[:100] if c.isprintable())
        # Not the names it answers to: a rebinding page could read this answer and learn them.
        return f"refused: Host {shown!r} is not a name of this server (see --allow-host)"

    def _authorised(self, scope, headers) -> bool:
        given = None
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        else:
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [None])[0]
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _same_origin(headers) -> bool:
        origin = headers.get("origin")
        if origin is None or origin == "null" and "host" not in headers:
            return True  # not a browser's cross-origin request (curl, scripts)
        try:
            return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()
        except ValueError:  # an Origin that is not a URL
            return False


class _Budget:
    """Uploads being decoded at once: at most MAX_DECODES, and together at most `total` pixels (the pixel
    limit, as their headers declare them), so the decodes' memory is bounded by one largest allowed image
    however many uploads arrive together. Single event loop; no lock."""

    def __init__(self, total: int) -> None:
        self.total, self.used, self.count = total, 0, 0

    async def acquire(self, n: int, wait_s: float) -> int:
        n = min(max(n, 1), self.total)
        deadline = time.monotonic() + wait_s
        while self.used + n > self.total or self.count >= MAX_DECODES:
            if time.monotonic() > deadline:
                raise _Overloaded("the server is busy decoding other uploads; try again in a moment")
            await asyncio.sleep(0.02)
        self.used += n
        self.count += 1
        return n

    def release(self, n: int) -> None:
        self.used -= n
        self.count -= 1


def _shown(path: str) -> str:
    """A client's path for a message: at most 200 characters, anything unprintable escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path[:200])


def open_under(base_fd: int, bases: Iterable[str], given: str) -> int:
    """A read-only descriptor of the regular file `given` names under the folder open as `base_fd`, walked
    one component at a time from that descriptor (O_NOFOLLOW, and O_DIRECTORY on the way): a link
    anywhere is refused, and nothing is looked up twice by name, so swapping a folder for a link meanwhile
    cannot lead outside. `bases`: the folder's spellings an absolute `given` may start with.

    Raises:
        BadRequest: NUL or undecodable characters, `..`, an absolute path elsewhere, or a link on the way.
        BadImage: no such regular file there (or it cannot be opened).
    """
    shown = _shown(given)
    if "\x00" in given:
        raise BadRequest(f"the path {shown} has a NUL character")
    try:
        os.fsencode(given)
    except UnicodeError:
        raise BadRequest(f"the path {shown} is not a valid file name") from None
    outside = BadRequest(f"{shown} is outside the folder the server allows (--allow-paths)")
    rel = given
    if os.path.isabs(given):
        for base in bases:
            if given == base or given.startswith(base.rstrip("/") + "/"):
                rel = given[len(base):]
                break
        else:
            raise outside
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise outside
    fd = os.dup(base_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | _NOFOLLOW | _CLOEXEC | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                try:
                    link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                if link or e.errno == errno.ELOOP:
                    raise outside from None
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    raise BadImage(f"no such file under --allow-paths: {shown}") from None
                if e.errno == errno.ENAMETOOLONG:
                    raise BadRequest(f"the path {shown} is too long") from None
                raise BadImage(f"{shown} under --allow-paths cannot be opened: {e.strerror}") from None
            os.close(fd)
            fd = nfd
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadImage(f"no such file under --allow-paths: {shown}")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _content_disposition(filename: str) -> str:
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


class _FileResponse(StreamingResponse):
    """A file object's bytes, streamed; the file is closed when the answer ends, however it ends (sent, the
    client gone before the first byte, cancelled), and by its own finaliser if the answer is never sent."""

    def __init__(self, file, media_type: str, headers: dict) -> None:
        self.file = file
        super().__init__(iter(lambda: file.read(_CHUNK), b""), media_type=media_type, headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.file.close()


def _fd_response(fd: int, media_type: str, headers: dict) -> Response:
    """The open file `fd` as the answer (streamed, then closed): never a second open by name."""
    try:
        size = os.fstat(fd).st_size
        file = os.fdopen(fd, "rb", buffering=0)  # owns fd from here: closed with the file object
    except BaseException:
        os.close(fd)
        raise
    return _FileResponse(file, media_type, {**headers, "Content-Length": str(size)})


def _options(form) -> JobOptions:
    def text(key: str) -> str | None:
        v = form.get(key)
        if v is None or isinstance(v, str) and not v.strip():
            return None
        if not isinstance(v, str):
            raise BadRequest(f"{key} must be a form field, not a file")
        return v.strip()

    def number(key: str, kind, default):
        v = text(key)
        if v is None:
            return default
        try:
            return kind(v)
        except ValueError:
            kind_name = "an integer" if kind is int else "a number"
            raise BadRequest(f"{key} must be {kind_name}, got {v[:40]!r}") from None

    return JobOptions(res=text("res"), scale=number("scale", float, None), steps=number("steps", int, 20),
                      seed=number("seed", int, 0), format=(text("format") or "png").lower(),
                      color_fix=(text("color_fix") or "none").lower())  # checked by the runner


def _display_name(name: str | None) -> str:
    """The client's file name for display: its last path part, control characters out, at most 200."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:200]
    return name or "image"


def page_html() -> str:
    return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ServerSettings:
    """What the handlers need besides the runner (`app.state.settings`)."""

    token: str | None
    max_bytes: int
    allow_paths: Path | None
    info: dict
    decode_wait_s: float
    allowed_fd: int | None  # `allow_paths` opened once: requests walk from this descriptor, never the name
    bases: list[str]  # `allow_paths`' spellings (`open_under`)
    hidden: list[tuple[str, str]]  # (server path, its role in answers), longest first

    def scrub(self, message: str) -> str:
        """No server path in an answer: the jobs and allowed folders by their role."""
        for path, role in self.hidden:
            message = message.replace(path, role)
        return message


def create_app(runner: JobRunner, *, token: str | None = None, max_bytes: int = 100 * 2**20,
               allow_paths: Path | None = None, info: dict | None = None,
               hosts: Iterable[str] = LOOPBACK_NAMES, any_ip: bool = False,
               decode_wait_s: float = DECODE_WAIT_S) -> object:
    """The ASGI application: the API and page over `runner`, whose jobs the caller runs (`runner.run()`,
    or `runner.start()` for a thread). Call its `closing()` when the server begins to stop (a signal): the
    event streams end, so no connection holds the stop up.

    `hosts`: the names (Host header, any port) it answers to; `any_ip`: also any IP address (a wildcard
    bind). Raises OSError when `allow_paths` cannot be opened as a folder."""
    events = EventStream()
    runner.publish = events.publish
    allowed_fd, bases = None, []
    if allow_paths is not None:
        allowed_fd = os.open(allow_paths, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        bases = list(dict.fromkeys([os.path.abspath(allow_paths), os.path.realpath(allow_paths)]))
    root = runner.store.root
    hidden = [(p, "<jobs folder>") for p in {os.path.realpath(root), os.path.abspath(root)}]
    hidden += [(p, "<allowed folder>") for p in bases]
    hidden.sort(key=lambda ph: -len(ph[0]))
    app = FastAPI(title="infdit", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router)
    for kind, handler in _HANDLERS:
        app.add_exception_handler(kind, handler)
    app.state.runner, app.state.events, app.state.budget = runner, events, _Budget(runner.max_pixels)
    app.state.settings = ServerSettings(token, max_bytes, allow_paths, info or {}, decode_wait_s, allowed_fd,
                                        bases, hidden)
    guard = app.state.guard = _Guard(app, token=token, max_bytes=max_bytes, hosts=hosts, any_ip=any_ip)
    guard.closing = events.close  # called as the server begins to stop: event streams end, connections close
    return guard


@asynccontextmanager
async def _lifespan(app: FastAPI):
    events = app.state.events
    events.loop = asyncio.get_running_loop()
    try:
        yield
    finally:
        events.close()


# ---- errors ------------------------------------------------------------------------------------------------


def _disk_full() -> JSONResponse:
    return _error(507, "the server's disk is full: nothing was stored; try again later", 1)


async def _known(request: Request, exc: Exception):
    if isinstance(exc, DiskFull):
        return _disk_full()
    msg, code = explain(exc)
    return _error(_status(exc), request.app.state.settings.scrub(msg), code)


async def _os(request: Request, exc: OSError):
    if no_space(exc) or exc.errno == errno.EFBIG:  # EFBIG: a file-size limit, as full
        return _disk_full()
    raise exc  # not a client's mistake: 500, logged (`_any`)


async def _too_large(request: Request, exc: Exception):
    limit = request.app.state.settings.max_bytes
    return _error(413, f"the upload is over {limit} bytes; this server takes at most {limit} (--max-bytes)",
                  2)


async def _http(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, request.app.state.settings.scrub(str(exc.detail)),
                  2 if exc.status_code < 500 else 1)


async def _not_found(request: Request, exc: Exception):
    return _error(404, f"no job {_shown(str(exc)[:40])}", 1)


async def _any(request: Request, exc: Exception):  # an internal error: one line here, the traceback logged
    msg, code = explain(exc)
    return _error(500, request.app.state.settings.scrub(msg), code)


_HANDLERS = ((InfditError, _known), (OSError, _os), (_TooLarge, _too_large), (StarletteHTTPException, _http),
             (_NotFound, _not_found), (Exception, _any))


# ---- what a request brings ---------------------------------------------------------------------------------


async def _upload(request: Request) -> tuple[Path, str, JobOptions]:
    """The request's image, stored under a generated name in the jobs folder, and its options."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        return await _server_path(request)
    if not ctype.startswith("multipart/form-data"):
        raise BadRequest("send the image as multipart/form-data (field 'image'), or JSON with a 'path' "
                         "on a server started with --allow-paths")
    store = request.app.state.runner.store
    form = await request.form(max_files=1, max_fields=20)
    try:
        options = _options(form)
        image = form.get("image")
        if image is None or isinstance(image, str):
            raise BadRequest("no image: send the file in the form field 'image'")
        name = _display_name(image.filename)
        tmp, fd = store.folder.temp("upload")
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := await image.read(_CHUNK):
                    f.write(chunk)
            if os.path.getsize(store.root / tmp) == 0:
                raise BadImage(f"{name} is empty (0 bytes)")
        except BaseException:
            store.folder.unlink(tmp)
            raise
        return store.root / tmp, name, options
    finally:
        await form.close()


async def _server_path(request: Request) -> tuple[Path, str, JobOptions]:
    """A file under --allow-paths (JSON {"path": ...}), copied into the jobs folder, and its options."""
    settings, store = request.app.state.settings, request.app.state.runner.store
    if settings.allow_paths is None:
        raise BadRequest("this server takes uploads only (start it with --allow-paths DIR to submit paths)")
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # malformed, not UTF-8, or nested past the parser's depth
        raise BadRequest("the JSON body cannot be read") from None
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise BadRequest("give {\"path\": \"...\"} and the options as JSON fields")
    options = _options({k: (str(v) if v is not None else None) for k, v in body.items() if k != "path"})
    src = open_under(settings.allowed_fd, settings.bases, body["path"])
    try:
        tmp, fd = store.folder.temp("upload")
        try:
            with os.fdopen(fd, "wb") as dst:
                await run_in_threadpool(_copy, src, dst)
        except BaseException:
            store.folder.unlink(tmp)
            raise
    finally:
        os.close(src)
    return store.root / tmp, _display_name(body["path"]), options


async def _decoded(request: Request, fn, path: Path, *args):
    """`fn(path, *args)` (it decodes the upload at `path`) in a thread, once the pixels its header
    declares fit in the decode budget; the budget is given back when the thread ends, even if the
    request is gone by then."""
    state = request.app.state
    weight = await run_in_threadpool(state.runner.declared_pixels, path)
    budget = state.budget
    taken = await budget.acquire(weight if weight is not None else state.runner.max_pixels,
                                 state.settings.decode_wait_s)
    task = asyncio.ensure_future(in_thread(fn, path, *args))
    task.add_done_callback(lambda t: budget.release(taken))
    return await asyncio.shield(task)


def _job(request: Request, job_id: str):
    job = request.app.state.runner.get(job_id)
    if job is None:
        raise _NotFound(job_id)
    return job


def _open_file(store, job, name: str) -> int | None:
    """A read-only descriptor of the job's file `name` (never through a link), or None."""
    try:
        folder = store.job_folder(job.id, create=False)
    except (UnsafePath, OSError):
        return None
    try:
        return folder.open(name)
    except (OSError, ValueError):
        return None
    finally:
        folder.close()


# ---- the routes --------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(page_html(), headers={
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' "
                                   "'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
                                   "frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})  # Referrer-Policy: the guard


@router.get("/api/info")
async def api_info(request: Request):
    settings, runner = request.app.state.settings, request.app.state.runner
    return {**settings.info, "max_pixels": runner.max_pixels, "max_bytes": settings.max_bytes,
            "token_required": settings.token is not None, "paths_allowed": settings.allow_paths is not None}


@router.post("/api/plan")
async def api_plan(request: Request):
    runner = request.app.state.runner
    path, name, options = await _upload(request)
    try:
        img, plan, lines = await _decoded(request, runner.plan, path, name, options)
    finally:
        runner.store.folder.unlink(path.name)
    return {"name": name, "input_size": list(img.size), "output_size": list(plan.target_size),
            "predicted_seconds": round(plan.seconds, 3), "lines": lines, "warnings": list(img.notices),
            "plan": json.loads(json.dumps(plan_json(plan), default=str))}


@router.post("/api/jobs", status_code=201)
async def api_submit(request: Request):
    runner = request.app.state.runner
    runner.check_room()  # QueueFull (429) before the upload is stored
    path, name, options = await _upload(request)
    try:
        job = await _decoded(request, runner.submit, path, name, options)
    finally:
        runner.store.folder.unlink(path.name)  # moved into the job when accepted
    return JSONResponse(runner.snapshot(job), status_code=201)


@router.get("/api/jobs")
async def api_jobs(request: Request):
    return {"jobs": request.app.state.runner.jobs()}


@router.get("/api/jobs/{job_id}")
async def api_job(request: Request, job_id: str):
    return request.app.state.runner.snapshot(_job(request, job_id))


@router.post("/api/jobs/{job_id}/cancel")
async def api_cancel(request: Request, job_id: str):
    runner = request.app.state.runner
    return runner.snapshot(runner.cancel(_job(request, job_id)))


@router.delete("/api/jobs/{job_id}", status_code=204)
async def api_delete(request: Request, job_id: str):
    job = _job(request, job_id)
    await run_in_threadpool(request.app.state.runner.delete, job)
    return Response(status_code=204)


@router.get("/api/jobs/{job_id}/preview")
async def api_preview(request: Request, job_id: str):
    job = _job(request, job_id)
    fd = _open_file(request.app.state.runner.store, job, "preview.jpg") if job.preview else None
    if fd is None:
        return _error(404, f"job {job.id} has no preview yet", 1)
    return _fd_response(fd, "image/jpeg", {"Cache-Control": "no-store"})


@router.get("/api/jobs/{job_id}/result")
async def api_result(request: Request, job_id: str):
    job = _job(request, job_id)
    if job.state != "done" or job.result_file is None:
        return _error(409, f"job {job.id} is {job.state}; its result is there when it is done", 1)
    fd = _open_file(request.app.state.runner.store, job, job.result_file)
    if fd is None:
        return _error(410, f"job {job.id}'s result is no longer on the server", 1)
    stem = _SAFE_NAME.sub("_", Path(job.name).stem).strip(" .") or "image"
    return _fd_response(fd, _MEDIA.get(job.options.format, "application/octet-stream"),
                        {"Content-Disposition": _content_disposition(f"{stem}_infdit.{job.options.format}"),
                         "Cache-Control": "no-store"})


@router.get("/api/events")
async def api_events(request: Request):
    queue: asyncio.Queue = asyncio.Queue()
    for job in request.app.state.runner.jobs():  # the state now, then every change
        queue.put_nowait(f"event: job\ndata: {json.dumps(job, separators=(',', ':'))}\n\n")
    events = request.app.state.events
    events.queues.add(queue)
    return StreamingResponse(_event_stream(request, queue, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _event_stream(request: Request, queue: asyncio.Queue, events: EventStream):
    """What `queue` receives, as it comes, with a keep-alive comment when nothing did for KEEPALIVE_S."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            if item is None:
                return
            yield item
    finally:
        events.queues.discard(queue)


def _copy(src: int, dst) -> None:
    while chunk := os.read(src, _CHUNK):
        dst.write(chunk)

