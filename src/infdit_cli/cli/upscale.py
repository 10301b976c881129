"""`infdit upscale`: one image to a target resolution."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadRequest, InfditError, Interrupted
from ..settings import override
from ..units import format_bytes
from . import _options as O
from ._checks import check_compile, check_target_args, check_upscale_args
from ._progress import FirstLines, device_note, make_display, plan_line
from ._text import safe

EXAMPLES = """Examples:

  infdit upscale photo.jpg --res 4096              # long side 4096 px -> photo_infdit.jpg

  infdit upscale photo.png -o big.png --res 3840x2160 --mem-budget 8GB

  infdit upscale photo.png --scale 3 --dry-run     # show the plan, compute nothing
"""


def load_upscaler(weights, repo, offline, device, dtype, options, quiet: bool = False, first=None,
                  world=None):
    """The loaded model. `first` (`_progress.FirstLines`: the plan's first line, the CPU-fallback line) is
    called just before a download starts, if one does. `world`: torchrun's ranks share each image
    (`ranks_wiring`)."""
    from ..jobs.upscaler import Upscaler  # torch: kept off start-up (--help, usage errors)
    from ._fetch import ensure_weights

    ensure_weights(weights, repo, offline, quiet, before=first)  # first use: fetched once (`infdit download`)

    return Upscaler.from_weights(weights, device=device, dtype=dtype, options=options, repo=repo,
                                 offline=offline or None, **ranks_wiring(world))


def ranks_wiring(world) -> dict:
    """The `Upscaler` arguments that share one image across torchrun's ranks: each denoiser call over the
    ranks' block-column bands (`bands.py`), and one placement for all ranks, agreed before the first call.
    None for one process."""
    if world is None or not world.distributed:
        return {}
    from ..distributed import world as D  # torch: kept off start-up (--help, usage errors)
    from ..engine.bands import band_engine

    return {"engine": band_engine(world), "agree": D.agree_plan(world)}


def first_lines(info: dict, requested_device: str) -> list[str | None]:
    """The plan's first line (as the job's own: predicted time on this device, passes, calls; a CPU job
    over an hour adds the GPU estimate) and, where --device auto fell back to the CPU, why."""
    plan = info["plan"]
    return [plan_line(plan.seconds, len(plan.passes), plan.model_calls, info["device"], info["gpu_seconds"]),
            device_note(requested_device, info["device"])]


def check_preview(preview: Path, input: Path, dst: Path) -> None:
    """--preview names a writable image file that is neither the input nor the output."""
    from ..images.save import check_output  # torch: kept off start-up (--help, usage errors)

    if preview.resolve() in (input.resolve(), dst.resolve()):
        which = "input" if preview.resolve() == input.resolve() else "output"
        raise BadRequest(f"--preview {preview} is the {which}; choose another file")
    check_output(preview, True)


def preview_writer(preview: Path | None):
    """A callback writing each preview to `preview` atomically, or None."""
    if preview is None:
        return None
    from ..images.save import save_image  # torch: kept off start-up (--help, usage errors)

    def write(img) -> None:
        save_image(preview, img, overwrite=True)

    return write


@contextlib.contextmanager
def keep_progress(folder: Path):
    """On Ctrl-C or a failure with a checkpoint saved, the error's one line ends with how to resume."""
    from ..jobs.checkpoint import summary  # torch: kept off start-up (--help, usage errors)

    try:
        yield
    except KeyboardInterrupt as e:
        err = Interrupted(f"{getattr(e, 'what', 'interrupted')}{resume_hint(summary(folder), folder)}")
        err.exit_code = getattr(e, "exit_code", 130)
        raise err from None
    except InfditError as e:
        info = summary(folder)
        if info is None:
            raise
        err = type(e)(f"{e}{resume_hint(info, folder)}")
        err.exit_code = e.exit_code
        raise err from None


def resume_hint(info: tuple[str, int] | None, folder: Path) -> str:
    if info is None:
        return ""

    where, nbytes = info
    return (f"; {where} saved in {folder} ({format_bytes(nbytes)} on disk): run the same command again to "
            "resume, or add --no-resume to start over")


