"""`InfDiT.forward`, the differentiable whole-image denoiser: it equals the block engine for every n, the
official model's denoiser call, and its gradients are the derivatives of what it computes."""

import pytest
import torch

from infdit_cli.engine.blocks import denoise
from infdit_cli.model.infdit import random_model

CALL_TOL = 1e-5  # tests/test_parity.py: one denoiser call against the official fixture
ENGINE_TOL = 1e-5  # tests/test_engine.py::test_block_batch_equals_whole_image

# Gradients are wanted on every parameter but the frozen CLIP tower's, and not on this one: the LR keys'
# LayerNorm bias adds the same q.b to every score of a query, which softmax cancels (the official model
# too; tests/test_parity.py::test_every_weight_matters), so its true gradient is zero.
INERT = {"lr_cross.k_norm.bias"}


def _inputs(cfg, b, h, w, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(b, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=g) * 2 - 1
    lr_up = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    x = lr_up + torch.randn(b, 3, h, w, generator=g) * 2.0
    vector = torch.randn(b, cfg.vector_dim, generator=g)
    return tuple(t.to(dtype) for t in (x, lr_up, lr, vector))


def _trainable(model):
    """The model with autograd on every parameter outside the CLIP tower."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("clip."))
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def batch2(tiny_model):
    """A batch of two at 3x5 blocks (48x80 px), one sigma each, and the forward's output."""
    x, lr_up, lr, vec = _inputs(tiny_model.config, 2, 48, 80)
    sigma = torch.tensor([1.7, 0.3])
    with torch.no_grad():
        out = tiny_model(x, sigma, lr_up, lr, vec)
    return x, sigma, lr_up, lr, vec, out


@pytest.mark.parametrize("n", [None, 1, 2, 3, 5])
def test_forward_equals_engine(tiny_model, batch2, n):
    x, sigma, lr_up, lr, vec, out = batch2
    ref = denoise(tiny_model, x, sigma, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)
    assert out.shape == ref.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ENGINE_TOL, rtol=0)


def test_forward_equals_engine_tall_and_float_sigma(tiny_model):
    """A tall grid (5x3 blocks), one image, sigma as a float."""
    x, lr_up, lr, vec = _inputs(tiny_model.config, 1, 80, 48, seed=1)
    with torch.no_grad():
        out = tiny_model(x, 2.5, lr_up, lr, vec)
    ref = denoise(tiny_model, x, 2.5, lr_up=lr_up, lr=lr, vector=vec, block_batch=2)
    torch.testing.assert_close(out, ref, atol=ENGINE_TOL, rtol=0)


def test_batch_elements_are_independent(tiny_model, batch2):
    """Each image of a batch gets its own sigma and conditioning: image 1 alone gives its row of the batch."""
    x, sigma, lr_up, lr, vec, out = batch2
    with torch.no_grad():
        one = tiny_model(x[1:], sigma[1:], lr_up[1:], lr[1:], vec[1:])
    torch.testing.assert_close(one, out[1:], atol=ENGINE_TOL, rtol=0)
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_forward_matches_official_call(official_model, io):
    with torch.no_grad():
        den = official_model(io["x"], io["sigma"], io["concat"], io["lr"], io["vector"])
    assert (den.cpu() - io["denoised_full"]).abs().max().item() <= CALL_TOL


def test_sizes_must_be_block_multiples(tiny_model):
    x, lr_up, lr, vec = _inputs(tiny_model.config, 1, 48, 80)
    with pytest.raises(ValueError, match="multiples of block_size 16"):
        tiny_model(x[..., :40, :], 1.0, lr_up[..., :40, :], lr[..., :10, :], vec)
    with pytest.raises(ValueError, match="lr_up"):
        tiny_model(x, 1.0, lr_up[..., :32, :], lr, vec)
    with pytest.raises(ValueError, match=r"lr must be \(B, 3, 12, 20\)"):
        tiny_model(x, 1.0, lr_up, lr[..., :8, :], vec)


def test_gradients_reach_every_trainable_weight(tiny_config):
    model = random_model(tiny_config, seed=3)
    params = _trainable(model)
    x, lr_up, lr, vec = _inputs(tiny_config, 2, 32, 48, seed=2)  # 2x3 blocks: every neighbour is real
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    loss = (model(x, torch.tensor([0.8, 4.0]), lr_up, lr, vec, origin=(3, 7)) - target).square().mean()
    loss.backward()
    norms = {n: p.grad.abs().max().item() for n, p in params.items()}
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    scale = max(norms.values())
    dead = [n for n, v in norms.items() if v <= 1e-6 * scale and n not in INERT]
    assert dead == [], f"no gradient: {dead}"
    assert all(norms[n] <= 1e-6 * scale for n in INERT)  # rounding only
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("clip."))


