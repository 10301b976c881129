"""`infdit batch`: a whole folder, resumable; one bad file never stops the rest."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from . import _options as O
from ._checks import check_compile, check_target_args
from ._progress import make_display
from ._text import safe

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
    compile_: O.Compile = False,
    max_pixels: O.MaxPixels = 64 * 2**20,
    overwrite: O.Overwrite = False,
    checkpoint: O.Checkpoint = None,
    resume: O.Resume = True,
    dry_run_: Annotated[bool, typer.Option("--dry-run", help=(
        "List what would be done (each file's size change, skips, refusals); load and compute nothing."))] = False,
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
    check_target_args(res, scale)  # the commonest usage error, answered before torch loads
    from .. import distributed as D  # the library (torch) is kept off start-up: --help and usage errors
    from ..batch import IMAGE_SUFFIXES, BatchReport, plan_batch, preview_batch, run_batch
    from ..planner import format_bytes
    from .upscale import load_upscaler

    if verbose:
        os.environ["INFDIT_DEBUG"] = "1"
    options = O.make_options(steps, seed, mem_budget, block_batch, color_fix, low_memory, compile_)
    check_compile(compile_, device)
    check_target_args(res, scale)  # usage before the folder, the folder before weights
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
        up = load_upscaler(weights, repo, offline, device, dtype, options, quiet) if todo else None
        display = make_display(quiet)
        display.start(todo, calls_per_pass=2 * steps - 1)
        started: set[str] = set()
        current: list[Path] = []  # the output of the file in progress

        def on_start(p: Path) -> None:
            started.add(str(p))
            current[:] = [next(Path(i.output) for i in items if i.input == str(p))]
            display.image(p.name)

        def on_item(item) -> None:
            if item.input in started:
                display.image_done()

        try:
            report = run_batch(up, folder, out_root, res=res, scale=scale, recursive=recursive, glob=glob,
                               overwrite=overwrite, quality=quality, max_pixels=max_pixels, on_event=display,
                               on_item=on_item, on_start=on_start, items=items, checkpoint=checkpoint,
                               resume=resume, depth=depth)
        except KeyboardInterrupt as e:
            from ..checkpoint import describe, run_folder_for
            from ..errors import Interrupted

            info = describe(run_folder_for(current[0])) if current else None
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


def _summary(report: BatchReport, dry_run: bool) -> dict:
    return {"dry_run": dry_run, "todo": report.count("todo"), "done": report.count("done"),
            "skipped": report.count("skipped"), "failed": report.count("failed"),
            "items": [asdict(i) for i in report.items]}


def _print_table(report: BatchReport, folder: Path, out_root: Path, *, quiet: bool, dry_run: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(safe(f"{folder} -> {out_root}{' (dry run)' if dry_run else ''}")), title_justify="left")
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
        table.add_row(Text(safe(Path(i.input).relative_to(folder))), Text(status, style=style), Text(safe(detail)))
    console = Console(stderr=True, highlight=False)
    console.print(table)
    counts = [f"{report.count(k)} {k if k != 'todo' else 'to do'}" for k in ("todo", "done", "skipped", "failed")
              if k != "todo" or dry_run]
    console.print(Text(", ".join(counts)))


def _batch_ranks(world, folder, out_root, recursive, glob, overwrite, res, scale, steps, weights, repo, offline,
                 device, dtype, options, quality, max_pixels, quiet, json_, depth=None) -> None:
    """`batch` under torchrun: rank 0's plan, files dealt by size, rank 0 displays and reports the whole job."""
    from .. import distributed as D  # kept off start-up (torch)
    from ..batch import plan_batch
    from .upscale import load_upscaler

    device = D.rank_device(device, world)
    with D.group(world, device):
        # Every rank plans (so a bad command line fails everywhere alike), then all take rank 0's plan:
        # a file rank 0 writes meanwhile must not look "done" to a rank that lists the folder later.
        items = D.broadcast(plan_batch(folder, out_root, recursive=recursive, glob=glob, overwrite=overwrite),
                            world)
        todo = sum(i.status == "todo" for i in items)
        up = load_upscaler(weights, repo, offline, device, dtype, options, quiet) if todo else None
        display = make_display(quiet, main=world.main)
        counter = D.Counter(world)
        display.start(todo, calls_per_pass=2 * steps - 1)
        started: set[str] = set()

        def on_start(p: Path) -> None:
            started.add(str(p))
            display.image(p.name)

        def on_item(item) -> None:
            if item.input in started:
                display.images(counter.add(1))

        try:
            report = D.run_batch_sharded(up, folder, out_root, items, world, res=res, scale=scale,
                                         max_pixels=max_pixels, on_item=on_item, on_start=on_start,
                                         on_event=display, recursive=recursive, glob=glob, overwrite=overwrite,
                                         quality=quality, depth=depth,
                                         # every rank waits here, polling the store, not in the gather
                                         # (whose INFDIT_RANK_TIMEOUT a long share of another rank exceeds)
                                         on_idle=lambda: counter.wait(todo, display.images if world.main
                                                                      else lambda v: None))
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
