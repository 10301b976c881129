"""Usage first: the checks a command runs before it resolves weights or computes anything.

A wrong command line is reported as itself (exit 2), a missing or unreadable input as itself (exit 1),
and an output that cannot be written before any work, never as a weights error found later.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from ..errors import BadRequest

DEFAULT_MAX_PIXELS = 64 * 2**20  # images.DEFAULT_MAX_PIXELS (a test holds them equal); images imports torch

__all__ = ["check_compile", "check_target_args", "check_upscale_args", "DEFAULT_MAX_PIXELS"]

_RES = re.compile(r"^\s*(\d+)(\s*x\s*(\d+))?\s*$", re.IGNORECASE)


def check_compile(compile: bool | None, device: str) -> None:
    """--compile only where it is offered: a CUDA device.

    Raises:
        BadRequest: --compile with a device that is not CUDA.
    """
    if not compile:
        return
    from ..plan.device import resolve_device  # torch: kept off start-up (--help, usage errors)

    dev = resolve_device(device, check=False)
    if dev.type != "cuda":
        raise BadRequest(f"--compile is for CUDA devices; the device here is {dev.type} (drop --compile)")


def check_target_args(res: str | None, scale: float | None) -> None:
    """The size options alone: exactly one of --res and --scale, each well formed.

    Raises:
        BadRequest: no target, both, or a malformed value.
    """
    if res is None and scale is None:
        raise BadRequest("give a target: --res 4096, --res 3840x2160 or --scale 2")
    if res is not None and scale is not None:
        raise BadRequest("give either --res or --scale, not both")
    if scale is not None and not (math.isfinite(scale) and scale > 1):
        raise BadRequest(f"--scale must be greater than 1, got {scale:.4g}")
    if res is not None:
        m = _RES.match(res)
        if m is None or int(m.group(1)) < 1 or (m.group(3) is not None and int(m.group(3)) < 1):
            raise BadRequest(f"--res must be a long side like 4096 or WxH like 3840x2160, got {res!r}")


def check_upscale_args(src: Path, dst: Path, *, res: str | None, scale: float | None, overwrite: bool,
                       max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Everything `upscale` can know before loading a model; returns the input's (height, width).

    Order: the command line (size options, output type), then the input (header only), then the target
    against the input's size, then the output's folder and any file in the way.

    Raises:
        BadRequest: bad size options or a target the input cannot reach (exit 2).
        BadImage: the input is missing, unreadable or too large.
        OutputExists, OutputError: the output cannot be written.
    """
    from ..images.load import SUFFIXES, probe_size  # kept off start-up (torch)
    from ..images.save import check_format_size, check_output
    from ..jobs.pipeline import target_size

    check_target_args(res, scale)
    if dst.suffix.lower() not in SUFFIXES:
        check_output(dst, overwrite)  # raises BadRequest naming the suffixes infdit writes
    if same_file(src, dst):
        raise BadRequest(f"the output {dst} is the input itself; infdit never replaces its input "
                         "(--overwrite included): choose another -o")
    size = probe_size(src, max_pixels=max_pixels)
    check_format_size(SUFFIXES[dst.suffix.lower()], target_size(size, res=res, scale=scale))
    check_output(dst, overwrite)
    return size


def same_file(a: Path, b: Path) -> bool:
    """`a` and `b` name one file: the same path once resolved (links followed), or the same inode (hard
    links, case-insensitive file systems)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
