"""distributed.py and `torchrun`: sharding, one report, the same files as one process (gloo on the CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from infdit_cli.distributed.world import World, rank_device, world_from_env
from infdit_cli.jobs.batch import shard


def torchrun(*args, nproc: int = 2, cwd=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (rendezvous on localhost, a free port) of `python -m infdit_cli ARGS`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "infdit_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# --- pure pieces -----------------------------------------------------------------------------------------

def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0) and not World().distributed
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.main, w.distributed) == (3, 4, 1, False, True)
    with pytest.raises(ValueError, match="outside"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_rank_device_keeps_explicit_choices():
    w = World(1, 2, 1)
    assert rank_device("cpu", w) == "cpu" and rank_device("cuda:0", w) == "cuda:0"
    assert rank_device("auto", World()) == "auto"  # one process: untouched


def test_shard_longest_first_to_least_loaded():
    # LPT by hand: 9 -> 0; 7 -> 1; 5 -> 1 (7 < 9); 4 -> 0 (9 < 12); 3 -> 1 (12 < 13)
    costs = [3, 9, 4, 7, 5]
    owner = shard(costs, 2)
    assert owner == [1, 0, 0, 1, 1]
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert loads == [13, 15]
    # equal counts (a b a b ...) would give 3+4+5 = 12 against 9+7 = 16; LPT is never worse here
    assert max(loads) <= 16
    assert shard(costs, 2) == owner  # deterministic
    assert sorted(shard([1.0] * 7, 3)) == [0, 0, 0, 1, 1, 2, 2]
    assert shard([], 4) == [] and shard([5, 5], 1) == [0, 0]


def test_shard_balances_a_skewed_folder():
    costs = [100] + [1] * 100  # one huge file and many small ones
    owner = shard(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert loads == [100, 100]  # equal counts would give 150 against 50


# --- batch under torchrun ----------------------------------------------------------------------------------

def _folder(root: Path) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # --scale 2 targets of 1024, 576, 576, 256 px: LPT deals a -> 0, b -> 1, c -> 1, d -> 0, and then the
    # unreadable file (cost 0) goes to the less loaded rank 1: the injected failure lands on rank 1.
    for name, s in [("a.png", 16), ("b.png", 12), ("c.png", 12), ("d.png", 8), ("skip.png", 8)]:
        Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(root / name)
    (root / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")


@pytest.mark.slow
def test_batch_under_torchrun_same_files_one_report(tmp_path, tiny_weights):
    root, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    _folder(root)
    out.mkdir()
    (out / "skip.png").write_bytes(b"mine")  # resume: an existing output is skipped, never rewritten
    common = ["--scale", "2", "--steps", "2", "--device", "cpu", "--weights", tiny_weights, "--json"]
    one = run_cli("batch", root, "-o", ref, *common)
    assert one.returncode == 1, one.stderr  # bad.jpg failed

    res = torchrun("batch", root, "-o", out, *common)
    assert res.returncode != 0, res.stderr  # rank 0 exits 1 (torchrun then reports its own failure)
    summary = json.loads(res.stdout)  # exactly one JSON document: rank 0's, for the whole job
    assert summary["ranks"] == 2
    assert (summary["done"], summary["skipped"], summary["failed"]) == (4, 1, 1)
    items = {Path(i["input"]).name: i for i in summary["items"]}
    assert list(items) == ["a.png", "b.png", "bad.jpg", "c.png", "d.png", "skip.png"]  # the plan's order
    assert {k: v["rank"] for k, v in items.items()} == {
        "a.png": 0, "b.png": 1, "bad.jpg": 1, "c.png": 1, "d.png": 0, "skip.png": None}
    assert items["bad.jpg"]["status"] == "failed" and "bad.jpg" in items["bad.jpg"]["reason"]
    for name in "abcd":
        assert items[f"{name}.png"]["status"] == "done"
        assert (out / f"{name}.png").read_bytes() == (ref / f"{name}.png").read_bytes(), name
    assert (out / "skip.png").read_bytes() == b"mine"
    # no temps
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "d.png", "skip.png"]
    assert json.loads(one.stdout)["items"][2]["reason"] == items["bad.jpg"]["reason"]


# --- one image across ranks ---------------------------------------------------------------------------------

def test_column_bands():
    from infdit_cli.engine.bands import column_bands

    assert column_bands(7, 2) == [(0, 4), (4, 7)]
    assert column_bands(2, 3) == [(0, 1), (1, 2), (2, 2)]  # more ranks than columns: the last idles
    assert column_bands(9, 3) == [(0, 3), (3, 6), (6, 9)]


@pytest.mark.slow
def test_bands_equal_the_whole_image_pass(tmp_path):
    """BandEngine on 2 ranks against engine.denoise's whole-image pass: every n, ragged grids, one column
    per band (see bands_worker.py)."""
    out = tmp_path / "bands.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(Path(__file__).with_name("bands_worker.py")), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2 and len(per_rank[0]) == 5
    for rank, results in enumerate(per_rank):
        for r in results:
            assert r["max_abs"] <= 1e-5, (rank, r)  # the broadcast D(x) equals the one-process D(x)
    assert [r["band"] for r in per_rank[1]][:3] == [[4, 7], [4, 7], [1, 2]]  # rank 1 really had work


@pytest.mark.slow
def test_upscale_under_torchrun_same_pixels(tmp_path, tiny_weights):
    rng = np.random.default_rng(1)
    src = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 255, (24, 100, 3), dtype=np.uint8)).save(src)
    common = ["--scale", "4", "--steps", "2", "--device", "cpu", "--weights", tiny_weights, "--block-batch",
              "2"]
    # one process with the ranks' thread count (torchrun's OMP_NUM_THREADS=1): a reduction split over
    # threads rounds differently, and a value on an 8-bit level's edge then flips
    run_cli("upscale", src, "-o", tmp_path / "one.png", *common, check=True, process=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = torchrun("upscale", src, "-o", tmp_path / "two.png", *common, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["output"].endswith("two.png")  # one report, from rank 0
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("one.png", "two.png"))
    assert a.shape == (96, 400, 3) and np.array_equal(a, b)  # the 8-bit result, pixel for pixel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png", "two.png", "wide.png"]  # written once


def test_expandable_segments_before_cuda_starts_unless_the_user_chose(monkeypatch):
    from infdit_cli.plan.device import prefer_expandable_segments

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    env: dict = {}
    assert not prefer_expandable_segments("cpu", env) and env == {}
    assert prefer_expandable_segments("cuda:1", env) and \
        env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert not prefer_expandable_segments("cuda", mine) and \
        mine == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late: the allocator has read it
    late: dict = {}
    assert not prefer_expandable_segments("cuda", late) and late == {}


def test_clean_teardown_meets_the_peers_on_gloo_not_the_devices_barrier(monkeypatch):
    """A clean teardown meets the other ranks at the group's CPU backend's (gloo's) barrier, also on the
    "cpu:gloo,cuda:nccl" group, not `dist.barrier()`, which under `device_id` goes through NCCL on the GPU
    (a dead peer then costs the NCCL watchdog's timeout)."""
    import torch.distributed as dist

    from infdit_cli.distributed.world import teardown

    calls: list = []

    class Work:
        def wait(self):
            calls.append("waited")

    class Backend:
        def barrier(self):
            calls.append("gloo barrier")
            return Work()

    class Group:
        def _get_backend(self, device):
            calls.append(("backend", torch.device(device).type))
            return Backend()

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: Group())
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append("device barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    teardown(clean=True)
    assert calls == [("backend", "cpu"), "gloo barrier", "waited", "destroy"]
