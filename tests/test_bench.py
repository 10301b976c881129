"""`infdit bench` as a user meets it, and the dtype choices it shares with `upscale`."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import default_signals, run_cli

from infdit_cli.errors import BadRequest
from infdit_cli.plan.device import resolve_dtype


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
    adding up to the announced total, sizes written WxH, each row handed on as it is measured."""
    from infdit_cli.events import MeasureDone
    from infdit_cli.tools.bench import run_bench

    events, streamed = [], []
    rows = run_bench(tiny_config, [(16, 48)], budget=2**30, device="cpu", dtype=torch.float32, steps=2,
                     config_name="tiny", repeats=1, on_event=events.append,
                     on_row=lambda r: streamed.append((r, len(events))))
    assert [r.size for r in rows] == ["48x16"] and (rows[0].height, rows[0].width) == (16, 48)
    assert streamed == [(rows[0], 3)]  # handed on once its three measurements were done
    done = [e for e in events if isinstance(e, MeasureDone)]
    assert [e.index for e in done] == [1, 2, 3] and all(e.total == 3 for e in done)
    assert [e.work for e in done] == sorted(e.work for e in done) and done[-1].work == done[-1].work_total
    r = rows[0]
    assert r.whole is not None and r.paired_seconds is not None
    assert (r.block_seconds, r.whole_seconds) == r.paired_seconds  # the table's two columns share one run
    assert r.block.setup_seconds > 0 and r.block.put_seconds is not None and r.block.put_bytes > 0
    assert r.whole.put_seconds is None  # the whole image has no cache to write


def _fake_rows(cfg):
    from infdit_cli.tools.bench import BenchRow, CallMeasurement, CallSpec

    def m(n, peak, sec):
        return CallMeasurement(CallSpec("tiny", 16, 48, n), peak, peak + 2**20, sec, 48, 4e12,
                               setup_seconds=0.25 if n else 0.0, put_seconds=0.5 if n else None)

    return [BenchRow("48x16", 16, 48, 2, False, m(2, 10 * 2**20, 9.0), 11 * 2**20, m(None, 30 * 2**20, 8.0),
                     31 * 2**20, 3, paired_seconds=(2.0, 1.6))]


def _fake_run_bench(cfg):
    def run(*a, on_row=None, **k):
        rows = _fake_rows(cfg)
        for r in rows:
            on_row(r)
        return rows

    return run


