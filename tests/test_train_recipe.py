"""The training recipe (infdit_cli.train): each degradation op does what its parameters say, the EDM
sigma/weight/loss match the official formulas, the crops are aligned and the batch loss is batch-invariant."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from infdit_cli.train import degrade as dg
from infdit_cli.train.recipe import (
    RECIPE,
    Recipe,
    concat_lr,
    edm_loss,
    loss_weight,
    lr_dropout,
    random_crop_pair,
    sample_rope_origin,
    sample_sigma,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def moments(k: torch.Tensor) -> torch.Tensor:
    """2x2 second-moment matrix of a kernel in (x = column, y = row) offsets from its centre."""
    xx, yy = dg._grid(k.shape[0])
    k = k.double()
    return torch.tensor([[(k * xx * xx).sum(), (k * xx * yy).sum()],
                         [(k * xx * yy).sum(), (k * yy * yy).sum()]])


# ---- kernels ----

def test_kernels_sum_to_one():
    for k in (dg.gaussian_kernel(21, 2.0, 0.7, 0.3), dg.generalized_gaussian_kernel(15, 1.2, 2.0, -1.0, 0.6),
              dg.plateau_kernel(13, 1.5, 1.5, 0.0, 1.7), dg.sinc_kernel(11, math.pi / 4)):
        assert abs(k.double().sum().item() - 1) < 1e-6
    g = gen(1)
    for st in (dg.DEGRADATION_2.first, dg.DEGRADATION_2.second):
        for _ in range(50):
            k = dg.random_kernel(st, g)
            assert k.shape == (21, 21) and abs(k.double().sum().item() - 1) < 1e-5


@pytest.mark.parametrize("sigma", [1.0, 2.0, 2.5])
def test_isotropic_gaussian_has_the_asked_sigma(sigma):
    m = moments(dg.gaussian_kernel(21, sigma, sigma, 0.0))
    assert abs(m[0, 0] / sigma**2 - 1) < 0.01 and abs(m[1, 1] / sigma**2 - 1) < 0.01
    assert abs(m[0, 1]) < 1e-9


def test_anisotropic_gaussian_is_rotated_by_theta():
    sx, sy, theta = 3.0, 1.0, 0.6
    evals, evecs = torch.linalg.eigh(moments(dg.gaussian_kernel(41, sx, sy, theta)))
    assert abs(evals[1] / sx**2 - 1) < 0.01 and abs(evals[0] / sy**2 - 1) < 0.01
    major = evecs[:, 1]  # the sigma_x axis, (x, y)
    angle = math.atan2(major[1].item(), major[0].item()) % math.pi
    assert abs(angle - theta) < 1e-3
    # a quarter turn swaps the axes exactly
    torch.testing.assert_close(dg.gaussian_kernel(21, 3.0, 1.0, math.pi / 2),
                               dg.gaussian_kernel(21, 1.0, 3.0, 0.0))


def test_sinc_kernel_is_a_low_pass_with_its_cutoff():
    k = F.pad(dg.sinc_kernel(21, math.pi / 3).double(), (0, 43, 0, 43))  # (64, 64); truncation ripples ~10 %
    resp = torch.fft.fft2(k).abs()
    freqs = torch.fft.fftfreq(64, dtype=torch.float64) * 2 * math.pi
    r = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2)
    assert resp[r < math.pi / 3 * 0.5].min() > 0.85 and resp[r > math.pi / 3 * 1.6].max() < 0.15


# ---- ops ----

def test_jpeg_equals_pillow_pixel_for_pixel():
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
    # (3, 48, 40)
    img = torch.stack([(xx / 39), (yy / 47), 0.5 + 0.4 * torch.sin(xx / 3) * torch.cos(yy / 5)])
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    for q in (60, 95):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=q)
        ref = torch.from_numpy(np.array(Image.open(buf).convert("RGB"))).permute(2, 0, 1).float() / 255
        out = dg.jpeg(img[None], q)[0]
        assert torch.equal(out, ref)
    assert not torch.equal(dg.jpeg(img[None], 60), dg.jpeg(img[None], 95))


def test_gaussian_noise_has_the_asked_std_and_gray_is_equal_across_channels():
    img = torch.full((1, 3, 256, 256), 0.5)
    out = dg.add_gaussian_noise(img, 0.05, False, gen(2))
    assert abs((out - img).std().item() / 0.05 - 1) < 0.01
    assert not torch.equal(out[:, 0], out[:, 1])
    gray = dg.add_gaussian_noise(img, 0.05, True, gen(2))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert abs((gray - img).std().item() / 0.05 - 1) < 0.01


@pytest.mark.parametrize("level", [51, 153])
def test_poisson_noise_variance_is_proportional_to_the_level(level):
    # a one-level image: basicsr's vals = 2^ceil(log2(1)) = 1, noise = scale (Poisson(v) - v): var scale^2 v
    v, scale = level / 255, 0.05
    img = torch.full((1, 3, 512, 512), v)
    d = (dg.add_poisson_noise(img, scale, False, gen(3)) - img) / scale
    assert abs(d.mean().item()) < 4 * math.sqrt(v / d.numel())
    assert abs(d.var().item() / v - 1) < 0.02
    gray = dg.add_poisson_noise(img, scale, True, gen(3))
    assert torch.equal(gray[:, 0], gray[:, 2])


def test_resize_keeps_the_asked_size():
    img = torch.rand(1, 3, 40, 30)
    for mode in dg.MODES:
        assert dg.resize(img, (37, 23), mode).shape[-2:] == (37, 23)
        assert dg.resize(img, mode=mode, scale=0.5).shape[-2:] == (20, 15)


def test_degrade_is_reproducible_from_its_seed():
    hr = torch.rand(3, 96, 64, generator=gen(4))
    a, b, c = (dg.degrade(hr, 4, gen(s)) for s in (7, 7, 8))
    assert a.shape == (3, 24, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and torch.equal((a * 255).round(), a * 255)


# ---- recipe ----

def test_sigma_samples_are_lognormal_and_clipped():
    s = sample_sigma(100_000, gen(5), dtype=torch.float64)
    logs = s.log()
    assert abs(logs.mean().item() - RECIPE.p_mean) < 4 * RECIPE.p_std / math.sqrt(1e5)
    assert abs(logs.std().item() - RECIPE.p_std) < 4 * RECIPE.p_std / math.sqrt(2e5)
    assert s.min() >= RECIPE.sigma_min
    low = sample_sigma(1000, gen(5), Recipe(p_mean=-12.0, p_std=0.1))
    assert torch.all(low == torch.tensor(RECIPE.sigma_min, dtype=torch.float32))


def test_loss_weight_at_known_points():
    w = loss_weight(torch.tensor([0.5, 1.0, 0.001], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([8.0, 5.0, 1_000_004.0], dtype=torch.float64))


def test_lr_dropout_rate_and_clamping():
    b = 20_000
    lr, up = torch.full((b, 3, 2, 2), 0.25), torch.full((b, 3, 4, 4), -0.25)
    lr2, up2, dropped = lr_dropout(lr, up, gen(6), 0.07)
    assert abs(dropped.double().mean().item() - 0.07) < 4 * math.sqrt(0.07 * 0.93 / b)
    assert torch.all(lr == 0.25) and torch.all(up == -0.25)  # inputs untouched
    assert torch.all(lr2[~dropped] == 0.25) and torch.all(up2[~dropped] == -0.25)
    for x in (lr2[dropped], up2[dropped]):
        assert x.min() == -1 and x.max() == 1
        clipped = (x.abs() == 1).double().mean().item()  # P(|N(0,1)| >= 1) = 0.3173
        assert abs(clipped - 0.3173) < 0.01
    assert not torch.equal(lr2[dropped][:, :, :2, :2], up2[dropped][:, :, :2, :2])


def toy_denoiser(x, sigma, lr_up):
    """A per-sample nonlinear D: EDM-preconditioned 3x3 conv of [x, lr_up]."""
    w = torch.linspace(-1, 1, 3 * 6 * 9, dtype=x.dtype).view(3, 6, 3, 3)
    s = sigma.view(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25) ** 0.5, 1 / (s**2 + 0.25) ** 0.5
    f = torch.tanh(F.conv2d(torch.cat([x * c_in, lr_up], 1), w, padding=1))
    return c_skip * x + c_out * f


def test_batch_loss_is_the_mean_of_single_losses():
    g = gen(7)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    up = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    loss, per = edm_loss(toy_denoiser, x, sigma, noise, lr_up=up)
    singles = [edm_loss(toy_denoiser, x[i:i + 1], sigma[i:i + 1], noise[i:i + 1], lr_up=up[i:i + 1])[0]
               for i in range(2)]
    assert abs(loss.item() - (singles[0] + singles[1]).item() / 2) < 1e-7
    assert abs(per[0].item() - singles[0].item()) < 1e-7 and abs(per[1].item() - singles[1].item()) < 1e-7
    # D = 0: per-sample loss is w(sigma) mean(x^2)
    _, per0 = edm_loss(lambda y, s: torch.zeros_like(y), x, sigma, noise)
    torch.testing.assert_close(per0, loss_weight(sigma) * (x**2).flatten(1).mean(1))


def test_edm_loss_refuses_a_denoiser_that_broadcasts_across_the_batch():
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="denoiser returned"):
        edm_loss(lambda y, s: y.mean(0, keepdim=True), x, torch.ones(2), torch.zeros_like(x))


def test_paired_crops_are_aligned():
    r = RECIPE.scaled(32)  # 32 px HR, 8 px LR
    hr = torch.rand(3, 4 * 40, 4 * 48, generator=gen(8)) * 2 - 1
    lr = F.avg_pool2d(hr[None], 4)[0]  # (3, 40, 48)
    g = gen(9)
    for _ in range(20):
        hc, lc = random_crop_pair(hr, g, r, lr=lr)
        assert hc.shape == (3, 32, 32) and lc.shape == (3, 8, 8)
        torch.testing.assert_close(F.avg_pool2d(hc[None], 4)[0], lc)
    with pytest.raises(ValueError, match="pair7: HR 192x160 and LR 47x40 are not 4x apart"):
        random_crop_pair(hr, g, r, lr=lr[..., :47], name="pair7")


def test_hr_only_crop_degrades_to_the_lr_size():
    r = RECIPE.scaled(64)
    hr = torch.rand(3, 90, 120, generator=gen(10)) * 2 - 1
    g = gen(11)
    for _ in range(6):
        hc, lc = random_crop_pair(hr, g, r)
        assert hc.shape == (3, 64, 64) and lc.shape == (3, 16, 16)
        assert hc.min() >= -1 and hc.max() <= 1 and lc.min() >= -1 and lc.max() <= 1
    with pytest.raises(ValueError, match="small.png: 120x60 is smaller"):
        random_crop_pair(hr[:, :60], g, r, name="small.png")


def test_concat_lr_is_the_clipped_upscale():
    lr = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(concat_lr(lr, 4), torch.full((2, 3, 32, 32), 0.3))
    edge = torch.zeros(3, 8, 8)
    edge[:, :, 4:] = 1.0
    up = concat_lr(edge, 4)  # bicubic overshoots past 1 at the edge; the result is clipped
    assert up.shape == (3, 32, 32) and up.max() == 1 and up.min() >= -1


def test_rope_origin_follows_the_official_range():
    t = RECIPE.sr_size // RECIPE.patch_size  # 128 tokens per side
    assert RECIPE.rope_table_size - t == 7 * t  # the official randint(0, 7 T + 1)
    g = gen(12)
    draws = torch.tensor([sample_rope_origin(g, t) for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 7 * t
    assert draws.min() < 10 and draws.max() > 7 * t - 10 and not torch.equal(draws[:, 0], draws[:, 1])
