"""The pipeline at the memory level: lazily upsampled conditioning, memory-mapped state, host planning,
out-of-memory learned across passes, and interruption leaving nothing behind."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import default_signals, run_cli
from PIL import Image

from infdit_cli.events import PlanChanged
from infdit_cli.images.load import resize
from infdit_cli.jobs.pipeline import Upsampled, UpscaleOptions, plan_upscale, upscale
from infdit_cli.plan.grid import BlockRect
from infdit_cli.plan.planner import batch_device_bytes


@pytest.mark.parametrize("scale", [2, 4])
def test_upsampled_slices_are_the_whole_resize(scale):
    """Each slice computed from its own source pixels (plus halo) has the very bits of the whole resize."""
    src = torch.rand(1, 3, 29, 41, generator=torch.Generator().manual_seed(0)) * 2 - 1
    size = (29 * scale, 41 * scale)
    ref = resize(src, size).clamp(-1, 1)
    up = Upsampled(src, size)
    assert up.shape == ref.shape
    for ys, xs in [(slice(0, 16), slice(0, 16)), (slice(16, 48), slice(32, 80)),
                   (slice(40, None), slice(5, 9)),
                   (slice(None), slice(None)), (slice(size[0] - 3, None), slice(size[1] - 16, None))]:
        assert torch.equal(up[..., ys, xs], ref[..., ys, xs]), (ys, xs)


def _run(model, rgb, opts, **kw):
    cfg = model.config
    target = (rgb.shape[-2] * 4, rgb.shape[-1] * 4)
    up_plan = plan_upscale(cfg, tuple(rgb.shape[-2:]), target, opts)
    return upscale(model, rgb, up_plan, opts, **kw), up_plan


@pytest.fixture(scope="module")
def rgb():
    return torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(tiny_model, rgb):
    out, _ = _run(tiny_model, rgb, UpscaleOptions(steps=2, block_batch=2, low_memory=False))
    return out.clone()


def test_compile_option_reaches_the_engine(tiny_model, rgb, reference, monkeypatch):
    """`UpscaleOptions.compile` runs every pass's layers through torch.compile (a backend name here:
    "aot_eager" traces like Inductor without generating code), with the eager pixels."""
    from infdit_cli.engine import blocks as engine

    backends = []
    real = engine.compiled_kernels
    monkeypatch.setattr(engine, "compiled_kernels", lambda b: backends.append(b) or real("aot_eager"))
    out, up_plan = _run(tiny_model, rgb, UpscaleOptions(steps=2, block_batch=2, low_memory=False,
                                                        compile=True))
    assert backends == ["inductor"] * len(up_plan.passes)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)


def test_low_memory_gives_the_same_bits(tiny_model, rgb, reference, tmp_path):
    out, up_plan = _run(tiny_model, rgb, UpscaleOptions(steps=2, block_batch=2, low_memory=True),
                        scratch_dir=str(tmp_path))
    assert all(p.memory.low_memory for p in up_plan.passes)
    assert torch.equal(out, reference)
    assert list(tmp_path.iterdir()) == []  # scratch folder removed


def test_placements_agree_with_the_whole_image(tiny_model, rgb, reference):
    whole, _ = _run(tiny_model, rgb, UpscaleOptions(steps=2, block_batch=None, low_memory=False))
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=0)
    assert (whole * 255).round().equal((reference * 255).round())


def test_out_of_memory_mid_pass_keeps_the_smaller_plan(tiny_model, rgb, reference):
    """From the third denoiser call on, a 2x2 batch no longer fits: the engine steps down to n=1 and keeps
    it (one change reported); the result stays within the block tolerance of the n=2 run and, where
    n=1 ran from the start, equals the n=1 run."""
    cfg = tiny_model.config
    two = batch_device_bytes(cfg, BlockRect(0, 2, 0, 2, 5, 7), 1, torch.float32, False)
    calls = {"batches": 0}
    per_call = 3 * 4  # 5x7 grid at n=2: 3 x 4 rectangles

    def fault(nbytes):
        calls["batches"] += 1
        if calls["batches"] > 2 * per_call and nbytes >= two:
            raise torch.OutOfMemoryError("simulated")

    events = []
    out, _ = _run(tiny_model, rgb, UpscaleOptions(steps=2, block_batch=2, low_memory=False), fault=fault,
                  on_event=events.append)
    changes = [(e.old, e.new) for e in events if isinstance(e, PlanChanged)]
    assert changes == [("n=2", "n=1")]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert (out * 255).round().equal((reference * 255).round())


def test_out_of_memory_at_the_leanest_plan_exits_3_without_output(tmp_path, tiny_weights, monkeypatch):
    """The CLI: nothing fits -> exit 3, one line, no output and no scratch left."""
    src = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)).save(src)
    code = ("import sys, torch\n"
            "from infdit_cli.engine import blocks as engine\n"
            "def fault(nbytes): raise torch.OutOfMemoryError('simulated')\n"
            "orig = engine.BlockEngine.__init__\n"
            "def init(self, *a, **k): k['fault'] = fault; orig(self, *a, **k)\n"
            "engine.BlockEngine.__init__ = init\n"
            "from infdit_cli.cli.app import main\n"
            "sys.argv = ['infdit'] + sys.argv[1:]\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code, "upscale", str(src), "-o", str(tmp_path / "b.png"),
                          "--scale", "4", "--steps", "2", "--device", "cpu", "--weights", str(tiny_weights),
                          "--block-batch", "2", "--low-memory"], capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    first, *warnings, last = res.stderr.strip().splitlines()
    assert first.startswith("predicted ") and \
        last.startswith("error: out of device memory even at block batch 1")
    assert warnings == ["warning: out of memory with n=2; continuing with n=1",  # each step down, once
                        "warning: out of memory with n=1; continuing with n=1, cache on host"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_host_memory_refused_before_any_weights(tmp_path):
    """A job the host cannot hold is refused with the numbers (exit 2), even with no weights at all."""
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((625, 625, 3), np.uint8)).save(src)  # 3 passes of 4x
    res = run_cli("upscale", src, "--res", "40000", "--device", "cpu", "--no-low-memory",
                  "--weights", tmp_path / "missing.safetensors")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert line.startswith("error: a ") and "of host memory" in line and "available" in line
    assert "--low-memory" in line
    planned = run_cli("upscale", src, "--res", "40000", "--device", "cpu", "--dry-run", "--json")
    # the planner turns --low-memory on by itself; the plan is shown even where the disk is too small for
    # its ~220 GiB of scratch files, which the dry run then refuses as the real run would (issue 21)
    assert planned.returncode == 0 or (planned.returncode == 2 and planned.stderr.startswith(
        "error: not enough disk in ")), planned.stderr
    import json

    mem = json.loads(planned.stdout)["plan"]["passes"][-1]["memory"]
    assert mem["low_memory"] and mem["host_peak_bytes"] <= mem["host_budget"]
    assert mem["device_peak_bytes"] < mem["host_peak_bytes"]  # on the CPU: the same memory less the runtime


@pytest.mark.slow
def test_sigint_with_low_memory_leaves_nothing(tmp_path, tiny_weights):
    src = tmp_path / "big.png"
    Image.fromarray((np.random.default_rng(1).random((96, 96, 3)) * 255).astype(np.uint8)).save(src)
    exe = Path(sys.executable).with_name("infdit")
    proc = subprocess.Popen([str(exe), "upscale", str(src), "-o", str(tmp_path / "out.png"), "--scale", "4",
                             "--steps", "400", "--device", "cpu", "--weights", str(tiny_weights),
                             "--low-memory",
                             "--block-batch", "2", "--no-checkpoint"],  # (a job this long would checkpoint)
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".infdit-") for p in tmp_path.iterdir()):  # sampling has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]


@pytest.mark.skip(reason="CPU jobs are not observed (a stopped or slowed CPU job poisoned the cache); "
                         "to be made a CUDA-placement test")
def test_the_observed_pace_leaves_out_checkpoint_saves(tiny_model, rgb, tmp_path, monkeypatch):
    """The per-call time a job hands `calibrate.observe` is the sampler's own: a checkpoint save (here a
    slow fake, 0.5 s a step) between the steps is not a model call's time."""
    import infdit_cli.jobs.pipeline as pipeline_mod
    import infdit_cli.plan.calibrate as calibrate_mod
    from infdit_cli.jobs.checkpoint import RunFolder
    from infdit_cli.plan.planner import Rates

    opts = UpscaleOptions(steps=4, low_memory=False)
    rates = Rates(flops=1e9, op_seconds=1e-6, copy_bytes=1e9, source="measured")
    up_plan = plan_upscale(tiny_model.config, tuple(rgb.shape[-2:]), (rgb.shape[-2] * 4, rgb.shape[-1] * 4),
                           opts, rates=rates)
    seen, saves = [], []
    monkeypatch.setattr(calibrate_mod, "observe", lambda *a: seen.append(a[5:]))
    monkeypatch.setattr(pipeline_mod._Checkpointer, "save", lambda *a: (saves.append(1), time.sleep(0.5)))
    t = time.perf_counter()
    upscale(tiny_model, rgb, up_plan, opts, run=RunFolder(tmp_path / "run", {}))
    took = time.perf_counter() - t
    assert len(saves) == 4 and len(seen) == 1
    per_call, calls = seen[0]
    # 3 of the saves (1.5 s) fall between the first and the last stamp: counted, the calls took >= 1.5 s
    assert calls >= 4 and per_call * calls < 1.5, (per_call, calls, took)