def test_gradients_are_finite_differences_float64(tiny_config):
    """Every trainable parameter's gradient along a random direction u against the central difference
    (L(p + eps u) - L(p - eps u)) / 2 eps, in float64 (truncation error ~eps^2, rounding ~1e-16/eps)."""
    model = random_model(tiny_config, seed=4, dtype=torch.float64)
    params = _trainable(model)
    x, lr_up, lr, vec = _inputs(tiny_config, 1, 32, 32, seed=6, dtype=torch.float64)  # 2x2 blocks
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def loss():
        return (model(x, 1.3, lr_up, lr, vec, origin=(2, 5)) * weight).sum()

    loss().backward()
    gen, eps = torch.Generator().manual_seed(8), 1e-6
    for name, p in params.items():
        u = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            p.add_(u, alpha=eps)
            up = loss()
            p.sub_(u, alpha=2 * eps)
            down = loss()
            p.add_(u, alpha=eps)
        numeric, analytic = ((up - down) / (2 * eps)).item(), (p.grad * u).sum().item()
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (name, numeric, analytic)


def test_gradcheck_float64(tiny_config):
    """torch.autograd.gradcheck (fast mode: a random projection of the Jacobian against finite differences)
    with respect to layer 1's `re_pos_embed` and the inputs x and lr_up."""
    model = random_model(tiny_config, seed=9, dtype=torch.float64)
    x, lr_up, lr, vec = _inputs(tiny_config, 1, 32, 32, seed=10, dtype=torch.float64)
    base = model.re_pos_embed.detach()

    def f(re_pos_1, x, lr_up):
        params = {"re_pos_embed": torch.cat([base[:1], re_pos_1[None]])}
        return torch.func.functional_call(model, params, (x, 1.3, lr_up, lr, vec), {"origin": (1, 2)})

    inputs = tuple(t.clone().requires_grad_(True) for t in (base[1], x, lr_up))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, fast_mode=True)


def test_origin_shifts_rope(tiny_model, batch2):
    """origin offsets every token's RoPE position: the table of a crop at origin (its first block's place in
    a larger grid) is that grid's table there; the positions wrap at `rope_table_size`; and the output
    depends on the origin (the re_pos offsets are added after rotation, so attention is not
    shift-invariant)."""
    cfg, model = tiny_model.config, tiny_model
    bt, size = cfg.block_tokens, cfg.rope_table_size
    full = model.rope(range(3), range(5))  # (3, 5, T, d) each
    crop = model.rope(range(2), range(3), origin=(bt, 2 * bt))  # blocks 1..2 x 2..4 of it
    for a, b in zip(full, crop):
        assert torch.equal(a[1:3, 2:5], b)
    x, sigma, lr_up, lr, vec, out = batch2
    with torch.no_grad():
        wrapped = model(x, sigma, lr_up, lr, vec, origin=(size, -2 * size))
        moved = model(x, sigma, lr_up, lr, vec, origin=(1, 0))
    assert torch.equal(wrapped, out)
    assert (moved - out).abs().max() > 1e-3


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once): what stays
    alive until backward, as `saved_tensors_hooks` sees it from outside any checkpointed region."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_activation_checkpointing_gives_the_same_output_and_gradients_and_recomputes(tiny_config):
    """`grad_checkpointing`: the output and every parameter's gradient equal the plain path's (float64,
    1e-12), each layer runs twice (forward, then again in backward) where the plain path runs it once, and
    autograd keeps far fewer bytes between forward and backward."""
    model = random_model(tiny_config, seed=11, dtype=torch.float64)
    params = _trainable(model)
    x, lr_up, lr, vec = _inputs(tiny_config, 2, 32, 48, seed=12, dtype=torch.float64)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    calls = []
    layer = model.layer
    model.layer = lambda i, *a: calls.append(i) or layer(i, *a)  # instance attribute: counts every call

    def run(checkpointing: bool):
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        calls.clear()
        out, saved = _saved_bytes(lambda: model(x, torch.tensor([0.7, 3.0]), lr_up, lr, vec, origin=(1, 3)))
        forward_calls = len(calls)
        (out * weight).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in params.items()}, saved, forward_calls, len(calls)

    out0, grads0, saved0, fwd0, all0 = run(False)
    out1, grads1, saved1, fwd1, all1 = run(True)
    layers = tiny_config.num_layers
    torch.testing.assert_close(out1, out0, atol=1e-12, rtol=0)
    for n in params:
        torch.testing.assert_close(grads1[n], grads0[n], atol=1e-12, rtol=0, msg=n)
    assert (fwd0, all0) == (layers, layers)
    assert (fwd1, all1) == (layers, 2 * layers)  # every layer recomputed once in backward
    assert saved1 < saved0 / 2, (saved1, saved0)
