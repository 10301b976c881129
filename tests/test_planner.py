import pytest
import torch

from infdit_cli.errors import HostMemoryTooSmall, MemoryBudgetTooSmall
from infdit_cli.model.config import PRESETS
from infdit_cli.plan.grid import cache_bound, choose_order, plan_rects
from infdit_cli.plan.planner import Rates, call_seconds, estimate, param_count, plan
from infdit_cli.units import parse_bytes

OFFICIAL = PRESETS["official"]


@pytest.mark.parametrize("text,value", [("8GB", 8 * 2**30), ("512MiB", 512 * 2**20),
                                        ("1.5g", int(1.5 * 2**30)), ("1000", 1000), (" 2 gb ", 2 * 2**30)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "8XB", "nanGB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_plan_picks_largest_n_that_fits():
    cfg = PRESETS["small"]
    budget = 400 * 2**20  # on the CPU: weights, state, cache, activations (the runtime is the host's)
    p = plan(cfg, (1024, 1024), budget=budget, device="cpu", host_budget=8 << 30, low_memory=False)
    assert not p.whole_image and p.estimate.total <= budget
    bigger = estimate(cfg, (1024, 1024), p.n + 1, device_type="cpu")
    assert bigger.total > budget  # n+1 would not fit: n is the largest
    assert f"n={p.n}" in p.reason


# The cost model (`planner.call_seconds`): a call's FLOPs at `flops`, each tensor operation the engine issues
# at `op_seconds`, and what crosses between host and device at `copy_bytes`. A GPU's compute and launch cost
# (H100-class in bf16) with two kinds of link: PCIe-like copies, and copies as good as free.
PCIE = Rates(flops=400e12, op_seconds=2e-6, copy_bytes=12e9)
FREE_COPIES = Rates(flops=400e12, op_seconds=2e-6, copy_bytes=1e15)
GPU = dict(dtype=torch.bfloat16, device="cuda", host_budget=256 << 30)


def _seconds(n, cache_on_host, rates, size=(4096, 4096), state_on_host=False):
    return call_seconds(OFFICIAL, size, n, rates, dtype=torch.bfloat16, device_type="cuda",
                        cache_on_host=cache_on_host, state_on_host=state_on_host)


def test_the_planner_picks_the_faster_of_two_plans_that_fit():
    """A 14 GiB budget at 4096^2: a larger n fits only with the K/V cache on the host. Over PCIe the host
    cache's traffic (every rectangle's neighbours, every layer) costs more than the smaller n's extra
    rectangles: the cache stays on the device. With free copies the larger n's fewer operations win."""
    budget = 14 << 30
    pcie = plan(OFFICIAL, (4096, 4096), budget=budget, rates=PCIE, **GPU)
    free = plan(OFFICIAL, (4096, 4096), budget=budget, rates=FREE_COPIES, **GPU)
    assert not pcie.cache_on_host and free.cache_on_host and free.n > pcie.n
    assert estimate(OFFICIAL, (4096, 4096), free.n, dtype=torch.bfloat16, device_type="cuda").total > budget
    assert _seconds(pcie.n, False, PCIE) < _seconds(free.n, True, PCIE)  # each is the faster by its rates
    assert _seconds(free.n, True, FREE_COPIES) < _seconds(pcie.n, False, FREE_COPIES)
    assert free.seconds_per_call == pytest.approx(_seconds(free.n, True, FREE_COPIES))
    assert "per call" in free.reason


def test_memory_decides_when_only_the_slower_plan_fits():
    """The whole image would be the fastest (fewest operations for the same FLOPs), but only n=2 fits."""
    budget = 8 << 30 | 1 << 29  # 8.5 GiB
    p = plan(OFFICIAL, (4096, 4096), budget=budget, rates=FREE_COPIES, **GPU)
    assert p.n < 32 and p.estimate.total <= budget
    assert estimate(OFFICIAL, (4096, 4096), p.n + 1, dtype=torch.bfloat16, device_type="cuda").total > budget
    assert _seconds(32, False, FREE_COPIES) < p.seconds_per_call


def test_the_choice_is_the_fastest_of_everything_that_fits():
    """Against a brute force over every n and placement, at budgets from tight to ample: the plan's
    predicted time is the least of those that fit. At 4096^2 (32 x 32 blocks) with room for n=10, n=8 is
    taken: n=9 and 10 have the same 4 x 4 rectangles and more chunks (81 blocks = 6 chunks of 16, not 4)."""
    size, kw = (4096, 4096), dict(dtype=torch.bfloat16, device_type="cuda")
    for budget in [9 << 30, 11 << 30, 14 << 30, 20 << 30, 30 << 30, 64 << 30]:
        p = plan(OFFICIAL, size, budget=budget, rates=PCIE, **GPU)
        fits = [(_seconds(n, cache, PCIE, state_on_host=state), n, cache, state) for n in range(1, 33)
                for cache, state in ((False, False), (True, False), (True, True))
                if estimate(OFFICIAL, size, n, cache_on_host=cache, state_on_host=state,
                            **kw).total <= budget]
        assert p.seconds_per_call == pytest.approx(min(fits)[0]), budget
    room_for_10 = estimate(OFFICIAL, size, 10, **kw).total  # and not for 11
    p = plan(OFFICIAL, size, budget=room_for_10, rates=PCIE, **GPU)
    assert estimate(OFFICIAL, size, 11, **kw).total > room_for_10
    assert (p.n, p.cache_on_host) == (8, False)
    assert _seconds(10, False, PCIE) > _seconds(9, False, PCIE) > _seconds(8, False, PCIE)


def test_plan_whole_image_when_it_fits():
    p = plan(PRESETS["small"], (256, 256), budget=8 * 2**30, device="cpu", host_budget=8 << 30)
    assert p.whole_image


def test_plan_refuses_clearly():
    with pytest.raises(MemoryBudgetTooSmall, match="needs at least"):
        plan(OFFICIAL, (4096, 4096), budget=512 * 2**20, dtype=torch.bfloat16, device="cuda",
             host_budget=64 << 30)


def test_block_mode_memory_grows_with_width_only():
    """With the cache and image state on the host, device memory does not depend on the image height."""
    kw = dict(dtype=torch.bfloat16, device_type="cuda", cache_on_host=True, state_on_host=True)
    a = estimate(OFFICIAL, (4096, 4096), 2, **kw).total
    b = estimate(OFFICIAL, (16384, 4096), 2, **kw).total
    assert a == b
    on_device = dict(dtype=torch.bfloat16, device_type="cuda", order="row")
    assert estimate(OFFICIAL, (4096, 8192), 2, **on_device).cache > estimate(OFFICIAL, (4096, 4096), 2,
                                                                                 **on_device).cache


def test_host_placements_used_when_device_is_tight():
    p = plan(OFFICIAL, (16384, 16384), budget=8 * 2**30, dtype=torch.bfloat16, device="cuda",
             host_budget=64 << 30)
    assert p.cache_on_host and p.state_on_host and p.estimate.total <= 8 * 2**30


def test_param_count_is_the_module_s():
    import math

    from infdit_cli.weights.format import expected_shapes

    for name, cfg in PRESETS.items():
        assert param_count(cfg) == sum(math.prod(s) for s in expected_shapes(cfg).values()), name
    assert param_count(OFFICIAL) == 1_057_396_976  # 1.06 B with the CLIP ViT-L-14 vision tower


def test_planning_builds_no_model(monkeypatch):
    """Estimates are arithmetic: planning the 16K job must not construct a module (it used to build a meta
    model per estimate, hundreds of them)."""
    from infdit_cli.model import infdit as model_mod

    def boom(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(model_mod.InfDiT, "__init__", boom)
    p = plan(OFFICIAL, (16384, 16384), budget=8 << 30, dtype=torch.bfloat16, device="cuda",
             host_budget=32 << 30)
    assert p.estimate.device_peak <= 8 << 30 and p.estimate.host_peak <= 32 << 30


def test_16k_host_plans():
    """The headline job on an 8 GB card: <= 32 GiB of host memory in RAM (bf16 sampler state, as the
    official code keeps it), <= 12 GiB with memory-mapped state."""
    kw = dict(budget=8 << 30, dtype=torch.bfloat16, device="cuda", host_budget=32 << 30)
    ram = plan(OFFICIAL, (16384, 16384), low_memory=False, **kw)
    assert not ram.low_memory and ram.state_dtype == torch.bfloat16
    assert ram.estimate.host_peak <= 32 << 30 and ram.estimate.device_peak <= 8 << 30
    mapped = plan(OFFICIAL, (16384, 16384), low_memory=True, **kw)
    assert mapped.low_memory and mapped.estimate.host_peak <= 12 << 30
    auto = plan(OFFICIAL, (16384, 16384), **kw)
    assert auto.low_memory == ram.low_memory  # RAM is enough: no memory-mapping unless needed
    with pytest.raises(HostMemoryTooSmall, match="try --low-memory"):
        plan(OFFICIAL, (16384, 16384), low_memory=False, **{**kw, "host_budget": 16 << 30})
    assert plan(OFFICIAL, (16384, 16384), **{**kw, "host_budget": 16 << 30}).low_memory  # turned on by itself


def test_fixed_n_still_plans_placements():
    """--block-batch fixes n; the cache and state still go where they fit."""
    p = plan(OFFICIAL, (16384, 16384), budget=8 << 30, dtype=torch.bfloat16, device="cuda", n=4,
             host_budget=64 << 30)
    assert p.n == 4 and p.cache_on_host and p.state_on_host


def test_schedule_covers_grid_once():
    for gh, gw, n in [(3, 5, 2), (5, 3, 3), (4, 4, 4), (1, 7, 3)]:
        for order in ("row", "col"):
            seen = [b for r in plan_rects(gh, gw, n, order) for b in r.blocks()]
            assert sorted(seen) == [(i, j) for i in range(gh) for j in range(gw)]
    assert choose_order(10, 3) == "row" and choose_order(3, 10) == "col"
    assert cache_bound(3, 10, 2, "col") < cache_bound(3, 10, 2, "row")


def test_memory_mapped_state_only_when_nothing_in_ram_is_as_fast():
    """16384^2 on a 24 GiB card with 32 GiB of host memory: n=28 with the image state on the host needs it
    memory-mapped (its disk traffic counted at MAPPED_BYTES); n=20 with the state on the device fits in
    RAM and is chosen. The mapped plan would be the faster without that traffic."""
    from infdit_cli.plan.planner import MAPPED_BYTES, STATE_BYTES_PER_PIXEL

    size, host = (16384, 16384), 32 << 30
    p = plan(OFFICIAL, size, budget=24 << 30, rates=PCIE, dtype=torch.bfloat16, device="cuda",
             host_budget=host)
    assert not p.low_memory and not p.state_on_host and p.estimate.host_peak <= host
    kw = dict(dtype=torch.bfloat16, device_type="cuda", cache_on_host=True, state_on_host=True)
    ram = estimate(OFFICIAL, size, 28, **kw, state_dtype=torch.bfloat16)
    mapped = estimate(OFFICIAL, size, 28, **kw, low_memory=True)
    assert ram.host_peak > host >= mapped.host_peak and mapped.total <= 24 << 30
    mapped_s = _seconds(28, True, PCIE, size, state_on_host=True)
    assert mapped_s < p.seconds_per_call < mapped_s + STATE_BYTES_PER_PIXEL * size[0] * size[1] / MAPPED_BYTES


# ---- what a GPU plan keeps free, and what an out-of-memory does first ------------------------------------


def test_a_cuda_plan_keeps_a_tenth_of_the_free_memory(monkeypatch):
    """The default budget on CUDA is what the device reports free less 10 % (at least 512 MiB): the fitted
    coefficients do not see cuBLAS/NCCL workspaces or the allocator's fragmentation."""
    from infdit_cli.plan import planner

    free = {"now": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["now"], 80 * 2**30))
    assert planner.device_free(torch.device("cuda")) == 72 * 2**30
    free["now"] = 2 * 2**30  # a small card: the floor
    assert planner.device_free(torch.device("cuda")) == 2 * 2**30 - 512 * 2**20
    assert planner.device_free(torch.device("cpu")) is None
    free["now"] = 80 * 2**30
    p = plan(OFFICIAL, (8192, 8192), **GPU)  # budget left to the planner: what is free, less the margin
    assert p.budget == 72 * 2**30 and p.estimate.total <= 0.9 * 80 * 2**30
    full = plan(OFFICIAL, (8192, 8192), budget=80 * 2**30 - 512 * 2**20, **GPU)  # the old margin
    assert full.n > p.n  # the margin costs n here: what it was there for


def test_out_of_memory_replans_at_nine_tenths_of_the_budget():
    """The first rung after an out-of-memory is the largest n that fits 0.9x the plan's budget (a step of
    a few per cent, where halving n would double the rectangles); only where no smaller n fits that does
    the engine halve."""
    from infdit_cli.plan.planner import Placement, replan, step_down

    budget = 40 * 2**30
    p = plan(OFFICIAL, (8192, 8192), budget=budget, **GPU)
    assert not p.whole_image and p.n > 4
    kw = dict(dtype=torch.bfloat16, device_type="cuda")
    smaller = replan(OFFICIAL, (8192, 8192), p.placement, budget, **kw)
    assert smaller is not None and step_down(p.placement, 64, 64).n < smaller.n < p.n
    assert smaller.cache_on_host == p.cache_on_host and smaller.state_on_host == p.state_on_host
    assert estimate(OFFICIAL, (8192, 8192), smaller.n, cache_on_host=smaller.cache_on_host,
                    **kw).total <= 0.9 * budget
    assert estimate(OFFICIAL, (8192, 8192), smaller.n + 1, cache_on_host=smaller.cache_on_host,
                    **kw).total > 0.9 * budget
    assert replan(OFFICIAL, (8192, 8192), Placement(n=1), budget, **kw) is None  # nothing below n=1
    tiny_budget = estimate(OFFICIAL, (8192, 8192), 2, **kw).total  # n=2 fits, n=1 not within 0.9x of it
    assert replan(OFFICIAL, (8192, 8192), Placement(n=2), tiny_budget * 0.5, **kw) is None


def test_the_engine_replans_before_it_halves(tiny_model):
    """An engine given the pipeline's re-plan takes it on the first out-of-memory (n=4 -> 3), and halves
    only on the next (3 -> 1: a 3-block grid side); the result equals a call planned that way."""
    from infdit_cli.engine.blocks import BlockEngine, denoise
    from infdit_cli.events import PlanChanged
    from infdit_cli.plan.grid import BlockRect
    from infdit_cli.plan.planner import Placement, batch_device_bytes

    cfg = tiny_model.config
    g = torch.Generator().manual_seed(0)
    h, w = 3 * cfg.block_size, 5 * cfg.block_size
    lr = torch.rand(1, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=g) * 2 - 1
    lr_up = torch.rand(1, 3, h, w, generator=g) * 2 - 1
    x, vec = lr_up + torch.randn(1, 3, h, w, generator=g), torch.randn(1, cfg.vector_dim, generator=g)
    three = batch_device_bytes(cfg, BlockRect(0, 3, 0, 3, 3, 5), 1, torch.float32, False, "cpu")

    def fault(nbytes):
        if nbytes > three:
            raise torch.OutOfMemoryError("simulated")

    asked, events = [], []

    def replan(at):
        asked.append(at.n)
        return Placement(n=3, order=at.order)

    eng = BlockEngine(tiny_model, lr, vec, lr_up, Placement(n=4), on_event=events.append, fault=fault,
                      replan=replan)
    out = eng(x, 1.7)
    assert asked == [4] and [(e.old, e.new) for e in events if isinstance(e, PlanChanged)] == [("n=4", "n=3")]
    assert torch.equal(out, denoise(tiny_model, x, 1.7, lr_up=lr_up, lr=lr, vector=vec, block_batch=3))
    events.clear()
    eng.fault = lambda nbytes: (_ for _ in ()).throw(torch.OutOfMemoryError("x")) if nbytes >= three else None
    eng(x, 1.7)
    assert asked == [4] and [e.new for e in events if isinstance(e, PlanChanged)] == ["n=1"]


def test_band_sends_are_planned_for():
    """Under torchrun each rank keeps up to 3 rectangle rows of its right edge's K/V in flight (`bands.py`):
    counted on the device beside a device cache, on the host beside a host cache."""
    kw = dict(dtype=torch.bfloat16, device_type="cuda")
    one, two = (estimate(OFFICIAL, (8192, 8192), 16, ranks=r, **kw) for r in (1, 2))
    block_kv = 2 * OFFICIAL.num_layers * OFFICIAL.block_tokens**2 * OFFICIAL.hidden_size * 2
    assert two.total - one.total == 3 * 16 * block_kv
    host_one, host_two = (estimate(OFFICIAL, (8192, 8192), 16, ranks=r, cache_on_host=True, **kw)
                          for r in (1, 2))
    assert host_two.total == host_one.total and \
        host_two.host["cache"] - host_one.host["cache"] == 3 * 16 * block_kv
    assert plan(OFFICIAL, (8192, 8192), budget=40 * 2**30, ranks=2, **GPU).n <= plan(
        OFFICIAL, (8192, 8192), budget=40 * 2**30, **GPU).n


def test_a_pass_out_of_memory_first_replans_then_halves(tiny_model):
    """Through the pipeline: a pass planned at n=4 whose 4x4 batches run out of memory goes on at the
    largest n within 0.9x its budget (here n=3: the budget is roomy, the miss small), not at n=2; when 3x3
    batches fail too, then it halves (n=1)."""
    from infdit_cli.events import PlanChanged
    from infdit_cli.jobs.pipeline import UpscaleOptions, plan_upscale, upscale
    from infdit_cli.plan.grid import BlockRect
    from infdit_cli.plan.planner import batch_device_bytes

    cfg = tiny_model.config
    rgb = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))  # 5x7 blocks at 4x
    opts = UpscaleOptions(steps=2, block_batch=4, low_memory=False)
    up_plan = plan_upscale(cfg, (20, 28), (80, 112), opts)
    three = batch_device_bytes(cfg, BlockRect(0, 3, 0, 3, 5, 7), 1, torch.float32, False, "cpu")
    for limit, want in ((three, [("n=4", "n=3")]), (three - 1, [("n=4", "n=3"), ("n=3", "n=1")])):
        def fault(nbytes, limit=limit):
            if nbytes > limit:
                raise torch.OutOfMemoryError("simulated")

        events = []
        upscale(tiny_model, rgb, up_plan, opts, fault=fault, on_event=events.append)
        assert [(e.old, e.new) for e in events if isinstance(e, PlanChanged)] == want


