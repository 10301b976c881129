"""The cost model's rates: measured once per device and model shape, cached, and shown in every plan."""

import json
import os

import pytest
import torch
from conftest import run_cli

from infdit_cli.errors import BadRequest
from infdit_cli.model.config import PRESETS
from infdit_cli.plan import calibrate
from infdit_cli.plan.calibrate import CALIBRATION_FILE, calibration, device_key
from infdit_cli.plan.planner import Rates

TINY = PRESETS["tiny"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("INFDIT_CALIBRATION", raising=False)  # the session's shared table (conftest)
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / CALIBRATION_FILE


@pytest.fixture
def measured(monkeypatch):
    """Counts measurements (each a steady one with made-up rates: what is cached is the point here;
    `test_a_real_measurement` measures for real)."""
    calls = []

    def counting(*a, **kw):
        calls.append(a)
        return Rates(flops=1e9 * (1 + len(calls)), op_seconds=3e-6, copy_bytes=4e9, source="measured",
                     pixel_seconds=1e-8)

    monkeypatch.setattr(calibrate, "measure_rates", counting)
    return calls


def test_a_real_measurement():
    """The real thing, once (tiny model): positive rates from the engine's own chunk."""
    r = calibrate.measure_rates(TINY, torch.device("cpu"), torch.float32)
    assert r.measured and r.flops > 0 and r.op_seconds > 0 and r.copy_bytes > 0 and isinstance(r.steady, bool)


@pytest.fixture
def timed(monkeypatch):
    """measure_rates with its timings supplied: the chunk's rounds take `times` seconds (in turn)."""
    times: list[float] = []
    monkeypatch.setattr(calibrate, "_warm", lambda device, dtype: None)
    monkeypatch.setattr(calibrate, "_op_seconds", lambda device, dtype: 1e-6)
    monkeypatch.setattr(calibrate, "_copy_rate", lambda device: 5e9)
    monkeypatch.setattr(calibrate, "_pixel_seconds", lambda device: 8e-9)
    monkeypatch.setattr(calibrate, "_chunk", lambda cfg, device, dtype: (6e9, lambda: None))
    monkeypatch.setattr(calibrate, "_best", lambda fn, device, runs, spend=0.3, warm=True: times.pop(0))
    monkeypatch.setattr(calibrate, "busy", lambda: False)
    return times


def test_rates_make_the_cost_model_predict_the_measured_chunk(timed):
    """flops = the chunk's FLOPs over its best time less what the cost model charges its operations."""
    from infdit_cli.plan.planner import DISPATCHES_PER_OP, OPS_PER_CHUNK_LAYER

    timed[:] = [1.02, 1.0, 1.05]
    r = calibrate.measure_rates(TINY, torch.device("cpu"), torch.float32)
    fixed = OPS_PER_CHUNK_LAYER * DISPATCHES_PER_OP * 1e-6
    assert r.steady and 6e9 / r.flops + fixed == pytest.approx(1.0)


@pytest.mark.parametrize("times,busy", [([1.0, 1.3, 1.0], False), ([1.0, 1.0, 1.01], True)])
def test_a_calibration_under_contention_is_used_but_not_kept(timed, cache, monkeypatch, times, busy):
    """Rounds that disagree by more than 15 %, or a load average above the cores: the rates serve this run,
    and the next run measures again."""
    timed[:] = times * 2
    monkeypatch.setattr(calibrate, "busy", lambda: busy)
    first = calibration(TINY, "cpu", torch.float32)
    from infdit_cli.plan.planner import DISPATCHES_PER_OP, OPS_PER_CHUNK_LAYER

    fixed = OPS_PER_CHUNK_LAYER * DISPATCHES_PER_OP * 1e-6  # the operations' share of the chunk's 1.0 s
    assert first.measured and not first.steady and first.flops == pytest.approx(6e9 / (1.0 - fixed))
    assert not cache.exists() or device_key(torch.device("cpu"), torch.float32, TINY) not in cache.read_text()
    calibration(TINY, "cpu", torch.float32)
    assert timed == []  # measured again


def test_a_jobs_own_calls_correct_the_cache(cache, measured, monkeypatch):
    """A job that ran 2x slower than predicted (steady, long enough) doubles every cost in the cache: the
    next plan predicts what it measured. Too short, too few calls, a busy machine: nothing changes."""
    from infdit_cli.plan.planner import call_seconds

    monkeypatch.setattr(calibrate, "busy", lambda: False)
    rates = calibration(TINY, "cpu", torch.float32)
    before = cache.read_text()
    predicted = call_seconds(TINY, (256, 256), 1 << 30, rates)
    assert calibrate.observe(TINY, "cpu", torch.float32, rates, predicted,
                             predicted * 2, 2) is None  # 2 calls
    assert calibrate.observe(TINY, "cpu", torch.float32, rates, 1e-3, 2e-3, 39) is None  # 0.08 s in all
    assert cache.read_text() == before
    monkeypatch.setattr(calibrate, "busy", lambda: True)
    assert calibrate.observe(TINY, "cpu", torch.float32, rates, 1.0, 2.0, 39) is None
    monkeypatch.setattr(calibrate, "busy", lambda: False)
    fixed = calibrate.observe(TINY, "cpu", torch.float32, rates, predicted, 2 * predicted,
                              39 if predicted > 0.1 else int(3 / predicted))
    assert fixed is not None and \
        call_seconds(TINY, (256, 256), 1 << 30, fixed) == pytest.approx(2 * predicted)
    again = calibration(TINY, "cpu", torch.float32)
    assert len(measured) == 1 and again.flops == pytest.approx(fixed.flops)


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


@pytest.mark.parametrize("text",
                         ["not json", "[1, 2]",
                          '{"KEY": {"flops": -1, "op_seconds": 1e-6, "copy_bytes": 1e9}}',
                                  '{"KEY": {"flops": "fast", "op_seconds": 1e-6, "copy_bytes": 1e9}}',
                                  '{"KEY": {"flops": 1e9}}', "\udcff",
                          # a cache written before the image work was measured: measured again, once
                          '{"KEY": {"flops": 1e9, "op_seconds": 1e-6, "copy_bytes": 1e9}}'])
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
    monkeypatch.delenv("INFDIT_CALIBRATION", raising=False)
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
    res = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--steps", "2", "--device",
                  "cpu", "-o", tmp_path / "out.png",
                  env={**os.environ, "INFDIT_CACHE": str(tmp_path / "cache")},
                  check=True)
    first = res.stderr.splitlines()[0]
    assert first.startswith("predicted ") and "on cpu (1 pass(es), 3 model calls)" in first, res.stderr
    quiet = run_cli("upscale", src, "--weights", tiny_weights, "--scale", "4", "--steps", "2", "--device",
                    "cpu", "-o", tmp_path / "out2.png", "--quiet", check=True)
    assert "predicted" not in quiet.stderr


