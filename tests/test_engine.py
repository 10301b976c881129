"""UniBA block batches equal the whole-image pass, for every n, grid shape, size, order and placement;
the engine's memory behaviour (slab cache, memory-mapped storage, out-of-memory step-down)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infdit_cli.engine import blocks as engine_mod
from infdit_cli.engine.blocks import BlockEngine, denoise
from infdit_cli.engine.storage import Scratch
from infdit_cli.errors import OutOfMemory
from infdit_cli.events import BatchDone, PlanChanged
from infdit_cli.plan.grid import cache_bound, plan_rects
from infdit_cli.plan.planner import Placement, step_down

WHOLE = Placement(n=1 << 30)


def _inputs(cfg, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    lr = torch.rand(1, 3, -(-h // cfg.sr_scale), -(-w // cfg.sr_scale), generator=g) * 2 - 1
    lr_up = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    x = lr_up + torch.randn(1, 3, h, w, generator=g) * 2.0
    vector = torch.randn(1, cfg.vector_dim, generator=g)
    return x, lr_up, lr, vector


SIZES = [(48, 80), (80, 48), (40, 72)]  # 3x5 and 5x3 blocks of 16 px; 40x72 is not a block multiple


@pytest.fixture(scope="module")
def whole(tiny_model):
    out = {}
    for h, w in SIZES:
        x, lr_up, lr, vec = _inputs(tiny_model.config, h, w)
        out[(h, w)] = (x, lr_up, lr, vec, denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec))
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("order", ["row", "col"])
def test_block_batch_equals_whole_image(tiny_model, whole, size, n, order):
    x, lr_up, lr, vec, ref = whole[size]
    out = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=n, order=order)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mapped", [False, True])
def test_host_and_mapped_cache_equal_whole_image(tiny_model, whole, n, mapped, tmp_path):
    x, lr_up, lr, vec, ref = whole[(48, 80)]
    with Scratch(tmp_path if mapped else None) as scratch:
        eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=n, cache_on_host=True), scratch=scratch)
        out = eng(x, 1.7)
        assert (eng.cache.slab.device.type, eng.scratch.mapped) == ("cpu", mapped)
        if mapped:
            assert sorted(p.name for p in scratch.path.iterdir()) == [".infdit", "kv_cache.bin"]  # + marker
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone


def test_block_batch_is_not_vacuous(tiny_model, whole, monkeypatch):
    """Dropping the cached neighbours (treating every batch as an image edge) must change the output,
    or the equality above would prove nothing about the cache."""
    x, lr_up, lr, vec, ref = whole[(48, 80)]
    monkeypatch.setattr(engine_mod, "_neighbours", lambda *a: (None, None, None, None))
    out = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=1)
    assert (out - ref).abs().max() > 1e-3


def test_padding_never_leaks_into_real_pixels_from_x(tiny_model):
    """Real pixels don't depend on padded content except through partly-real blocks: changing x beyond
    a block-aligned image edge (here: a wider image whose extra column of blocks differs) leaves the
    left blocks unchanged, because UniBA only looks left and up."""
    x, lr_up, lr, vec = _inputs(tiny_model.config, 48, 80)
    a = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec)
    x2 = x.clone()
    x2[..., 64:] += 1.0  # the last block column
    b = denoise(tiny_model, x2, 1.7, lr_up=lr_up, lr=lr, vector=vec)
    torch.testing.assert_close(a[..., :64], b[..., :64], atol=1e-6, rtol=0)
    assert (a[..., 64:] - b[..., 64:]).abs().max() > 1e-3


@pytest.mark.parametrize("grid,n,order", [((3, 5), 1, "row"), ((3, 5), 2, "row"), ((5, 3), 2, "col"),
                                          ((5, 3), 1, "row"), ((4, 4), 3, "col")])
def test_cache_holds_only_what_is_needed(tiny_model, grid, n, order):
    cfg = tiny_model.config
    h, w = grid[0] * cfg.block_size, grid[1] * cfg.block_size
    x, lr_up, lr, vec = _inputs(cfg, h, w)
    events = []
    denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=n, order=order,
            on_event=events.append)
    counts = [e.cached_blocks for e in events if isinstance(e, BatchDone)]
    assert len(counts) == len(plan_rects(*grid, n, order))
    assert max(counts) <= cache_bound(*grid, n, order), counts
    assert counts[-1] == 0  # everything released at the end


def test_order_auto_picks_smaller_cache(tiny_model):
    cfg = tiny_model.config
    for gh, gw, best in [(5, 2, "row"), (2, 5, "col")]:  # tall, wide
        x, lr_up, lr, vec = _inputs(cfg, gh * cfg.block_size, gw * cfg.block_size)
        events = []
        denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=1, on_event=events.append)
        worst = "col" if best == "row" else "row"
        assert cache_bound(gh, gw, 1, best) < cache_bound(gh, gw, 1, worst)
        assert max(e.cached_blocks for e in events) <= cache_bound(gh, gw, 1, best)
        assert max(e.cached_blocks for e in events) > cache_bound(gh, gw, 1, best) - 2


def test_slab_allocated_once_per_pass(tiny_model, whole):
    """The K/V slab is made on the first call and reused by every later call of the engine."""
    x, lr_up, lr, vec, ref = whole[(48, 80)]
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2))
    eng(x, 1.7)
    slab = eng.cache.slab
    out = eng(x, 1.7)
    assert eng.cache.slab is slab
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _limit(max_bytes):
    """A fault hook: batches asking the device for more than `max_bytes` run out of memory."""

    def fault(nbytes):
        if nbytes > max_bytes:
            raise torch.OutOfMemoryError(f"simulated: {nbytes} > {max_bytes}")

    return fault


def test_out_of_memory_steps_down_and_keeps_the_smaller_plan(tiny_model, whole):
    from infdit_cli.plan.grid import BlockRect
    from infdit_cli.plan.planner import batch_device_bytes

    x, lr_up, lr, vec, ref = whole[(48, 80)]
    cfg = tiny_model.config
    big = batch_device_bytes(cfg, BlockRect(0, 3, 0, 4, 3, 5), 1, torch.float32, False)
    two = batch_device_bytes(cfg, BlockRect(0, 2, 0, 2, 3, 5), 1, torch.float32, False)
    fault = _limit((big + two) // 2)  # a 4x4 batch does not fit, 2x2 does
    events = []
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=4), on_event=events.append, fault=fault)
    a = eng(x, 1.7)
    b = eng(x, 1.7)
    changes = [e for e in events if isinstance(e, PlanChanged)]
    assert [(e.old, e.new) for e in changes] == [("n=4", "n=2")]  # once: the second call starts at n=2
    assert eng.placement.n == 2
    started_small = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=2)
    assert torch.equal(a, started_small) and torch.equal(b, started_small)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)


def test_out_of_memory_at_the_leanest_plan_is_one_error(tiny_model, whole):
    x, lr_up, lr, vec, _ = whole[(48, 80)]
    fault = _limit(0)  # nothing fits
    events = []
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=2), on_event=events.append, fault=fault)
    with pytest.raises(OutOfMemory, match="even at block batch 1"):
        eng(x, 1.7)
    assert [e.new for e in events if isinstance(e, PlanChanged)] == ["n=1", "n=1, cache on host"]


def test_step_down_ladder():
    p = Placement(n=8)
    seen = []
    while p is not None:
        seen.append(p.describe())
        p = step_down(p, 10, 10)
    assert seen == ["n=8", "n=4", "n=2", "n=1", "n=1, cache on host"]
    assert step_down(Placement(n=1 << 30), 6, 3).n == 3  # whole image (6 blocks) -> n = 3


class _Sizes(TorchDispatchMode):
    """Records the shape of every tensor any operation returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def _largest_hidden_tensor(model, h, w, **kw):
    cfg = model.config
    x, lr_up, lr, vec = _inputs(cfg, h, w)
    with _Sizes() as rec:
        denoise(model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, **kw)
    return max(torch.Size(s).numel() for s in rec.shapes if cfg.hidden_size in s or cfg.head_dim in s)


