"""The cost model's rates: measured once per device and model shape, cached, and shown in every plan."""

import json
import os

import pytest
import torch

from conftest import run_cli
from infdit_cli import calibrate
from infdit_cli.calibrate import CALIBRATION_FILE, calibration, device_key
from infdit_cli.config import PRESETS

TINY = PRESETS["tiny"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / CALIBRATION_FILE


@pytest.fixture
def measured(monkeypatch):
    """Counts measurements (each still runs for real)."""
    calls = []
    real = calibrate.measure_rates

    def counting(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(calibrate, "measure_rates", counting)
    return calls


def test_measured_once_then_read_from_the_cache(cache, measured):
    first = calibration(TINY, "cpu", torch.float32)
    assert first.measured and first.flops > 0 and first.op_seconds > 0 and first.copy_bytes > 0
    assert len(measured) == 1 and cache.is_file()
    again = calibration(TINY, "cpu", torch.float32)
    assert len(measured) == 1 and (again.flops, again.op_seconds) == (first.flops, first.op_seconds)
    calibration(PRESETS["micro"], "cpu", torch.float32)  # another model shape: its own entry
    assert len(measured) == 2 and len(json.loads(cache.read_text())) == 2
    calibration(TINY, "cpu", torch.float32, refresh=True)  # `infdit bench` measures again
    assert len(measured) == 3


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"KEY": {"flops": -1, "op_seconds": 1e-6, "copy_bytes": 1e9}}',
                                  '{"KEY": {"flops": "fast", "op_seconds": 1e-6, "copy_bytes": 1e9}}',
                                  '{"KEY": {"flops": 1e9}}', "\udcff"])
def test_a_damaged_cache_is_measured_again_and_rewritten(cache, measured, text):
    cache.parent.mkdir(parents=True)
    key = device_key(torch.device("cpu"), torch.float32, TINY)
    cache.write_text(text.replace("KEY", key), errors="surrogateescape")
    rates = calibration(TINY, "cpu", torch.float32)
    assert len(measured) == 1 and rates.flops > 0
    assert json.loads(cache.read_text())[key]["flops"] == rates.flops


def test_an_unwritable_cache_costs_only_the_measurement(tmp_path, monkeypatch, measured):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("INFDIT_CACHE", str(blocker / "cache"))  # under a regular file: no folder can be made
    assert calibration(TINY, "cpu", torch.float32).flops > 0
    assert calibration(TINY, "cpu", torch.float32).flops > 0
    assert len(measured) == 2 and blocker.read_text() == ""


def test_the_dry_run_states_the_time(tmp_path, tiny_weights):
    """`--dry-run` prints the predicted time per pass and in total, and --json carries it; a CPU job of
    the official architecture that takes days says what a GPU would take."""
    from PIL import Image

    src = tmp_path / "in.png"
    Image.new("RGB", (24, 20), (10, 120, 200)).save(src)
    env = {**os.environ, "INFDIT_CACHE": str(tmp_path / "cache")}
    res = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--dry-run", "--device", "cpu",
                  env=env, check=True)
    assert "time: predicted" in res.stdout and "rates measured on this device" in res.stdout
    assert "a CUDA GPU" not in res.stdout  # a second at most: no hour-long job
    res = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--dry-run", "--json",
                  "--device", "cpu", env=env, check=True)
    info = json.loads(res.stdout)
    passes = info["plan"]["passes"]
    assert info["predicted_seconds"] > 0
    assert info["predicted_seconds"] == pytest.approx(sum(p["seconds"] for p in passes))
    assert info["plan"]["seconds"] == pytest.approx(info["predicted_seconds"])
    assert passes[0]["memory"]["seconds_per_call"] * 39 == pytest.approx(passes[0]["seconds"])

    big = tmp_path / "big.png"
    Image.new("RGB", (1024, 1024), (10, 120, 200)).save(big)
    res = run_cli("upscale", big, "--weights", tmp_path / "absent.safetensors", "--res", "4096", "--dry-run",
                  "--device", "cpu", "--mem-budget", "200GB", env={**env, "INFDIT_HOST_MEMORY": "256GB"},
                  check=True)
    assert "more than an hour on the CPU: a CUDA GPU" in res.stdout, res.stdout


def test_a_run_says_its_predicted_time_first(tmp_path, tiny_weights):
    from PIL import Image

    src = tmp_path / "in.png"
    Image.new("RGB", (24, 20), (10, 120, 200)).save(src)
    res = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--steps", "2", "--device", "cpu",
                  "-o", tmp_path / "out.png", env={**os.environ, "INFDIT_CACHE": str(tmp_path / "cache")},
                  check=True)
    first = res.stderr.splitlines()[0]
    assert first.startswith("predicted ") and "on cpu (1 pass(es), 3 model calls)" in first, res.stderr
    quiet = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--steps", "2", "--device", "cpu",
                    "-o", tmp_path / "out2.png", "--quiet", check=True)
    assert "predicted" not in quiet.stderr
