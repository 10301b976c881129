"""`infdit batch`: a whole folder, resumable; one bad file never stops the rest."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import Interrupted
from ..settings import override
from ..units import format_bytes
from . import _options as O
from ._checks import check_compile, check_target_args
from ._progress import FirstLines, device_note, make_display, plan_line
from ._text import safe

if TYPE_CHECKING:  # the library imports torch: kept off start-up
    from ..jobs.batch import BatchReport

EXAMPLES = """Examples:

  infdit batch ./photos --res 4096                 # -> ./photos_infdit/, same names

  infdit batch ./shoot -o ./big --recursive --scale 4 --glob '*.png'

  infdit batch ./scans --scale 2 --dry-run          # what would be done; nothing loaded
"""


def batch(
    folder: Annotated[Path, typer.Argument(help="The folder of images.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help=(
        "Output folder, mirroring the input tree (default: FOLDER_infdit beside it)."))] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subfolders.")] = False,
    glob: Annotated[str | None, typer.Option(help=(
        "Only files matching this pattern (case-insensitive). Default: png, jpg, jpeg, webp, tif, tiff, "
        "bmp, gif; other files are ignored."))] = None,
    res: O.Res = None,
    scale: O.Scale = None,
    steps: O.Steps = 20,
    seed: O.Seed = 0,
    mem_budget: O.MemBudget = None,
    block_batch: O.BlockBatch = None,
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    weights: O.Weights = None,
    repo: O.Repo = None,
    offline: O.Offline = False,
    quality: O.Quality = 95,
    depth: O.Depth = None,
    color_fix: O.ColorFixOpt = O.ColorFix.none,
    low_memory: O.LowMemory = None,
    compile_: O.Compile = None,
    max_pixels: O.MaxPixels = 64 * 2**20,
    overwrite: O.Overwrite = False,
    checkpoint: O.Checkpoint = None,
    resume: O.Resume = True,
    dry_run_: Annotated[bool, typer.Option("--dry-run", help=(
        "List what would be done (each file's size change, skips, refusals); load and compute nothing."
    ))] = False,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json_: O.Json = False,
) -> None:
    """Upscale every image in a folder with one loaded model.

    Existing outputs are skipped, so running the same command again resumes an interrupted batch. A file
    that fails is reported and the rest go on; a summary table (or --json) ends the run. GIF, BMP and other
    formats infdit does not write become PNG (photo.gif.png where photo.png is taken). An output folder
    inside FOLDER is never read back. Exit status: 0 if none failed, 1 otherwise (after finishing the
    others), 2 for a wrong command line.
    """
    if verbose:
        override(debug=True)
    check_target_args(res, scale)  # usage before the folder, the folder before weights; before torch loads
    options = O.make_options(steps, seed, mem_budget, block_batch, color_fix, low_memory, compile_)
    from ..distributed import world as D  # the library (torch) is kept off start-up: --help and usage errors
    from ..jobs.batch import IMAGE_SUFFIXES, BatchReport, plan_batch, preview_batch, run_batch
    from .upscale import load_upscaler

    check_compile(compile_, device)
    O.check_depth(depth)  # 8 or 16; JPEG and WebP outputs stay 8-bit whatever it says
    out_root = output if output is not None else folder.resolve().with_name(folder.resolve().name + "_infdit")
    world = D.world_from_env()  # under torchrun: this rank's place; one process otherwise
    if world.distributed and not dry_run_:
        _batch_ranks(world, folder, out_root, recursive, glob, overwrite, res, scale, steps, weights, repo,
                     offline, device, dtype, options, quality, max_pixels, quiet, json_, depth)
        return
    items = plan_batch(folder, out_root, recursive=recursive, glob=glob, overwrite=overwrite)
    if not items:
        what = f"matching {glob!r}" if glob else f"({', '.join(s.lstrip('.') for s in IMAGE_SUFFIXES)})"
        typer.echo(json.dumps(_summary(BatchReport(), dry_run_)) if json_ else
                   f"nothing to do: no image files {what} in {folder}"
                   f"{'' if recursive else ' (add --recursive for subfolders)'}", err=not json_)
        return
    todo = sum(i.status == "todo" for i in items)
    if dry_run_:
        report = BatchReport(preview_batch(items, res=res, scale=scale, max_pixels=max_pixels))
    else:
        # the plan before any download starts, else at the start
        lines = batch_first_lines(items, weights, repo, device, dtype, res, scale, options, max_pixels)
        first = FirstLines(lines, quiet) if todo else None
        up = load_upscaler(weights, repo, offline, device, dtype, options, quiet, first) if todo else None
        display = make_display(quiet)
        display.first = first
        display.start(todo, calls_per_pass=2 * steps - 1)
        started: set[str] = set()
        current: list[Path] = []  # the output of the file in progress

        def on_start(p: Path) -> None:
            started.add(str(p))
            current[:] = [next(Path(i.output) for i in items if i.input == str(p))]
            display.image(_shown_name(p, folder))

        def on_item(item) -> None:
            if item.input in started:
                display.image_done()

        try:
            report = run_batch(up, folder, out_root, res=res, scale=scale, recursive=recursive, glob=glob,
                               overwrite=overwrite, quality=quality, max_pixels=max_pixels, on_event=display,
                               on_item=on_item, on_start=on_start, items=items, checkpoint=checkpoint,
                               resume=resume, depth=depth)
        except KeyboardInterrupt as e:
            from ..jobs.checkpoint import run_folder_for, summary

            info = summary(run_folder_for(current[0])) if current else None
            where = f"; {current[0].name}: {info[0]} saved ({format_bytes(info[1])} on disk)" if info else ""
            err = Interrupted(f"{getattr(e, 'what', 'interrupted')} after {max(0, len(started) - 1)} file(s)"
                              f"{where}; run the same command again to skip the finished files and continue")
            err.exit_code = getattr(e, "exit_code", 130)
            raise err from None
        finally:
            display.stop()
    failed = report.count("failed")
    if json_:
        typer.echo(json.dumps(_summary(report, dry_run_)))
    elif not quiet or failed:
        _print_table(report, folder, out_root, quiet=quiet, dry_run=dry_run_)
    if failed:  # a dry run predicts the real run's status too
        raise typer.Exit(1)


def _shown_name(p: Path, folder: Path) -> str:
    """A file as the batch names it: its path inside the folder (two subfolders may hold one name)."""
    try:
        return str(Path(p).relative_to(folder))
    except ValueError:
        return Path(p).name


def batch_first_lines(items, weights, repo, device, dtype, res, scale, options, max_pixels
                      ) -> list[str | None]:
    """The batch's plan in one line (files to do, predicted time on this device in all, passes, model
    calls; over an hour on a CPU, what a GPU would take) and, where --device auto fell back to the CPU, why.
    Each file is planned from its header alone; one that cannot be planned is left out here (the run
    reports it)."""
    from ..images.load import probe_size  # torch: kept off start-up (--help, usage errors)
    from ..jobs.pipeline import SLOW_ON_CPU, gpu_seconds, plan_upscale, target_size
    from ..plan.device import resolve_device, resolve_dtype
    from .upscale import device_rates, plan_config

    todo = [i for i in items if i.status == "todo"]
    cfg, _ = plan_config(weights, repo)
    dev = resolve_device(device, check=False)
    dt = resolve_dtype(dtype, dev)
    rates = device_rates(cfg, dev, dt)
    seconds = gpu = 0.0
    passes = calls = 0
    for item in todo:
        try:
            size = probe_size(Path(item.input), max_pixels=max_pixels)
            target = target_size(size, res=res, scale=scale)
            plan = plan_upscale(cfg, size, target, options, dtype=dt, device=dev, rates=rates)
        except Exception:  # noqa: BLE001 - this file fails later, with its own line in the table
            continue
        seconds += plan.seconds
        passes += len(plan.passes)
        calls += plan.model_calls
        gpu += gpu_seconds(cfg, plan) if dev.type == "cpu" else 0.0
    slow = dev.type == "cpu" and seconds > SLOW_ON_CPU
    return [plan_line(seconds, passes, calls, dev.type, gpu if slow else None,
                      f"{len(todo)} file(s) to upscale"),
            device_note(device, dev.type)]


def _summary(report: BatchReport, dry_run: bool) -> dict:
    return {"dry_run": dry_run, "todo": report.count("todo"), "done": report.count("done"),
            "skipped": report.count("skipped"), "failed": report.count("failed"),
            "items": [asdict(i) for i in report.items]}


def _print_table(report: BatchReport, folder: Path, out_root: Path, *, quiet: bool, dry_run: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
    # the title on its own line, paths shortened to the terminal's width (a table's title wraps at the
    # table's own width, mid-word in a long path)
    title = table_title(folder, out_root, dry_run, console.width)
    console.print(Text(title, no_wrap=True, overflow="ellipsis"))
    table = Table()
    for col in ("file", "status", "detail"):
        table.add_column(col)
    for i in report.items:
        if quiet and i.status != "failed":
            continue
        style = {"failed": "red", "skipped": "dim", "todo": "cyan"}.get(i.status, "green")
        detail = i.reason or f"{i.seconds:.1f} s"
        if i.warnings:
            detail += "; " + "; ".join(i.warnings)
        status = "would upscale" if i.status == "todo" else i.status
        name = Text(safe(Path(i.input).relative_to(folder)))
        table.add_row(name, Text(status, style=style), Text(safe(detail)))
    console.print(table)
    counts = [f"{report.count(k)} {k if k != 'todo' else 'to do'}"
              for k in ("todo", "done", "skipped", "failed") if k != "todo" or dry_run]
    console.print(Text(", ".join(counts)))


def table_title(folder: Path, out_root: Path, dry_run: bool, width: int) -> str:
    """`FOLDER -> OUTPUT` for the batch table, each path as the user would type it from here (relative to
    the current folder when inside it, ~ for the home folder), and shortened from the left, whole names
    first, where the line would be wider than `width`."""
    tail = " (dry run)" if dry_run else ""
    a, b = safe(_from_here(folder)), safe(_from_here(out_root))
    if len(a) + len(b) + 4 + len(tail) <= width:
        return f"{a} -> {b}{tail}"
    room = max(12, width - 4 - len(tail))
    a2 = shorten_path(a, max(6, room // 2))
    b2 = shorten_path(b, max(6, room - len(a2)))
    a2 = shorten_path(a, max(6, room - len(b2)))  # what the output's path left over
    return f"{a2} -> {b2}{tail}"


def _from_here(p: Path) -> str:
    try:
        rel = os.path.relpath(Path(p).resolve(), Path.cwd())
    except (OSError, ValueError):
        rel = str(p)
    if not rel.startswith(".."):
        return rel
    home = os.path.expanduser("~")
    text = str(Path(p).resolve())
    return "~" + text[len(home):] if home not in ("/", "") and text.startswith(home + os.sep) else text


def shorten_path(text: str, room: int) -> str:
    """`text` in at most `room` characters: the last path names that fit after ".../", else the end of the
    last name after "..."."""
    if len(text) <= room:
        return text
    parts = text.split(os.sep)
    for k in range(len(parts) - 1, 0, -1):
        cut = "..." + os.sep + os.sep.join(parts[-k:])
        if len(cut) <= room:
            return cut
    return "..." + text[-max(1, room - 3):]


def _batch_ranks(world, folder, out_root, recursive, glob, overwrite, res, scale, steps, weights, repo,
                 offline, device, dtype, options, quality, max_pixels, quiet, json_, depth=None) -> None:
    """`batch` under torchrun: rank 0's plan, files dealt by size; rank 0 displays and reports the whole
    job."""
    from ..distributed import world as D  # kept off start-up (torch)
    from ..jobs.batch import Counter, plan_batch, run_batch_sharded
    from .upscale import load_upscaler

    device = D.rank_device(device, world)
    with D.group(world, device):
        # Every rank plans (so a bad command line fails everywhere alike), then all take rank 0's plan:
        # a file rank 0 writes meanwhile must not look "done" to a rank that lists the folder later.
        items = D.broadcast(plan_batch(folder, out_root, recursive=recursive, glob=glob, overwrite=overwrite),
                            world)
        todo = sum(i.status == "todo" for i in items)
        lines = batch_first_lines(items, weights, repo, device, dtype, res, scale, options, max_pixels)
        first = FirstLines(lines, quiet or not world.main) if todo else None
        up = load_upscaler(weights, repo, offline, device, dtype, options, quiet, first) if todo else None
        display = make_display(quiet, main=world.main)
        display.first = first
        counter = Counter(world)
        display.start(todo, calls_per_pass=2 * steps - 1)
        started: set[str] = set()

        def on_start(p: Path) -> None:
            started.add(str(p))
            display.image(_shown_name(p, folder))

        def on_item(item) -> None:
            if item.input in started:
                display.images(counter.add(1))

        try:
            # every rank waits for the others in `counter.wait`, polling the store, not in the gather
            # (whose INFDIT_RANK_TIMEOUT a long share of another rank exceeds)
            report = run_batch_sharded(
                up, folder, out_root, items, world, res=res, scale=scale, max_pixels=max_pixels,
                on_item=on_item, on_start=on_start, on_event=display, recursive=recursive, glob=glob,
                overwrite=overwrite, quality=quality, depth=depth,
                on_idle=lambda: counter.wait(todo, display.images if world.main else lambda v: None))
        finally:
            display.stop()
    if report is None:  # not rank 0: its files are in rank 0's summary and exit status
        return
    failed = report.count("failed")
    if json_:
        typer.echo(json.dumps({**_summary(report, False), "ranks": world.size}))
    elif not quiet or failed:
        _print_table(report, folder, out_root, quiet=quiet, dry_run=False)
    if failed:
        raise typer.Exit(1)
