"""Progress display: rich Live on stderr for a TTY, a null sink otherwise (quiet, pipes, tests)."""

from __future__ import annotations

import sys
import time
from typing import Protocol

from ..events import (
    BatchDone,
    CheckpointDiscarded,
    JobStarted,
    Notice,
    PassStarted,
    PlanChanged,
    Resumed,
    StepDone,
)
from ..units import format_seconds
from ._text import safe


def plan_line(seconds: float, passes: int, calls: int, device: str | None, gpu_seconds: float | None = None,
              name: str = "") -> str:
    """The plan's first line: the predicted time on this device, the passes and model calls, and on a CPU
    job of more than an hour what a GPU would take (`pipeline.gpu_seconds`: nominal H100-class rates)."""

    line = (f"{name + ': ' if name else ''}predicted {format_seconds(seconds)} on {device or 'this device'} "
            f"({passes} pass(es), {calls} model calls)")
    if gpu_seconds is not None:
        line += (f"; a CUDA GPU (H100-class, bf16) would take about {format_seconds(gpu_seconds)} "
                 f"(an estimate "
                 "from nominal rates): Ctrl-C stops, the same command resumes")
    return line


def job_line(event: JobStarted, name: str = "") -> str:
    """The job's first line (`plan_line`) from its JobStarted event; `name`: the file (batch)."""
    return plan_line(sum(event.seconds), len(event.seconds), event.calls * len(event.seconds), event.device,
                     event.gpu_seconds, name)


def device_note(requested: str, device: str) -> str | None:
    """Why `--device auto` runs on the CPU, and what to do about it; None where it did not fall back.

    The two causes: a torch built without CUDA (`torch.version.cuda is None`, the usual install mistake),
    or a CUDA build that finds no usable GPU (no NVIDIA driver, no device, or CUDA_VISIBLE_DEVICES hides it).
    """
    if requested != "auto" or device != "cpu":
        return None
    import torch  # torch: kept off start-up (--help, usage errors)

    fix = "pass --device cpu to choose the CPU without this note"
    if sys.platform == "darwin" and torch.version.cuda is None:
        return (f"running on the CPU: this torch ({torch.__version__}) has no CUDA on macOS and MPS is not "
                f"available (macOS 12.3+ on Apple silicon); {fix}")
    if torch.version.cuda is None:
        return (f"running on the CPU: this torch ({torch.__version__}) is a CPU-only build (no CUDA); for an "
                "NVIDIA GPU install a CUDA build of torch (https://pytorch.org/get-started/locally/), "
                "or " + fix)
    return (f"running on the CPU: this torch ({torch.__version__}) is built for CUDA {torch.version.cuda} "
            f"but "
            "finds no GPU (no NVIDIA driver or device, or CUDA_VISIBLE_DEVICES hides it: `nvidia-smi` should "
            "list one); " + fix)


def event_line(event: object) -> str | None:
    """The line an event prints by itself (resume, discarded checkpoint), or None."""
    if isinstance(event, Resumed):
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.saved_at))
        return (f"resuming at pass {event.pass_}/{event.passes}, step {event.step}/{event.steps} "
                f"(saved {saved})")
    if isinstance(event, CheckpointDiscarded):
        return f"not resuming from {event.path}: {event.reason}; starting over"
    return None


class FirstLines:
    """A job's first lines, said once: the plan's first line, then any notes (why --device auto is the CPU).

    Called (no arguments) just before a download starts (`_fetch.ensure_weights`' `before`); otherwise the
    display says them at the job's start (`say`), where the job's own line, planned with the loaded model,
    takes the plan's place when `job_is_plan` (one image); a batch's per-file lines follow its own plan.
    Nothing is said for a job that fails before it starts: its error stays one line."""

    def __init__(self, lines, quiet: bool = False, *, job_is_plan: bool = False) -> None:
        self.lines = list(lines)
        self.quiet = quiet
        self.job_is_plan = job_is_plan
        self.said = False

    def __call__(self) -> None:
        self.say(lambda line: print(line, file=sys.stderr, flush=True))

    def say(self, emit, job: str | None = None) -> str | None:
        """Emit the lines (once; escaped by `safe`); returns `job` where it is still to be said (never
        where it is the plan's line, said here or before the download)."""
        if self.said:
            return None if self.job_is_plan else job
        self.said = True
        lines = list(self.lines)
        if self.job_is_plan and job is not None and lines:
            lines[0], job = job, None
        if not self.quiet:
            for line in lines:
                if line:
                    emit(safe(line))
        return job


