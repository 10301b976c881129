"""The official Inf-DiT training recipe as pure functions: crops, LR inputs, LR dropout, EDM sigma and loss.

Sources (THUDM/Inf-DiT): `configs/text2image-sr.yaml` (yaml), `train_text2image_sr_big_clip.sh` (sh),
`scripts/ds_config_zero_clip.json` (ds), `dit/data.py`, `dit/loss.py` (`ConcatSRLoss2`),
`dit/sigma_sampling.py` (`EDMSampling`), `dit/weighting.py` (`EDMWeighting`), `dit/model.py` (`forward`).
Images are float (3, H, W) or (B, 3, H, W) in [-1, 1] (the official `x / 127.5 - 1`). Every random draw
comes from the caller's `torch.Generator`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..images.load import resize
from .degrade import DEGRADATION_2, Degradation, degrade


@dataclass(frozen=True)
class Recipe:
    """Official training values; `scaled(sr_size)` keeps them but crops smaller (tiny test models)."""

    sr_size: int = 512  # yaml data.params.sr_size (HR crop side)
    lr_size: int = 128  # yaml data.params.lr_size; sr_size / lr_size = 4 = degradation_2.yaml sf
    patch_size: int = 4  # sh --patch-size
    p_mean: float = -1.0  # yaml loss_config.sigma_sampler_config.params.p_mean
    p_std: float = 1.4  # yaml ... p_std
    sigma_min: float = 0.001  # EDMSampling(truncated_sigma_min=0.001), not overridden by the yaml
    sigma_data: float = 0.5  # EDMWeighting / EDMPrecond default, not overridden by the yaml
    lr_dropout: float = 0.07  # sh --lr-dropout (data.get_batch: both LR inputs become noise)
    crop_prob: float = 0.7  # data.py: a plain RandomCrop with p 0.7, else Resize(short side) + RandomCrop
    hflip_prob: float = 0.3  # data.py: RandomHorizontalFlip(p=0.3), in the RandomCrop branch only
    random_position: bool = True  # sh --random-position: a random RoPE origin per batch (model.forward)
    rope_table_size: int = 1024  # 8 * image_size / patch_size with sh --image-size 512
    lr: float = 1e-4  # ds optimizer (sat.ops.FusedEmaAdam) lr
    betas: tuple[float, float] = (0.9, 0.999)  # ds
    eps: float = 1e-8  # ds
    weight_decay: float = 1e-4  # ds
    grad_clip: float = 0.1  # ds gradient_clipping
    batch_per_gpu: int = 1  # ds train_micro_batch_size_per_gpu
    train_iters: int = 1_000_000  # sh --train-iters
    degradation: Degradation = DEGRADATION_2  # yaml data.params.realesr_config

    @property
    def scale(self) -> int:
        return self.sr_size // self.lr_size

    def scaled(self, sr_size: int) -> Recipe:
        """The same recipe with an `sr_size` HR crop (and the LR crop at the same scale)."""
        if sr_size % self.scale or sr_size % self.patch_size:
            raise ValueError(f"crop size {sr_size} is not a multiple of the scale {self.scale} "
                             f"and the patch size {self.patch_size}")
        return dataclasses.replace(self, sr_size=sr_size, lr_size=sr_size // self.scale)


RECIPE = Recipe()


def _randint(gen: torch.Generator, hi: int) -> int:
    """Uniform integer in [0, hi]."""
    return int(torch.randint(hi + 1, (), generator=gen).item())


def _coin(gen: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=gen, dtype=torch.float64).item() < p


def random_crop_pair(hr: torch.Tensor, gen: torch.Generator, recipe: Recipe = RECIPE,
                     lr: torch.Tensor | None = None, name: str = "image"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One training pair (hr (3, S, S), lr (3, S/s, S/s)), S = recipe.sr_size, s = recipe.scale.

    HR only (`lr` None), as data.py + realesr.py: with `crop_prob` a random S crop (flipped with
    `hflip_prob`), else the short side resized to S (antialiased bicubic) and a random S crop; the LR is
    `degrade` of the crop. An image with a side under S raises ValueError (the official skips it).
    Paired (`lr` given; the official has no paired path): aligned crops, the LR crop at (i, j) and the HR
    one at (s i, s j), both flipped with `hflip_prob`; no resize, no degradation. HR and LR sizes must be
    exactly s apart, else ValueError naming `name` and both sizes.
    """
    s, size = recipe.scale, recipe.sr_size
    h, w = hr.shape[-2:]
    if lr is not None:
        lh, lw = lr.shape[-2:]
        if (h, w) != (lh * s, lw * s):
            raise ValueError(f"{name}: HR {w}x{h} and LR {lw}x{lh} are not {s}x apart")
        ls = recipe.lr_size
        if min(lh, lw) < ls:
            raise ValueError(f"{name}: LR {lw}x{lh} is smaller than the {ls}x{ls} crop")
        i, j = _randint(gen, lh - ls), _randint(gen, lw - ls)
        hr_c, lr_c = hr[..., s * i: s * (i + ls), s * j: s * (j + ls)], lr[..., i: i + ls, j: j + ls]
        if _coin(gen, recipe.hflip_prob):
            hr_c, lr_c = hr_c.flip(-1), lr_c.flip(-1)
        return hr_c, lr_c
    if min(h, w) < size:
        raise ValueError(f"{name}: {w}x{h} is smaller than the {size}x{size} training crop")
    x = hr
    if _coin(gen, recipe.crop_prob):
        if _coin(gen, recipe.hflip_prob):
            x = x.flip(-1)
    else:  # torchvision Resize(size): short side to size, long side int(size * long / short)
        nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = resize(x[None].float(), (nh, nw))[0].clamp(-1, 1)
        h, w = nh, nw
    i, j = _randint(gen, h - size), _randint(gen, w - size)
    hr_c = x[..., i: i + size, j: j + size]
    lr_c = degrade((hr_c.float() + 1) / 2, s, gen, recipe.degradation) * 2 - 1
    return hr_c, lr_c


