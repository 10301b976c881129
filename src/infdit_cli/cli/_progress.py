"""Progress display: rich Live on stderr for a TTY, a null sink otherwise (quiet, pipes, tests)."""

from __future__ import annotations

import sys
from typing import Protocol

import time

from ..events import BatchDone, CheckpointDiscarded, JobStarted, Notice, PassStarted, PlanChanged, Resumed, StepDone
from ._text import safe


def job_line(event: JobStarted) -> str:
    """The job's first line: its predicted time, and on a slow CPU job what a GPU would take."""
    from ..planner import format_seconds  # kept off start-up (the planner imports torch)

    line = (f"predicted {format_seconds(sum(event.seconds))} on {event.device or 'this device'} "
            f"({len(event.seconds)} pass(es), {event.calls * len(event.seconds)} model calls)")
    if event.gpu_seconds is not None:
        line += (f"; a CUDA GPU (H100-class, bf16) would take about {format_seconds(event.gpu_seconds)}: "
                 "Ctrl-C stops, the same command resumes")
    return line


def event_line(event: object) -> str | None:
    """The line an event prints by itself (resume, discarded checkpoint), or None."""
    if isinstance(event, Resumed):
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.saved_at))
        return f"resuming at pass {event.pass_}/{event.passes}, step {event.step}/{event.steps} (saved {saved})"
    if isinstance(event, CheckpointDiscarded):
        return f"not resuming from {event.path}: {event.reason}; starting over"
    return None


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

    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None:
        pass

    def image(self, name: str) -> None:
        pass

    def image_done(self) -> None:
        pass

    def images(self, done: int) -> None:
        pass

    def __call__(self, event: object) -> None:
        if isinstance(event, JobStarted) and event.seconds and not self.quiet:
            print(safe(job_line(event)), file=sys.stderr)
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
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = console if console is not None else Console(stderr=True)
        # every task has a total and a unit from its start: "0/39 calls", never "0/?"
        cols = (TextColumn("{task.description}", markup=False), BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} {task.fields[unit]}"), TimeElapsedColumn(),
                TimeRemainingColumn())
        self.overall = Progress(*cols, console=self.console)
        self.steps = Progress(*cols, console=self.console)
        self.blocks = Progress(*cols, console=self.console, transient=True)
        self.live = Live(Group(self.overall, self.steps, self.blocks), console=self.console, refresh_per_second=8)
        self.images_task = self.step_task = self.block_task = self.job_task = None
        self.work: list[float] = []
        self.pass_index = 1
        self.total_images = 1
        self.calls_per_pass: int | None = None
        self.name = ""

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
            if event.seconds:
                self.console.print(safe(job_line(event)), markup=False, highlight=False)
            self.work, self.calls_per_pass = event.work, event.calls
            if self.job_task is not None:
                self.overall.remove_task(self.job_task)
            name = f"{self.name}: " if self.name and self.total_images == 1 else ""
            self.job_task = self.overall.add_task(f"{name}job, {len(event.work)} pass(es)", total=100,
                                                  unit="% of work")
        elif isinstance(event, Resumed):
            if self.job_task is not None and self.work:
                calls = 2 * event.step - (1 if event.step == event.steps else 0)
                # reset: the saved progress is not speed, so the ETA starts from this run's own pace
                self.overall.reset(self.job_task, total=100,
                                   completed=self._job_level(event.pass_, calls, 2 * event.steps - 1))
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
            self.step_task = self.steps.add_task(desc, total=self.calls_per_pass or 1, unit="calls")
        elif isinstance(event, StepDone) and self.step_task is not None:
            self.steps.update(self.step_task, total=2 * event.steps - 1, completed=event.calls)
            if self.job_task is not None and self.work:
                self.overall.update(self.job_task,
                                    completed=self._job_level(self.pass_index, event.calls, 2 * event.steps - 1))
        elif isinstance(event, BatchDone):
            if self.block_task is None:
                self.block_task = self.blocks.add_task(f"blocks, {event.n}x{event.n} at a time", total=event.total,
                                                       unit="batches")
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
