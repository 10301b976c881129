"""`infdit selftest --device cpu`: every check runs at toy sizes and none fails (CI runs this), from a wheel
installed outside the checkout (its fixtures are package data); one engine per mode, pinned once."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from infdit_cli.tools import selftest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"


@pytest.fixture
def outside(request, tmp_path):
    """(command, env) running `infdit` from outside the checkout: the wheel's installed copy, or where no
    wheel can be built here, a copy of the package (and nothing else of the repository)."""
    try:
        _, venv, env = request.getfixturevalue("wheel_venv")
        return [str(venv / "bin" / "infdit")], env
    except pytest.skip.Exception:
        pkg = tmp_path / "site"
        shutil.copytree(ROOT / "src" / "infdit_cli", pkg / "infdit_cli",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(pkg), "HF_HUB_OFFLINE": "1"}
        return [sys.executable, "-m", "infdit_cli"], env


@pytest.mark.slow
def test_selftest_cpu_passes_outside_the_checkout(outside, tmp_path):
    cmd, env = outside
    report = tmp_path / "selftest.md"
    res = subprocess.run([*cmd, "selftest", "--device", "cpu", "--json", "-o", str(report)],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    data = json.loads(res.stdout)
    rows = data["checks"]
    assert data["passed"] is True and data["profile"] == "toy"
    assert [r["name"] for r in rows if r["status"] == "fail"] == []
    groups = {g: [r for r in rows if r["group"] == g] for g in ("parity", "bf16", "memory", "speed", "plan")}
    # The checks with a criterion really ran and passed (not skipped): 2 parity + 3 block + cache, 3 bf16,
    # one memory row per toy size (the default full-memory plan is a CUDA row: skipped here).
    assert [r["status"] for r in groups["parity"]] == ["pass"] * 6
    assert [r["status"] for r in groups["bf16"]] == ["pass"] * 3
    assert [r["status"] for r in groups["memory"]] == ["pass", "pass", "skip"]
    # The 20-step samples are held here (and only here: one run each in the suite): fp32 within 1e-5 of the
    # official sample (tests/test_parity.py's bound), bf16 within 1.5x the official bf16 path and not float32
    # in disguise (tests/test_bf16.py's criterion)
    assert all(0.05 < r["numbers"]["ratio"] <= 1.5 for r in groups["bf16"])
    assert all(r["numbers"]["value"] <= 1e-5 for r in groups["parity"])
    names = {r["name"] for r in rows}
    assert {"fp32 20-step sample vs official", "bf16 20-step sample vs official fp32"} <= names
    speed = [r for r in groups["speed"] if r["status"] == "info"]
    assert speed[0]["numbers"]["block_s"] > 0 and groups["plan"][0]["numbers"]["seconds"] > 0
    for r in groups["memory"][:2] + speed:  # the slab's set-up and one call's puts, measured on their own
        assert r["numbers"]["pin_s"] >= 0 and r["numbers"]["put_s"] > 0 and r["numbers"]["put_bytes"] > 0
    for r in groups["memory"][:2]:  # CUDA's allocator figures: absent on the CPU
        assert r["numbers"]["max_memory_reserved"] is None and r["numbers"]["mem_get_info_drop"] is None
    skipped = {r["name"]: r["value"] for r in rows if r["status"] == "skip"}
    assert "CUDA only" in skipped["attention kernels (SDPA backends)"]
    text = report.read_text()
    assert text.startswith("## `infdit selftest` on cpu") and text.count("\n| ") == len(rows) + 1


@pytest.mark.skipif(not (SHARED / "upstream-a-bf16" / "io.safetensors").is_file(),
                    reason="no ../shared fixtures")
def test_packaged_fixtures_are_the_full_ones_reduced():
    """Every tensor the package ships (and rebuilds for the bf16 fixture) equals the full fixtures' own."""
    packed, full = selftest.find_fixtures(), selftest.find_fixtures(SHARED)
    assert packed.where == selftest.DATA and full.where == SHARED
    assert packed.checkpoint.read_bytes() == full.checkpoint.read_bytes() == full.checkpoint_bf16.read_bytes()
    assert packed.config == full.config
    for mine, theirs in ((packed.io, full.io), (packed.bio, full.bio)):
        assert set(mine) < set(theirs)
        for k, v in mine.items():
            assert v.dtype == theirs[k].dtype and torch.equal(v, theirs[k]), k