def test_the_attention_backend_is_measured_with_the_rates_and_kept(timed, cache, monkeypatch):
    """CUDA in 16 bits: the fastest backend within the bf16 bound, measured at a chunk's attention shapes
    before the chunk is timed (under it); cached with the rates, and kept when a job corrects them. The
    CPU, and float32, measure none."""
    from contextlib import contextmanager

    asked, preferred = [], []
    monkeypatch.setattr(calibrate, "measure_backends",
                        lambda device, **kw: asked.append(kw) or {"choice": "cudnn"})

    @contextmanager
    def prefer(name):
        preferred.append(name)
        yield

    monkeypatch.setattr(calibrate, "prefer", prefer)
    monkeypatch.setattr(calibrate, "device_key", lambda device, dtype, cfg: f"{device.type}|{dtype}")
    timed[:] = [1.0, 1.0, 1.0] * 3
    got = calibration(TINY, "cuda", torch.bfloat16)
    t = TINY.block_tokens**2
    assert got.sdpa == "cudnn" and preferred == ["cudnn"]
    assert [(a["heads"], a["head_dim"], a["queries"], a["keys"], a["dtype"]) for a in asked] == \
        [(TINY.num_heads, TINY.head_dim, t, 4 * t, torch.bfloat16)]
    assert calibration(TINY, "cuda", torch.bfloat16).sdpa == "cudnn" and len(asked) == 1  # from the cache
    fixed = calibrate.observe(TINY, "cuda", torch.bfloat16, got, 1.0, 2.0, 5)
    assert fixed.sdpa == "cudnn" and calibration(TINY, "cuda", torch.bfloat16).sdpa == "cudnn"
    assert calibration(TINY, "cuda", torch.float32).sdpa is None and len(asked) == 1
    assert calibration(TINY, "cpu", torch.bfloat16).sdpa is None and len(asked) == 1


