"""The HTTP side of `infdit serve`: a JSON API, a server-sent-events stream and the web page, over a
`jobs.JobRunner` (FastAPI; the optional extra `infdit[serve]`).

Rules every request meets (`_Guard`, a plain ASGI middleware in front of the app):
- the token, where the server has one: `Authorization: Bearer T` or `?token=T` (for the page's images,
  links and event stream), compared in constant time; else 401;
- a request that changes something (POST, DELETE) from a page of another origin is refused (403): a web
  page elsewhere cannot submit or cancel jobs through a browser on this machine;
- a body over `max_bytes` is refused (413) while it arrives, before it is stored.
Errors are JSON `{"error": one line, "exit_code": the CLI's code for it}`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import threading
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BadImage, BadRequest, Busy, InfditError, describe
from ..pipeline import plan_json
from .jobs import JobOptions, JobRunner

__all__ = ["create_app", "Hub"]

KEEPALIVE_S = 15.0
_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]+")


class Hub:
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
    """`fn(*args)` in a new thread that ends with it. Not a pool's: a thread that lives on after torch ran in it
    keeps its OpenMP team, and the job thread's CPU work ran 4-5 % slower beside one
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


def _error(status: int, message: str, code: int = 2) -> JSONResponse:
    return JSONResponse({"error": message, "exit_code": code}, status_code=status)


def _status(exc: BaseException) -> int:
    if isinstance(exc, BadImage):
        return 413 if "pixels" in str(exc) else 415
    if isinstance(exc, Busy):
        return 409
    if isinstance(exc, InfditError):
        return 400 if exc.exit_code == 2 else 422
    return 500