def _job_name(display) -> str:
    """The file a job's line names: the batch's file; none for one image (its line is the plan's)."""
    first = display.first
    return "" if first is not None and first.job_is_plan else display.name


class Display(Protocol):
    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None: ...
    def image(self, name: str) -> None: ...
    def image_done(self) -> None: ...
    def images(self, done: int) -> None: ...
    def __call__(self, event: object) -> None: ...
    def stop(self) -> None: ...
    def warn(self, text: str) -> None: ...


class NullDisplay:
    """For --quiet, non-TTY stderr and tests: warnings still reach stderr as plain lines; without `quiet`
    also the job's first line (`job_line`)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.name = ""  # the file in progress (batch): its first line names it
        self.first: FirstLines | None = None  # said at the first job's start, unless said before a download

    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None:
        pass

    def image(self, name: str) -> None:
        self.name = name

    def image_done(self) -> None:
        pass

    def images(self, done: int) -> None:
        pass

    def __call__(self, event: object) -> None:
        if isinstance(event, JobStarted):
            line = job_line(event, _job_name(self)) if event.seconds else None
            if self.first is not None:
                line = self.first.say(lambda text: print(text, file=sys.stderr), line)
            if line is not None and not self.quiet:
                print(safe(line), file=sys.stderr)
        elif isinstance(event, PlanChanged):
            self.warn(f"{event.reason} with {event.old}; continuing with {event.new}")
        elif isinstance(event, Notice):
            self.warn(event.text)
        elif (line := event_line(event)) is not None:
            print(safe(line), file=sys.stderr)

    def stop(self) -> None:
        pass

    def warn(self, text: str) -> None:
        print(f"warning: {safe(text)}", file=sys.stderr)


class RichDisplay:
    """Images x passes x denoising calls x block batches, after rich's dynamic_progress example."""

    def __init__(self, console=None) -> None:
        from rich.console import Console, Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console if console is not None else Console(stderr=True)
        # every task has a total and a unit from its start: "0/39 calls", never "0/?"
        cols = (TextColumn("{task.description}", markup=False), BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"), TimeElapsedColumn(),
                _remaining_column())
        self.overall = Progress(*cols, console=self.console)
        self.steps = Progress(*cols, console=self.console)
        self.blocks = Progress(*cols, console=self.console, transient=True)
        self.live = Live(Group(self.overall, self.steps, self.blocks), console=self.console,
                         refresh_per_second=8)
        self.images_task = self.step_task = self.block_task = self.job_task = None
        self.work: list[float] = []
        self.pass_index = 1
        self.total_images = 1
        self.calls_per_pass: int | None = None
        self.name = ""
        self.first: FirstLines | None = None  # said at the first job's start, unless said before a download
        self.resumed_at: tuple[int, int] | None = None  # (pass, calls) of a resumed run, for its pass's bar

    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None:
        self.total_images = total_images
        self.calls_per_pass = calls_per_pass
        if total_images > 1:
            self.images_task = self.overall.add_task("images", total=total_images, unit="images")
        self.live.start()

    def image(self, name: str) -> None:
        self.name = name

    def image_done(self) -> None:
        if self.images_task is not None:
            self.overall.advance(self.images_task)
        if self.job_task is not None:
            self.overall.remove_task(self.job_task)
            self.job_task = None

    def _job_level(self, pass_index: int, calls: int, calls_per_pass: int) -> float:
        """Percent of the whole job's compute done at `calls` calls into pass `pass_index` (1-based)."""
        w = self.work
        return 100 * (sum(w[: pass_index - 1]) + w[pass_index - 1] * calls / max(1, calls_per_pass))

    def images(self, done: int) -> None:
        """Images finished in the whole job (under torchrun, by every rank)."""
        if self.images_task is not None:
            self.overall.update(self.images_task, completed=done)

    def __call__(self, event: object) -> None:
        if isinstance(event, JobStarted):
            line = job_line(event, _job_name(self)) if event.seconds else None
            if self.first is not None:
                def say(text: str) -> None:
                    self.console.print(text, markup=False, highlight=False)

                line = self.first.say(say, line)
            if line is not None:
                self.console.print(safe(line), markup=False, highlight=False)
            self.work, self.calls_per_pass = event.work, event.calls
            self.resumed_at = None
            if self.job_task is not None:
                self.overall.remove_task(self.job_task)
            name = f"{self.name}: " if self.name and self.total_images == 1 else ""
            # the ETA is the plan's prediction until the job has moved, then its measured pace
            self.job_task = self.overall.add_task(f"{name}job, {len(event.work)} pass(es)", total=100,
                                                  unit="% of work", predicted=sum(event.seconds) or None,
                                                  base=0.0)
        elif isinstance(event, Resumed):
            calls = 2 * event.step - (1 if event.step == event.steps else 0)
            self.resumed_at = (event.pass_, calls)
            if self.job_task is not None and self.work:
                level = self._job_level(event.pass_, calls, 2 * event.steps - 1)
                # reset: the saved progress is not speed, so the ETA starts from this run's own pace
                self.overall.reset(self.job_task, total=100, completed=level)
                self.overall.update(self.job_task, base=level)
            self.console.print(safe(event_line(event)), markup=False, highlight=False)
        elif isinstance(event, CheckpointDiscarded):
            self.console.print(safe(event_line(event)), markup=False, highlight=False)
        elif isinstance(event, PassStarted):
            self.pass_index = event.index
            for t in list(self.steps.task_ids):
                self.steps.remove_task(t)
            p = event.pass_
            desc = (f"{self.name + ': ' if self.name else ''}pass {event.index}/{event.total} {p.scale}x "
                    f"{p.in_size[1]}x{p.in_size[0]} -> {p.out_size[1]}x{p.out_size[0]}")
            done = self.resumed_at[1] if self.resumed_at and self.resumed_at[0] == event.index else 0
            self.step_task = self.steps.add_task(desc, total=self.calls_per_pass or 1, unit="calls",
                                                 completed=done, base=float(done),
                                                 predicted=p.seconds or None)
        elif isinstance(event, StepDone) and self.step_task is not None:
            self.steps.update(self.step_task, total=2 * event.steps - 1, completed=event.calls)
            if self.job_task is not None and self.work:
                self.overall.update(self.job_task,
                                    completed=self._job_level(self.pass_index, event.calls,
                                                              2 * event.steps - 1))
        elif isinstance(event, BatchDone):
            if self.block_task is None:
                self.block_task = self.blocks.add_task(f"blocks, {event.n}x{event.n} at a time",
                                                       total=event.total, unit="batches")
            self.blocks.update(self.block_task, completed=event.index, total=event.total)
            if event.index == event.total:
                self.blocks.remove_task(self.block_task)
                self.block_task = None
        elif isinstance(event, PlanChanged):
            self.warn(f"{event.reason} with {event.old}; continuing with {event.new}")
        elif isinstance(event, Notice):
            self.warn(event.text)

    def stop(self) -> None:
        self.live.stop()

    def warn(self, text: str) -> None:
        from rich.text import Text

        self.console.print(Text.assemble(("warning:", "yellow"), " ", safe(text)))  # names literal, escaped