def test_bench_table_columns_agree(monkeypatch, tiny_config):
    """Seconds per call, overhead, TFLOP/s and run time all come from the same (paired) medians; setup and
    put are the block engine's own fields."""
    from typer.testing import CliRunner

    import infdit_cli.tools.bench as bench_mod
    from infdit_cli.cli.app import app

    monkeypatch.setattr(bench_mod, "run_bench", _fake_run_bench(tiny_config))
    res = CliRunner().invoke(app, ["bench", "--random-weights", "--config", "tiny", "--device", "cpu",
                                   "--steps", "2", "--res", "48x16"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    title = next(ln for ln in lines if "size WxH" in ln)
    line = next(ln for ln in lines if ln.strip().startswith("48x16"))
    titles = re.split(r"\s{2,}", title.strip())
    cells = re.split(r"\s{2,}", line.strip())
    assert len(cells) == len(titles) == 12 and titles[-1] == "run: 3 calls"
    assert cells[0] == "48x16" and cells[1] == "2 / device"
    assert cells[5:9] == ["2", "1.6", "+25%", "2"]  # 2.0 / 1.6 - 1; 4e12 FLOPs / 2 s
    assert cells[9:] == ["0.25 s", "0.5 s", "6 s"]  # setup, put; 3 calls x 2 s
    assert cells[4] == "3.0x"  # 30 MiB whole / 10 MiB block

    res = CliRunner().invoke(app, ["bench", "--random-weights", "--config", "tiny", "--device", "cpu",
                                   "--res", "48x16", "--json"])
    objs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [o["event"] for o in objs] == ["bench", "row"]
    row = objs[1]
    assert row["size"] == "48x16" and (row["block_seconds"], row["whole_seconds"]) == (2.0, 1.6)
    assert (row["setup_seconds"], row["put_seconds"]) == (0.25, 0.5)


def _count_calls(monkeypatch, bench_mod):
    """Run the measurements in this process (no fresh process per configuration), counting them."""
    from infdit_cli.tools.bench import CallMeasurement

    seen = []

    def measure(spec, timeout=0):
        seen.append((spec.height, spec.width, spec.n))
        return CallMeasurement(spec, 2**20, 2**20, 0.1, 16, 1e9)

    monkeypatch.setattr(bench_mod, "measure", measure)
    monkeypatch.setattr(bench_mod, "time_pair", lambda a, b, rounds, timeout=0: (0.1, 0.1))
    return seen


def test_default_cpu_sizes_skip_rows_predicted_too_long(monkeypatch):
    """Without --res on the CPU, a size whose measurements the cost model predicts over the limit is not
    measured but said, with how to run it; given with --res, it runs."""
    from typer.testing import CliRunner

    import infdit_cli.plan.calibrate as calibrate_mod
    import infdit_cli.plan.planner as planner_mod
    import infdit_cli.tools.bench as bench_mod
    from infdit_cli.cli.app import app

    seen = _count_calls(monkeypatch, bench_mod)
    monkeypatch.setattr(calibrate_mod, "calibration", lambda *a, **k: planner_mod.Rates(1e9, 1e-6, 1e9))
    # 1 s per call at 256², growing with the area: 256² and 512² rows (16 and 64 s) run, 1024² (256 s) not
    monkeypatch.setattr(planner_mod, "call_seconds",
                        lambda cfg, size, n, rates, **k: size[0] * size[1] / 65536)
    base = ["bench", "--random-weights", "--config", "tiny", "--device", "cpu", "--repeats", "3"]
    res = CliRunner().invoke(app, [*base, "--json"])
    assert res.exit_code == 0, res.output
    objs = [json.loads(ln) for ln in res.stdout.splitlines()]
    assert [(o["event"], o.get("size")) for o in objs] == [
        ("bench", None), ("row", "256x256"), ("row", "512x512"), ("skipped", "1024x1024")]
    skipped = objs[-1]
    assert skipped["predicted_seconds"] == 16 and skipped["predicted_row_seconds"] == 16 * 16
    assert "predicted 16 s per call" in skipped["reason"] and "give --res 1024 to run it" in skipped["reason"]
    assert {(h, w) for h, w, _ in seen} == {(256, 256), (512, 512)}

    res = CliRunner().invoke(app, base)  # the text output says it too
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith("1024x1024"))
    assert "skipped: predicted 16 s per call" in line and "--res 1024" in line

    # Predicted 10x longer (a calibration on a busy machine): the first size still runs, so there is a row
    seen.clear()
    monkeypatch.setattr(planner_mod, "call_seconds",
                        lambda cfg, size, n, rates, **k: size[0] * size[1] / 6554)
    res = CliRunner().invoke(app, [*base, "--json"])
    events = [json.loads(ln)["event"] for ln in res.stdout.splitlines()]
    assert events == ["bench", "row", "skipped", "skipped"]
    assert {(h, w) for h, w, _ in seen} == {(256, 256)}

    seen.clear()
    res = CliRunner().invoke(app, [*base, "--res", "1024", "--json"])
    assert res.exit_code == 0, res.output
    assert [json.loads(ln)["event"] for ln in res.stdout.splitlines()] == ["bench", "row"]
    assert {(h, w) for h, w, _ in seen} == {(1024, 1024)}


def _window_counter(monkeypatch):
    """KV caches made slowly (0.5 s each), and whether each was made inside a timed call (`bench._call`)."""
    import infdit_cli.engine.blocks as engine_mod
    import infdit_cli.tools.bench as bench_mod

    made, puts, timing = [], [], [False]

    class SlowCache(engine_mod.KVCache):
        def __init__(self, *a, **k):
            time.sleep(0.5)
            made.append(timing[0])
            super().__init__(*a, **k)

        def put(self, block, layer, k, v):
            if timing[0]:
                puts.append(2 * k.numel() * k.element_size())
            super().put(block, layer, k, v)

    real_call = bench_mod._call

    def call(*a):
        timing[0] = True
        try:
            return real_call(*a)
        finally:
            timing[0] = False

    monkeypatch.setattr(engine_mod, "KVCache", SlowCache)
    monkeypatch.setattr(bench_mod, "_call", call)
    return made, puts


def test_timed_calls_exclude_building_the_cache(monkeypatch):
    """The K/V cache (pinned on CUDA) is made once per engine, outside the timed calls, and its time is
    reported as setup; the put field times one call's cache writes (the same bytes a call writes)."""
    import infdit_cli.tools.bench as bench_mod
    from infdit_cli.tools.bench import CallSpec

    made, puts = _window_counter(monkeypatch)
    spec = CallSpec("tiny", 64, 64, n=1, repeats=2)
    got = bench_mod._measure_here(spec)
    assert made == [False, False]  # the warm-up's engine and the measured one; none inside a timed call
    assert got["setup_seconds"] >= 0.5
    # the put field's bytes are one call's: the calls (the warm-up and the timed ones) wrote as much each
    assert got["put_bytes"] > 0 and sum(puts) == (1 + spec.repeats) * got["put_bytes"]
    assert got["put_seconds"] is not None

    made.clear()
    bench_mod._time_pair_here(spec, CallSpec("tiny", 64, 64, n=None, repeats=2), rounds=2)
    assert made == [False]  # the block engine's, once; the whole image has none
def test_bench_default_weights_from_env(monkeypatch, tiny_weights):
    from typer.testing import CliRunner

    import infdit_cli.tools.bench as bench_mod
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


def _workers_of(pid: int) -> list[int]:
    """The bench workers (`python -m infdit_cli.tools.bench`) started by the `infdit bench` with this pid:
    its own children with the marker in their environment (not what a worker starts in turn, such as
    `uname` behind platform.processor(), which inherits the marker and may outlive the worker by a moment)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                parent = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid and f"INFDIT_BENCH_PARENT={pid}".encode() in env:
                found.append(int(d.name))
    return found


@pytest.mark.slow
def test_bench_streams_json_lines_to_a_pipe_and_sigterm_ends_it_with_143():
    """Off a terminal, each row arrives while the command still runs (JSON lines); SIGTERM during the next
    size's measurement stops the worker too and ends with one line and 143."""
    exe = Path(sys.executable).with_name("infdit")
    # 256x16: its whole image (22.7 MB predicted) is over the 22.5 MB budget, so its row is one worker's;
    # 16x1024 (block mode 22.2 MB) is still being measured when the signal comes.
    proc = subprocess.Popen([str(exe), "bench", "--random-weights", "--config", "tiny", "--device", "cpu",
                             "--res", "256x16,16x1024", "--mem-budget", "22500000", "--repeats", "20",
                             "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)
    try:
        start = json.loads(proc.stdout.readline())
        assert start["event"] == "bench" and start["sizes"] == ["256x16", "16x1024"]
        assert start["device"] == "cpu" and start["row_seconds_limit"] is None  # sizes given: none skipped
        row = json.loads(proc.stdout.readline())
        assert proc.poll() is None  # the first row came before the command ended
        assert row["event"] == "row" and row["size"] == "256x16" and row["whole"] is None
        assert row["block"]["spec"]["n"] == row["n"] and row["block_seconds"] > 0
        assert row["setup_seconds"] >= 0 and row["put_seconds"] is not None
        deadline = time.monotonic() + 60
        while not _workers_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _workers_of(proc.pid)
        assert workers and proc.poll() is None, "the second size's worker never started"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["bench: 256x16, 16x1024 on cpu float32",  # what it measures, first
                                        "error: terminated by SIGTERM after 1 of 2 size(s)"]
    assert out == ""  # nothing after the first row
    # the worker was killed and reaped, not left running
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]


def test_a_stop_while_a_worker_starts_still_kills_and_reaps_it(monkeypatch):
    """A stop that arrives while Popen is still starting the worker (the test's SIGINT, sent from inside
    Popen) is held until the worker is the bench's to kill: it is killed and reaped, and the stop goes on."""
    from infdit_cli.tools import bench

    started, real = [], subprocess.Popen

    def popen(cmd, **kw):
        proc = real([sys.executable, "-c", "import time; time.sleep(120)"], **kw)
        started.append(proc.pid)
        os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt, as Ctrl-C would
        return proc

    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        bench._child(["{}"], 60, "a measurement")
    assert started and not Path(f"/proc/{started[0]}").exists()  # killed and reaped, not left running
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, set()) & bench._STOPS  # the mask as it was
