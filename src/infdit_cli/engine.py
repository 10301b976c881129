"""The UniBA block-batch engine: one denoiser call D(x; sigma), n x n blocks at a time.

The official code's memory-bounded modes do not reproduce its own whole-image pass (see
`docs/architecture.md`, "Known upstream limits"); this engine does, for every n, grid and traversal order:
each rectangle attends to itself and to the cached K/V of the blocks to its left, top and top-left, and a
block's K/V is dropped as soon as every block that reads it is done.

Image-sized tensors (x, lr_up, the output, the LR tokens) stay on whatever device the caller keeps them
("state device", possibly the host); only each rectangle's slices travel to the model's device.
"""

from __future__ import annotations

from collections.abc import Callable
import torch
import torch.nn.functional as F

from .attention import KVCache
from .events import BatchDone, PlanChanged
from .schedule import BlockBatch, Order, cache_slots, choose_order, consumers, plan_batches

__all__ = ["denoise", "pad_to_blocks"]


def pad_to_blocks(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (…, H, W) at the bottom/right to whole multiples.

    Bottom/right because UniBA only looks left and up: padding there reaches real pixels only through
    blocks that are partly real and the layer-0 LR window; replicating the edge keeps those plausible,
    where zeros would put a black border next to the image.
    """
    h, w = t.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return t
    return F.pad(t, (0, pw, 0, ph), mode="replicate")


def denoise(model, x: torch.Tensor, sigma: float | torch.Tensor, *, lr_up: torch.Tensor, image,
            block_batch: int | str | None = None, order: Order | str = "auto",
            cache_device: torch.device | str | None = None, mem_budget: int | None = None,
            on_event: Callable[[object], None] | None = None) -> torch.Tensor:
    """D(x; sigma) for `model` (an `InfDiT`), whole-image or n x n block batches.

    Args:
        x, lr_up: (B, 3, H, W); they and the result stay on x's device.
        image: `ImageCond` from `model.prepare_image`.
        block_batch: None (whole image), an int n >= 1, or "auto" (planner, from `mem_budget`).
        order: "row", "col" or "auto" (the one with the smaller cache).
        cache_device: where cached K/V live: the model's device (default) or "cpu".
        mem_budget: bytes, for block_batch="auto".
        on_event: receives `BatchDone` after each rectangle and `PlanChanged` on a retry.
    """
    cfg = model.config
    b, _, h, w = x.shape
    if lr_up.shape != x.shape:
        raise ValueError(f"lr_up {tuple(lr_up.shape)} must match x {tuple(x.shape)}")
    bs = cfg.block_size
    grid_h, grid_w = -(-h // bs), -(-w // bs)
    lb = cfg.lr_block
    if tuple(image.lr_tokens.shape[1:3]) != (grid_h * lb, grid_w * lb):
        raise ValueError(
            f"LR tokens {tuple(image.lr_tokens.shape[1:3])} do not match a {grid_h}x{grid_w} block grid; "
            f"lr must be (B, 3, {h // cfg.sr_scale}, {w // cfg.sr_scale})"
        )
    if order == "auto":
        order = choose_order(grid_h, grid_w)
    if block_batch == "auto":
        from .planner import plan

        chosen = plan(cfg, (h, w), budget=mem_budget, dtype=model.dtype, device=model.device, batch=b)
        n = None if chosen.whole_image else chosen.n
        if cache_device is None and chosen.cache_on_host:
            cache_device = "cpu"
    elif block_batch is not None and (not isinstance(block_batch, int) or block_batch < 1):
        raise ValueError(f"block_batch must be None, 'auto' or an int >= 1, got {block_batch!r}")
    else:
        n = block_batch
    sigma_t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b).to(x.device)
    step = model.prepare_step(sigma_t, image.vector)
    xp, lr_upp = pad_to_blocks(x, bs), pad_to_blocks(lr_up, bs)
    cache_dev = torch.device(cache_device) if cache_device is not None else model.device
    while True:
        try:
            out = _run(model, xp, lr_upp, image.lr_tokens, step, grid_h, grid_w, n, order, cache_dev, on_event)
            return out[..., :h, :w]
        except torch.OutOfMemoryError:
            if n == 1:
                raise
            retry = max(1, (n or max(grid_h, grid_w)) // 2)
            if on_event is not None:
                on_event(PlanChanged(old=f"n={n or max(grid_h, grid_w)}", new=f"n={retry}"))
            n = retry
            if model.device.type == "cuda":
                torch.cuda.empty_cache()


def _run(model, x, lr_up, lr_tokens, step, grid_h, grid_w, n, order, cache_dev, on_event) -> torch.Tensor:
    cfg = model.config
    bs, lb = cfg.block_size, cfg.lr_block
    dev, dt = model.device, model.dtype
    batches = plan_batches(grid_h, grid_w, n, order)
    whole = len(batches) == 1
    slots = cache_slots(grid_h, grid_w, n or max(grid_h, grid_w), order)
    cache = None if whole else KVCache(slots, device=cache_dev)
    done = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    out = torch.empty(x.shape[0], cfg.out_channels, *x.shape[2:], dtype=torch.float32, device=x.device)
    c_in = step.c_in.to(x.device).view(-1, 1, 1, 1)
    c_out = step.c_out.to(x.device).view(-1, 1, 1, 1)
    c_skip = step.c_skip.to(x.device).view(-1, 1, 1, 1)
    for idx, rect in enumerate(batches):
        ys, xs = slice(rect.r0 * bs, rect.r1 * bs), slice(rect.c0 * bs, rect.c1 * bs)
        x_r = x[..., ys, xs]
        xin = torch.cat([x_r, lr_up[..., ys, xs]], dim=1) * c_in  # the LR channels are scaled by c_in too
        region = _lr_region(lr_tokens, rect, lb)
        f = model.forward_rect(xin.to(dev, dt), region.to(dev, dt), rect, step, cache)
        out[..., ys, xs] = f.to(x.device, torch.float32) * c_out + x_r * c_skip
        if cache is not None:
            _evict(cache, rect, done)
        if on_event is not None:
            on_event(BatchDone(index=idx + 1, total=len(batches), n=n or max(grid_h, grid_w),
                               cached_blocks=len(cache) if cache is not None else 0))
    return out


def _lr_region(lr_tokens: torch.Tensor, rect: BlockBatch, lb: int) -> torch.Tensor:
    """LR tokens of the rectangle plus one LR block all round, zero outside the image (the official
    `Unfold(padding=16)` pads the projected map with zeros). Only this slice is copied, never the map."""
    hl, wl = lr_tokens.shape[1:3]
    r0, r1 = (rect.r0 - 1) * lb, (rect.r1 + 1) * lb
    c0, c1 = (rect.c0 - 1) * lb, (rect.c1 + 1) * lb
    part = lr_tokens[:, max(r0, 0) : min(r1, hl), max(c0, 0) : min(c1, wl)]
    pad = (0, 0, max(-c0, 0), max(c1 - wl, 0), max(-r0, 0), max(r1 - hl, 0))
    return F.pad(part, pad) if any(pad) else part


def _evict(cache: KVCache, rect: BlockBatch, done: torch.Tensor) -> None:
    """Mark the rectangle done; drop cached blocks that no block still to come reads."""
    done[rect.r0 : rect.r1, rect.c0 : rect.c1] = True
    grid_h, grid_w = done.shape
    stale = [blk for blk in cache.entries if all(done[i, j] for i, j in consumers(blk, grid_h, grid_w))]
    cache.evict(stale)