def test_a_pass_replans_with_its_state_dtype_and_order(tiny_model, monkeypatch):
    """The out-of-memory re-plan estimates the pass as planned: a bfloat16 state (not float32, `estimate`'s
    default), the plan's storage and the placement's traversal order; its answer is `planner.replan`'s
    with them."""
    from dataclasses import replace as dc_replace

    import infdit_cli.jobs.pipeline as pipeline_mod
    import infdit_cli.plan.planner as planner_mod
    from infdit_cli.jobs.pipeline import UpscaleOptions, plan_upscale, upscale
    from infdit_cli.plan.grid import BlockRect
    from infdit_cli.plan.planner import batch_device_bytes

    cfg = tiny_model.config
    rgb = torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))
    opts = UpscaleOptions(steps=2, block_batch=4, low_memory=False)
    up_plan = plan_upscale(cfg, (20, 28), (80, 112), opts)
    pas = up_plan.passes[0]
    mem = dc_replace(pas.memory, state_dtype=torch.bfloat16,
                     placement=dc_replace(pas.memory.placement, order="col"))
    up_plan = dc_replace(up_plan, passes=[dc_replace(pas, memory=mem)])
    three = batch_device_bytes(cfg, BlockRect(0, 3, 0, 3, 5, 7), 1, torch.float32, False, "cpu")
    seen, answers = [], []
    real_estimate, real_replan = planner_mod.estimate, pipeline_mod.planner_replan

    def estimate(*a, **k):
        seen.append((k.get("state_dtype", torch.float32), k.get("order", "auto"), k.get("low_memory", False)))
        return real_estimate(*a, **k)

    def spy(*a, **k):
        answers.append((a, real_replan(*a, **k)))
        return answers[-1][1]

    def fault(nbytes):
        if nbytes > three:
            raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(planner_mod, "estimate", estimate)
    monkeypatch.setattr(pipeline_mod, "planner_replan", spy)
    upscale(tiny_model, rgb, up_plan, opts, fault=fault)
    monkeypatch.undo()
    assert seen and set(seen) == {(torch.bfloat16, "col", mem.low_memory)}
    (args, got), = answers
    assert got == real_replan(*args, dtype=tiny_model.dtype, device_type="cpu", batch=1, scale=pas.scale,
                              ranks=1, state_dtype=torch.bfloat16, low_memory=mem.low_memory, order="col")


