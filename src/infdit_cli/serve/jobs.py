"""The jobs of `infdit serve`: a folder that outlives the server, and the one worker that runs them.

    JOBS/                      a SafeFolder ("jobs folder"); its file `lock` is flock-ed by the one server
      20261205-130102-a1b2c3/  a job: a SafeFolder ("job folder") under a generated name
        job.json               the job's state, replaced atomically; what a restarted server reads
        input.png              the upload, decoded and planned before it was accepted, under this name
        run/                   the run folder: the sampler state after every step (`checkpoint.RunFolder`)
        preview.jpg            the model's latest estimate of the result, after every step
        output.png             the result

The client's file name is shown (`Job.name`), never used as a path. A job that was running when the server
stopped (Ctrl-C, SIGTERM, a crash, a reboot) is queued again first and resumes from its last step.
No web framework here: `serve.app` puts this behind HTTP; this module is usable on its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from ..engine.storage import SafeFolder
from ..errors import BadRequest, Busy, InfditError, UnsafePath, explain
from ..events import (
    BatchDone,
    CheckpointWritten,
    JobStarted,
    Notice,
    PassDone,
    PassStarted,
    PlanChanged,
    Resumed,
    StepDone,
)
from ..images.load import SUFFIXES, load_image, probe_size
from ..images.save import check_format_size
from ..jobs.checkpoint import RunFolder
from ..jobs.pipeline import plan_lines

__all__ = [
    "FORMATS",
    "MAX_QUEUE",
    "PREVIEW_SIDE",
    "Job",
    "JobOptions",
    "JobRunner",
    "JobStore",
    "QueueFull",
    "valid_id",
]

FORMATS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "tif": "tiff", "tiff": "tiff"}
PREVIEW_SIDE = 1024  # the preview JPEG's long side, at most
MAX_QUEUE = 100  # queued jobs a server takes by default (`infdit serve --max-queue`)
STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
_INPUT_TYPES = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp", "GIF": "gif"}


class QueueFull(InfditError):
    """The queue holds `--max-queue` jobs already: try again when some have run."""


def valid_id(job_id: str) -> bool:
    return bool(_ID.fullmatch(job_id))


@dataclass(frozen=True)
class JobOptions:
    """What a client chooses per job; the device, dtype and memory budget are the server's."""

    res: str | None = None
    scale: float | None = None
    steps: int = 20
    seed: int = 0
    format: str = "png"
    color_fix: str = "none"

    def check(self) -> JobOptions:
        """Raises BadRequest (one line, naming the field) for anything `infdit upscale` would refuse."""
        if (self.res is None) == (self.scale is None):
            raise BadRequest("give a target: res (4096 or 3840x2160) or scale (e.g. 4), not both")
        if not 1 <= self.steps <= 1000:
            raise BadRequest(f"steps must be 1 to 1000, got {self.steps}")
        if not 0 <= self.seed < 2**63:
            raise BadRequest(f"seed must be 0 to 2^63-1, got {self.seed}")
        if self.format not in FORMATS:
            raise BadRequest(f"format must be one of png, jpg, webp, tiff; got {self.format!r}")
        if self.color_fix not in ("none", "wavelet", "adain"):
            raise BadRequest(f"color_fix must be none, wavelet or adain; got {self.color_fix!r}")
        return JobOptions(self.res, self.scale, self.steps, self.seed, FORMATS[self.format], self.color_fix)


@dataclass
class Job:
    id: str
    name: str  # the client's file name: display only
    options: JobOptions
    input_file: str  # in the job folder
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    predicted_seconds: float
    plan_lines: list[str]
    created: float
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    progress: dict = field(default_factory=lambda: {"fraction": 0.0, "pass": 0, "passes": 0, "step": 0,
                                                    "steps": 0, "elapsed": 0.0, "eta": None})
    preview: int = 0  # how many previews were written (0: none yet)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int | None = None
    result_file: str | None = None
    result_bytes: int | None = None
    resumed: dict | None = None  # {"pass", "step"}: where the last restart continued from
    cancel_requested: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        d["options"] = asdict(self.options)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Job:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["options"] = JobOptions(**d["options"])
        d["input_size"], d["output_size"] = tuple(d["input_size"]), tuple(d["output_size"])
        job = cls(**d)
        if job.state not in STATES or not valid_id(job.id):
            raise ValueError(f"bad state {job.state!r}")
        return job

    def public(self, position: int | None) -> dict:
        """What the API shows: no server paths."""
        d = self.to_json()
        for k in ("input_file", "result_file", "cancel_requested"):
            d.pop(k)
        d["position"] = position
        d["preview_url"] = f"/api/jobs/{self.id}/preview" if self.preview else None
        d["result_url"] = f"/api/jobs/{self.id}/result" if self.state == "done" else None
        return d


