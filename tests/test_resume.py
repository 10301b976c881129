"""Checkpoints and resume: killed and interrupted runs continue to the very same bytes; stale or damaged
run folders are refused with one line; a preview is written after every step."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import JOB_ARGS, JOB_STEPS, default_signals, rgb_image, run_cli
from PIL import Image

from infdit_cli.events import CheckpointDiscarded, CheckpointWritten, Resumed, StepDone
from infdit_cli.jobs import pipeline
from infdit_cli.jobs.checkpoint import run_folder_for
from infdit_cli.jobs.pipeline import UpscaleOptions, predicted_seconds
from infdit_cli.jobs.upscaler import Upscaler

STEPS = JOB_STEPS
ARGS = JOB_ARGS


@pytest.fixture
def job(reference_job):
    """An input and the output of an uninterrupted run (no checkpoints): the session's reference job."""
    return reference_job


def _saved(folder: Path) -> tuple[int, int] | None:
    try:
        m = json.loads((folder / "meta.json").read_text())
        return m["pass"], m["step"]
    except (OSError, ValueError, KeyError):
        return None


def _start(src, out, weights, *extra, cmd="upscale") -> subprocess.Popen:
    exe = Path(sys.executable).with_name("infdit")
    return subprocess.Popen([str(exe), cmd, str(src), "-o", str(out), *ARGS, "--weights", str(weights),
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)


def _stop_at(proc: subprocess.Popen, folder: Path, at: tuple[int, int], sig: int) -> str:
    """Send `sig` once the checkpoint of (pass, step) `at` (or a later one) is committed."""
    deadline = time.monotonic() + 120
    while (_saved(folder) or (0, 0)) < at:
        assert proc.poll() is None, proc.communicate()  # it must not finish before we stop it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return err


@pytest.mark.slow
@pytest.mark.parametrize("sig,at", [(signal.SIGKILL, (1, 2)), (signal.SIGINT, (1, 1)),
                                    (signal.SIGKILL, (2, 1)), (signal.SIGINT, (2, 2))],
                         ids=["kill-pass1", "int-pass1", "kill-pass2", "int-pass2"])
def test_stopped_run_resumes_to_the_same_bytes(tmp_path, job, tiny_weights, sig, at):
    src, ref = job
    out = tmp_path / "out.png"
    folder = run_folder_for(out)
    proc = _start(src, out, tiny_weights, "--checkpoint")
    err = _stop_at(proc, folder, at, sig)
    saved = _saved(folder)
    assert saved is not None and saved >= at
    assert not out.exists()  # no partial output
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: interrupted; ") and "Traceback" not in err
        assert f"pass {saved[0]}/2, step {saved[1]}/{STEPS} saved in {folder}" in last
        assert "on disk): run the same command again to resume" in last
        # only the last checkpoint is kept: meta.json, x of that step, and pass 2's input
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted([".infdit", "meta.json", f"x.p{saved[0]}.s{saved[1]}.bin"]
                               + (["input.p2.bin"] if saved[0] == 2 else [])), names
    else:
        assert proc.returncode == -signal.SIGKILL
    res = run_cli("upscale", src, "-o", out, *ARGS, "--weights", tiny_weights)  # default: the folder is found
    assert res.returncode == 0, res.stderr
    assert f"resuming at pass {saved[0]}/2, step {saved[1]}/{STEPS} (saved " in res.stderr
    assert out.read_bytes() == ref  # bit-identical to the uninterrupted run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # run folder removed


def test_low_memory_state_is_the_checkpoint(tmp_path, job, tiny_weights):
    """Under --low-memory the mapped x file is what the checkpoint names (no copy), and it resumes exactly,
    also into a run that is not low-memory and has another block batch."""
    src, ref = job
    out = tmp_path / "out.png"
    folder = run_folder_for(out)
    proc = _start(src, out, tiny_weights, "--checkpoint", "--low-memory", "--block-batch", "2")
    err = _stop_at(proc, folder, (2, 1), signal.SIGINT)
    assert proc.returncode == 130, err
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["x"]["file"].startswith(f"p{meta['pass']}_heun_x")  # the sampler's own mapped file
    assert sorted(p.name for p in folder.iterdir()) == sorted([".infdit", "meta.json", "input.p2.bin",
                                                                  meta["x"]["file"]])
    res = run_cli("upscale", src, "-o", out, *ARGS, "--weights", tiny_weights, "--low-memory",
                  "--block-batch", "2")
    assert res.returncode == 0, res.stderr
    assert "resuming at pass 2/2" in res.stderr
    assert out.read_bytes() == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# -- the library, in process -------------------------------------------------------------------------

class Stop(Exception):
    pass


def _stop_after(pass_: int, step: int, seen: list):
    def on_event(e):
        seen.append(e)
        if isinstance(e, CheckpointWritten) and (e.pass_, e.step) == (pass_, step):
            raise Stop

    return on_event


@pytest.fixture(scope="module")
def lib(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("lib")
    src = d / "in.png"
    Image.fromarray(rgb_image(12, 14, 3)).save(src)
    up = Upscaler(tiny_model, options=UpscaleOptions(steps=3))
    ref = d / "ref.png"
    up.upscale_file(src, ref, scale=8, checkpoint=False)
    return up, src, ref


def _interrupt(up, src, out, at=(1, 2), **kw):
    seen = []
    with pytest.raises(Stop):
        up.upscale_file(src, out, scale=8, checkpoint=True, on_event=_stop_after(*at, seen), **kw)
    assert _saved(run_folder_for(out)) == at
    return seen


def _events(up, src, out, **kw):
    seen = []
    up.upscale_file(src, out, scale=8, on_event=seen.append, **kw)
    return seen


def test_other_block_batch_resumes_within_the_block_tolerance(tmp_path, lib):
    up, src, ref = lib
    out = tmp_path / "out.png"
    _interrupt(up, src, out, at=(2, 1))  # whole-image plan
    opts = UpscaleOptions(steps=3, block_batch=1)  # 1x1 blocks with the K/V cache from now on
    seen = _events(up, src, out, options=opts)
    assert any(isinstance(e, Resumed) and (e.pass_, e.step) == (2, 1) for e in seen)
    a, b = np.asarray(Image.open(ref), np.int16), np.asarray(Image.open(out), np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # 8-bit: at most one level of rounding
    assert (a == b).mean() > 0.99


@pytest.mark.parametrize("change", ["input", "weights", "options"])
def test_a_changed_job_is_not_resumed(tmp_path, lib, tiny_config, change):
    from infdit_cli.model.infdit import random_model

    up, src, ref = lib
    out = tmp_path / "out.png"
    _interrupt(up, src, out)
    kw, expect, other = {}, ref.read_bytes(), up
    if change == "input":
        src2 = tmp_path / "in.png"
        Image.fromarray(rgb_image(12, 14, 9)).save(src2)
        src, expect = src2, None
    elif change == "weights":
        other = Upscaler(random_model(tiny_config, seed=5), options=up.options)
        expect = None
    else:
        kw["options"] = UpscaleOptions(steps=3, seed=1)
        expect = None
    seen = _events(other, src, out, **kw)
    why = [e.reason for e in seen if isinstance(e, CheckpointDiscarded)]
    assert why == [{"input": "the input file changed", "weights": "the weights changed",
                    "options": "made with other options (seed 0 -> 1)"}[change]]
    assert not any(isinstance(e, Resumed) for e in seen)
    assert sum(isinstance(e, StepDone) for e in seen) == 2 * 3  # started over: every step of both passes
    fresh = tmp_path / "fresh.png"
    other.upscale_file(src, fresh, scale=8, checkpoint=False, **kw)
    assert out.read_bytes() == fresh.read_bytes()  # the result of the changed job, not a mix
    if expect is not None:
        assert out.read_bytes() == expect
    assert not run_folder_for(out).exists()


@pytest.mark.parametrize("damage", ["truncated", "header", "missing"])
def test_a_damaged_checkpoint_is_discarded(tmp_path, lib, damage):
    up, src, ref = lib
    out = tmp_path / "out.png"
    _interrupt(up, src, out, at=(1, 2))
    folder = run_folder_for(out)
    meta = json.loads((folder / "meta.json").read_text())
    x = folder / meta["x"]["file"]
    if damage == "truncated":
        with open(x, "r+b") as f:
            f.truncate(x.stat().st_size - 7)
    elif damage == "header":
        (folder / "meta.json").write_text('{"format": 1, "fingerprint": {"inpu')
    else:
        x.unlink()
    seen = _events(up, src, out)
    why = [e.reason for e in seen if isinstance(e, CheckpointDiscarded)]
    assert len(why) == 1 and why[0].startswith("damaged"), why
    if damage == "truncated":
        assert f"{x.name} is {x.stat().st_size if x.exists() else 0}" in why[0] or "bytes, expected" in why[0]
    assert not any(isinstance(e, Resumed) for e in seen)
    assert out.read_bytes() == ref.read_bytes()


def test_no_resume_starts_over_and_success_removes_the_folder(tmp_path, lib):
    up, src, ref = lib
    out = tmp_path / "out.png"
    _interrupt(up, src, out)
    seen = _events(up, src, out, resume=False)
    assert not any(isinstance(e, (Resumed, CheckpointDiscarded)) for e in seen)
    assert sum(isinstance(e, StepDone) for e in seen) == 6
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_checkpoint_dir_and_events(tmp_path, lib):
    up, src, ref = lib
    out, folder = tmp_path / "out.png", tmp_path / "runs" / "job1"
    seen = []
    with pytest.raises(Stop):
        up.upscale_file(src, out, scale=8, checkpoint=True, checkpoint_dir=folder,
                        on_event=_stop_after(2, 1, seen))
    written = [e for e in seen if isinstance(e, CheckpointWritten)]
    assert [(e.pass_, e.step) for e in written] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert all(e.path == str(folder) and e.nbytes > 0 for e in written)
    assert written[-1].nbytes == 3 * 112 * 96 * 4  # x of pass 2: its padded canvas, float32
    assert _saved(folder) == (2, 1) and not run_folder_for(out).exists()
    seen = _events(up, src, out, checkpoint_dir=folder)
    assert [(e.pass_, e.passes, e.step, e.steps) for e in seen if isinstance(e, Resumed)] == [(2, 2, 1, 3)]
    assert out.read_bytes() == ref.read_bytes() and not folder.exists()


def test_checkpoints_default_from_the_time_estimate(tmp_path, lib, monkeypatch):

    up, src, _ = lib
    plan = up.plan((12, 14), scale=8)
    assert 0 < predicted_seconds(plan) < 1  # the tiny model: far below the 5-minute threshold
    seen = _events(up, src, tmp_path / "a.png")
    assert not any(isinstance(e, CheckpointWritten) for e in seen)
    monkeypatch.setattr(pipeline, "CHECKPOINT_AFTER", 0.0)  # as if the job were long
    seen = _events(up, src, tmp_path / "b.png")
    assert sum(isinstance(e, CheckpointWritten) for e in seen) == 6


def test_official_estimate_is_in_the_issue_range():
    """The estimate behind the default: a 4096^2 job of the official model is ~70 PFLOP (issue 16), so
    minutes on a CUDA card (nominal rates) and far beyond 5 minutes on a 2-core CPU's; a 512^2 job on
    CUDA takes seconds."""
    from infdit_cli.jobs.pipeline import UpscaleOptions, plan_upscale
    from infdit_cli.model.config import PRESETS
    from infdit_cli.plan.planner import Rates, flops_per_call

    cfg = PRESETS["official"]
    assert 50e15 < 39 * flops_per_call(cfg, 4096, 4096) < 90e15
    gpu = UpscaleOptions(mem_budget=80 << 30, host_budget=256 << 30)
    s = plan_upscale(cfg, (1024, 1024), (4096, 4096), gpu, dtype=torch.bfloat16, device="cuda").seconds
    assert 60 < s < 3600, s
    cpu = Rates(flops=100e9, op_seconds=3e-6, copy_bytes=5e9)  # about what calibrate measured here (official)
    opts = UpscaleOptions(mem_budget=200 << 30, host_budget=256 << 30)
    assert plan_upscale(cfg, (1024, 1024), (4096, 4096), opts, rates=cpu).seconds > 300
    assert plan_upscale(cfg, (128, 128), (512, 512), gpu, dtype=torch.bfloat16, device="cuda").seconds < 300


# -- preview --------------------------------------------------------------------------------------------

def test_preview_after_every_step(tmp_path, lib):
    up, src, ref = lib
    shots = []
    up.upscale_file(src, tmp_path / "out.png", scale=8, on_preview=lambda im: shots.append(im.clone()))
    assert len(shots) == 2 * 3
    assert [tuple(s.shape) for s in shots] == [(1, 3, 48, 56)] * 3 + [(1, 3, 96, 112)] * 3  # each pass's size
    assert all(float(s.min()) >= 0 and float(s.max()) <= 1 for s in shots)
    for a, b in zip(shots[:2], shots[1:3]):
        assert (a - b).abs().max() > 1e-3  # the estimate changes from step to step


def test_preview_is_downscaled_in_row_chunks():
    from infdit_cli.jobs.pipeline import preview_image

    den = torch.rand(1, 3, 4200, 100) * 2 - 1
    small = preview_image(den, (4100, 90))  # the valid region, then f = 3
    assert small.shape == (1, 3, 1366, 30)
    expect = torch.nn.functional.avg_pool2d(den[..., : 1366 * 3, :90], 3).add(1).div(2)
    torch.testing.assert_close(small, expect, atol=1e-6, rtol=0)
    same = preview_image(den[..., :64, :80], (64, 80))
    torch.testing.assert_close(same, den[..., :64, :80].add(1).div(2), atol=0, rtol=0)


def test_cli_preview_file(tmp_path, tiny_weights):
    src = tmp_path / "in.png"
    Image.fromarray(rgb_image(8, 10, 4)).save(src)
    out, prev = tmp_path / "out.png", tmp_path / "watch.jpg"
    res = run_cli("upscale", src, "-o", out, *ARGS, "--weights", tiny_weights, "--preview", prev)
    assert res.returncode == 0, res.stderr
    with Image.open(prev) as im:
        assert im.format == "JPEG" and im.size == (80, 64)  # the last pass's estimate, full size here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png", "watch.jpg"]
    o2 = tmp_path / "o2.png"
    bad = run_cli("upscale", src, "-o", o2, *ARGS, "--weights", tiny_weights, "--preview", o2)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --preview")


def test_batch_interrupted_mid_file_resumes_it_and_skips_the_done_ones(tmp_path, job, tiny_weights):
    src, ref = job
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    Image.fromarray(rgb_image(8, 10, 7)).save(root / "a.png")  # small: done before b starts
    (root / "b.png").write_bytes(src.read_bytes())  # the job: its uninterrupted output is `ref`
    proc = _start(root, out, tiny_weights, "--checkpoint", cmd="batch")
    err = _stop_at(proc, run_folder_for(out / "b.png"), (1, 2), signal.SIGINT)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted after 1 file(s); b.png: pass ") and \
        "run the same command" in last
    a_bytes = (out / "a.png").read_bytes()
    assert not (out / "b.png").exists()
    res = run_cli("batch", root, "-o", out, *ARGS, "--weights", tiny_weights, "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert {i["input"].rsplit("/", 1)[-1]: i["status"] for i in summary["items"]} == {"a.png": "skipped",
                                                                                      "b.png": "done"}
    assert "resuming at pass 1/2, step " in res.stderr
    assert (out / "b.png").read_bytes() == ref and (out / "a.png").read_bytes() == a_bytes
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_progress_shows_the_whole_job_and_the_resume(tmp_path, lib):
    """The rich display (as on a terminal) gets a job bar over all passes, weighted by each pass's compute,
    and starts it at the saved point when resuming."""
    import io

    from rich.console import Console

    from infdit_cli.cli._progress import RichDisplay

    up, src, _ = lib
    out = tmp_path / "out.png"
    _interrupt(up, src, out, at=(2, 1))
    buf = io.StringIO()
    display = RichDisplay(Console(file=buf, force_terminal=True, width=150))
    levels = []

    def on_event(e):
        display(e)
        if display.job_task is not None:
            levels.append(display.overall.tasks[-1].completed)

    display.start(1, calls_per_pass=5)
    display.image("in.png")
    up.upscale_file(src, out, scale=8, on_event=on_event)
    display.stop()
    text = buf.getvalue()
    assert "resuming at pass 2/2, step 1/3 (saved " in text and "job, 2 pass(es)" in text
    w = display.work
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-9 and w[1] > 2 * w[0]  # pass 2 has 3.5x the pixels
    resumed = 100 * (w[0] + w[1] * 2 / 5)  # all of pass 1, 2 of pass 2's 5 calls
    assert abs(levels[1] - resumed) < 1e-6 and abs(levels[-1] - 100) < 1e-6