def test_selftest_missing_fixtures_is_one_line(tmp_path):
    res = run_cli("selftest", "--device", "cpu", "--fixtures", tmp_path / "nowhere")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--fixtures" in lines[0]


def test_selftest_never_overwrites_a_report(tmp_path):
    out = tmp_path / "r.md"
    out.write_text("precious")
    res = run_cli("selftest", "--device", "cpu", "-o", out)
    assert res.returncode == 1 and "--overwrite" in res.stderr
    assert out.read_text() == "precious"


def test_one_pinned_slab_per_mode_in_each_check(monkeypatch):
    """Pin once: every K/V slab an engine makes is counted as CUDA would pin it (the CPU run is made to
    pin, `storage._pin` counts), per check, with the measuring processes run in this one. A check times
    several calls of each mode; it must make one slab per mode with a cache, not one per call."""
    from infdit_cli.engine import blocks as engine
    from infdit_cli.engine import storage

    pins: list[int] = []
    monkeypatch.setattr(storage, "_pin", lambda t: pins.append(t.numel()) or (lambda t: None))  # -> its unpin
    real = storage.Scratch
    monkeypatch.setattr(engine, "Scratch", lambda folder=None, *, pin=False,
                        **kw: real(folder, pin=True, **kw))
    monkeypatch.setattr(selftest, "_spawn", lambda work, timeout=0: selftest._work(work))
    # tiny at 96² (6x6 blocks): fast; a budget that makes every plan a block mode (n = 4) with a cache
    profile = replace(selftest.TOY_PROFILE, config="tiny", budget=22 * 2**20, mem_sizes=(96,),
                      speed_sizes=(96,), big=(24, 96), rounds=2)
    run = selftest._Run(torch.device("cpu"), profile, None)
    counts = {}
    for step in selftest._steps(run, 1e10):
        if step.group in ("memory", "speed", "plan"):
            pins.clear()
            got = step.run()
            counts[step.label] = (len(pins), got.numbers.get("n"), got.status)
    assert counts["peak memory at 96²"][:2] == (1, 4), counts  # a warm-up and a measured call: one slab
    assert counts["speed at 96²"][:2] == (1, 4), counts  # 3 rounds of n=4 and of the whole image: one slab
    assert counts["one call at 96²"][:2] == (1, 4), counts  # made (and its puts timed) before the timed call
    assert counts["default plan"][0] == 0 and counts["attention kernels"][0] == 0  # skipped on the CPU


def test_put_seconds_is_one_calls_puts():
    """`_put_seconds` copies as many (block, layer) entries as one call stores: 2x2 blocks at n=1 store
    3 blocks (the last is read by none), each for every layer."""
    from infdit_cli.model.config import PRESETS
    from infdit_cli.model.infdit import random_model

    cfg = PRESETS["tiny"]
    model = random_model(cfg, seed=0)
    x, lr_up, lr, vec = selftest._random_inputs(cfg, 2 * cfg.block_size, torch.device("cpu"))
    whole = selftest._engine(model, lr_up, (lr, vec))
    whole.prepare()
    assert selftest._put_seconds(whole) == (None, 0)
    eng = selftest._engine(model, lr_up, (lr, vec), n=1)
    eng.prepare()
    sec, nbytes = selftest._put_seconds(eng)
    entry = eng.cache.slab[0, 0, 0]
    assert sec > 0 and nbytes == 3 * cfg.num_layers * 2 * entry.numel() * entry.element_size()


def test_without_fixtures_only_the_rows_that_need_them_are_skipped(tmp_path):
    """Without fixtures, the parity and bf16 rows are "skip" rows that say so; the memory and speed checks
    are still planned (here not run, for a time budget of 8 s that their predictions overrun;
    tests/test_gpu_script.py runs them without fixtures)."""
    (tmp_path / "empty").mkdir()
    report = selftest.run_selftest(device="cpu", fixtures=tmp_path / "empty", time_budget=8.0)
    why = "no fixtures"
    rows = {g: [c for c in report.checks if c.group == g] for g in ("parity", "bf16", "memory", "speed")}
    assert len(rows["parity"]) + len(rows["bf16"]) == 4
    assert all(c.status == "skip" and why in c.value for c in rows["parity"] + rows["bf16"])
    assert [c.status for c in rows["memory"]][:2] == ["skip", "skip"]
    assert all("not run: predicted" in c.value for c in rows["memory"][:2])