def test_no_image_area_by_hidden_width_tensor(tiny_model):
    """In block mode no tensor grows with (image area x hidden width): the LR conditioning is computed per
    rectangle, never as an image-sized map of hidden-width tokens (10 GiB at 16384^2 officially). A tall
    image runs row-major, so only the cache (one block row) may grow with the width: with the width fixed,
    the largest hidden-width tensor must not grow with the height."""
    bs = tiny_model.config.block_size
    short = _largest_hidden_tensor(tiny_model, 8 * bs, 8 * bs, block_batch=2)
    tall = _largest_hidden_tensor(tiny_model, 32 * bs, 8 * bs, block_batch=2)
    assert tall == short
    # The check can fail: the whole-image pass does hold such tensors, and they grow with the area.
    whole_short = _largest_hidden_tensor(tiny_model, 8 * bs, 8 * bs)
    assert _largest_hidden_tensor(tiny_model, 32 * bs, 8 * bs) >= 3 * whole_short  # 4x the area


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_placements_give_identical_pixels(tiny_config, whole):
    from infdit_cli.model.infdit import random_model

    m = random_model(tiny_config, seed=0, device="cuda")
    x, lr_up, lr, vec, ref = whole[(48, 80)]
    dev = denoise(m, x.cuda(), 1.7, lr_up=lr_up.cuda(), lr=lr.cuda(), vector=vec, block_batch=2)
    host = denoise(m, x.cuda(), 1.7, lr_up=lr_up.cuda(), lr=lr.cuda(), vector=vec, block_batch=2,
                   cache_device="cpu")
    on_host = denoise(m, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=2, cache_device="cpu")
    assert on_host.device.type == "cpu" and dev.device.type == "cuda"
    assert torch.equal(dev, host) and torch.equal(dev.cpu(), on_host)
    torch.testing.assert_close(on_host, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_blocks", [1, 2, 4])
def test_chunked_layers_equal_one_chunk(tiny_model, whole, monkeypatch, chunk_blocks):
    """A rectangle's per-token work runs over chunks of its blocks (the last one ragged): the result is
    the one-chunk pass's, whole image and block mode alike."""
    from infdit_cli.plan import planner

    t = tiny_model.config.block_tokens**2
    assert planner.chunk_blocks(tiny_model.config, "cpu") >= 15  # the fixture ran as one chunk
    monkeypatch.setitem(planner.CHUNK_TOKENS, "cpu", chunk_blocks * t)
    x, lr_up, lr, vec, ref = whole[(48, 80)]  # 3x5 blocks
    for n in (None, 3):
        out = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_chunks_bound_the_mlp_temporaries(tiny_model, monkeypatch):
    """The MLP's (tokens x 4D) tensors are a chunk's, not the rectangle's: with 2-block chunks they do not
    grow with the image, while with one chunk for the rectangle they do."""
    from infdit_cli.plan import planner

    cfg = tiny_model.config
    bs, t, width = cfg.block_size, cfg.block_tokens**2, cfg.mlp_ratio * cfg.hidden_size

    def largest_mlp(h, w):
        x, lr_up, lr, vec = _inputs(cfg, h, w)
        with _Sizes() as rec:
            denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec)
        return max(torch.Size(s).numel() for s in rec.shapes if len(s) > 2 and s[-2:] == (t, width))

    monkeypatch.setitem(planner.CHUNK_TOKENS, "cpu", 2 * t)
    assert largest_mlp(4 * bs, 4 * bs) == largest_mlp(8 * bs, 8 * bs) == 2 * t * width
    monkeypatch.setitem(planner.CHUNK_TOKENS, "cpu", 1 << 30)
    assert largest_mlp(8 * bs, 8 * bs) == 64 * t * width


