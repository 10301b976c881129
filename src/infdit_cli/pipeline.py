"""Upscaling an image: plan the model passes, pad, draw the noise, sample, crop, resample to the target.

The only place that pads and crops, draws noise and plans passes. Each pass is one Inf-DiT sampling run:
4x, or 2x the way the official script does it (the model always sees HR/LR = 4: for 2x, `lr` is the
input downscaled by 2 and `lr_up` the input's 2x upsample). Inputs are replicate-padded at the bottom and
right to whole blocks (UniBA looks only left and up, so padding there barely reaches real pixels) and the
result is cropped back: no input pixel is ever cropped away.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .engine import pad_to_blocks
from .errors import BadRequest
from .events import PassDone, PassStarted
from .images import resize
from .planner import Plan, plan
from .sampling import edm_sigmas, sample_heun

__all__ = ["UpscaleOptions", "Pass", "UpscalePlan", "plan_upscale", "upscale", "target_size",
           "color_fix", "pass_inputs"]

MAX_OUTPUT_SIDE = 65535


@dataclass(frozen=True)
class UpscaleOptions:
    steps: int = 20
    seed: int = 0
    block_batch: int | str | None = "auto"  # None: whole image; "auto": the planner's n
    mem_budget: int | None = None  # bytes; None: what the device has
    color_fix: str = "none"  # none | wavelet | adain


@dataclass(frozen=True)
class Pass:
    scale: int  # 4 or 2
    in_size: tuple[int, int]  # (h, w) of this pass's input
    out_size: tuple[int, int]  # in_size * scale
    padded_out: tuple[int, int]  # the whole-block canvas the sampler runs on
    memory: Plan | None = None  # the planner's choice for this pass


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
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> UpscalePlan:
    """The fewest 4x/2x passes whose result covers `target`, each with its memory plan."""
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
        mem = None
        if options.block_batch == "auto":
            mem = plan(cfg, padded_out, budget=options.mem_budget, dtype=dtype, device=device)
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
            generator: torch.Generator | None = None,
            on_event: Callable[[object], None] | None = None) -> torch.Tensor:
    """Upscale `rgb` (1, 3, h, w) in [0, 1] to `up_plan.target_size`; returns (1, 3, H, W) in [0, 1] on the host.

    Noise is drawn on the CPU from `generator` (seeded from `options.seed` when None), so the same seed gives
    the same image whatever n, cache placement or device.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(options.seed)
    x = rgb.float().cpu() * 2 - 1  # [-1, 1]
    for i, p in enumerate(up_plan.passes):
        mem = p.memory
        n = None if options.block_batch is None else options.block_batch
        cache_device = None
        state_dev = model.device
        if mem is not None:
            n = None if mem.whole_image else mem.n
            cache_device = "cpu" if mem.cache_on_host else None
            state_dev = torch.device("cpu") if mem.state_on_host else model.device
        if on_event is not None:
            on_event(PassStarted(i + 1, len(up_plan.passes), p, n))
        x = _one_pass(model, x, p, options, n, cache_device, state_dev, generator, on_event)
        if on_event is not None:
            on_event(PassDone(i + 1, len(up_plan.passes)))
    if up_plan.resample:
        x = resize(x, up_plan.target_size)
    return ((x.clamp(-1, 1) + 1) / 2).cpu()


def pass_inputs(lr_in: torch.Tensor, scale: int, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model inputs of one pass over `lr_in` (B, 3, h, w) in [-1, 1]: (lr, lr_up, clip_in).

    `lr_up` is the padded input's bicubic upsample by `scale`, clipped to [-1, 1] (the official `concat`);
    `lr` the image the LR cross-attention sees, `clip_in` the one CLIP encodes. For 4x both are the input;
    for the official 2x they are the input at half size, so HR/LR stays 4.
    """
    padded = pad_to_blocks(lr_in, cfg.block_size // scale)  # (1, 3, ph, pw), replicate at bottom/right
    hr = (padded.shape[-2] * scale, padded.shape[-1] * scale)
    lr_up = resize(padded, hr).clamp(-1, 1)
    if scale == 4:
        return padded, lr_up, lr_in
    lr = resize(padded, (hr[0] // cfg.sr_scale, hr[1] // cfg.sr_scale))
    clip_in = resize(lr_in, (round(lr_in.shape[-2] / 2), round(lr_in.shape[-1] / 2)))
    return lr, lr_up, clip_in


def _one_pass(model, lr_in: torch.Tensor, p: Pass, options: UpscaleOptions, n, cache_device, state_dev,
              generator, on_event) -> torch.Tensor:
    lr, lr_up, clip_in = pass_inputs(lr_in, p.scale, model.config)
    vector = model.encode_image(clip_in)
    image = model.prepare_image(lr, vector, state_device=state_dev)
    sigmas = edm_sigmas(options.steps)
    noise = torch.randn(lr_up.shape, generator=generator)  # on the CPU: independent of device and n
    lr_up = lr_up.to(state_dev)
    x0 = lr_up + noise.to(state_dev) * sigmas[0]
    del noise

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model.denoise(x, sigma, lr_up=lr_up, image=image, block_batch=n, cache_device=cache_device,
                             on_event=on_event)

    out = sample_heun(denoise, x0, sigmas, callback=on_event)
    out = color_fix(out, lr_up, options.color_fix)
    return out[..., : p.out_size[0], : p.out_size[1]].cpu()