def remaining(task) -> tuple[float | None, bool]:
    """(seconds left, measured) for a progress task: its own pace since it began (or since a resume: the
    task's `base` field) once it has moved; before that the plan's prediction (`predicted` field: the
    task's whole time) less the time spent; (None, False) where neither is known."""
    if task.finished:
        return 0.0, True
    if not task.total:
        return None, False
    elapsed = task.elapsed or 0.0
    moved = task.completed - task.fields.get("base", 0.0)
    if moved > 0 and elapsed > 0:
        return (task.total - task.completed) * elapsed / moved, True
    predicted = task.fields.get("predicted")
    if predicted is None:
        return None, False
    return max(0.0, predicted * (task.total - task.completed) / task.total - elapsed), False


def _remaining_column():
    """The ETA column (`remaining`): a predicted time is marked with "~"; unknown is "-:--:--"."""
    from datetime import timedelta

    from rich.progress import ProgressColumn
    from rich.text import Text

    class Remaining(ProgressColumn):
        max_refresh = 0.5

        def render(self, task) -> Text:
            left, measured = remaining(task)
            if left is None:
                return Text("-:--:--", style="progress.remaining")
            text = str(timedelta(seconds=int(left + 0.5)))
            return Text(text if measured else f"~{text}", style="progress.remaining")

    return Remaining()


class SilentDisplay(NullDisplay):
    """Ranks other than 0 under torchrun: their warnings reach rank 0's summary, not the terminal."""

    def __init__(self) -> None:
        super().__init__(quiet=True)

    def warn(self, text: str) -> None:
        pass


def make_display(quiet: bool, *, main: bool = True) -> Display:
    if not main:
        return SilentDisplay()
    if quiet or not sys.stderr.isatty():
        return NullDisplay(quiet=quiet)
    return RichDisplay()