def test_a_cached_backend_that_is_not_one_is_measured_again(cache, measured):
    cache.parent.mkdir(parents=True)
    key = device_key(torch.device("cpu"), torch.float32, TINY)
    good = {"flops": 1e9, "op_seconds": 1e-6, "copy_bytes": 1e9, "pixel_seconds": 1e-8}
    cache.write_text(json.dumps({key: good | {"sdpa": "magic"}}))
    calibration(TINY, "cpu", torch.float32)
    assert len(measured) == 1
    cache.write_text(json.dumps({key: good | {"sdpa": "flash"}}))
    assert calibration(TINY, "cpu", torch.float32).sdpa == "flash" and len(measured) == 1


def test_a_compile_measurement_is_kept_per_device_and_shape(cache):
    assert calibrate.compile_record(TINY, "cpu", torch.float32) is None
    calibrate.record_compile(TINY, "cpu", torch.float32, 1.5, 1.0, 61.0)
    assert calibrate.compile_record(TINY, "cpu", torch.float32) == \
        {"eager_s": 1.5, "compiled_s": 1.0, "first_call_s": 61.0}
    assert calibrate.compile_record(PRESETS["micro"], "cpu", torch.float32) is None
    assert calibrate.compile_record(TINY, "cpu", torch.bfloat16) is None
    path = cache.parent / calibrate.COMPILE_FILE
    path.write_text(json.dumps({k: {"eager_s": -1, "compiled_s": 1, "first_call_s": 2}
                                for k in json.loads(path.read_text())}))
    assert calibrate.compile_record(TINY, "cpu", torch.float32) is None  # damaged: nothing measured


