"""Training memory: what one optimizer step needs, and the plan that fits `--mem-budget`.

A step holds the weights, their gradients and AdamW's two moments (and the EMA) in float32, plus the
activations autograd keeps between forward and backward. On CUDA the step's peak is measured (one micro-step
at the candidate's micro-batch and crop); on the CPU it is estimated: the state from the parameter count, the
activations from a per-pixel figure measured once on a small crop (`activation_bytes_per_pixel`).

Over the budget, the plan first turns on activation checkpointing, then splits the rank's share of the
global batch into smaller micro-batches accumulated into one step (the global batch, so the training, stays
the same); if micro-batch 1 with checkpointing does not fit either, `MemoryBudgetTooSmall` (exit 2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import MemoryBudgetTooSmall
from ..units import format_bytes
from . import recipe as R

__all__ = ["MemoryPlan", "activation_bytes_per_pixel", "plan_memory", "state_bytes", "synthetic_batch"]


@dataclass(frozen=True)
class MemoryPlan:
    """How a step runs, and what it needs (bytes per rank)."""

    micro_batch: int  # images per forward/backward on one rank
    accum: int  # micro-batches accumulated into one optimizer step
    checkpointing: bool  # activation checkpointing
    state_bytes: int  # weights, gradients, AdamW moments (and EMA), frozen weights
    activation_bytes: int | None  # estimated activations of a micro-batch (CPU); None where measured
    step_bytes: int  # the step's memory: estimated (CPU) or the measured peak (CUDA)
    measured: bool  # step_bytes is a measured CUDA peak
    budget: int | None  # --mem-budget
    changes: list[str] = field(default_factory=list)  # what the budget changed, in words


def state_bytes(model, ema: bool) -> int:
    """float32 weights, gradients and AdamW's exp_avg and exp_avg_sq (and the EMA) of the trainable
    parameters, plus the frozen ones' weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 4 * trainable * (4 + int(ema)) + 4 * frozen


def synthetic_batch(model, micro: int, crop: int, device: torch.device, seed: int = 0) -> dict:
    """A batch of random crops in the loader's layout (hr, lr, lr_up, noise, sigma) for measurements."""
    s = model.config.sr_scale
    gen = torch.Generator().manual_seed(seed)
    batch = {"hr": torch.rand(micro, 3, crop, crop, generator=gen) * 2 - 1,
             "lr": torch.rand(micro, 3, crop // s, crop // s, generator=gen) * 2 - 1,
             "noise": torch.randn(micro, 3, crop, crop, generator=gen), "sigma": torch.full((micro,), 0.5)}
    batch["lr_up"] = R.concat_lr(batch["lr"], s)
    return {k: v.to(device) for k, v in batch.items()}


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, each storage counted once (as
    `saved_tensors_hooks` sees them: outside any checkpointed layer)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activation_bytes_per_pixel(model) -> tuple[float, float]:
    """(plain, checkpointed) activation bytes per HR pixel of a micro-batch, measured on one 2 x 2-block
    crop (attention is local to a block's neighbours, so activations grow with the pixels).

    Plain: what a forward saves for backward (S), plus one layer's share of it again for the gradients
    backward makes as it goes. Checkpointed: what stays saved outside the layers (O, a checkpointed forward),
    each layer's kept input (the hidden states), and two mean layers, (S - O) / L each: the layer backward is
    recomputing and its gradients (layer 0, with its cross-attention, saves about 1.4x a later layer).
    """
    cfg, dev = model.config, model.device
    side = 2 * cfg.block_size
    batch = synthetic_batch(model, 1, side, dev)
    vector = torch.zeros(1, cfg.vector_dim, device=dev)
    was = model.grad_checkpointing

    def forward() -> None:
        model(batch["hr"], batch["sigma"], batch["lr_up"], batch["lr"], vector)

    try:
        with torch.enable_grad():
            model.grad_checkpointing = False
            plain = _saved_bytes(forward)
            model.grad_checkpointing = True
            outside = _saved_bytes(forward)
    finally:
        model.grad_checkpointing = was
    layers, pixels = cfg.num_layers, side * side
    per_layer = max(plain - outside, 0) / layers
    hidden = layers * cfg.hidden_size * model.dtype.itemsize / cfg.patch_size**2 * pixels
    return (plain + per_layer) / pixels, (outside + hidden + 2 * per_layer) / pixels


def _cuda_peak(model, micro: int, crop: int, checkpointing: bool, amp, ema: bool) -> int | None:
    """The peak bytes allocated on CUDA by one micro-step (forward, backward, an AdamW step with lr 0, which
    leaves the weights as they were), the weights included; None if it ran out of memory."""

    dev = model.device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    extra = sum(p.numel() for p in params) * 4 if ema else 0
    was = model.grad_checkpointing
    model.grad_checkpointing = checkpointing
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        batch = synthetic_batch(model, micro, crop, dev)
        with torch.autocast("cuda", dtype=amp) if amp is not None else contextlib.nullcontext():
            loss, _ = R.batch_loss(model, model, batch)
        loss.backward()
        opt.step()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) + extra
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model.grad_checkpointing = was
        model.zero_grad(set_to_none=True)
        del opt
        torch.cuda.empty_cache()


def plan_memory(model, *, batch: int, ranks: int, accum: int, crop: int, checkpointing: bool, ema: bool,
                budget: int | None, amp=None, estimate: bool = False) -> MemoryPlan:
    """The step's plan: the options as given if they fit `budget` (or there is none), else checkpointing,
    then more accumulation (a smaller micro-batch, the same global batch `batch`). Without a budget nothing
    is measured, unless `estimate` asks for the CPU's activation estimate (`--dry-run`).

    Raises:
        MemoryBudgetTooSmall: micro-batch 1 with checkpointing does not fit (one line, exit 2).
    """
    per_rank = batch // ranks
    state = state_bytes(model, ema)
    cuda = model.device.type == "cuda"
    rates = activation_bytes_per_pixel(model) if not cuda and (budget is not None or estimate) else None

    def need(ckpt: bool, acc: int) -> tuple[int, int | None]:
        micro = per_rank // acc
        if budget is None and rates is None:  # nothing measured: only the state is known
            return state, None
        if cuda:
            peak = _cuda_peak(model, micro, crop, ckpt, amp, ema)
            return (peak if peak is not None else 1 << 62), None
        act = round(rates[int(ckpt)] * micro * crop * crop)
        return state + act, act

    candidates = [(checkpointing, accum)]
    if budget is not None:  # checkpointing first, then ever smaller micro-batches down to 1
        candidates += [] if checkpointing else [(True, accum)]
        candidates += [(True, a) for a in range(accum + 1, per_rank + 1) if per_rank % a == 0]
    for ckpt, acc in candidates:
        step, act = need(ckpt, acc)
        if budget is None or step <= budget:
            changes = []
            if ckpt and not checkpointing:
                changes.append("activation checkpointing on")
            if acc != accum:
                changes.append(f"micro-batch {per_rank // acc} x {acc} accumulated "
                               f"(global batch {batch} kept)")
            measured = cuda and budget is not None
            return MemoryPlan(per_rank // acc, acc, ckpt, state, act, step, measured, budget, changes)
    how = ("measured peak" if cuda else f"{format_bytes(state)} of weights, gradients and AdamW state + "
           f"{format_bytes(act)} of activations, estimated")
    raise MemoryBudgetTooSmall(
        f"--mem-budget {format_bytes(budget)} is too small to train: one step needs {format_bytes(step)} "
        f"even at micro-batch 1 with activation checkpointing ({how}); raise it or use a smaller --crop")
