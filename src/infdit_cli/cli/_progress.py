"""Progress display: rich Live on stderr for a TTY, a null sink otherwise (quiet, pipes, tests)."""

from __future__ import annotations

import sys
from typing import Protocol

from ..events import BatchDone, Notice, PassStarted, PlanChanged, StepDone


class Display(Protocol):
    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None: ...
    def image(self, name: str) -> None: ...
    def image_done(self) -> None: ...
    def images(self, done: int) -> None: ...
    def __call__(self, event: object) -> None: ...
    def stop(self) -> None: ...
    def warn(self, text: str) -> None: ...


class NullDisplay:
    """For --quiet, non-TTY stderr and tests: warnings still reach stderr as plain lines."""

    def start(self, total_images: int = 1, *, calls_per_pass: int | None = None) -> None:
        pass

    def image(self, name: str) -> None:
        pass

    def image_done(self) -> None:
        pass

    def images(self, done: int) -> None:
        pass

    def __call__(self, event: object) -> None:
        if isinstance(event, PlanChanged):
            self.warn(f"{event.reason} with {event.old}; continuing with {event.new}")
        elif isinstance(event, Notice):
            self.warn(event.text)

    def stop(self) -> None:
        pass

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr)


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
        self.images_task = self.step_task = self.block_task = None
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

    def images(self, done: int) -> None:
        """Images finished in the whole job (under torchrun, by every rank)."""
        if self.images_task is not None:
            self.overall.update(self.images_task, completed=done)

    def __call__(self, event: object) -> None:
        if isinstance(event, PassStarted):
            for t in list(self.steps.task_ids):
                self.steps.remove_task(t)
            p = event.pass_
            desc = (f"{self.name + ': ' if self.name else ''}pass {event.index}/{event.total} {p.scale}x "
                    f"{p.in_size[1]}x{p.in_size[0]} -> {p.out_size[1]}x{p.out_size[0]}")
            self.step_task = self.steps.add_task(desc, total=self.calls_per_pass or 1, unit="calls")
        elif isinstance(event, StepDone) and self.step_task is not None:
            self.steps.update(self.step_task, total=2 * event.steps - 1, completed=event.calls)
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

        self.console.print(Text.assemble(("warning:", "yellow"), " ", text))  # file names printed literally


class SilentDisplay(NullDisplay):
    """Ranks other than 0 under torchrun: their warnings reach rank 0's summary, not the terminal."""

    def warn(self, text: str) -> None:
        pass


def make_display(quiet: bool, *, main: bool = True) -> Display:
    if not main:
        return SilentDisplay()
    if quiet or not sys.stderr.isatty():
        return NullDisplay()
    return RichDisplay()