@pytest.mark.parametrize("seconds,measured,pays", [
    (600, None, False),  # nothing measured on this GPU
    (600, {"eager_s": 1.0, "compiled_s": 0.95, "first_call_s": 5.0}, False),  # x1.05: not worth a compile
    (600, {"eager_s": 1.5, "compiled_s": 1.0, "first_call_s": 61.0}, True),  # saves 200 s, costs 60 s
    (300, {"eager_s": 1.5, "compiled_s": 1.0, "first_call_s": 61.0}, False),  # saves 100 s < 2 x 60 s
    (120, {"eager_s": 3.0, "compiled_s": 1.0, "first_call_s": 2.0}, False),  # a short pass: eager
])
def test_compile_by_default_only_where_the_measurement_says_it_pays(seconds, measured, pays):
    from infdit_cli.plan.planner import compile_pays

    assert compile_pays(seconds, measured) is pays


def test_a_calls_image_work_is_charged_per_output_pixel():
    """`Rates.pixel_seconds` (the calibration's measure of the LR upsampling, slices and sampler arithmetic)
    adds that much per pixel of the block-padded canvas, whatever n; a state on the host next to a GPU
    adds its slices' traffic over the copy rate on top."""
    from dataclasses import replace

    from infdit_cli.plan.planner import STATE_BYTES_PER_PIXEL, call_seconds

    cfg, size = PRESETS["tiny"], (100, 200)  # canvas 112 x 208
    base = Rates(flops=1e9, op_seconds=1e-6, copy_bytes=1e9)
    for n in (1, 3, 1 << 30):
        with_pixels = call_seconds(cfg, size, n, replace(base, pixel_seconds=1e-8))
        extra = with_pixels - call_seconds(cfg, size, n, base)
        assert extra == pytest.approx(112 * 208 * 1e-8)
    on_host = call_seconds(cfg, size, 2, base, device_type="cuda", state_on_host=True)
    assert on_host - call_seconds(cfg, size, 2, base, device_type="cuda") == \
        pytest.approx(STATE_BYTES_PER_PIXEL * 112 * 208 / 1e9)
