import pytest
import torch

from infdit_cli.config import PRESETS
from infdit_cli.errors import MemoryBudgetTooSmall
from infdit_cli.planner import estimate, parse_bytes, plan
from infdit_cli.schedule import cache_bound, choose_order, plan_batches

OFFICIAL = PRESETS["official"]


@pytest.mark.parametrize("text,value", [("8GB", 8 * 2**30), ("512MiB", 512 * 2**20), ("1.5g", int(1.5 * 2**30)),
                                        ("1000", 1000), (" 2 gb ", 2 * 2**30)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "8XB", "nanGB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_plan_picks_largest_n_that_fits():
    cfg = PRESETS["small"]
    p = plan(cfg, (1024, 1024), budget=400 * 2**20, device="cpu")
    assert not p.whole_image and p.estimate.total <= 400 * 2**20
    bigger = estimate(cfg, (1024, 1024), p.n + 1, device_type="cpu")
    assert bigger.total > 400 * 2**20  # n+1 would not fit: n is the largest
    assert "blocks" in p.reason


def test_plan_whole_image_when_it_fits():
    p = plan(PRESETS["small"], (256, 256), budget=8 * 2**30, device="cpu")
    assert p.whole_image


def test_plan_refuses_clearly():
    with pytest.raises(MemoryBudgetTooSmall, match="needs at least"):
        plan(OFFICIAL, (4096, 4096), budget=512 * 2**20, dtype=torch.bfloat16, device="cuda")


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
    p = plan(OFFICIAL, (16384, 16384), budget=8 * 2**30, dtype=torch.bfloat16, device="cuda")
    assert p.cache_on_host and p.state_on_host and p.estimate.total <= 8 * 2**30


def test_schedule_covers_grid_once():
    for gh, gw, n in [(3, 5, 2), (5, 3, 3), (4, 4, 4), (1, 7, 3)]:
        for order in ("row", "col"):
            seen = [b for r in plan_batches(gh, gw, n, order) for b in r.blocks()]
            assert sorted(seen) == [(i, j) for i in range(gh) for j in range(gw)]
    assert choose_order(10, 3) == "row" and choose_order(3, 10) == "col"
    assert cache_bound(3, 10, 2, "col") < cache_bound(3, 10, 2, "row")