def dry_run(src: Path, weights, repo, offline, device: str, dtype: str, res, scale, options, *,
            dst: Path | None = None, checkpoint: bool | None = None) -> dict:
    """The plan without loading any weights (the config comes from the file's header, else the official one).

    Raises:
        MemoryBudgetTooSmall, HostMemoryTooSmall: the job cannot fit (exit 2, before any weights load).
    """
    from ..images.load import probe_size
    from ..jobs.checkpoint import run_folder_for  # these (torch) are kept off start-up
    from ..jobs.pipeline import SLOW_ON_CPU, gpu_seconds, plan_upscale, target_size
    from ..plan.device import resolve_device, resolve_dtype

    size = probe_size(src)
    cfg, source = plan_config(weights, repo)
    dev = resolve_device(device, check=False)
    dt = resolve_dtype(dtype, dev)
    target = target_size(size, res=res, scale=scale)
    plan = plan_upscale(cfg, size, target, options, dtype=dt, device=dev, rates=device_rates(cfg, dev, dt))
    info = {"plan": plan, "device": dev.type, "dtype": str(dt).removeprefix("torch."), "config_from": source,
            "predicted_seconds": plan.seconds, "gpu_seconds": None}
    if dev.type == "cpu" and plan.seconds > SLOW_ON_CPU:
        info["gpu_seconds"] = gpu_seconds(cfg, plan)
    if dst is not None:  # the disk the job's files need beside the output (`refuse_disk` checks it)
        from ..jobs.pipeline import check_disk, checkpoint_by_default, disk_need

        if checkpoint is None:
            checkpoint = checkpoint_by_default(run_folder_for(dst), plan.seconds)
        need = disk_need(plan, bool(checkpoint))
        folder = dst.parent if str(dst.parent) else Path(".")
        info["disk"] = {**need, "folder": str(folder), "free_bytes": check_disk(folder, need, refuse=False)}
    return info


def plan_config(weights, repo):
    """(config, where it came from) for planning without loading weights: the file's header where the
    weights are here, else the official architecture (a registry model not downloaded yet is the official
    one)."""
    from ..model.config import PRESETS  # torch: kept off start-up (--help, usage errors)
    from ..weights.format import read_config
    from ..weights.hub import resolve_weights

    try:
        return read_config(resolve_weights(weights, repo=repo, offline=True)), "weights file"
    except Exception:  # noqa: BLE001 - planning needs only the architecture
        return PRESETS["official"], "official architecture (weights not available)"


def device_rates(cfg, dev, dt):
    """The device's calibrated rates (`calibrate.calibration`: measured once, cached), or None (the
    planner's nominal ones) for a device this machine does not have (`--device cuda --dry-run` here)."""
    import torch  # kept off start-up

    from ..plan.calibrate import calibration

    if (dev.type == "cuda" and not torch.cuda.is_available()) or (
            dev.type == "mps" and not torch.backends.mps.is_available()):
        return None
    return calibration(cfg, dev, dt)


def refuse_disk(info: dict) -> None:
    """DiskTooSmall (exit 2) when the job's scratch and checkpoint files do not fit the free disk."""
    from ..jobs.pipeline import check_disk  # torch: kept off start-up (--help, usage errors)

    d = info.get("disk")
    if d is not None and d["free_bytes"] is not None:
        check_disk(d["folder"], d)


def show_plan(info: dict, input: Path, seed: int, as_json: bool) -> None:
    """`--dry-run`'s answer on stdout: the plan's lines (or its JSON) and the disk it needs."""
    from ..jobs.pipeline import plan_json, plan_lines  # torch: kept off start-up (--help, usage errors)

    if as_json:
        typer.echo(json.dumps({"input": str(input), **{k: (plan_json(v) if k == "plan" else v)
                                                        for k, v in info.items()}}, default=str))
        return
    for line in plan_lines(info["plan"], info["device"], info["dtype"], info["gpu_seconds"]):
        typer.echo(safe(line))
    d = info["disk"]
    if d["total_bytes"]:  # a job with no scratch and no checkpoints needs no disk line
        typer.echo(f"  disk: {format_bytes(d['total_bytes'])} in {d['folder']} (scratch "
                   f"{format_bytes(d['scratch_bytes'])}, checkpoints {format_bytes(d['checkpoint_bytes'])})"
                   + ("" if d["free_bytes"] is None else f", {format_bytes(d['free_bytes'])} free"))
    typer.echo(f"  (config: {info['config_from']}; seed {seed})")


