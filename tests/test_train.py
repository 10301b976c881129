"""`infdit train` (issue 34): the loss is the inference path's, batches average, a SIGTERM then the same
command resumes bit-identically, two gloo ranks equal one process, the output loads in upscale and info,
bad data is one line each. Tiny config, 32 px crops, a few steps, CPU only."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infdit_cli.cli.app import main
from infdit_cli.engine.blocks import denoise
from infdit_cli.errors import BadRequest
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model
from infdit_cli.train.data import scan
from infdit_cli.train.loop import TrainConfig, provenance, train
from infdit_cli.train.recipe import batch_loss, loss_weight

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "INFDIT_RANK_TIMEOUT": "120"}
ENV.pop("OMP_NUM_THREADS", None)  # the threads of this process: bit-identity needs the same reductions
STEPS, BATCH, CROP = 3, 2, 32
ARGS = ["--config", "tiny", "--steps", str(STEPS), "--batch", str(BATCH), "--crop", str(CROP), "--every", "2",
        "--workers", "0", "--device", "cpu", "--seed", "5"]


def photos(folder: Path, n: int = 4, size=(48, 56)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        base = rng.random((size[0] // 8, size[1] // 8, 3))  # smooth: blocks of 8 px, plus some noise
        img = np.kron(base, np.ones((8, 8, 1))) * 0.8 + rng.random((*size, 3)) * 0.2
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def config(data: Path, out: Path, **kw) -> TrainConfig:
    """The TrainConfig the CLI makes of `ARGS`."""
    return TrainConfig(data=data, output=out, config="tiny", steps=STEPS, batch=BATCH, crop=CROP, every=2,
                       workers=0, device="cpu", seed=5, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run in this process: (data folder, output file)."""
    root = tmp_path_factory.mktemp("train")
    data = photos(root / "data")
    out = root / "ref.safetensors"
    train(config(data, out))
    return data, out