def test_a_pass_compiles_as_told_or_where_the_gpus_measurement_says_so(monkeypatch):
    """--compile / --no-compile as given; neither: eager on the CPU, and on CUDA what `compile_pays` says
    of this GPU's kept measurement for the pass's predicted seconds."""
    from types import SimpleNamespace

    from infdit_cli.jobs import pipeline
    from infdit_cli.jobs.pipeline import UpscaleOptions, compiles

    kept = {"eager_s": 1.5, "compiled_s": 1.0, "first_call_s": 61.0}
    monkeypatch.setattr(pipeline.calibrate, "compile_record", lambda cfg, device, dtype: kept)
    gpu = SimpleNamespace(config=TINY, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    cpu = SimpleNamespace(config=TINY, device=torch.device("cpu"), dtype=torch.float32)
    long, short = SimpleNamespace(seconds=600.0), SimpleNamespace(seconds=300.0)
    auto = UpscaleOptions()
    assert auto.compile is None
    assert compiles(gpu, long, auto) and not compiles(gpu, short, auto) and not compiles(cpu, long, auto)
    assert not compiles(gpu, long, UpscaleOptions(compile=False))
    assert compiles(gpu, short, UpscaleOptions(compile=True))
    monkeypatch.setattr(pipeline.calibrate, "compile_record", lambda cfg, device, dtype: None)
    assert not compiles(gpu, long, auto)


def test_a_calibration_file_of_its_own_is_read_and_written_instead_of_the_caches(cache, measured, monkeypatch,
                                                                                 tmp_path):
    """`INFDIT_CALIBRATION`: the rates (and the compile measurement, beside them) live in that file, so a job
    with a fresh cache of its own does not measure again."""
    shared = tmp_path / "shared" / "rates.json"
    monkeypatch.setenv("INFDIT_CALIBRATION", str(shared))
    first = calibration(TINY, "cpu", torch.float32)
    calibrate.record_compile(TINY, "cpu", torch.float32, 1.5, 1.0, 61.0)
    assert shared.is_file() and (shared.parent / calibrate.COMPILE_FILE).is_file() and not cache.exists()
    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "another-cache"))
    assert calibration(TINY, "cpu", torch.float32).flops == first.flops and len(measured) == 1
    assert calibrate.compile_record(TINY, "cpu", torch.float32)["first_call_s"] == 61.0
    monkeypatch.delenv("INFDIT_CALIBRATION")
    calibration(TINY, "cpu", torch.float32)  # the cache's own table: empty, so measured
    assert len(measured) == 2


@pytest.mark.parametrize("what", ["a file of the user's", "a folder", "a link to a file of the user's",
                                  "a compile.json of the user's beside it"])
def test_a_calibration_file_named_over_someone_elses_is_one_line_and_left_alone(monkeypatch, capsys, tmp_path,
                                                                                 measured, what):
    """INFDIT_CALIBRATION names whatever the user typed: infdit writes it (and compile.json beside it)
    only where nothing is there yet or a table of measured rates is; anything else is refused before
    anything is measured, and stays as it was."""
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    named = {"a file of the user's": mine, "a folder": tmp_path,
             "a link to a file of the user's": tmp_path / "link.json",
             "a compile.json of the user's beside it": tmp_path / "rates.json"}[what]
    if what.startswith("a link"):
        named.symlink_to(mine)
    if what.startswith("a compile.json"):
        (tmp_path / "compile.json").write_text('{"build": "mine"}')
    monkeypatch.setenv("INFDIT_CALIBRATION", str(named))
    with pytest.raises(BadRequest, match="INFDIT_CALIBRATION: .* is not a table of measured rates"):
        calibration(TINY, "cpu", torch.float32)
    assert measured == [] and mine.read_text() == "my notes\n"
    assert what != "a compile.json of the user's beside it" or not named.exists()
    if "compile" in what:
        assert json.loads((tmp_path / "compile.json").read_text()) == {"build": "mine"}


def test_a_foreign_calibration_file_is_one_line_from_the_command(monkeypatch, tmp_path, tiny_weights):
    from conftest import rgb_image, run_cli
    from PIL import Image

    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    src = tmp_path / "in.png"
    Image.fromarray(rgb_image(12, 14)).save(src)
    monkeypatch.setenv("INFDIT_CALIBRATION", str(mine))
    res = run_cli("upscale", src, "--scale", "2", "--weights", tiny_weights, "--device", "cpu", "--dry-run")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert "INFDIT_CALIBRATION" in lines[0] and "notes.txt" in lines[0]
    assert mine.read_text() == "my notes\n"


def test_a_calibration_file_through_a_link_is_updated_where_it_lives(monkeypatch, tmp_path, measured):
    real = tmp_path / "shared" / "rates.json"
    real.parent.mkdir()
    link = tmp_path / "link.json"
    link.symlink_to(real)
    monkeypatch.setenv("INFDIT_CALIBRATION", str(link))
    calibration(TINY, "cpu", torch.float32)
    assert link.is_symlink() and json.loads(real.read_text()) and len(measured) == 1
