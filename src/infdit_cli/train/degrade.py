"""Real-ESRGAN second-order degradation, as the official Inf-DiT training data (`dit/realesr.py`).

Values from `configs/degradation_2.yaml`; the steps and their order from `RealESRGANTransform.__call__`
(which uses basicsr's kernels, `filter2D`, noise and DiffJPEG). Images are float (3, H, W) in [0, 1], RGB.
Every random draw comes from the caller's `torch.Generator`: the same seed gives the same LR.

JPEG goes through Pillow (a project dependency; torchvision, the other candidate, is not one), a real
libjpeg encoder with 4:2:0 chroma like DiffJPEG; its quality is an integer, so the official continuous
quality draw is rounded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

KERNELS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
MODES = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class Stage:
    """One degradation round: blur kernel, resize, noise, JPEG (`opt` / `degradation` keys, suffix 2)."""

    kernel_prob: tuple[float, ...]  # over KERNELS
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    sinc_prob: float
    blur_prob: float  # the first round always blurs; the second with second_blur_prob
    resize_prob: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]
    gaussian_noise_prob: float  # otherwise Poisson
    noise_range: tuple[float, float]  # Gaussian sigma, in 8-bit levels
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]


@dataclass(frozen=True)
class Degradation:
    """`configs/degradation_2.yaml`."""

    first: Stage
    second: Stage
    final_sinc_prob: float = 0.8
    kernel_sizes: tuple[int, ...] = tuple(range(7, 22, 2))  # realesr.py: [2v+1 for v in range(3, 11)]
    kernel_pad: int = 21  # every kernel is zero-padded to 21 x 21


_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
DEGRADATION_2 = Degradation(
    first=Stage(_PROBS, (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), 0.1, 1.0, (0.2, 0.7, 0.1), (0.3, 1.5),
                0.5, (1.0, 15.0), (0.05, 2.0), 0.4, (60.0, 95.0)),
    second=Stage(_PROBS, (0.2, 1.5), (0.5, 4.0), (1.0, 2.0), 0.1, 0.5, (0.3, 0.4, 0.3), (0.6, 1.2),
                 0.5, (1.0, 12.0), (0.05, 1.0), 0.4, (60.0, 100.0)),
)


# ---- random draws, all from `gen` ----

def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _choice(gen: torch.Generator, probs) -> int:
    return int(torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=gen).item())


def _pick(gen: torch.Generator, items):
    return items[int(torch.randint(len(items), (), generator=gen).item())]


# ---- kernels ----

def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) = (column, row) offsets from the centre, basicsr's `mesh_grid`."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _quad_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """v^T Sigma^-1 v on the grid, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T (basicsr `sigma_matrix2`)."""
    xx, yy = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinate along the sigma_x axis
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float = 0.0) -> torch.Tensor:
    """(size, size) bivariate Gaussian, its sigma_x axis at angle `theta` from +x (columns) towards +y."""
    k = torch.exp(-0.5 * _quad_form(size, sigma_x, sigma_y, theta))
    return (k / k.sum()).float()


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
                                ) -> torch.Tensor:
    """exp(-0.5 (v^T Sigma^-1 v)^beta), normalised (basicsr `bivariate_generalized_Gaussian`)."""
    k = torch.exp(-0.5 * _quad_form(size, sigma_x, sigma_y, theta) ** beta)
    return (k / k.sum()).float()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> torch.Tensor:
    """1 / ((v^T Sigma^-1 v)^beta + 1), normalised (basicsr `bivariate_plateau`)."""
    k = 1.0 / (_quad_form(size, sigma_x, sigma_y, theta) ** beta + 1.0)
    return (k / k.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """Circular low-pass (2-D sinc) with angular cutoff `cutoff` (basicsr `circular_lowpass_kernel`)."""
    xx, yy = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    k = cutoff * torch.special.bessel_j1(cutoff * r) / (2 * math.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * math.pi)
    return (k / k.sum()).float()


def _beta(gen: torch.Generator, lo: float, hi: float) -> float:
    """basicsr: half the time below 1, half above."""
    return _uniform(gen, lo, 1.0) if _uniform(gen, 0.0, 1.0) < 0.5 else _uniform(gen, 1.0, hi)


def random_kernel(st: Stage, gen: torch.Generator, sizes=tuple(range(7, 22, 2)), pad_to: int = 21
                  ) -> torch.Tensor:
    """One round's blur kernel: sinc with `sinc_prob`, else a mixed kernel (realesr.py + basicsr)."""
    size = _pick(gen, sizes)
    if _uniform(gen, 0.0, 1.0) < st.sinc_prob:
        k = sinc_kernel(size, _uniform(gen, math.pi / 3 if size < 13 else math.pi / 5, math.pi))
    else:
        kind = KERNELS[_choice(gen, st.kernel_prob)]
        sx = _uniform(gen, *st.blur_sigma)
        if kind.split("_")[-1] == "iso":
            sy, theta = sx, 0.0
        else:
            sy, theta = _uniform(gen, *st.blur_sigma), _uniform(gen, -math.pi, math.pi)
        if kind.startswith("generalized"):
            k = generalized_gaussian_kernel(size, sx, sy, theta, _beta(gen, *st.betag_range))
        elif kind.startswith("plateau"):
            k = plateau_kernel(size, sx, sy, theta, _beta(gen, *st.betap_range))
        else:
            k = gaussian_kernel(size, sx, sy, theta)
    p = (pad_to - size) // 2
    return F.pad(k, (p, p, p, p))


# ---- ops on (B, C, H, W) in [0, 1] ----