def fixed_batch(model, b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = model.config.sr_scale
    lr = torch.rand(b, 3, CROP // s, CROP // s, generator=g) * 2 - 1
    return {"hr": torch.rand(b, 3, CROP, CROP, generator=g) * 2 - 1, "lr": lr,
            "lr_up": torch.nn.functional.interpolate(lr, scale_factor=s, mode="bicubic").clamp(-1, 1),
            "noise": torch.randn(b, 3, CROP, CROP, generator=g), "sigma": torch.tensor([0.3, 2.5])[:b]}


def trainable(model):
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("clip."))
    return model


# --- the loss ---------------------------------------------------------------------------------------------

def test_training_loss_is_l2_through_the_inference_denoiser():
    model = trainable(random_model(PRESETS["tiny"], seed=3))
    b = fixed_batch(model)
    loss, per = batch_loss(model, model, b)  # origin (0, 0): the inference positions
    vec = model.encode_image(b["lr"])
    s = b["sigma"].view(-1, 1, 1, 1)
    d = denoise(model, b["hr"] + s * b["noise"], b["sigma"], lr_up=b["lr_up"], lr=b["lr"], vector=vec,
                block_batch=1)  # the engine: 1 x 1 blocks with its K/V cache
    want = (loss_weight(s) * (d - b["hr"]) ** 2).flatten(1).mean(1)
    assert torch.allclose(per.double(), want.double(), rtol=1e-6, atol=1e-6), (per, want)
    assert abs(loss.item() - want.mean().item()) <= 1e-6 * max(1.0, want.mean().item())


def test_a_batch_of_two_is_the_mean_of_two_singles_in_loss_and_gradients():
    model = trainable(random_model(PRESETS["tiny"], seed=4))
    params = [p for p in model.parameters() if p.requires_grad]
    b = fixed_batch(model)
    loss, _ = batch_loss(model, model, b)
    both = torch.autograd.grad(loss, params)
    singles, grads = [], []
    for i in range(2):
        li, _ = batch_loss(model, model, {k: v[i:i + 1] for k, v in b.items()})
        singles.append(li.item())
        grads.append(torch.autograd.grad(li, params))
    assert abs(loss.item() - sum(singles) / 2) <= 1e-6 * max(1.0, abs(loss.item()))
    for g, g0, g1 in zip(both, *grads):
        torch.testing.assert_close(g, (g0 + g1) / 2, rtol=1e-5, atol=1e-7)
    assert singles[0] != pytest.approx(singles[1])  # two different samples: the mean is not trivially one


# --- resume -------------------------------------------------------------------------------------------------

STOPPER = textwrap.dedent("""
    import os, signal, sys
    from infdit_cli.train import recipe
    real = recipe.batch_loss
    calls = [0]
    def batch_loss(*a, **k):
        calls[0] += 1
        if calls[0] == 2:  # inside step 2 (one micro-batch per step): a real SIGTERM, mid-step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    recipe.batch_loss = batch_loss
    from infdit_cli.cli.app import main
    sys.argv = ["infdit", *sys.argv[1:]]
    main()
""")


def test_sigterm_then_the_same_command_gives_bit_identical_weights(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-c", STOPPER, "train", str(data), "-o", str(out), *ARGS]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 143, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: terminated by SIGTERM") and "run the same command again" in line, \
        res.stderr
    assert not out.exists()
    meta = json.loads((tmp_path / ".m.safetensors.infdit-train" / "meta.json").read_text())
    assert meta["step"] == 2  # step 2 finished, then saved at its boundary
    result = train(config(data, out))  # the same command (workers do not matter)
    assert result.resumed_from == 2
    got, want = load_file(str(out)), load_file(str(ref))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_run_folder_of_other_options_is_refused(reference, tmp_path):
    data, _ = reference
    out = tmp_path / "m.safetensors"
    folder = tmp_path / ".m.safetensors.infdit-train"
    from infdit_cli.train.loop import TrainRun

    TrainRun(folder, {"lr": 1.0}).save(1, {"x": torch.zeros(1)})
    with pytest.raises(BadRequest, match="other options"):
        train(config(data, out))
    assert folder.exists() and not out.exists()


def test_sigma_options_set_the_sampled_and_validation_sigmas(reference, monkeypatch, capsys):
    from infdit_cli.train.data import TrainSet
    from infdit_cli.train.loop import recipe_for, val_sigmas

    data, ref = reference
    items = scan(data, crop=CROP, scale=4)

    def sigmas(cfg: TrainConfig) -> torch.Tensor:
        ts = TrainSet(items, crop=CROP, scale=4, seed=5, recipe=recipe_for(cfg))
        return torch.stack([ts[pos]["sigma"] for pos in range(8)]).double()

    official, shifted = sigmas(config(data, ref)), sigmas(config(data, ref, sigma_mean=3.0, sigma_std=0.5))
    z = (official.log() + 1.0) / 1.4  # the same standard normal draws, now at mean 3 and std 0.5
    torch.testing.assert_close(shifted.log(), 3.0 + 0.5 * z, rtol=0, atol=1e-5)
    med = val_sigmas(recipe_for(config(data, ref, sigma_mean=3.0)))[2].item()
    assert med == pytest.approx(np.exp(3.0), rel=1e-5)
    assert val_sigmas(recipe_for(config(data, ref)))[2].item() == pytest.approx(np.exp(-1.0), rel=1e-5)
    prov = provenance(ref)
    assert (prov["sigma_mean"], prov["sigma_std"]) == (-1.0, 1.4)  # the official defaults
    monkeypatch.setattr(sys, "argv", ["infdit", "train", str(data), "-o", str(ref.parent / "n.safetensors"),
                                      *ARGS, "--sigma-std", "0"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--sigma-std" in err[0], err


# --- the output file ----------------------------------------------------------------------------------------

def test_the_trained_file_loads_in_upscale_and_info(reference, tmp_path, monkeypatch, capsys):
    data, ref = reference
    prov = provenance(ref)
    assert prov["steps"] == STEPS and prov["data_files"] == 3 and prov["base"] == "config:tiny"  # 1 held out
    monkeypatch.setattr(sys, "argv", ["infdit", "info", str(ref)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr().out
    assert e.value.code == 0 and "trained:" in out and f"steps {STEPS}" in out, out
    dst = tmp_path / "up.png"
    monkeypatch.setattr(sys, "argv", ["infdit", "upscale", str(data / "p0.png"), "-o", str(dst), "--scale",
                                      "4", "--steps", "2", "--device", "cpu", "--weights", str(ref)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0, capsys.readouterr().err
    assert Image.open(dst).size == (56 * 4, 48 * 4)


def test_an_existing_output_is_not_overwritten(reference, monkeypatch, capsys):
    data, ref = reference
    before = ref.read_bytes()
    monkeypatch.setattr(sys, "argv", ["infdit", "train", str(data), "-o", str(ref), *ARGS])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "--overwrite" in err[0]
    assert ref.read_bytes() == before


def test_a_dangling_link_at_the_output_is_kept(reference, tmp_path, monkeypatch, capsys):
    """A symbolic link to nothing is the user's file too: refused without --overwrite, left as it was."""
    data, _ = reference
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(sys, "argv", ["infdit", "train", str(data), "-o", str(link), *ARGS])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "--overwrite" in err[0]
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


# --- --mem-budget ------------------------------------------------------------------------------------------

def _budgets() -> tuple[int, int]:
    """(a budget between, one too small) for the tiny config at batch 2: the first fits only micro-batch 1
    with activation checkpointing, the second not even that (from the plan's own estimate)."""
    from infdit_cli.train.memory import activation_bytes_per_pixel, state_bytes

    model = trainable(random_model(PRESETS["tiny"], seed=5))
    state, (plain, ckpt) = state_bytes(model, ema=False), activation_bytes_per_pixel(model)
    one, two = state + ckpt * CROP * CROP, state + ckpt * 2 * CROP * CROP
    assert ckpt < plain and one < two
    return int((one + two) / 2), int(state)


def test_a_budget_turns_on_checkpointing_and_accumulation_and_trains_the_same(reference, tmp_path, capsys,
                                                                             monkeypatch):
    """A budget between micro-batch 1 and 2 with checkpointing: --dry-run --json shows checkpointing on and
    1 x 2 accumulated, and training under it gives the weights of the unconstrained run (float tolerance:
    accumulation only regroups the sums)."""
    data, ref = reference
    between, _ = _budgets()
    monkeypatch.setattr(sys, "argv", ["infdit", "train", str(data), "-o", str(tmp_path / "d.safetensors"),
                                      *ARGS, "--mem-budget", str(between), "--dry-run", "--json"])
    with pytest.raises(SystemExit) as e:
        main()
    plan = json.loads(capsys.readouterr().out)
    assert e.value.code == 0
    assert (plan["checkpointing"], plan["micro_batch"], plan["accum"]) == (True, 1, 2), plan
    assert plan["step_bytes"] <= plan["mem_budget"] == between and len(plan["budget_changes"]) == 2
    out = tmp_path / "budget.safetensors"
    notes = []
    train(config(data, out, mem_budget=between), on_event=notes.append)
    assert any("micro-batch 1 x 2 accumulated" in getattr(n, "text", "") for n in notes), notes
    got, want = load_file(str(out)), load_file(str(ref))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_budget_too_small_is_one_line_exit_2(reference, tmp_path, capsys, monkeypatch):
    data, _ = reference
    _, tiny = _budgets()
    monkeypatch.setattr(sys, "argv", ["infdit", "train", str(data), "-o", str(tmp_path / "t.safetensors"),
                                      *ARGS, "--mem-budget", str(tiny)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "too small to train" in err[0] and "micro-batch 1 with activation checkpointing" in err[0]
    assert not (tmp_path / "t.safetensors").exists()


# --- several ranks ------------------------------------------------------------------------------------------

def test_two_gloo_ranks_give_the_weights_of_one_process(reference, tmp_path):
    data, ref = reference
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "infdit_cli.launch", "--standalone", "--nproc-per-node=2", "--", "train",
           str(data), "-o", str(out), *ARGS, "--quiet"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got, want = load_file(str(out)), load_file(str(ref))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


# --- data ---------------------------------------------------------------------------------------------------

def test_paired_data_with_a_wrong_ratio_is_one_line_naming_the_pair(tmp_path):
    photos(tmp_path / "d" / "hr", n=2, size=(64, 64))
    (tmp_path / "d" / "lr").mkdir()
    for i, side in enumerate((16, 32)):  # p0: 4x (good), p1: 2x
        Image.new("RGB", (side, side), (10, 20, 30)).save(tmp_path / "d" / "lr" / f"p{i}.png")
    lines: list[str] = []
    items = scan(tmp_path / "d", crop=CROP, scale=4, on_skip=lines.append)
    assert [it.hr.name for it in items] == ["p0.png"] and items[0].lr.name == "p0.png"
    assert len(lines) == 1 and "p1.png" in lines[0] and "not a 4x pair" in lines[0], lines


def test_an_unreadable_image_is_one_line_and_skipped(tmp_path):
    data = photos(tmp_path / "d", n=2)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines: list[str] = []
    items = scan(data, crop=CROP, scale=4, on_skip=lines.append)
    assert sorted(it.hr.name for it in items) == ["p0.png", "p1.png"]
    assert len(lines) == 1 and "broken.png" in lines[0] and "\n" not in lines[0], lines
    with pytest.raises(BadRequest, match="usable"):
        scan(data, crop=512, scale=4, on_skip=lambda t: None)  # nothing is as large as the crop
