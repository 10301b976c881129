"""The device and dtype a job runs on: `auto` resolved, a named device checked, and the CUDA allocator
asked for expandable segments before CUDA initialises."""

from __future__ import annotations

import os

import torch

from ..errors import BadRequest

__all__ = ["ALLOC_CONF", "prefer_expandable_segments", "resolve_device", "resolve_dtype"]

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def prefer_expandable_segments(device: torch.device | str, env=None) -> bool:
    """Ask the CUDA caching allocator for expandable segments (`expandable_segments:True`): a pass's
    buffers of changing sizes (edge rectangles, the last chunk) then grow one mapping instead of leaving
    fragments the next plan cannot use. Only for a CUDA device, only where the user has not set
    PYTORCH_CUDA_ALLOC_CONF, and only before CUDA initialises (the allocator reads it then). True when set."""
    env = os.environ if env is None else env
    if torch.device(device).type != "cuda" or ALLOC_CONF in env or "PYTORCH_ALLOC_CONF" in env:
        return False
    if torch.cuda.is_initialized():
        return False
    env[ALLOC_CONF] = "expandable_segments:True"
    return True


def resolve_device(name: str = "auto", *, check: bool = True) -> torch.device:
    """`auto` -> cuda, mps or cpu; a named device must exist here unless `check` is False (planning only)."""
    if name == "auto":
        if torch.cuda.is_available():
            prefer_expandable_segments("cuda")  # before CUDA initialises, unless the user set the allocator's
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadRequest(f"unknown device {name!r}; use auto, cuda, cpu or mps") from None
    if dev.type not in ("cuda", "cpu", "mps"):
        raise BadRequest(f"unsupported device {name!r}; use auto, cuda, cpu or mps")
    if not check:
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadRequest("--device cuda: no CUDA device is available here")
    if dev.type == "cuda":
        prefer_expandable_segments(dev)  # before CUDA initialises (unless the user set the allocator's)
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadRequest("--device mps: no MPS device is available here")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA where supported, else fp32; never fp16 (see below)."""
    table = {"fp32": torch.float32, "float32": torch.float32,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if name == "auto":
        if device.type == "cuda" and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float32
    if name in ("fp16", "float16", "half"):
        # The official weights were trained in bf16, whose range fp16 lacks: activations overflow to inf.
        raise BadRequest("--dtype fp16 is not supported: the bf16-trained weights overflow float16's range; "
                         "use bf16 (or fp32)")
    if name not in table:
        raise BadRequest(f"unknown dtype {name!r}; use auto, bf16 or fp32")
    return table[name]