class JobStore:
    """The jobs folder: its lock (one server at a time), and each job's folder and state file.

    Raises (from the constructor):
        UnsafePath: `root` is a link, a file, another user's, or a folder infdit did not make.
        Busy: another server uses this jobs folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        empty = self.root.is_dir() and not self.root.is_symlink() and not os.listdir(self.root)
        self.folder = SafeFolder(self.root, "jobs folder", fresh=empty)  # an empty folder made for it is fine
        try:
            fd = self.folder.open("lock", write=True)
        except FileNotFoundError:
            fd = self.folder.create("lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise Busy(f"another infdit serve is using the jobs folder {self.root} (pid {pid or '?'})"
                       ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self.jobs: dict[str, Job] = {}
        self.skipped: list[str] = []  # folders that are not readable jobs: left alone, said once
        self._load()

    def _load(self) -> None:
        for name in sorted(os.listdir(self.root)):
            if not valid_id(name):
                continue
            try:
                folder = self.job_folder(name, create=False)
                try:
                    fd = folder.open("job.json")
                    try:
                        data = b"".join(iter(functools.partial(os.read, fd, 1 << 16), b""))
                    finally:
                        os.close(fd)
                finally:
                    folder.close()
                job = Job.from_json(json.loads(data))
                if job.id != name:
                    raise ValueError("its id is not its folder's name")
            except FileNotFoundError:
                continue  # a job being made, or one being deleted: no state file yet / any more
            except (OSError, ValueError, KeyError, TypeError, UnsafePath) as e:
                why = (explain(e)[0] if isinstance(e, OSError | UnsafePath)
                       else f"its job.json is damaged ({e})")
                self.skipped.append(f"left {self.root / name} alone: {why}")
                continue
            if job.state == "running":  # the server stopped while it ran: it resumes first
                job.state = "queued"
            self.jobs[job.id] = job

    def close(self) -> None:
        os.close(self._lock_fd)
        self.folder.close()

    def new_id(self) -> str:
        while True:
            job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
            if job_id not in self.jobs and not os.path.lexists(self.root / job_id):
                return job_id

    def job_folder(self, job_id: str, *, create: bool = True) -> SafeFolder:
        return SafeFolder(self.root / job_id, "job folder", create=create)

    def path(self, job: Job, name: str) -> Path:
        return self.root / job.id / name

    def save(self, job: Job) -> None:
        """Replace the job's state file atomically."""
        folder = self.job_folder(job.id, create=False)
        try:
            folder.write("job.json", json.dumps(job.to_json(), indent=1).encode(), "a job's state")
        finally:
            folder.close()

    def drop_run(self, job: Job) -> None:
        """The job's run folder (its checkpoints), if it has one."""
        run = self.path(job, "run")
        if os.path.lexists(run):
            RunFolder(run, {}).remove(strict=False)

    def remove(self, job: Job) -> None:
        """The job's files: its run folder, then what its marker records, then the folder."""
        self.drop_run(job)
        folder = self.job_folder(job.id, create=False)
        folder.unlink("job.json")  # first: a half-removed job is never read back
        folder.remove()
        self.jobs.pop(job.id, None)


class _Cancelled(Exception):
    pass


class _Stopping(Exception):
    pass


def event_json(event: object) -> dict:
    """A library event as JSON: its fields, with objects (a pass) as their text."""
    out = {}
    for f in fields(event):
        v = getattr(event, f.name)
        if is_dataclass(v) and f.name == "pass_" and hasattr(v, "scale"):
            v = {"scale": v.scale, "in_size": list(v.in_size), "out_size": list(v.out_size),
                 "seconds": v.seconds}
        elif not isinstance(v, (int, float, str, bool, list, dict, type(None))):
            v = str(v)
        out[f.name] = v
    return out


