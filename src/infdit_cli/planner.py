"""Memory planner: an explicit model of peak bytes, and the choice of n and placements for a budget.

Peak = weights + image-sized state + K/V cache + activations of one batch + runtime overhead, each counted
from the shapes involved (no tensors are made). Coefficients that depend on how many temporaries PyTorch
keeps alive were counted from `model.forward_rect` and checked against measured peaks (`benchmarks/`,
`docs/benchmarks.md`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import InfDiTConfig
from .errors import MemoryBudgetTooSmall
from .schedule import cache_slots, choose_order

__all__ = ["MemoryEstimate", "Plan", "estimate", "plan", "parse_bytes", "format_bytes", "param_count"]

# Live (tokens x hidden) tensors at the attention peak of a layer: h, a, qkv (3), normed+rotated q/k (4),
# gathered k/v (8), k + re_pos (4), attention output and its projection (2) -> 22 counted; 25 is what the
# CPU measurements need (allocator slack; docs/benchmarks.md has predicted beside measured).
ACT_TOKEN_COPIES = 25
# Layer-0 cross-attention: k/v region (2), the unfolded k/v windows (2 x 2.25 T per block), k + pos (2.25).
CROSS_WINDOW_COPIES = 6.75
SAMPLER_IMAGES = 7  # x, lr_up, d, x_euler, the denoiser output, and two temporaries of the Heun update
SATURATING_N = 4  # 4x4 blocks = 16K tokens per batch: assumed enough to fill a GPU (not measured here)
OVERHEAD = {"cpu": 64 * 2**20, "cuda": 64 * 2**20, "mps": 64 * 2**20}  # allocator slack, kernel workspaces


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    state: int  # image-sized tensors on the compute device (0 when they live on the host)
    cache: int  # K/V cache on the compute device (only the batch's neighbours when the cache is on the host)
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.state + self.cache + self.activations + self.overhead


@dataclass(frozen=True)
class Plan:
    n: int  # block batch side; n >= the grid's longer side means the whole-image pass
    whole_image: bool
    order: str
    cache_on_host: bool
    state_on_host: bool
    estimate: MemoryEstimate
    budget: int
    reason: str


def param_count(cfg: InfDiTConfig) -> int:
    from .weights import expected_shapes

    return sum(math.prod(s) for s in expected_shapes(cfg).values())


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def estimate(cfg: InfDiTConfig, size: tuple[int, int], n: int | None, *, dtype: torch.dtype = torch.float32,
             device_type: str = "cpu", cache_on_host: bool = False, state_on_host: bool = False,
             batch: int = 1, flash: bool | None = None, order: str = "auto") -> MemoryEstimate:
    """Predicted peak bytes on the compute device for one sampling run at HR `size` (H, W)."""
    e = _elem(dtype)
    h, w = size
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    n_eff = min(n or max(gh, gw), max(gh, gw))
    whole = n_eff >= max(gh, gw)
    bh, bw = min(n_eff, gh), min(n_eff, gw)  # the largest rectangle
    t, d, heads = cfg.block_tokens**2, cfg.hidden_size, cfg.num_heads
    tokens = batch * bh * bw * t
    if flash is None:
        flash = device_type in ("cuda", "cpu")  # torch has flash-style SDPA kernels for both

    weights = param_count(cfg) * e
    hp, wp = gh * cfg.block_size, gw * cfg.block_size
    state = 0
    if not state_on_host:
        state = SAMPLER_IMAGES * batch * 3 * hp * wp * 4 + batch * (hp // 8) * (wp // 8) * d * e

    block_kv = batch * 2 * cfg.num_layers * t * d * e  # one cached block, all layers
    if whole:
        cache = 0
    elif cache_on_host:
        cache = batch * 2 * (bh + bw + 1) * t * d * e  # the neighbours of one batch, one layer at a time
    else:
        order = choose_order(gh, gw) if order == "auto" else order
        cache = cache_slots(gh, gw, n_eff, order) * block_kv  # the slab `engine._run` allocates

    act = ACT_TOKEN_COPIES * tokens * d * e
    win = (3 * cfg.lr_block) ** 2
    cross = CROSS_WINDOW_COPIES * batch * bh * bw * win * d * e
    if not flash:  # the math kernel materialises the attention scores (and their softmax)
        act += 2 * batch * bh * bw * heads * t * 4 * t * e
        cross += 2 * batch * bh * bw * heads * t * win * e
    act = int(max(act, cross + 6 * tokens * d * e))
    act += batch * bh * bw * cfg.block_size**2 * (6 + 3) * 4  # the rectangle's pixels in and out
    return MemoryEstimate(weights, state, cache, act, OVERHEAD.get(device_type, OVERHEAD["cuda"]))


def device_memory(device: torch.device) -> int:
    """Memory one could use on `device`: free CUDA memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def plan(cfg: InfDiTConfig, size: tuple[int, int], *, budget: int | None = None,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", batch: int = 1) -> Plan:
    """The largest block batch n (and placements) whose predicted peak fits `budget` bytes.

    Placements are tried from fastest to leanest: everything on the device; the K/V cache on the host;
    the cache and all image-sized state on the host. On the CPU the host is the device, so only the first
    applies.

    Raises:
        MemoryBudgetTooSmall: not even n = 1 with everything on the host fits.
    """
    device = torch.device(device)
    budget = device_memory(device) if budget is None else int(budget)
    h, w = size
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    placements = [(False, False)] if device.type == "cpu" else [(False, False), (True, False), (True, True)]
    best: Plan | None = None
    for cache_host, state_host in placements:
        for n in range(max(gh, gw), 0, -1):
            est = estimate(cfg, size, n, dtype=dtype, device_type=device.type, cache_on_host=cache_host,
                           state_on_host=state_host, batch=batch)
            if est.total > budget:
                continue
            whole = n >= max(gh, gw)
            where = ", ".join(
                s for s, on in (("K/V cache on the host", cache_host), ("image state on the host", state_host))
                if on
            ) or "everything on the device"
            reason = (f"{'whole image' if whole else f'{n}x{n} blocks'} ({where}) predicted "
                      f"{format_bytes(est.total)} <= budget {format_bytes(budget)}")
            found = Plan(n, whole, choose_order(gh, gw), cache_host, state_host, est, budget, reason)
            # Host transfers cost time: keep things on the device as long as batches stay big enough to
            # keep it busy (SATURATING_N^2 blocks), else move the cache/state off for a bigger n.
            if n >= min(SATURATING_N, max(gh, gw)):
                return found
            if best is None or n > best.n:
                best = found
            break
    if best is not None:
        return best
    leanest = estimate(cfg, size, 1, dtype=dtype, device_type=device.type, cache_on_host=placements[-1][0],
                       state_on_host=placements[-1][1], batch=batch)
    raise MemoryBudgetTooSmall(
        f"a {h}x{w} output needs at least {format_bytes(leanest.total)} on {device.type} "
        f"(weights {format_bytes(leanest.weights)}); the budget is {format_bytes(budget)}"
    )


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GB', '512MiB', '1.5g', '1000000' -> bytes (binary units: 1 GB = 2^30, as GPU memory is sold)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (try 8GB or 512MB)") from None
    if unit not in _UNITS or value <= 0 or not math.isfinite(value):
        raise ValueError(f"not a memory size: {text!r} (try 8GB or 512MB)")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
