"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import BadRequest
from ..units import parse_bytes

if TYPE_CHECKING:  # the library imports torch: kept off start-up
    from ..jobs.pipeline import UpscaleOptions


class ColorFix(str, Enum):
    none = "none"
    wavelet = "wavelet"
    adain = "adain"


Weights = Annotated[Optional[str], typer.Option(
    help="A .safetensors file, a Hub reference org/repo[/file][@revision], or a registry name "
         "(default: infdit-4x, or $INFDIT_WEIGHTS).", rich_help_panel="Model")]
Repo = Annotated[Optional[str], typer.Option(help="Hub repo id for a registry model ($INFDIT_REPO).",
                                             rich_help_panel="Model")]
Offline = Annotated[bool, typer.Option("--offline", help="Use only the HF cache (like HF_HUB_OFFLINE=1).",
                                       rich_help_panel="Model")]
Device = Annotated[str, typer.Option(help="auto, cuda, cpu or mps.", rich_help_panel="Model")]
Dtype = Annotated[str, typer.Option(
    help="auto (bf16 on CUDA if supported, else fp32), bf16 or fp32 "
         "(no fp16: the bf16-trained weights overflow it).",
    rich_help_panel="Model")]
Res = Annotated[Optional[str], typer.Option(
    help="Target: long side in pixels (4096, aspect kept) or exact WxH (3840x2160).", rich_help_panel="Size")]
Scale = Annotated[Optional[float], typer.Option(help="Target as a factor of the input, e.g. 2.5.",
                                                rich_help_panel="Size")]
Steps = Annotated[int, typer.Option(min=1, max=1000, help="Denoising steps (2*steps-1 model calls per pass).",
                                    rich_help_panel="Sampling")]
Seed = Annotated[int, typer.Option(min=0, max=2**63 - 1,
                                   help="Noise seed: the same seed gives the same image, "
                                   "whatever n or device.",
                                   rich_help_panel="Sampling")]
MemBudget = Annotated[Optional[str], typer.Option(
    help="Device memory to plan for, e.g. 8GB (default: what is free).", rich_help_panel="Memory")]
BlockBatch = Annotated[Optional[int], typer.Option(
    min=1, help="Blocks per batch side (n x n blocks of 128 px), fixed; placements are still planned.",
    rich_help_panel="Memory")]
LowMemory = Annotated[Optional[bool], typer.Option(
    "--low-memory/--no-low-memory",
    help="Keep the sampler state and host K/V cache in memory-mapped files next to the output (removed "
         "afterwards): a few bytes of RAM per pixel, some speed. Default: on by itself when RAM is short.",
    rich_help_panel="Memory")]
Compile = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="Run the layers through torch.compile (CUDA only): one compile at the "
                                   "start, then each call may be faster. Default: where `infdit selftest` "
                                   "measured that it pays on this GPU, for passes of 3 min or more.",
    rich_help_panel="Model")]
Checkpoint = Annotated[Optional[bool], typer.Option(
    "--checkpoint/--no-checkpoint",
    help="Save the sampler state after every step in .OUTPUT.infdit-run/ beside the output (12 bytes per "
         "output pixel), so an interrupted run continues where it stopped. Default: on when the job is "
         "predicted to take more than 5 minutes, or when a run folder is already there.",
    rich_help_panel="Long jobs")]
Resume = Annotated[bool, typer.Option(
    "--resume/--no-resume",
    help="Continue from the run folder when its input, weights and options match (default); "
         "--no-resume starts over.", rich_help_panel="Long jobs")]
Preview = Annotated[Optional[Path], typer.Option(
    help="After every step, write the model's current estimate of the image here (at most 2048 px on the "
         "long side), replacing the previous one.", rich_help_panel="Long jobs")]
Depth = Annotated[Optional[int], typer.Option(
    "--depth", min=8, max=16, metavar="8|16",
    help="Bits per sample of a PNG or TIFF output (default: the input's; JPEG and WebP are always 8).",
    rich_help_panel="Output")]
Quality = Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.", rich_help_panel="Output")]
ColorFixOpt = Annotated[ColorFix, typer.Option(
    help="Low-frequency colour transfer from the input, if colours drift.", rich_help_panel="Output")]
Overwrite = Annotated[bool,
                      typer.Option("--overwrite", help="Replace existing outputs.", rich_help_panel="Output")]
MaxPixels = Annotated[int, typer.Option(
    min=1, help="Refuse inputs with more pixels than this (decompression-bomb guard).",
    rich_help_panel="Input")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="More detail; tracebacks on errors.")]
Json = Annotated[bool, typer.Option("--json", help="A machine-readable summary on stdout.")]
OutPath = Annotated[Optional[Path], typer.Option("-o", "--output")]


def parse_budget(mem_budget: str | None) -> int | None:
    """--mem-budget in bytes (None: the device's free memory); a bad size is one line, exit 2."""
    if mem_budget is None:
        return None
    try:
        return parse_bytes(mem_budget)
    except ValueError as e:
        raise BadRequest(f"--mem-budget: {e}") from None


def make_options(steps: int, seed: int, mem_budget: str | None, block_batch: int | None,
                 color_fix: ColorFix, low_memory: bool | None = None,
                 compile: bool | None = None) -> UpscaleOptions:
    budget = parse_budget(mem_budget)
    from ..jobs.pipeline import UpscaleOptions  # kept off start-up (torch): after the usage checks

    return UpscaleOptions(steps=steps, seed=seed, block_batch=block_batch if block_batch else "auto",
                          mem_budget=budget, color_fix=color_fix.value, low_memory=low_memory,
                          compile=compile)


def check_depth(depth: int | None, dst: Path | None = None) -> None:
    """--depth is 8 or 16; 16 only for a PNG or TIFF output (JPEG and WebP hold 8 bits; exit 2)."""
    if depth is None:
        return
    if depth not in (8, 16):
        raise BadRequest(f"--depth must be 8 or 16, not {depth}")
    if depth == 16 and dst is not None:
        from ..images.load import SUFFIXES  # torch: kept off start-up (--help, usage errors)

        fmt = SUFFIXES.get(dst.suffix.lower())
        if fmt in ("JPEG", "WEBP"):
            raise BadRequest(f"--depth 16: {dst} is {fmt}, which holds 8 bits per sample; write .png or .tif")
