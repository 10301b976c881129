"""`infdit batch`: a whole folder, resumable; one bad file never stops the rest."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..batch import run_batch
from ..errors import BadRequest
from . import _options as O
from ._progress import make_display
from .upscale import load_upscaler

EXAMPLES = """Examples:

  infdit batch ./photos --res 4096                 # -> ./photos_infdit/, same names

  infdit batch ./shoot -o ./big --recursive --scale 4 --glob '*.png'
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
    color_fix: O.ColorFixOpt = O.ColorFix.none,
    max_pixels: O.MaxPixels = 64 * 2**20,
    overwrite: O.Overwrite = False,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json_: O.Json = False,
) -> None:
    """Upscale every image in a folder with one loaded model.

    Existing outputs are skipped, so running the same command again resumes an interrupted batch. A file
    that fails is reported and the rest go on. Exit status: 0 if none failed, 1 otherwise.
    """
    if verbose:
        os.environ["INFDIT_DEBUG"] = "1"
    if res is None and scale is None:
        raise BadRequest("give a target: --res 4096, --res 3840x2160 or --scale 2")
    if not folder.is_dir():
        raise BadRequest(f"not a directory: {folder}")
    out_root = output if output is not None else folder.resolve().with_name(folder.resolve().name + "_infdit")
    options = O.make_options(steps, seed, mem_budget, block_batch, color_fix)
    up = load_upscaler(weights, repo, offline, device, dtype, options)
    from ..batch import find_images

    total = len(find_images(folder, recursive=recursive, glob=glob, exclude=out_root))
    display = make_display(quiet)
    display.start(total)
    try:
        report = run_batch(up, folder, out_root, res=res, scale=scale, recursive=recursive, glob=glob,
                           overwrite=overwrite, quality=quality, max_pixels=max_pixels, on_event=display,
                           on_item=lambda item: display.image_done(), on_start=lambda p: display.image(p.name))
    finally:
        display.stop()
    failed = report.count("failed")
    if json_:
        typer.echo(json.dumps({"done": report.count("done"), "skipped": report.count("skipped"),
                               "failed": failed, "items": [asdict(i) for i in report.items]}))
    elif not quiet or failed:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{folder} -> {out_root}")
        for col in ("file", "status", "detail"):
            table.add_column(col)
        for i in report.items:
            if i.status != "skipped" or not quiet:
                style = {"failed": "red", "skipped": "dim"}.get(i.status, "green")
                detail = i.reason or f"{i.seconds:.1f} s"
                table.add_row(str(Path(i.input).relative_to(folder)), f"[{style}]{i.status}[/]", detail)
        console = Console(stderr=True)
        console.print(table)
        console.print(f"{report.count('done')} done, {report.count('skipped')} skipped, {failed} failed")
    if failed:
        raise typer.Exit(1)