def concat_lr(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """The LR's bicubic upscale by `scale`, clipped to [-1, 1]: the official `concat_lr_img` (data.py,
    `transforms.functional.resize(..., BICUBIC)` then `torch.clip(-1, 1)`), with the same resample as
    inference (`images.resize`, pipeline.pass_inputs)."""
    x = lr if lr.dim() == 4 else lr[None]  # (B, 3, h, w)
    up = resize(x, (x.shape[-2] * scale, x.shape[-1] * scale)).clamp(-1, 1)
    return up if lr.dim() == 4 else up[0]


def lr_dropout(lr: torch.Tensor, lr_up: torch.Tensor, gen: torch.Generator, p: float = RECIPE.lr_dropout
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """data.get_batch's LR dropout on a batch: each sample with probability p has BOTH its LR (B, 3, h, w)
    and its upscaled LR (B, 3, H, W) replaced by independent N(0, 1) noise clamped to [-1, 1].

    Returns (lr, lr_up, dropped (B,) bool); the inputs are not modified. The CLIP vector is computed from
    the returned `lr` (ConcatSRLoss2 encodes the LR after get_batch), so a dropped sample's vector is noise's.
    """
    dropped = torch.rand(lr.shape[0], generator=gen, dtype=torch.float64) < p  # (B,)
    lr, lr_up = lr.clone(), lr_up.clone()
    for i in torch.nonzero(dropped).flatten().tolist():
        lr[i] = torch.randn(lr.shape[1:], generator=gen, dtype=lr.dtype).clamp(-1, 1)
        lr_up[i] = torch.randn(lr_up.shape[1:], generator=gen, dtype=lr_up.dtype).clamp(-1, 1)
    return lr, lr_up, dropped


def sample_sigma(n: int, gen: torch.Generator, recipe: Recipe = RECIPE, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
    """(n,) noise levels exp(N(P_mean, P_std^2)) clipped below at sigma_min (EDMSampling)."""
    log_sigma = recipe.p_mean + recipe.p_std * torch.randn(n, generator=gen, dtype=torch.float64)
    return log_sigma.exp().clip(min=recipe.sigma_min).to(dtype)


def loss_weight(sigma: torch.Tensor, sigma_data: float = RECIPE.sigma_data) -> torch.Tensor:
    """EDM loss weight (sigma^2 + sd^2) / (sigma sd)^2 (EDMWeighting)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoise: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
             noise: torch.Tensor, *, sigma_data: float = RECIPE.sigma_data, **cond
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM denoising loss of a batch: (loss, per_sample (B,)).

    D = denoise(x + sigma noise, sigma, **cond); per_sample = mean over pixels of
    loss_weight(sigma) (D - x)^2; loss = per_sample.mean(), so a batch's loss is the mean of its
    samples' single-image losses (ConcatSRLoss2 + `loss.mean()`). A denoiser output not shaped like x
    (one that broadcasts across the batch) raises ValueError instead of silently mixing samples.
    """
    b = x.shape[0]
    if sigma.shape != (b,) or noise.shape != x.shape:
        raise ValueError(f"sigma must be ({b},) and noise {tuple(x.shape)}; got {tuple(sigma.shape)} "
                         f"and {tuple(noise.shape)}")
    sig = sigma.view(b, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)
    d = denoise(x + sig * noise, sigma, **cond)
    if d.shape != x.shape:
        raise ValueError(f"the denoiser returned {tuple(d.shape)} for a batch of {tuple(x.shape)}")
    per_sample = (loss_weight(sig, sigma_data) * (d - x) ** 2).reshape(b, -1).mean(1)  # (B,)
    return per_sample.mean(), per_sample


def sample_rope_origin(gen: torch.Generator, tokens: int, table_size: int = RECIPE.rope_table_size
                       ) -> tuple[int, int]:
    """Random RoPE origin (row, col) in tokens for one training batch (sh --random-position).

    Official rule (dit/model.py DiffusionEngine.forward): row and col offsets each uniform in
    [0, 7 T], T = image_size / patch_size tokens per side (128), drawn once per batch (row first), added to
    every token of every sample; the RoPE table holds 8 T positions, so no position wraps. Written here as
    [0, table_size - tokens], which is the same [0, 7 T] at the official sizes and, for a smaller crop, still
    reaches every table position without wrapping.
    """
    if tokens > table_size:
        raise ValueError(f"{tokens} tokens per side exceed the RoPE table of {table_size}")
    hi = table_size - tokens
    return _randint(gen, hi), _randint(gen, hi)


def batch_loss(forward, model, batch: dict, origin: tuple[int, int] = (0, 0)
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-sample losses) of a batch: the EDM-weighted L2 of D(hr + sigma noise) - hr through
    the model's differentiable `forward` (or its DDP wrapper), the CLIP vector of the LR from the frozen
    tower. `batch`: hr, lr, lr_up, noise (B, 3, ...) and sigma (B,), on the model's device."""
    vector = model.encode_image(batch["lr"])  # (B, vector_dim), no autograd
    return edm_loss(forward, batch["hr"], batch["sigma"], batch["noise"], lr_up=batch["lr_up"],
                      lr=batch["lr"], vector=vector, origin=origin)
