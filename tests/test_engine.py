"""UniBA block batches equal the whole-image pass, for every n, grid shape, size and traversal order."""

import pytest
import torch

from infdit_cli.events import BatchDone
from infdit_cli.schedule import cache_bound, plan_batches


def _inputs(cfg, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(1, 3, -(-h // cfg.sr_scale), -(-w // cfg.sr_scale), generator=g) * 2 - 1
    lr_up = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    x = lr_up + torch.randn(1, 3, h, w, generator=g) * 2.0
    return x, lr_up, lr


SIZES = [(48, 80), (80, 48), (40, 72)]  # 3x5 and 5x3 blocks of 16 px; 40x72 is not a block multiple


@pytest.fixture(scope="module")
def whole(tiny_model):
    out = {}
    for h, w in SIZES:
        x, lr_up, lr = _inputs(tiny_model.config, h, w)
        image = tiny_model.prepare_image(lr)
        out[(h, w)] = (x, lr_up, image, tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image))
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("order", ["row", "col"])
def test_block_batch_equals_whole_image(tiny_model, whole, size, n, order):
    x, lr_up, image, ref = whole[size]
    out = tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image, block_batch=n, order=order)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2])
def test_host_cache_equals_whole_image(tiny_model, whole, n):
    x, lr_up, image, ref = whole[(48, 80)]
    out = tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image, block_batch=n, cache_device="cpu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_block_batch_is_not_vacuous(tiny_model, whole):
    """Dropping the cached neighbours (treating every batch as an image edge) must change the output,
    or the equality above would prove nothing about the cache."""
    from infdit_cli import model as model_mod

    x, lr_up, image, ref = whole[(48, 80)]
    orig = model_mod._neighbours_from_cache
    model_mod._neighbours_from_cache = lambda *a: (None, None, None, None)
    try:
        out = tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image, block_batch=1)
    finally:
        model_mod._neighbours_from_cache = orig
    assert (out - ref).abs().max() > 1e-3


def test_padding_never_leaks_into_real_pixels_from_x(tiny_model):
    """Real pixels don't depend on padded content except through partly-real blocks: changing x beyond
    a block-aligned image edge (here: a wider image whose extra column of blocks differs) leaves the
    left blocks unchanged, because UniBA only looks left and up."""
    x, lr_up, lr = _inputs(tiny_model.config, 48, 80)
    image = tiny_model.prepare_image(lr)
    a = tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image)
    x2 = x.clone()
    x2[..., 64:] += 1.0  # the last block column
    b = tiny_model.denoise(x2, 1.7, lr_up=lr_up, image=image)
    torch.testing.assert_close(a[..., :64], b[..., :64], atol=1e-6, rtol=0)
    assert (a[..., 64:] - b[..., 64:]).abs().max() > 1e-3


@pytest.mark.parametrize("grid,n,order", [((3, 5), 1, "row"), ((3, 5), 2, "row"), ((5, 3), 2, "col"),
                                          ((5, 3), 1, "row"), ((4, 4), 3, "col")])
def test_cache_holds_only_what_is_needed(tiny_model, grid, n, order):
    cfg = tiny_model.config
    h, w = grid[0] * cfg.block_size, grid[1] * cfg.block_size
    x, lr_up, lr = _inputs(cfg, h, w)
    events = []
    tiny_model.denoise(x, 1.7, lr_up=lr_up, lr=lr, block_batch=n, order=order, on_event=events.append)
    counts = [e.cached_blocks for e in events if isinstance(e, BatchDone)]
    assert len(counts) == len(plan_batches(*grid, n, order))
    bound = cache_bound(*grid, n, order)
    assert max(counts) <= bound, counts
    assert counts[-1] == 0  # everything released at the end


def test_order_auto_picks_smaller_cache(tiny_model):
    cfg = tiny_model.config
    for gh, gw, best in [(5, 2, "row"), (2, 5, "col")]:  # tall, wide
        x, lr_up, lr = _inputs(cfg, gh * cfg.block_size, gw * cfg.block_size)
        events = []
        tiny_model.denoise(x, 1.7, lr_up=lr_up, lr=lr, block_batch=1, on_event=events.append)
        worst = "col" if best == "row" else "row"
        assert cache_bound(gh, gw, 1, best) < cache_bound(gh, gw, 1, worst)
        assert max(e.cached_blocks for e in events) <= cache_bound(gh, gw, 1, best)
        assert max(e.cached_blocks for e in events) > cache_bound(gh, gw, 1, best) - 2


def test_state_may_live_off_the_model_device(tiny_model, whole):
    """x/lr_up on the host with the model elsewhere: only batch slices travel (CPU here: same path)."""
    x, lr_up, image, ref = whole[(48, 80)]
    out = tiny_model.denoise(x.to("cpu"), 1.7, lr_up=lr_up.to("cpu"), image=image, block_batch=2)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_out_of_memory_retries_with_smaller_n(tiny_model, whole, monkeypatch):
    from infdit_cli.events import PlanChanged

    x, lr_up, image, ref = whole[(48, 80)]
    real = tiny_model.forward_rect

    def flaky(xin, *a, **k):  # pretend rectangles wider than 2 blocks do not fit
        if xin.shape[-1] > 2 * tiny_model.config.block_size:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(xin, *a, **k)

    monkeypatch.setattr(tiny_model, "forward_rect", flaky)
    events = []
    out = tiny_model.denoise(x, 1.7, lr_up=lr_up, image=image, block_batch=4, on_event=events.append)
    retries = [e for e in events if isinstance(e, PlanChanged)]
    assert [(e.old, e.new) for e in retries] == [("n=4", "n=2")]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_host_cache_and_host_state(tiny_config, whole):
    from infdit_cli.weights import random_model

    m = random_model(tiny_config, seed=0, device="cuda")
    x, lr_up, image, ref = whole[(48, 80)]
    out = m.denoise(x, 1.7, lr_up=lr_up, image=image, block_batch=2, cache_device="cpu")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