class _Watch:
    """The library's callbacks for one job: its progress, warnings and saves, published as they change;
    a cancel or a stop is raised from them, inside the job."""

    def __init__(self, runner: JobRunner, job: Job) -> None:
        self.runner, self.job = runner, job
        self.progress = _Progress(job)
        self.last_publish = 0.0  # time.monotonic() of the last snapshot published

    def on_event(self, event: object) -> None:
        runner, job = self.runner, self.job
        if job.cancel_requested:
            raise _Cancelled()
        if runner.stopping:
            raise _Stopping()
        show = self.progress.update(event)
        if isinstance(event, Resumed):
            job.resumed = {"pass": event.pass_, "step": event.step}
        if isinstance(event, Notice | PlanChanged):
            job.warnings.append(runner._shown(job, event.text) if isinstance(event, Notice)
                                else f"plan {event.old} -> {event.new} ({event.reason})")
            show = True
        if not isinstance(event, BatchDone):
            runner.publish(type(event).__name__, {"job": job.id, **{
                k: runner._shown(job, v) if isinstance(v, str) else v for k, v in event_json(event).items()}})
        if show or isinstance(event, BatchDone) and time.monotonic() - self.last_publish > 1.0:
            self.last_publish = time.monotonic()
            if isinstance(event, StepDone | CheckpointWritten | PassDone | Notice | PlanChanged):
                runner.store.save(job)
            runner.publish("job", runner.snapshot(job))

    def on_preview(self, img) -> None:
        folder = self.runner.store.job_folder(self.job.id, create=False)
        try:
            folder.write("preview.jpg", preview_jpeg(img), "a preview")
        finally:
            folder.close()
        self.job.preview += 1
        self.runner.publish("job", self.runner.snapshot(self.job))


class _Progress:
    """Fraction of the job's compute done, and an ETA from the pace measured since this run began."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.work: list[float] = [1.0]
        self.calls = 1
        self.pass_ = 0  # 0-based
        self.calls_done = 0
        self.t0 = time.monotonic()
        self.f0: float | None = None
        self.elapsed0 = job.progress.get("elapsed", 0.0) or 0.0

    def fraction(self, within_call: float = 0.0) -> float:
        done = sum(self.work[:self.pass_])
        if self.pass_ < len(self.work):
            done += self.work[self.pass_] * min(1.0, (self.calls_done + within_call) / self.calls)
        return min(1.0, done)

    def update(self, event: object) -> bool:
        """Fold `event` in; True when the job's progress changed enough to show."""
        p = self.job.progress
        if isinstance(event, JobStarted):
            self.work, self.calls = list(event.work), max(1, event.calls)
            p["passes"] = len(self.work)
            return False
        if isinstance(event, Resumed):
            self.pass_ = event.pass_ - 1
            p["pass"], p["step"], p["steps"] = event.pass_, event.step, event.steps
            self.calls_done = 2 * event.step if event.step < event.steps else self.calls
        elif isinstance(event, PassStarted):
            if self.pass_ != event.index - 1:
                self.calls_done = 0
            self.pass_, p["pass"], p["passes"] = event.index - 1, event.index, event.total
        elif isinstance(event, StepDone):
            self.calls_done, p["step"], p["steps"] = event.calls, event.i, event.steps
        elif isinstance(event, PassDone):
            self.pass_, self.calls_done = event.index, 0
        elif not isinstance(event, BatchDone):
            return False
        within = event.index / event.total if isinstance(event, BatchDone) else 0.0
        frac = self.fraction(within)
        now = time.monotonic()
        if self.f0 is None:
            self.f0, self.t0 = frac, now
        p["fraction"] = round(frac, 4)
        p["elapsed"] = round(self.elapsed0 + now - self.t0, 1)
        pace = (frac - self.f0) / (now - self.t0) if frac - self.f0 > 1e-3 and now > self.t0 else None
        if pace:
            p["eta"] = round((1 - frac) / pace, 1)
        else:
            p["eta"] = round(self.job.predicted_seconds * (1 - frac), 1)
        return not isinstance(event, BatchDone)