class _Guard:
    """Token, same-origin writes and the body's byte limit, before the app sees a request."""

    def __init__(self, app, *, token: str | None, max_bytes: int) -> None:
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.token is not None and not self._authorised(scope, headers):
            return await _error(401, "this server needs its token: open the address it printed, or send "
                                "'Authorization: Bearer TOKEN'", 2)(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and not self._same_origin(headers):
            return await _error(403, "refused: a request from a page of another site", 2)(scope, receive, send)
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
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await _error(413, f"the upload is over {self.max_bytes} bytes; this server takes at most "
                             f"{self.max_bytes} (--max-bytes)", 2)(scope, receive, send)

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
        return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


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
            raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, got {v[:40]!r}") from None

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


def create_app(runner: JobRunner, *, token: str | None = None, max_bytes: int = 100 * 2**20,
               allow_paths: Path | None = None, info: dict | None = None) -> object:
    """The ASGI application: the API and page over `runner`, whose jobs the caller runs (`runner.run()`,
    or `runner.start()` for a thread). Call its `closing()` when the server begins to stop (a signal): the
    event streams end, so no connection holds the stop up."""
    from contextlib import asynccontextmanager

    hub = Hub()
    runner.publish = hub.publish
    store = runner.store

    @asynccontextmanager
    async def lifespan(app):
        hub.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            hub.close()

    app = FastAPI(title="infdit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(InfditError)
    async def _known(request: Request, exc: Exception):
        msg, code = describe(exc)
        return _error(_status(exc), msg, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), 2 if exc.status_code < 500 else 1)

    @app.exception_handler(_NotFound)
    async def _not_found(request: Request, exc: Exception):
        return _error(404, f"no job {str(exc)[:40]}", 1)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception):  # an internal error: one line here, the traceback logged
        msg, code = describe(exc)
        return _error(500, msg, code)

    async def _upload(request: Request) -> tuple[Path, str, JobOptions]:
        """The request's image, stored under a generated name in the jobs folder, and its options."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            return await _server_path(request)
        if not ctype.startswith("multipart/form-data"):
            raise BadRequest("send the image as multipart/form-data (field 'image'), or JSON with a 'path' "
                             "on a server started with --allow-paths")
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
        if allow_paths is None:
            raise BadRequest("this server takes uploads only (start it with --allow-paths DIR to submit paths)")
        try:
            body = await request.json()
        except ValueError:
            raise BadRequest("the JSON body cannot be read") from None
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise BadRequest("give {\"path\": \"...\"} and the options as JSON fields")
        options = _options({k: (str(v) if v is not None else None) for k, v in body.items() if k != "path"})
        base = os.path.realpath(allow_paths)
        path = os.path.realpath(os.path.join(base, body["path"]))
        if os.path.commonpath([base, path]) != base:
            raise BadRequest(f"{body['path'][:200]} is outside the folder the server allows (--allow-paths)")
        if not os.path.isfile(path):
            raise BadImage(f"no such file under --allow-paths: {body['path'][:200]}")
        tmp, fd = store.folder.temp("upload")
        try:
            with open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                await run_in_threadpool(_copy, src, dst)
        except BaseException:
            store.folder.unlink(tmp)
            raise
        return store.root / tmp, _display_name(body["path"]), options

    def _job(job_id: str):
        job = runner.get(job_id)
        if job is None:
            raise _NotFound(job_id)
        return job

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html(), headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' "
                                       "'unsafe-inline'; script-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/api/info")
    async def api_info():
        return {**(info or {}), "max_pixels": runner.max_pixels, "max_bytes": max_bytes,
                "token_required": token is not None, "paths_allowed": allow_paths is not None}

    @app.post("/api/plan")
    async def api_plan(request: Request):
        path, name, options = await _upload(request)
        try:
            img, plan, lines = await in_thread(runner.plan, path, name, options)
        finally:
            store.folder.unlink(path.name)
        return {"name": name, "input_size": list(img.size), "output_size": list(plan.target_size),
                "predicted_seconds": round(plan.seconds, 3), "lines": lines, "warnings": list(img.notices),
                "plan": json.loads(json.dumps(plan_json(plan), default=str))}

    @app.post("/api/jobs", status_code=201)
    async def api_submit(request: Request):
        path, name, options = await _upload(request)
        try:
            job = await in_thread(runner.submit, path, name, options)
        finally:
            store.folder.unlink(path.name)  # moved into the job when accepted
        return JSONResponse(runner.snapshot(job), status_code=201)

    @app.get("/api/jobs")
    async def api_jobs():
        return {"jobs": runner.jobs()}

    @app.get("/api/jobs/{job_id}")
    async def api_job(job_id: str):
        return runner.snapshot(_job(job_id))

    @app.post("/api/jobs/{job_id}/cancel")
    async def api_cancel(job_id: str):
        return runner.snapshot(runner.cancel(_job(job_id)))

    @app.delete("/api/jobs/{job_id}", status_code=204)
    async def api_delete(job_id: str):
        job = _job(job_id)
        await run_in_threadpool(runner.delete, job)
        return Response(status_code=204)

    @app.get("/api/jobs/{job_id}/preview")
    async def api_preview(job_id: str):
        job = _job(job_id)
        path = store.path(job, "preview.jpg")
        if not job.preview or not path.is_file() or path.is_symlink():
            return _error(404, f"job {job.id} has no preview yet", 1)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/api/jobs/{job_id}/result")
    async def api_result(job_id: str):
        job = _job(job_id)
        if job.state != "done" or job.result_file is None:
            return _error(409, f"job {job.id} is {job.state}; its result is there when it is done", 1)
        path = store.path(job, job.result_file)
        if not path.is_file() or path.is_symlink():
            return _error(410, f"job {job.id}'s result is no longer on the server", 1)
        stem = _SAFE_NAME.sub("_", Path(job.name).stem).strip(" .") or "image"
        return FileResponse(path, filename=f"{stem}_infdit.{job.options.format}",
                            headers={"Cache-Control": "no-store"})

    @app.get("/api/events")
    async def api_events(request: Request):
        queue: asyncio.Queue = asyncio.Queue()
        for job in runner.jobs():  # the state now, then every change
            queue.put_nowait(f"event: job\ndata: {json.dumps(job, separators=(',', ':'))}\n\n")
        hub.queues.add(queue)

        async def stream():
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
                hub.queues.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    app.state.runner, app.state.hub = runner, hub
    guard = _Guard(app, token=token, max_bytes=max_bytes)
    guard.closing = hub.close  # the server calls it as it begins to stop: event streams end, connections close
    return guard


def _copy(src, dst) -> None:
    while chunk := src.read(_CHUNK):
        dst.write(chunk)

