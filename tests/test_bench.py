"""`infdit bench` as a user meets it, and the dtype choices it shares with `upscale`."""

import json
import os

import pytest
import torch

from conftest import run_cli
from infdit_cli.errors import BadRequest
from infdit_cli.upscaler import resolve_dtype


@pytest.mark.parametrize("name", ["fp16", "float16", "half"])
def test_fp16_is_refused_with_a_reason(name):
    with pytest.raises(BadRequest, match="use bf16"):
        resolve_dtype(name, torch.device("cuda"))


def test_auto_never_picks_fp16():
    for dev in ("cpu", "cuda", "mps"):
        assert resolve_dtype("auto", torch.device(dev)) in (torch.bfloat16, torch.float32)
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_fp16_on_the_command_line_is_one_line_exit_2(tiny_weights, tmp_path):
    src = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (10, 200, 30)).save(src)
    res = run_cli("upscale", src, "--scale", "2", "--dtype", "fp16", "--device", "cpu",
                  "--weights", tiny_weights)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "bf16" in lines[0] and "overflow" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_run_bench_reports_progress_and_wxh_sizes(tiny_config):
    """The real measurement path (fresh processes) on the tiny model: one event per measurement, work
    adding up to the announced total, sizes written WxH."""
    from infdit_cli.bench import run_bench
    from infdit_cli.events import MeasureDone

    events = []
    rows = run_bench(tiny_config, [(16, 48)], budget=2**30, device="cpu", dtype=torch.float32, steps=2,
                     config_name="tiny", repeats=1, on_event=events.append)
    assert [r.size for r in rows] == ["48x16"] and (rows[0].height, rows[0].width) == (16, 48)
    done = [e for e in events if isinstance(e, MeasureDone)]
    assert [e.index for e in done] == [1, 2, 3] and all(e.total == 3 for e in done)
    assert [e.work for e in done] == sorted(e.work for e in done) and done[-1].work == done[-1].work_total
    r = rows[0]
    assert r.whole is not None and r.paired_seconds is not None
    assert (r.block_seconds, r.whole_seconds) == r.paired_seconds  # the table's two columns share one run


def _fake_rows(cfg):
    from infdit_cli.bench import BenchRow, CallMeasurement, CallSpec

    def m(n, peak, sec):
        return CallMeasurement(CallSpec("tiny", 16, 48, n), peak, peak + 2**20, sec, 48, 4e12)

    return [BenchRow("48x16", 16, 48, 2, False, m(2, 10 * 2**20, 9.0), 11 * 2**20, m(None, 30 * 2**20, 8.0),
                     31 * 2**20, 3, paired_seconds=(2.0, 1.6))]


def test_bench_table_columns_agree(monkeypatch, tiny_config):
    """Seconds per call, overhead, TFLOP/s and run time all come from the same (paired) medians."""
    from typer.testing import CliRunner

    import infdit_cli.bench as bench_mod
    from infdit_cli.cli.app import app

    monkeypatch.setattr(bench_mod, "run_bench", lambda *a, **k: _fake_rows(tiny_config))
    res = CliRunner().invoke(app, ["bench", "--random-weights", "--config", "tiny", "--device", "cpu",
                                   "--steps", "2", "--res", "48x16"])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if "48x16" in ln)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells[0] == "48x16" and cells[1] == "2 / device"
    assert cells[5:10] == ["2", "1.6", "+25%", "2", "6 s"]  # 2.0 / 1.6 - 1; 4e12 FLOPs / 2 s; 3 calls x 2 s
    assert cells[4] == "3.0x"  # 30 MiB whole / 10 MiB block

    res = CliRunner().invoke(app, ["bench", "--random-weights", "--config", "tiny", "--device", "cpu",
                                   "--res", "48x16", "--json"])
    row = json.loads(res.output)["rows"][0]
    assert row["size"] == "48x16" and (row["block_seconds"], row["whole_seconds"]) == (2.0, 1.6)


def test_bench_default_weights_from_env(monkeypatch, tiny_weights):
    from typer.testing import CliRunner

    import infdit_cli.bench as bench_mod
    from infdit_cli.cli.app import app

    seen = {}
    monkeypatch.setattr(bench_mod, "run_bench", lambda cfg, sizes, **k: seen.update(k, cfg=cfg) or [])
    monkeypatch.setenv("INFDIT_WEIGHTS", str(tiny_weights))
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--res", "32", "--mem-budget", "1GB"])
    assert res.exit_code == 0, res.output
    assert seen["weights"] == str(tiny_weights) and seen["cfg"].hidden_size == 32 and seen["budget"] == 2**30


def test_bench_without_weights_points_at_random_weights(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("INFDIT_WEIGHTS", "INFDIT_REPO")}
    res = run_cli("bench", "--device", "cpu", "--res", "32", env={**env, "HF_HOME": str(tmp_path)})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "--random-weights" in lines[0], res.stderr


@pytest.mark.parametrize("args,fragment", [(["--random-weights", "--weights", "x.safetensors"], "not both"),
                                           (["--random-weights", "--res", "12y"], "WxH"),
                                           (["--random-weights", "--res", "0"], "positive")])
def test_bench_bad_arguments_one_line_exit_2(args, fragment):
    res = run_cli("bench", "--device", "cpu", *args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and fragment in lines[0], res.stderr