@contextlib.contextmanager
def ranks_holding(dst: Path, device: str):
    """(world, this rank's device) inside torchrun's process group (one process: a world of one, `device`),
    rank 0 holding the output's lock: one writer per output, taken before the weights load so that a
    second run is refused at once, and let go before the group is left."""
    from ..distributed import world as D  # torch: kept off start-up (--help, usage errors)
    from ..jobs.checkpoint import output_lock

    world = D.world_from_env()  # under torchrun: the image's block columns are shared out (bands.py)
    if world.distributed:
        device = D.rank_device(device, world)
    with D.group(world, device), contextlib.ExitStack() as held:
        if world.main:
            held.enter_context(output_lock(dst))
        yield world, device


def upscale(
    input: Annotated[Path, typer.Argument(help="The image to upscale (PNG, JPEG, WebP, TIFF, ...).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help=(
        "Where to write; the format follows the suffix. Default: STEM_infdit.EXT beside the input."))] = None,
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
    preview: O.Preview = None,
    dry_run_: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; compute nothing.")]
        = False,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json_: O.Json = False,
) -> None:
    """Upscale one image to a target resolution with Inf-DiT.

    Model passes are 4x (and 2x, as the official script does it), the fewest that reach the target, then
    one antialiased resample to the exact size. Memory is planned from --mem-budget: the image is computed
    in n x n blocks of 128 px with a K/V cache, n as large as fits.
    """
    if verbose:
        override(debug=True)
    check_target_args(res, scale)  # the commonest usage errors, answered before torch loads
    options = O.make_options(steps, seed, mem_budget, block_batch, color_fix, low_memory, compile_)
    from ..jobs.checkpoint import (
        run_folder_for,  # the library (torch) is kept off start-up: --help, usage errors
    )
    from ..jobs.upscaler import default_output

    check_compile(compile_, device)
    dst = output or default_output(input)
    check_upscale_args(input, dst, res=res, scale=scale, overwrite=overwrite,
                       max_pixels=max_pixels)  # usage and files before weights: the real mistake first
    O.check_depth(depth, dst)
    if preview is not None:
        check_preview(preview, input, dst)
    info = dry_run(input, weights, repo, offline, device, dtype, res, scale, options, dst=dst,
                   checkpoint=checkpoint)  # refuses what cannot fit, in memory or on disk
    if dry_run_:
        show_plan(info, input, seed, json_)
        FirstLines([first_lines(info, device)[1]], quiet)()  # why auto is the CPU, on stderr
    refuse_disk(info)  # exit 2 before any weights load (after the dry run's plan is shown)
    if dry_run_:
        return
    out = output if output is not None else None
    with ranks_holding(dst, device) as (world, rank_device):
        # the plan's first line before any download starts, else at the job's start (the job's own)
        first = FirstLines(first_lines(info, device), quiet or not world.main, job_is_plan=True)
        up = load_upscaler(weights, repo, offline, rank_device, dtype, options, quiet, first, world)
        display = make_display(quiet, main=world.main)
        display.first = first
        display.start(1, calls_per_pass=2 * steps - 1)
        display.image(input.name)
        try:
            with keep_progress(run_folder_for(dst)):
                result = up.upscale_file(input, out, res=res, scale=scale, quality=quality,
                                         overwrite=overwrite, max_pixels=max_pixels, on_event=display,
                                         write=world.main,
                                         checkpoint=checkpoint if world.main else False, resume=resume,
                                         on_preview=preview_writer(preview) if world.main else None,
                                         depth=depth)
        finally:
            display.stop()
    if not world.main:  # rank 0 writes the file and reports
        return
    if json_:
        typer.echo(json.dumps(asdict(result)))
    elif not quiet:
        h, w = result.output_size
        typer.echo(safe(f"wrote {result.output} ({w}x{h}) in {result.seconds:.1f} s, seed {result.seed}"),
                   err=True)