def blur(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel correlation with a (k, k) kernel, reflect-padded (basicsr `filter2D`).

    An image no larger than the padding (tiny training crops only) is padded by replication instead.
    """
    k = kernel.shape[-1]
    c = img.shape[1]
    mode = "reflect" if min(img.shape[-2:]) > k // 2 else "replicate"
    x = F.pad(img, (k // 2,) * 4, mode=mode)
    return F.conv2d(x, kernel.to(img).expand(c, 1, k, k), groups=c)


def resize(img: torch.Tensor, size: tuple[int, int] | None = None, mode: str = "bicubic",
           scale: float | None = None) -> torch.Tensor:
    """`F.interpolate` to `size`, or by `scale` (as the official first round calls it)."""
    if size is not None:
        return F.interpolate(img, size=size, mode=mode)
    return F.interpolate(img, scale_factor=scale, mode=mode)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """img + N(0, sigma^2) (sigma in [0, 1] units), one noise map for all channels if `gray`; clipped."""
    b, c, h, w = img.shape
    shape = (b, 1, h, w) if gray else (b, c, h, w)
    noise = torch.randn(shape, generator=gen, dtype=img.dtype) * sigma
    return (img + noise).clamp(0, 1)


def _poisson_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """basicsr: quantise to 8 bits, count levels (over the whole call; `degrade` passes one image),
    vals = 2^ceil(log2(levels)), Poisson(x vals) / vals - x."""
    x = (x * 255).clamp(0, 255).round() / 255
    vals = 2 ** math.ceil(math.log2(len(torch.unique(x))))
    return torch.poisson(x * vals, generator=gen) / vals - x


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, gen: torch.Generator) -> torch.Tensor:
    """img + scale * (Poisson noise of the 8-bit image, or of its luma if `gray`); clipped."""
    if gray:
        # torchvision rgb_to_grayscale
        luma = 0.2989 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
        noise = _poisson_noise(luma, gen).expand_as(img)
    else:
        noise = _poisson_noise(img, gen)
    return (img + noise * scale).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Pillow JPEG round trip at `quality` of each (3, H, W) image in [0, 1] (8-bit quantised)."""
    out = []
    for x in img:
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
        dec = torch.frombuffer(bytearray(Image.open(buf).convert("RGB").tobytes()), dtype=torch.uint8)
        out.append(dec.view(x.shape[1], x.shape[2], 3).permute(2, 0, 1).to(img.dtype) / 255)
    return torch.stack(out)


def _resize_factor(st: Stage, gen: torch.Generator) -> float:
    kind = _choice(gen, st.resize_prob)
    return (_uniform(gen, 1.0, st.resize_range[1]), _uniform(gen, st.resize_range[0], 1.0), 1.0)[kind]


def _noise(img: torch.Tensor, st: Stage, gen: torch.Generator) -> torch.Tensor:
    gaussian = _uniform(gen, 0.0, 1.0) < st.gaussian_noise_prob
    gray = _uniform(gen, 0.0, 1.0) < st.gray_noise_prob
    if gaussian:
        return add_gaussian_noise(img, _uniform(gen, *st.noise_range) / 255, gray, gen)
    return add_poisson_noise(img, _uniform(gen, *st.poisson_scale_range), gray, gen)


def _jpeg(img: torch.Tensor, st: Stage, gen: torch.Generator) -> torch.Tensor:
    return jpeg(img, round(_uniform(gen, *st.jpeg_range)))


def degrade(hr: torch.Tensor, scale: int, gen: torch.Generator,
            params: Degradation = DEGRADATION_2) -> torch.Tensor:
    """The LR image of `hr` (3, H, W) in [0, 1]: (3, H // scale, W // scale) in [0, 1], 8-bit levels.

    Blur, random resize, noise, JPEG; a second round (blur with its probability, resize relative to the
    target size); then [resize to the target + final sinc] and JPEG in random order (realesr.py).
    """
    h, w = hr.shape[-2:]
    st1, st2 = params.first, params.second
    kernel1 = random_kernel(st1, gen, params.kernel_sizes, params.kernel_pad)
    kernel2 = random_kernel(st2, gen, params.kernel_sizes, params.kernel_pad)
    if _uniform(gen, 0.0, 1.0) < params.final_sinc_prob:
        size = _pick(gen, params.kernel_sizes)
        pad = (params.kernel_pad - size) // 2
        final = F.pad(sinc_kernel(size, _uniform(gen, math.pi / 3, math.pi)), (pad,) * 4)
    else:
        final = torch.zeros(params.kernel_pad, params.kernel_pad)
        final[params.kernel_pad // 2, params.kernel_pad // 2] = 1.0  # the official pulse: no blur

    x = hr.float().unsqueeze(0)  # (1, 3, H, W)
    x = blur(x, kernel1)
    s = _resize_factor(st1, gen)
    x = resize(x, mode=_pick(gen, MODES), scale=s)
    x = _jpeg(_noise(x, st1, gen).clamp(0, 1), st1, gen)

    if _uniform(gen, 0.0, 1.0) < st2.blur_prob:
        x = blur(x, kernel2)
    s = _resize_factor(st2, gen)
    x = resize(x, (int(h / scale * s), int(w / scale * s)), _pick(gen, MODES))
    x = _noise(x, st2, gen)

    target = (h // scale, w // scale)
    if _uniform(gen, 0.0, 1.0) < 0.5:
        x = blur(resize(x, target, _pick(gen, MODES)), final)
        x = _jpeg(x.clamp(0, 1), st2, gen)
    else:
        x = _jpeg(x.clamp(0, 1), st2, gen)
        x = blur(resize(x, target, _pick(gen, MODES)), final)
    return ((x * 255).round().clamp(0, 255) / 255)[0]
