"""Upscaling an image: plan the model passes, pad, draw the noise, sample, crop, resample to the target.

The only place that pads and crops, draws noise and plans passes. Each pass is one Inf-DiT sampling run:
4x, or 2x the way the official script does it (the model always sees HR/LR = 4: for 2x, `lr` is the
input downscaled by 2 and `lr_up` the input's 2x upsample). Inputs are replicate-padded at the bottom and
right to whole blocks (UniBA looks only left and up, so padding there barely reaches real pixels) and the
result is cropped back: no input pixel is ever cropped away.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .engine import BlockEngine, pad_to_blocks
from .errors import BadRequest, OutOfMemory
from .events import PassDone, PassStarted, PlanChanged
from .images import resize
from .planner import Placement, Plan, plan
from .sampling import HeunState, edm_sigmas, sample_heun
from .storage import Scratch

__all__ = ["UpscaleOptions", "Pass", "UpscalePlan", "plan_upscale", "upscale", "target_size",
           "color_fix", "Upsampled", "pass_inputs"]

MAX_OUTPUT_SIDE = 65535


@dataclass(frozen=True)
class UpscaleOptions:
    steps: int = 20
    seed: int = 0
    block_batch: int | str | None = "auto"  # None: whole image; "auto": the planner's n; or a fixed n
    mem_budget: int | None = None  # device bytes; None: what the device has free before our weights
    color_fix: str = "none"  # none | wavelet | adain
    low_memory: bool | None = None  # memory-mapped sampler state: True, False, or None (when RAM is short)
    host_budget: int | None = None  # host bytes; None: what the machine (and its cgroup) can give


@dataclass(frozen=True)
class Pass:
    scale: int  # 4 or 2
    in_size: tuple[int, int]  # (h, w) of this pass's input
    out_size: tuple[int, int]  # in_size * scale
    padded_out: tuple[int, int]  # the whole-block canvas the sampler runs on
    memory: Plan = None  # the planner's choice for this pass (always set by plan_upscale)


@dataclass(frozen=True)
class UpscalePlan:
    input_size: tuple[int, int]
    target_size: tuple[int, int]
    passes: list[Pass]
    steps: int
    resample: bool  # a final resample from the last pass's size to target_size

    @property
    def model_calls(self) -> int:
        return len(self.passes) * (2 * self.steps - 1)


def target_size(size: tuple[int, int], *, res: str | None = None, scale: float | None = None) -> tuple[int, int]:
    """(H, W) from `--res 4096` (long side, aspect kept), `--res 3840x2160` (W x H) or `--scale 2.5`."""
    h, w = size
    if (res is None) == (scale is None):
        raise BadRequest("give exactly one of --res and --scale")
    if scale is not None:
        if not (scale > 1 and math.isfinite(scale)):
            raise BadRequest(f"--scale must be greater than 1, got {scale}")
        out = (round(h * scale), round(w * scale))
    else:
        text = res.lower().strip()
        try:
            if "x" in text:
                tw, th = (int(v) for v in text.split("x"))
                out = (th, tw)
            else:
                long = int(text)
                out = (round(h * long / max(h, w)), round(w * long / max(h, w)))
        except ValueError:
            raise BadRequest(f"--res must be a long side like 4096 or WxH like 3840x2160, got {res!r}") from None
    if min(out) < 1:
        raise BadRequest(f"target size {out[1]}x{out[0]} is empty")
    if out[0] <= h and out[1] <= w:
        raise BadRequest(f"target {out[1]}x{out[0]} is not larger than the input {w}x{h}; infdit only upscales")
    if max(out) > MAX_OUTPUT_SIDE:
        raise BadRequest(f"target {out[1]}x{out[0]} exceeds {MAX_OUTPUT_SIDE} px per side")
    return out


def plan_upscale(cfg, input_size: tuple[int, int], target: tuple[int, int], options: UpscaleOptions, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 weights_file_dtype: torch.dtype | None = None) -> UpscalePlan:
    """The fewest 4x/2x passes whose result covers `target`, each with its memory plan.

    Raises:
        MemoryBudgetTooSmall, HostMemoryTooSmall: some pass cannot fit (before any weights are loaded).
    """
    h, w = input_size
    need = max(target[0] / h, target[1] / w)
    scales: list[int] = []
    total = 1
    while total < need - 1e-9:
        scales.append(2 if total * 2 >= need - 1e-9 else 4)
        total *= scales[-1]
    passes = []
    size = input_size
    for s in scales:
        unit = cfg.block_size // s  # input multiple that makes whole blocks (and an integer LR for 2x)
        padded_in = (-(-size[0] // unit) * unit, -(-size[1] // unit) * unit)
        padded_out = (padded_in[0] * s, padded_in[1] * s)
        n = None
        if options.block_batch is None:
            n = max(-(-padded_out[0] // cfg.block_size), -(-padded_out[1] // cfg.block_size))
        elif options.block_batch != "auto":
            n = int(options.block_batch)
        mem = plan(cfg, padded_out, budget=options.mem_budget, dtype=dtype, device=device, n=n,
                   host_budget=options.host_budget, low_memory=options.low_memory, scale=s,
                   weights_file_dtype=weights_file_dtype)
        passes.append(Pass(s, size, (size[0] * s, size[1] * s), padded_out, mem))
        size = (size[0] * s, size[1] * s)
    return UpscalePlan(input_size, target, passes, options.steps, resample=size != tuple(target))


def color_fix(out: torch.Tensor, ref: torch.Tensor, method: str) -> torch.Tensor:
    """Transfer the low-frequency colour of `ref` (the upsampled input) to `out`; both (B, 3, H, W) in [-1, 1].

    adain: per-channel mean/std matching. wavelet: replace the output's low-frequency band (a
    5-level dilated blur, as in StableSR's wavelet colour fix) with the reference's.
    """
    if method == "none":
        return out
    if method == "adain":
        dims = (-2, -1)
        mu_o, sd_o = out.mean(dims, keepdim=True), out.std(dims, keepdim=True).clamp_min(1e-6)
        mu_r, sd_r = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
        return ((out - mu_o) / sd_o * sd_r + mu_r).clamp(-1, 1)
    if method == "wavelet":
        return (out - _low_freq(out) + _low_freq(ref)).clamp(-1, 1)
    raise BadRequest(f"unknown --color-fix {method!r}; use none, wavelet or adain")


def _low_freq(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2**i
        pad = torch.nn.functional.pad(x, (d, d, d, d), mode="replicate")
        x = torch.nn.functional.conv2d(pad, k, groups=x.shape[1], dilation=d)
    return x


def upscale(model, rgb: torch.Tensor, up_plan: UpscalePlan, options: UpscaleOptions = UpscaleOptions(), *,
            generator: torch.Generator | None = None, on_event: Callable[[object], None] | None = None,
            scratch_dir: str | None = None, fault=None, engine=None) -> torch.Tensor:
    """Upscale `rgb` (1, 3, h, w) in [0, 1] to `up_plan.target_size`; returns (1, 3, H, W) in [0, 1] on the host.

    Noise is drawn on the CPU from `generator` (seeded from `options.seed` when None), so the same seed gives
    the same image whatever n, cache placement or device. A placement learned from running out of memory
    in one pass is kept for the passes after it. Memory-mapped state (`--low-memory`) lives in a scratch
    folder in `scratch_dir` (default: the system's temporary folder), removed however this returns.
    `engine`: what builds each pass's denoiser (default `BlockEngine`; `bands.band_engine` under torchrun).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(options.seed)
    x = rgb.float().cpu() * 2 - 1  # [-1, 1]
    mapped = any(p.memory.low_memory for p in up_plan.passes)
    scratch = Scratch(scratch_dir if scratch_dir is not None else tempfile.gettempdir()) if mapped else None
    learned: Placement | None = None
    try:
        for i, p in enumerate(up_plan.passes):
            placement = p.memory.placement
            if learned is not None:  # never go back above what ran out of memory
                placement = Placement(min(placement.n, learned.n), placement.order,
                                      placement.cache_on_host or learned.cache_on_host,
                                      placement.state_on_host or learned.state_on_host)
            if on_event is not None:
                on_event(PassStarted(i + 1, len(up_plan.passes), p, None if p.memory.whole_image else placement.n))
            x, final = _one_pass(model, x, p, placement, options, generator, on_event,
                                 scratch if p.memory.low_memory else None, fault, engine)
            if final != p.memory.placement:
                learned = final
            if on_event is not None:
                on_event(PassDone(i + 1, len(up_plan.passes)))
        if up_plan.resample:
            x = resize(x.float(), up_plan.target_size)
        x = x.float()  # a copy only if the state was bf16; then in place: no second float image
        return x.clamp_(-1, 1).add_(1).div_(2)
    finally:
        if scratch is not None:
            scratch.close()


class Upsampled:
    """`clamp(resize(src, size), -1, 1)` without holding it: `up[..., ys, xs]` computes just that slice
    from the source pixels it reads (plus a halo), with the same numbers as the whole-image resize."""

    HALO = 4  # source pixels beyond a slice on each side; the bicubic kernel reads 2 when upsampling

    def __init__(self, src: torch.Tensor, size: tuple[int, int]) -> None:
        self.src = src
        self.scale = size[0] // src.shape[-2]
        if (src.shape[-2] * self.scale, src.shape[-1] * self.scale) != tuple(size):
            raise ValueError(f"Upsampled needs an integer factor, got {tuple(src.shape[-2:])} -> {size}")
        self.shape = torch.Size((*src.shape[:-2], *size))

    def __getitem__(self, idx) -> torch.Tensor:
        if not (isinstance(idx, tuple) and len(idx) == 3 and idx[0] is Ellipsis):
            raise TypeError("Upsampled is sliced as up[..., rows, cols]")
        (y0, y1, _), (x0, x1, _) = (sl.indices(n) for sl, n in zip(idx[1:], self.shape[-2:]))
        s, hs, ws = self.scale, self.src.shape[-2], self.src.shape[-1]
        sy0, sy1 = max(y0 // s - self.HALO, 0), min(-(-y1 // s) + self.HALO, hs)
        sx0, sx1 = max(x0 // s - self.HALO, 0), min(-(-x1 // s) + self.HALO, ws)
        part = self.src[..., sy0:sy1, sx0:sx1].float()
        up = resize(part, ((sy1 - sy0) * s, (sx1 - sx0) * s)).clamp_(-1, 1)
        return up[..., y0 - sy0 * s : y1 - sy0 * s, x0 - sx0 * s : x1 - sx0 * s]


def _rows(h: int, w: int, budget: int = 32 * 2**20) -> list[slice]:
    step = max(1, budget // max(1, 3 * 4 * w))
    return [slice(r, min(r + step, h)) for r in range(0, h, step)]


def pass_inputs(lr_in: torch.Tensor, scale: int, cfg) -> tuple[torch.Tensor, Upsampled, torch.Tensor]:
    """The model inputs of one pass over `lr_in` (B, 3, h, w) in [-1, 1]: (lr, lr_up, clip_in).

    `lr_up` is the padded input's bicubic upsample by `scale`, clipped to [-1, 1] (the official `concat`),
    computed per slice (`lr_up[..., :, :]` is the whole image); `lr` the image the LR cross-attention sees,
    `clip_in` the one CLIP encodes. For 4x both are the input; for the official 2x they are the input at
    half size, so HR/LR stays 4.
    """
    padded = pad_to_blocks(lr_in, cfg.block_size // scale)  # (1, 3, ph, pw), replicate at bottom/right
    hr = (padded.shape[-2] * scale, padded.shape[-1] * scale)
    lr_up = Upsampled(padded, hr)
    if scale == 4:
        return padded, lr_up, lr_in
    lr = resize(padded, (hr[0] // cfg.sr_scale, hr[1] // cfg.sr_scale))
    clip_in = resize(lr_in, (round(lr_in.shape[-2] / 2), round(lr_in.shape[-1] / 2)))
    return lr, lr_up, clip_in


def _one_pass(model, lr_in: torch.Tensor, p: Pass, placement: Placement, options: UpscaleOptions,
              generator, on_event, scratch: Scratch | None, fault, engine_cls=None
              ) -> tuple[torch.Tensor, Placement]:
    """One sampling run; returns the cropped result and the placement it ended with."""
    lr, lr_up, clip_in = pass_inputs(lr_in, p.scale, model.config)
    hr = tuple(lr_up.shape[-2:])
    vector = model.encode_image(clip_in)
    sigmas = edm_sigmas(options.steps)

    # x_0 = lr_up + noise * sigma_0: noise drawn on the CPU in one call (independent of device and n),
    # straight into the state when it is float32 on the host, else through one float32 image.
    state_dev = torch.device("cpu") if placement.state_on_host else model.device
    sdtype = p.memory.state_dtype
    shape = (lr_in.shape[0], 3, *hr)
    direct = state_dev.type == "cpu" and sdtype == torch.float32
    noise = None if direct else torch.randn(shape, generator=generator)
    st = HeunState.allocate(shape, sdtype, state_dev, scratch)
    if direct:
        torch.randn(shape, generator=generator, out=st.x)
    for r in _rows(*hr):
        src = st.x[..., r, :] if direct else noise[..., r, :].to(state_dev)
        st.x[..., r, :] = (src * sigmas[0]).add_(lr_up[..., r, :].to(state_dev))
        st.trim()
    del noise

    engine = (engine_cls or BlockEngine)(model, lr, vector, lr_up, replace(placement, state_on_host=False), scratch=scratch,
                         on_event=on_event, fault=fault)
    done = 0

    def step_done(ev) -> None:
        nonlocal done
        done = ev.i
        if on_event is not None:
            on_event(ev)

    state_on_host = state_dev.type == "cpu"
    while True:
        try:
            sample_heun(engine, st.x, sigmas, callback=step_done, state=st, start=done)
            break
        except OutOfMemory:
            if state_on_host:
                raise
            # Last rung: the image state leaves the device; the interrupted step restarts from x.
            old = replace(engine.placement, state_on_host=False).describe()
            st, state_on_host = st.to("cpu", scratch), True
            if on_event is not None:
                on_event(PlanChanged(old=old, new=replace(engine.placement, state_on_host=True).describe()))
    engine.close()
    final = replace(engine.placement, state_on_host=state_on_host)
    out = st.x
    if options.color_fix != "none":
        out = color_fix(out.float(), lr_up[..., :, :].to(out.device), options.color_fix)
    return out[..., : p.out_size[0], : p.out_size[1]].cpu(), final