class JobRunner:
    """The server's one worker: runs the queued jobs one at a time on the loaded model (`run`, in the
    caller's thread; `start` for a thread of its own).

    `publish(kind, data)` is called (from the jobs' thread) with `("job", job JSON)` on every change and
    with each library event as `(class name, {"job": id, ...its fields})`.
    """

    def __init__(self, store: JobStore, upscaler, *, max_pixels: int, publish: Callable[[str, dict], None]
                 = lambda kind, data: None, on_error: Callable[[str], None] | None = None,
                 max_queue: int = MAX_QUEUE) -> None:
        self.store = store
        self.up = upscaler
        self.max_pixels = max_pixels
        self.max_queue = max_queue
        self._reserved = 0  # jobs being stored by `submit`: counted in the queue's length
        self.publish = publish
        self.on_error = on_error
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.current: str | None = None

    # -- the queue ----------------------------------------------------------------------------------------
    def queue(self) -> list[Job]:
        """Queued jobs in the order they run: one that was running (resumes) first, then oldest first."""
        with self.lock:
            waiting = [j for j in self.store.jobs.values() if j.state == "queued"]
        return sorted(waiting, key=lambda j: (j.started is None, j.created, j.id))

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1, 2, ... for the queued ones in the order they will run, else None."""
        if job.state == "running":
            return 0
        if job.state != "queued":
            return None
        ids = [j.id for j in self.queue()]  # 1: the next to run
        return ids.index(job.id) + 1 if job.id in ids else None

    def snapshot(self, job: Job) -> dict:
        with self.lock:
            return job.public(self.position(job))

    def jobs(self) -> list[dict]:
        with self.lock:
            every = sorted(self.store.jobs.values(), key=lambda j: (j.created, j.id))
            return [self.snapshot(j) for j in every]

    def get(self, job_id: str) -> Job | None:
        return self.store.jobs.get(job_id) if valid_id(job_id) else None

    # -- submitting ---------------------------------------------------------------------------------------
    def check_room(self) -> None:
        """Raises QueueFull when `max_queue` jobs wait already (the running one not counted)."""
        with self.lock:
            waiting = sum(j.state == "queued" for j in self.store.jobs.values()) + self._reserved
        if waiting >= self.max_queue:
            raise QueueFull(f"the queue is full ({waiting} jobs wait; this server takes at most "
                            f"{self.max_queue}, --max-queue): try again when some have run")

    def declared_pixels(self, path: Path) -> int | None:
        """The pixels the image at `path` declares in its header (nothing decoded), or None when the header
        cannot be read (decoding it then says why)."""
        try:
            h, w = probe_size(path, max_pixels=self.max_pixels)
        except InfditError:
            return None
        return h * w

    def plan(self, path: Path, name: str, options: JobOptions):
        """Decode `path` (an upload, shown as `name`) and plan it: (LoadedImage, UpscalePlan, plan lines).

        Raises: BadImage, BadRequest, MemoryBudgetTooSmall, ... with `name` in place of the path."""
        options = options.check()
        try:
            img = load_image(path, max_pixels=self.max_pixels)
            plan = self.up.plan(img.size, res=options.res, scale=options.scale,
                                options=self._options(options))
            check_format_size(SUFFIXES["." + options.format], plan.target_size)
        except InfditError as e:
            err = type(e)(str(e).replace(str(path), name))
            err.exit_code = e.exit_code
            raise err from None
        # the upload's name, not its path in the jobs folder
        img.notices = [n.replace(str(path), name) for n in img.notices]
        dtype = str(self.up.model.dtype).removeprefix("torch.")
        return img, plan, plan_lines(plan, self.up.device.type, dtype)

    def _options(self, options: JobOptions):
        from dataclasses import replace

        return replace(self.up.options, steps=options.steps, seed=options.seed, color_fix=options.color_fix)

    def submit(self, upload: Path, name: str, options: JobOptions) -> Job:
        """Accept the decoded, planned upload at `upload` (a file the caller made; moved into the job) as a
        new queued job. Raises what `plan` raises; nothing is kept then."""
        self.check_room()
        img, plan, lines = self.plan(upload, name, options)
        options = options.check()
        with self.lock:
            self.check_room()  # again, counting those accepted meanwhile: this one holds a place from here
            job_id = self.store.new_id()
            folder = self.store.job_folder(job_id)
            self._reserved += 1
        job = None
        try:
            try:
                kind = _INPUT_TYPES.get(img.source_format or "", "img")
                input_file = f"input.{kind}"
                folder.record(input_file)
                shutil.move(str(upload), str(self.store.root / job_id / input_file))
                job = Job(id=job_id, name=name, options=options, input_file=input_file, input_size=img.size,
                          output_size=plan.target_size, predicted_seconds=round(plan.seconds, 3),
                          plan_lines=lines, created=time.time(), warnings=list(img.notices))
                folder.write("job.json", json.dumps(job.to_json(), indent=1).encode(), "a job's state")
            except BaseException:
                job = None
                folder.remove()
                raise
            finally:
                folder.close()
        finally:
            with self.lock:
                self._reserved -= 1
                if job is not None:
                    self.store.jobs[job.id] = job
                    self.wake.notify_all()
        self.publish("job", self.snapshot(job))
        return job

    def cancel(self, job: Job) -> Job:
        """A queued job is cancelled at once; a running one at its next event (within one rectangle)."""
        with self.lock:
            if job.state == "queued":
                self._finish(job, "cancelled")
                self._drop_run(job)
            elif job.state == "running":
                job.cancel_requested = True
            else:
                raise BadRequest(f"job {job.id} is {job.state}; only a queued or running job can be "
                                 "cancelled")
        self.publish("job", self.snapshot(job))
        return job

    def delete(self, job: Job) -> None:
        with self.lock:
            if job.state not in FINISHED:
                raise BadRequest(f"job {job.id} is {job.state}; cancel it first")
            self.store.remove(job)

    # -- the worker ---------------------------------------------------------------------------------------
    def run(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Run queued jobs, one at a time, until `request_stop` (or, between jobs, until `alive()` is
        False: the web server's thread ended). `infdit serve` calls it in the main thread: torch's CPU
        thread team hands work over ~5 % faster there than in another thread."""
        while True:
            with self.lock:
                while not self.stopping and not self.queue() and alive():
                    self.wake.wait(0.5)  # a timeout: `request_stop` from a signal handler takes no lock
                if self.stopping or not alive():
                    return
                job = self.queue()[0]
                job.state, self.current = "running", job.id
                job.started = job.started or time.time()
                job.cancel_requested = False
            try:
                self.store.save(job)
                self.publish("job", self.snapshot(job))
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the state file itself failed (a full disk): the job
                with self.lock:  # fails, the worker goes on with the next one
                    job.state, job.finished = "failed", time.time()
                    job.error, job.exit_code = explain(e)
                    with contextlib.suppress(Exception):  # said in the API and the log: the disk is at fault
                        self.store.save(job)
                if self.on_error is not None:
                    self.on_error(f"job {job.id} ({job.name}) failed: {job.error}")
                self.publish("job", self.snapshot(job))
            finally:
                self.current = None

    def request_stop(self) -> None:
        """Stop after the running job's current block batch (it stays queued, resumable from its last
        step); safe in a signal handler."""
        self.stopping = True

    def start(self) -> None:
        """`run` in a thread of its own (for embedding; `stop` ends it)."""
        self.thread = threading.Thread(target=self.run, name="infdit-jobs", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        self.request_stop()
        if self.thread is not None:
            self.thread.join(timeout)

    def _shown(self, job: Job, text: str) -> str:
        """`text` for an answer: the job's input shown by its name, the jobs folder as <jobs>."""
        for path, shown in ((self.store.path(job, job.input_file), job.name), (self.store.root, "<jobs>")):
            text = text.replace(str(path), shown)
        return text

    def _run(self, job: Job) -> None:
        watch = _Watch(self, job)
        out_name = f"output.{job.options.format}"
        folder = self.store.job_folder(job.id, create=False)
        folder.record(out_name)
        folder.close()
        try:
            self.up.upscale_file(self.store.path(job, job.input_file), self.store.path(job, out_name),
                                 res=job.options.res, scale=job.options.scale,
                                 options=self._options(job.options), overwrite=True,
                                 max_pixels=self.max_pixels, on_event=watch.on_event,
                                 checkpoint=True, checkpoint_dir=self.store.path(job, "run"), resume=True,
                                 on_preview=watch.on_preview)
        except (_Stopping, KeyboardInterrupt):
            with self.lock:
                job.state = "queued"  # resumes from its last step when the server starts again
                self.store.save(job)
            return
        except _Cancelled:
            with self.lock:
                self._finish(job, "cancelled")
                self._drop_run(job)
        except BaseException as e:
            msg, code = explain(e)
            msg = self._shown(job, msg)
            with self.lock:
                job.error, job.exit_code = msg, code
                self._finish(job, "failed")
            if self.on_error is not None:
                self.on_error(f"job {job.id} ({job.name}) failed: {msg}")
            if isinstance(e, KeyboardInterrupt | SystemExit):
                raise
        else:
            with self.lock:
                job.result_file = out_name
                job.result_bytes = os.path.getsize(self.store.path(job, out_name))
                job.progress.update(fraction=1.0, eta=0.0)
                self._finish(job, "done")
        self.publish("job", self.snapshot(job))

    def _finish(self, job: Job, state: str) -> None:
        job.state, job.finished, job.cancel_requested = state, time.time(), False
        self.store.save(job)

    def _drop_run(self, job: Job) -> None:
        try:  # a cancelled job's checkpoints; a folder that will not go stays, the job is cancelled anyway
            self.store.drop_run(job)
        except (OSError, InfditError):
            pass


def preview_jpeg(img) -> bytes:
    """(1, 3, h, w) in [0, 1] -> JPEG bytes, the long side at most PREVIEW_SIDE."""
    from PIL import Image

    arr = (img[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    pil = Image.fromarray(arr)
    pil.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=85)
    return buf.getvalue()