@pytest.mark.parametrize("n", [None, 2])
def test_compiled_layers_equal_eager(tiny_model, whole, n, monkeypatch):
    """`compile=`: the layers' per-token work through torch.compile ("aot_eager" traces and functionalises
    the graphs like Inductor, without generating code) gives the eager pixels, and a new sigma (a new
    StepCond) reuses the graphs instead of recompiling."""
    from torch._dynamo.utils import counters

    used, real = [], engine_mod.compiled_kernels

    def spy(backend):
        qkv, out = real(backend)
        return (lambda *a: used.append("qkv") or qkv(*a)), (lambda *a: used.append("out") or out(*a))

    monkeypatch.setattr(engine_mod, "compiled_kernels", spy)
    x, lr_up, lr, vec, ref = whole[(48, 80)]
    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=n or 1 << 30), compile="aot_eager")
    out = eng(x, 1.7)
    assert {"qkv", "out"} <= set(used)  # the compiled kernels ran, not the eager ones
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)
    graphs = counters["stats"]["unique_graphs"]
    eng(x, 0.9)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("n", [None, 2])
def test_a_batch_of_two_equals_each_alone(tiny_model, n):
    """B = 2 (per-image modulation, not the one-image LayerNorm-affine path) gives each image's own call."""
    cfg = tiny_model.config
    a, b = _inputs(cfg, 48, 80, seed=1), _inputs(cfg, 48, 80, seed=2)
    x, lr_up, lr, vec = (torch.cat([u, v]) for u, v in zip(a, b))
    both = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)
    for i, (x, lr_up, lr, vec) in enumerate((a, b)):
        alone = denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)
        torch.testing.assert_close(both[i : i + 1], alone, atol=2e-6, rtol=0)
