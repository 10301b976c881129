"""`infdit selftest`: does everything hold on this device? Parity, bf16, memory, speed and one big plan.

The library runs the checks and returns `Check` rows in a `SelftestReport`; `cli/selftest.py` renders
them. On CUDA the sizes are the product's (official config in bf16, 8 GB budget, 1024² to 16384², and
the default full-memory plan at 8192²); elsewhere the same checks run at toy sizes, so CI exercises every
code path in under two minutes.

Fixtures (`find_fixtures`): the official code's float32 outputs (`upstream-a`) and its `--bf16` outputs
(`upstream-a-bf16`) on a tiny model, the keys the checks read, ship with the package (`selftest_data/`);
`--fixtures DIR` reads another copy (DIR holding `upstream-a/` and `upstream-a-bf16/`, or the package's
layout). Without fixtures, the parity and bf16 rows are "skip" rows and everything else runs (the memory,
speed and plan rows on a random model).

One engine per mode: every check builds a `BlockEngine` per placement it measures and calls it as often
as it needs, so a K/V slab is allocated (and on CUDA page-locked) once, before the timed calls; rows
report that time (`pin_s`) and the device->host put time of one call (`put_s`) as their own fields.
The memory and speed rows are measured in a fresh process each (`python -m infdit_cli.tools.selftest WORK`).

All calls into the engine and the planner go through `_engine`, `_plan` and `_prefetch_disabled`.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine import blocks as engine_mod
from ..engine.blocks import BlockEngine
from ..engine.sampling import edm_sigmas, sample_heun
from ..engine.storage import Scratch
from ..errors import BadRequest
from ..events import CheckDone, CheckStarted, PlanChanged, SelftestStarted
from ..jobs.pipeline import Upsampled
from ..model.config import PRESETS, InfDiTConfig
from ..model.infdit import random_model
from ..plan.calibrate import calibration, record_compile
from ..plan.device import resolve_device
from ..plan.grid import plan_rects
from ..plan.meter import host_status, reset_host_peak, rss, timed
from ..plan.planner import (
    Placement,
    call_seconds,
    device_free,
    estimate,
    flops_per_call,
    host_available,
    plan,
)
from ..plan.sdpa import measure_backends
from ..units import format_bytes
from ..weights.convert import convert_checkpoint
from ..weights.format import load_model, save_model_file
from .bench import environment

__all__ = ["Check", "SelftestReport", "Profile", "CUDA_PROFILE", "TOY_PROFILE", "Fixtures", "find_fixtures",
           "calibrate", "run_selftest", "DATA"]

RATIO_BF16 = 1.5  # our bf16 RMS from the official fp32 outputs, at most this times the official bf16 path's
MEMORY_TOL = 0.20  # measured peak within +-20 % of the planner's prediction
DATA = Path(__file__).with_name("selftest_data")  # the fixtures that ship with the package


@dataclass(frozen=True)
class Check:
    group: str  # parity | bf16 | memory | speed | plan
    name: str
    status: str  # pass | fail | info (a measurement without a criterion) | skip (does not apply here)
    value: str  # what was measured, for people
    criterion: str  # what "pass" means; "" for info rows
    seconds: float
    numbers: dict[str, float | int | str | None] = field(default_factory=dict)  # the raw values


@dataclass(frozen=True)
class SelftestReport:
    device: str
    profile: str
    environment: dict[str, str]
    checks: list[Check]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


@dataclass(frozen=True)
class Profile:
    """The sizes the checks run at."""

    name: str
    parity_tol: float  # fp32 max |diff| from the official outputs
    block_image: tuple[int, int]  # (H, W) of the random image the block-mode checks use (the fixture is
    # only 2x3 blocks: n = 4 would be the whole image); 5 blocks wide so n = 1, 2, 4 all differ
    config: str  # preset for the memory, speed and plan checks (random weights)
    dtype: str  # their dtype
    budget: int  # bytes
    mem_sizes: tuple[int, ...]
    full_size: int | None  # the default (full free memory) plan is run at this size; None: not here
    speed_sizes: tuple[int, ...]
    big: tuple[int, int]  # (input side, output side) of the one big 4x plan run
    rounds: int  # alternated timing rounds
    # What a check costs beyond its FLOPs (the time budget's predictions; each row reports its prediction
    # beside what it took, so a run calibrates them): a fresh measuring process (imports, device start,
    # random model), one denoiser call's fixed cost, one cold `torch.compile`.
    process_s: float = 5.0
    call_s: float = 0.15
    compile_s: float = 0.0


# fp32 on CUDA: TF32 is switched off for the parity checks; the bound leaves room for other kernels'
# summation order (mem-efficient SDPA, cuBLAS) over the CPU's ~1.3e-6. Not yet measured on a GPU.
CUDA_PROFILE = Profile("cuda", 3e-5, (640, 640), "official", "bfloat16", 8 * 2**30, (1024, 2048, 4096), 8192,
                       (1024, 2048), (4096, 16384), 3, process_s=15.0, call_s=0.05, compile_s=120.0)
# The toy budget makes the plan n = 2 at 512² and n = 1 at 640², where a steady call's peak RSS tracks the
# planner: -11 % and -8 to -10 % (these rows, 2-core machine; 768², n = 1, read -6 % and took 4 s more;
# `benchmarks/memory_vs_plan.py` and docs/benchmarks.md have more sizes and the whole-image rows).
TOY_PROFILE = Profile("toy", 1e-5, (256, 640), "small", "float32", 220 * 2**20, (512, 640), None, (256,),
                      (64, 256), 1, process_s=5.0, call_s=0.15, compile_s=0.0)


# --------------------------------------------------------------------------------------------------------
# Engine and planner: every call the checks make into them
# --------------------------------------------------------------------------------------------------------


def _engine(model, lr_up, image, *, n: int | None = None, cache_device: str | None = None,
            compile: bool = False, on_event: Callable[[object], None] | None = None):
    """One `BlockEngine` for one mode, called as often as a check needs (its K/V slab is made once).
    `image`: (lr, vector), the per-image conditioning."""
    lr, vector = image
    on_host = cache_device is not None and torch.device(cache_device).type == "cpu"
    return BlockEngine(model, lr, vector, lr_up, Placement(n=n or 1 << 30, cache_on_host=on_host),
                       compile=compile, on_event=on_event)


def _plan(cfg, size: tuple[int, int], budget: int | None, dtype: torch.dtype, device: torch.device):
    return plan(cfg, size, budget=budget, dtype=dtype, device=device)


@contextlib.contextmanager
def _prefetch_disabled():
    """Host-cache fetches inline on the compute stream, to time what the side-stream prefetch hides."""
    real = engine_mod._Prefetch
    engine_mod._Prefetch = lambda fetch, layers, stream: real(fetch, layers, None)
    try:
        yield
    finally:
        engine_mod._Prefetch = real


def _prepare(engine, device: torch.device) -> float:
    """Seconds to allocate the engine's K/V slab (and page-lock it: a host cache next to a CUDA model),
    once, before any timed call."""
    return timed(engine.prepare, device)


def _put_seconds(engine, cap: int = 4 << 30) -> tuple[float | None, int]:
    """(seconds, bytes) of one call's K/V puts into the engine's slab (device -> host for a host cache on
    CUDA), timed alone: every (block, layer) entry a call stores, copied as the engine copies it; above
    `cap` bytes a sample of them, scaled. (None, 0) where the call keeps no cache."""
    cache, g = engine.cache, engine.grid
    if cache is None:
        return None, 0
    layers = cache.slab.shape[1]
    rects = plan_rects(g.gh, g.gw, engine.n, engine.order)
    puts = sum(len(r.blocks_needed_later()) for r in rects) * layers
    entry = cache.slab[0, 0, 0]
    each = 2 * entry.numel() * entry.element_size()
    if puts == 0:
        return 0.0, 0
    dev = engine.model.device
    src = torch.randn(entry.shape, device=dev).to(cache.slab.dtype)
    k = max(1, min(puts, cap // each))
    slots = cache.slab.shape[0]

    def copies() -> None:
        for i in range(k):
            e = cache.slab[i % slots, i % layers]
            e[0].copy_(src, non_blocking=True)
            e[1].copy_(src, non_blocking=True)

    return timed(copies, dev) * puts / k, puts * each


def _random_inputs(cfg, side: int, state: torch.device, gen_seed: int = 0):
    g = torch.Generator().manual_seed(gen_seed)
    lr = torch.rand(1, 3, side // cfg.sr_scale, side // cfg.sr_scale, generator=g) * 2 - 1
    x = torch.randn(1, 3, side, side, generator=g)
    lr_up = torch.rand(1, 3, side, side, generator=g) * 2 - 1
    return x.to(state), lr_up.to(state), lr, torch.randn(1, cfg.vector_dim, generator=g)


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------

_INPUTS = ("lr", "concat", "x", "sigma", "init_noise")  # identical bytes in upstream-a and upstream-a-bf16
_OUTPUTS = ("vector", "denoised_full", "sample_20")  # the bf16 checks' official outputs


@dataclass(frozen=True)
class Fixtures:
    """The official code's outputs the parity and bf16 checks compare with (`find_fixtures`)."""

    where: Path
    checkpoint: Path  # the official-format checkpoint (the same bytes for both fixtures)
    checkpoint_bf16: Path
    config: dict  # upstream-a's config.json (the model's official arguments, its CLIP config)
    io: dict  # upstream-a's tensors: inputs and float32 outputs
    bio: dict  # upstream-a-bf16's: the same inputs, the bf16 outputs, and `fp32_*` for the fp32 ones


def find_fixtures(fixtures: str | Path | None = None) -> Fixtures | None:
    """The fixtures in `fixtures` (a folder holding `upstream-a/` and `upstream-a-bf16/`, or one laid out
    as the package's `selftest_data/`), by default the package's own; None where they are not there.

    Raises:
        BadRequest: `fixtures` is given and is not a folder.
    """
    from safetensors.torch import load_file

    if fixtures is not None and not Path(fixtures).is_dir():
        raise BadRequest(f"--fixtures: no such folder: {fixtures}")
    root = Path(fixtures) if fixtures is not None else DATA
    a, b = root / "upstream-a", root / "upstream-a-bf16"
    if all((d / f).is_file() for d in (a, b) for f in ("io.safetensors", "checkpoint.pt", "config.json")):
        return Fixtures(root, a / "checkpoint.pt", b / "checkpoint.pt",
                        json.loads((a / "config.json").read_text()),
                        load_file(str(a / "io.safetensors")), load_file(str(b / "io.safetensors")))
    if all((root / f).is_file() for f in ("io.safetensors", "checkpoint.pt", "config.json")):
        t = load_file(str(root / "io.safetensors"))
        if not all(f"bf16_{k}" in t for k in _OUTPUTS):
            return None
        io = {k: v for k, v in t.items() if not k.startswith("bf16_")}
        bio = {**{k: io[k] for k in _INPUTS}, **{k: t[f"bf16_{k}"].float() for k in _OUTPUTS},
               **{f"fp32_{k}": io[k] for k in _OUTPUTS}}
        ckpt = root / "checkpoint.pt"
        return Fixtures(root, ckpt, ckpt, json.loads((root / "config.json").read_text()), io, bio)
    return None


# --------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).pow(2).mean().sqrt().item()


def _gib(n: float) -> str:

    return format_bytes(n)


class _Run:
    """Loaded fixtures and models, shared by the checks of one selftest run."""

    def __init__(self, device: torch.device, profile: Profile, fixtures: Fixtures | None) -> None:
        self.device, self.profile, self.fixtures = device, profile, fixtures
        self.io = self.bio = None
        if fixtures is not None:
            self.io = {k: v.to(device) for k, v in fixtures.io.items()}
            self.bio = {k: v.to(device) for k, v in fixtures.bio.items()}
        self._models: dict[str, object] = {}

    def model(self, which: str):
        """'fp32' / 'bf16': the fixture checkpoint converted and loaded; 'random': the profile's preset."""
        if which not in self._models:
            if which == "random":
                self._models[which] = random_model(PRESETS[self.profile.config], seed=0,
                                                   device=self.device,
                                                   dtype=getattr(torch, self.profile.dtype))
            else:
                fx = self.fixtures
                self._models[which] = _load_fixture_model(
                    fx.checkpoint if which == "fp32" else fx.checkpoint_bf16, fx.config, self.device,
                    torch.float32 if which == "fp32" else torch.bfloat16)
        return self._models[which]

    def drop(self, which: str) -> None:
        self._models.pop(which, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _load_fixture_model(checkpoint: Path, config: dict, device: torch.device, dtype: torch.dtype):
    """The fixture's official checkpoint through the real path: convert, write safetensors, load."""
    head_width = config["open_clip_model_cfg"]["vision_cfg"]["head_width"]
    res = convert_checkpoint(checkpoint, clip_head_width=head_width)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fixture.safetensors"
        save_model_file(path, res.tensors, res.config)
        return load_model(path, device=device, dtype=dtype)


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 on CUDA while fp32 parity is checked (cuDNN convolutions use it by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _bound(group: str, name: str, value: float, tol: float, t0: float, what: str = "max |diff|") -> Check:
    return Check(group, name, "pass" if value <= tol else "fail", f"{what} {value:.2g}", f"<= {tol:.0e}",
                 time.perf_counter() - t0, {"value": value, "tolerance": tol})


def _sample(model, io: dict, vector: torch.Tensor, steps: int) -> torch.Tensor:
    """A whole Heun run, every call through one engine (as the pipeline runs a pass)."""
    engine = _engine(model, io["concat"], (io["lr"], vector))
    sigmas = edm_sigmas(steps)
    x0 = io["concat"] + io["init_noise"] * sigmas[0].item()
    return sample_heun(lambda x, s: engine(x, s), x0, sigmas)


def check_fp32_call(run: _Run) -> Check:
    t0, io, m = time.perf_counter(), run.io, run.model("fp32")
    with _exact_fp32():
        den = _engine(m, io["concat"], (io["lr"], io["vector"]))(io["x"], io["sigma"])
    return _bound("parity", "fp32 denoiser call vs official", _maxdiff(den, io["denoised_full"]),
                  run.profile.parity_tol, t0)


def check_fp32_sample(run: _Run) -> Check:
    t0, io = time.perf_counter(), run.io
    with _exact_fp32():
        out = _sample(run.model("fp32"), io, io["vector"], 20)
    return _bound("parity", "fp32 20-step sample vs official", _maxdiff(out, io["sample_20"]),
                  run.profile.parity_tol, t0)


def _block_inputs(run: _Run):
    """A random image of the profile's `block_image` size for the fixture model."""
    m, (h, w) = run.model("fp32"), run.profile.block_image
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1
    lr_up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(-1, 1)
    x = lr_up + torch.randn(lr_up.shape, generator=g) * 2.5
    d = run.device
    return m, x.to(d), lr_up.to(d), (lr.to(d), run.io["vector"])


def check_block_modes(run: _Run) -> list[Check]:
    t0 = time.perf_counter()
    m, x, lr_up, image = _block_inputs(run)
    with _exact_fp32():
        whole = _engine(m, lr_up, image)(x, 2.5)
        rows = []
        for n in (1, 2, 4):
            out = _engine(m, lr_up, image, n=n)(x, 2.5)
            name = f"block n={n} vs whole image ({x.shape[-1]}x{x.shape[-2]})"
            rows.append(_bound("parity", name, _maxdiff(out, whole), run.profile.parity_tol, t0))
            t0 = time.perf_counter()
        on_device = _engine(m, lr_up, image, n=2)(x, 2.5)
        on_host = _engine(m, lr_up, image, n=2, cache_device="cpu")(x, 2.5)
    diff = _maxdiff(on_host, on_device)
    note = "" if run.device.type == "cuda" else " (CPU: the host is the device)"
    rows.append(Check("parity", "host K/V cache vs device cache, n=2", "pass" if diff == 0 else "fail",
                      f"max |diff| {diff:.2g}{note}", "identical", time.perf_counter() - t0, {"value": diff}))
    return rows


def _bf16_check(run: _Run, key: str, ours: torch.Tensor, t0: float, name: str) -> Check:
    yard = _rms(run.bio[key], run.bio[f"fp32_{key}"])
    dist = _rms(ours, run.bio[f"fp32_{key}"])
    kernel = ""
    if run.device.type == "cuda":
        kernel = f"; SDPA flash {'on' if torch.backends.cuda.flash_sdp_enabled() else 'off'}"
    return Check("bf16", name, "pass" if dist <= RATIO_BF16 * yard else "fail",
                 f"RMS {dist:.2e} = {dist / yard:.2f}x official bf16 ({yard:.2e}){kernel}",
                 f"<= {RATIO_BF16}x", time.perf_counter() - t0, {"rms": dist, "official_bf16_rms": yard,
                                                                 "ratio": dist / yard})


def check_bf16(run: _Run) -> list[Check]:
    t0, bio, m = time.perf_counter(), run.bio, run.model("bf16")
    vector = m.encode_image(bio["lr"])
    rows = [_bf16_check(run, "vector", vector, t0, "bf16 CLIP vector vs official fp32")]
    t0 = time.perf_counter()
    den = _engine(m, bio["concat"], (bio["lr"], vector))(bio["x"], bio["sigma"])
    rows.append(_bf16_check(run, "denoised_full", den, t0, "bf16 denoiser call vs official fp32"))
    t0 = time.perf_counter()
    out = _sample(m, bio, vector, 20)
    rows.append(_bf16_check(run, "sample_20", out, t0, "bf16 20-step sample vs official fp32"))
    run.drop("bf16")
    return rows


# ---- memory and speed: one fresh process per row ----------------------------------------------------------


def _spawn(work: dict, timeout: float = 1800) -> dict:
    """Run `_work(work)` in a fresh Python process and return what it measured."""
    cmd = [sys.executable, "-m", "infdit_cli.tools.selftest", json.dumps(work)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measuring process failed: {tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _work(w: dict) -> dict:
    """One memory, speed or full-plan measurement on a random model (a fresh process runs this).

    w: kind ("memory" | "speed" | "full"), config, size, device, dtype, and for memory/speed n and
    cache_on_host; for speed rounds and whole (also time the whole-image pass). One engine per mode, its
    K/V slab made (and pinned) once before the calls. Memory: on CUDA the peaks since just before the
    slab was made, on the CPU the peak RSS of the call after a warm-up (plus the slab, resident since the
    warm-up); full: the default plan at `size`, one call, absolute peaks against the plan's prediction.
    """
    import resource

    dev, dtype, kind, size = torch.device(w["device"]), getattr(torch, w["dtype"]), w["kind"], w["size"]
    cuda = dev.type == "cuda"
    cfg = PRESETS[w["config"]]
    res: dict = {}
    if kind == "full":  # the plan first, as a job makes it: the budget is what the device has free
        chosen = _plan(cfg, (size, size), None, dtype, dev)
        n, host = (None if chosen.whole_image else chosen.n), chosen.cache_on_host
        res.update(n=n, cache_on_host=host, state_on_host=chosen.state_on_host, budget=chosen.budget,
                   predicted=chosen.estimate.device_peak, plan=chosen.placement.describe())
    else:
        n, host = w["n"], w["cache_on_host"]
    model = random_model(cfg, seed=0, device=dev, dtype=dtype)
    if kind == "full":
        g = torch.Generator().manual_seed(0)
        lr = torch.rand(1, 3, size // cfg.sr_scale, size // cfg.sr_scale, generator=g) * 2 - 1
        vec = torch.randn(1, cfg.vector_dim, generator=g)
        state = torch.device("cpu") if chosen.state_on_host else dev
        x = torch.randn(1, 3, size, size, generator=g).to(state, chosen.state_dtype)
        out = torch.empty_like(x)
        lr_up = Upsampled(lr.to(dev), (size, size))
    else:
        x, lr_up, lr, vec = _random_inputs(cfg, size, dev)
        out = None
    image = (lr.to(dev), vec.to(dev))
    changed: list = []
    on_event = lambda e: changed.append(e) if isinstance(e, PlanChanged) else None  # noqa: E731
    modes = [n] + ([None] if w.get("whole") else [])
    engines = [_engine(model, lr_up, image, n=m, cache_device="cpu" if host and m is not None else None,
                       on_event=on_event) for m in modes]
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free0 = torch.cuda.mem_get_info(dev)[0]
        torch.cuda.reset_peak_memory_stats(dev)
        a0, r0 = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    pins = [_prepare(e, dev) for e in engines]
    res["pin_s"] = pins[0]
    res["put_s"], res["put_bytes"] = _put_seconds(engines[0])
    cache = engines[0].cache
    res["cache_bytes"] = cache.slab.numel() * cache.slab.element_size() if cache is not None else 0
    if kind == "speed":
        times: list[list[float]] = [[] for _ in engines]
        for r in range(w["rounds"] + 1):  # round 0 warms both up
            for i, e in enumerate(engines):
                t = timed(lambda e=e: e(x, 2.0), dev)
                if r > 0:
                    times[i].append(t)
        res.update(block_s=statistics.median(times[0]),
                   whole_s=statistics.median(times[1]) if len(engines) > 1 else None, whole_pin_s=pins[-1])
    else:
        calls = 1 if kind == "full" else 2  # memory: a warm-up call, then the measured one
        hwm, before = False, 0
        for i in range(calls):
            if not cuda and i == calls - 1:
                hwm, before = reset_host_peak(), rss()
            res["seconds"] = timed(lambda: engines[0](x, 2.0, out), dev)
        if cuda:
            peak_r = torch.cuda.max_memory_reserved(dev)
            res.update(max_memory_reserved=peak_r, mem_get_info_drop=free0 - torch.cuda.mem_get_info(dev)[0])
            if kind == "full":
                res.update(measured=torch.cuda.max_memory_allocated(dev), reserved=peak_r,
                           free_at_start=free0)
            else:
                res.update(measured=torch.cuda.max_memory_allocated(dev) - a0, reserved=peak_r - r0)
        else:
            peak = host_status("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            res.update(measured=peak - before + res["cache_bytes"], reserved=None, max_memory_reserved=None,
                       mem_get_info_drop=None)
        if kind == "memory":  # the planner's prediction of the same quantity (as `bench.measure`)
            est = estimate(cfg, (size, size), n, dtype=dtype, device_type=dev.type, cache_on_host=host,
                           state_on_host=True)
            res["predicted"] = est.cache + est.activations + est.overhead + 3 * size * size * 4
    res["step_downs"] = [f"{e.old} -> {e.new}" for e in changed]
    return res


def _mem_extra(got: dict) -> str:
    """The CUDA-only memory figures of a row, for people ("" off CUDA)."""
    if got.get("max_memory_reserved") is None:
        return ""
    return (f"; reserved {_gib(got['reserved'])}, mem_get_info drop {_gib(got['mem_get_info_drop'])}")


def _copy_extra(got: dict) -> str:
    pin = f"pin {got['pin_s']:.2g} s" if got.get("pin_s") is not None else ""
    put = "" if got.get("put_s") is None else f", puts {got['put_s']:.2g} s ({_gib(got['put_bytes'])})"
    return f" [{pin}{put}]" if pin or put else ""


def _copy_numbers(got: dict) -> dict:
    return {k: got.get(k) for k in ("pin_s", "put_s", "put_bytes", "cache_bytes")}


def check_memory(run: _Run, size: int) -> Check:
    t0, p = time.perf_counter(), run.profile
    dtype = getattr(torch, p.dtype)
    cfg = PRESETS[p.config]
    chosen = _plan(cfg, (size, size), p.budget, dtype, run.device)
    grid = -(-size // cfg.block_size)
    # Block mode is what the planner's memory model is for (the whole-image pass's CPU peak carries
    # allocator slack it does not model): where the plan is the whole image, check the next smaller n.
    n = (grid - 1 if grid > 1 else None) if chosen.whole_image else chosen.n
    got = _spawn(dict(kind="memory", config=p.config, size=size, device=str(run.device), dtype=p.dtype,
                      n=n, cache_on_host=chosen.cache_on_host))
    err = got["measured"] / got["predicted"] - 1
    where = "host" if chosen.cache_on_host else "device"
    mode = "whole image" if n is None else f"n={n}, cache {where}"
    return Check("memory", f"peak {size}² ({p.config}, {p.dtype}, {_gib(p.budget)} plan: {mode})",
                 "pass" if abs(err) <= MEMORY_TOL else "fail",
                 f"measured {_gib(got['measured'])} / predicted {_gib(got['predicted'])} ({err:+.0%})"
                 f"{_mem_extra(got)}{_copy_extra(got)}", f"within ±{MEMORY_TOL:.0%}",
                 time.perf_counter() - t0,
                 {"measured": got["measured"], "predicted": got["predicted"], "n": n,
                  "size": f"{size}x{size}",
                  "reserved": got["reserved"], "max_memory_reserved": got["max_memory_reserved"],
                  "mem_get_info_drop": got["mem_get_info_drop"], **_copy_numbers(got)})


def check_full_plan(run: _Run) -> Check:
    """The default plan (the budget is all the GPU has free) at `profile.full_size`: one call in a fresh
    process, without stepping down, and its peaks beside the plan's prediction."""
    p = run.profile
    if p.full_size is None or run.device.type != "cuda":
        return Check("memory", "default (full free memory) plan", "skip",
                     "CUDA only: its budget is the GPU's free memory (the CPU rows above use a fixed budget)",
                     "", 0.0)
    t0, size = time.perf_counter(), p.full_size
    got = _spawn(dict(kind="full", config=p.config, size=size, device=str(run.device), dtype=p.dtype))
    steps = got["step_downs"]
    return Check("memory", f"default plan {size}² ({p.config}, {p.dtype}, {got['plan']})",
                 "fail" if steps else "pass",
                 f"{got['seconds']:.3g} s; peak {_gib(got['measured'])} allocated / predicted "
                 f"{_gib(got['predicted'])} of {_gib(got['budget'])} free{_mem_extra(got)}{_copy_extra(got)}"
                 + (f"; OUT OF MEMORY, stepped down: {'; '.join(steps)}" if steps else ""),
                 "no out-of-memory step-down", time.perf_counter() - t0,
                 {k: got.get(k) for k in ("seconds", "measured", "predicted", "budget", "reserved",
                                          "max_memory_reserved", "mem_get_info_drop", "free_at_start", "n",
                                          "cache_on_host", "state_on_host",
                                          "step_downs")} | _copy_numbers(got))


def check_speed(run: _Run, size: int) -> Check:
    t0, p = time.perf_counter(), run.profile
    cfg, dtype = PRESETS[p.config], getattr(torch, p.dtype)
    chosen = _plan(cfg, (size, size), p.budget, dtype, run.device)
    grid = -(-size // cfg.block_size)
    n = min(chosen.n, max(grid - 1, 1)) if chosen.whole_image else chosen.n  # a real block mode
    whole_fits = estimate(cfg, (size, size), None, dtype=dtype, device_type=run.device.type,
                          state_on_host=True).total <= 0.9 * (device_free(run.device) or host_available())
    flops = flops_per_call(cfg, size, size)
    rates = calibration(cfg, run.device, dtype)  # the cost model's prediction beside the measurement
    kw = dict(dtype=dtype, device_type=run.device.type)
    pb = call_seconds(cfg, (size, size), n, rates, cache_on_host=chosen.cache_on_host, **kw)
    pw = call_seconds(cfg, (size, size), 1 << 30, rates, **kw)
    got = _spawn(dict(kind="speed", config=p.config, size=size, device=str(run.device), dtype=p.dtype,
                      n=n, cache_on_host=chosen.cache_on_host, rounds=p.rounds,
                      whole=whole_fits))
    tb, tw = got["block_s"], got["whole_s"]
    if tw is not None:
        value = (f"whole {tw:.3g} s ({flops / tw / 1e12:.3g} TFLOP/s), n={n} {tb:.3g} s "
                 f"({flops / tb / 1e12:.3g} TFLOP/s), block overhead {tb / tw - 1:+.0%}; "
                 f"predicted whole {pw:.3g} s, n={n} {pb:.3g} s")
    else:
        value = (f"n={n} {tb:.3g} s ({flops / tb / 1e12:.3g} TFLOP/s; predicted {pb:.3g} s); whole image "
                 "does not fit this device")
    return Check("speed", f"s/call {size}² ({p.config}, {p.dtype})", "info", value + _copy_extra(got), "",
                 time.perf_counter() - t0,
                 {"flops": flops, "n": n, "block_s": tb, "whole_s": tw, "size": f"{size}x{size}",
                  "predicted_block_s": pb, "predicted_whole_s": pw, "calibrated_flops": rates.flops,
                  "calibrated_op_s": rates.op_seconds, "calibrated_copy_bytes": rates.copy_bytes,
                  **_copy_numbers(got)})


# ---- in this process ----------------------------------------------------------------------------------


def check_sdpa(run: _Run) -> Check:
    """SDPA at the model's attention shapes (a block's queries against its 4 key segments) under each
    fused backend: seconds, and which is fastest within the bf16 bound (`sdpa_pick`)."""
    if run.device.type != "cuda":
        return Check("speed", "attention kernels (SDPA backends)", "skip", "CUDA only (fused GPU kernels)",
                     "", 0.0)
    t0, p = time.perf_counter(), run.profile
    cfg = PRESETS[p.config]
    t = cfg.block_tokens**2
    got = measure_backends(run.device, heads=cfg.num_heads, head_dim=cfg.head_dim, queries=t, keys=4 * t,
                           dtype=getattr(torch, p.dtype), seconds=2.0, ratio=RATIO_BF16)
    parts = []
    numbers: dict = {"choice": got["choice"], "math_rms": got["math_rms"], "bound": got["bound"]}
    for name, r in got["backends"].items():
        if r["seconds"] is None:
            parts.append(f"{name} unavailable")
        else:
            parts.append(f"{name} {r['seconds'] * 1e3:.3g} ms ({r['tflops']:.3g} TFLOP/s, RMS {r['rms']:.2g}"
                         f"{'' if r['meets_bound'] else ', OVER the bound'})")
        numbers.update({f"{name}_s": r["seconds"], f"{name}_rms": r["rms"],
                        f"{name}_meets_bound": r["meets_bound"], f"{name}_error": r["error"]})
    return Check("speed", f"attention kernels, {got['shape']}", "info",
                 f"{'; '.join(parts)}: fastest within {RATIO_BF16}x the math backend's bf16 RMS "
                 f"({got['math_rms']:.2g}): {got['choice'] or 'none'}", "", time.perf_counter() - t0, numbers)


def check_prefetch(run: _Run) -> Check:
    t0 = time.perf_counter()
    if run.device.type != "cuda":
        return Check("speed", "host-copy time hidden by the prefetch", "skip",
                     "needs CUDA (on the CPU the host cache is the device's memory)", "", 0.0)
    m, size, dev = run.model("random"), run.profile.speed_sizes[-1], run.device
    cfg = m.config
    n = max(1, -(-size // cfg.block_size) // 2)
    x, lr_up, lr, vec = _random_inputs(cfg, size, dev)
    image = (lr.to(dev), vec)
    engines = {"device": _engine(m, lr_up, image, n=n),
               "host": _engine(m, lr_up, image, n=n, cache_device="cpu")}
    pin_s = {k: _prepare(e, dev) for k, e in engines.items()}
    put_s, put_bytes = _put_seconds(engines["host"])
    # host_sync: the host engine, inline copies
    modes = {"device": "device", "host": "host", "host_sync": "host"}
    times: dict[str, list[float]] = {k: [] for k in modes}
    for r in range(run.profile.rounds + 1):  # round 0 warms up
        for name, which in modes.items():
            ctx = _prefetch_disabled() if name == "host_sync" else contextlib.nullcontext()
            with ctx:
                t = timed(lambda which=which: engines[which](x, 2.0), dev)
            if r > 0:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    copy = med["host_sync"] - med["device"]
    hidden = (med["host_sync"] - med["host"]) / copy if copy > 0 else None  # None: no copy cost to hide
    verdict = "no copy cost measured" if hidden is None else f"{hidden:.0%} of the copy time hidden"
    return Check("speed", f"host-copy time hidden by the prefetch ({size}², n={n})", "info",
                 f"device cache {med['device']:.3g} s, host cache {med['host']:.3g} s (inline copies "
                 f"{med['host_sync']:.3g} s): {verdict} [pin {pin_s['host']:.2g} s, puts {put_s:.2g} s "
                 f"({_gib(put_bytes)})]", "",
                 time.perf_counter() - t0,
                 {**{f"{k}_s": v for k, v in med.items()}, "hidden_fraction": hidden, "pin_s": pin_s["host"],
                  "put_s": put_s, "put_bytes": put_bytes})


def check_compile(run: _Run) -> Check:
    """`--compile`: its one-off compile time, and eager against compiled seconds per call (auto n)."""
    t0, p = time.perf_counter(), run.profile
    if run.device.type != "cuda":
        return Check("speed", "torch.compile (--compile)", "skip", "offered on CUDA only", "", 0.0)
    m, size, dev = run.model("random"), p.speed_sizes[0], run.device
    chosen = _plan(m.config, (size, size), p.budget, m.dtype, dev)
    n = None if chosen.whole_image else chosen.n
    cache = "cpu" if chosen.cache_on_host else None
    x, lr_up, lr, vec = _random_inputs(m.config, size, dev)
    image = (lr.to(dev), vec)
    engines = {c: _engine(m, lr_up, image, n=n, cache_device=cache, compile=c) for c in (False, True)}
    pin_s = sum(_prepare(e, dev) for e in engines.values())
    first = timed(lambda: engines[True](x, 2.0), dev)  # compiles
    eager_out, compiled_out = engines[False](x, 2.0), engines[True](x, 2.0)
    diff = float((eager_out - compiled_out).abs().max())
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(p.rounds):
        for compiled in (False, True):
            times[compiled].append(timed(lambda compiled=compiled: engines[compiled](x, 2.0), dev))
    te, tc = statistics.median(times[False]), statistics.median(times[True])
    # kept for this GPU and model shape: later jobs compile by default where it pays (`planner.compile_pays`)
    record_compile(m.config, dev, m.dtype, te, tc, first)
    mode = "whole image" if n is None else f"n={n}"
    return Check("speed", f"torch.compile (--compile), {size}² ({p.config}, {p.dtype}, {mode})", "info",
                 f"eager {te:.3g} s, compiled {tc:.3g} s per call (x{te / tc:.2f}); first compiled call "
                 f"{first:.3g} s; max |compiled - eager| {diff:.2g}", "", time.perf_counter() - t0,
                 {"eager_s": te, "compiled_s": tc, "first_call_s": first, "max_diff": diff, "n": n,
                  "pin_s": pin_s})


def check_big_plan(run: _Run) -> Check:
    """One call of the big plan with the plan's own storage: state in its dtype (memory-mapped when the
    plan says so), the LR conditioning upsampled per rectangle as the pipeline does, not held. The K/V
    slab is made (and pinned) and the puts timed before the timed call."""
    t0, p = time.perf_counter(), run.profile
    m, dev = run.model("random"), run.device
    cuda = dev.type == "cuda"
    lr_side, side = p.big
    chosen = _plan(m.config, (side, side), p.budget, m.dtype, dev)
    state = torch.device("cpu") if chosen.state_on_host else dev
    n = None if chosen.whole_image else chosen.n
    cache = "cpu" if chosen.cache_on_host else None
    mode = "whole image" if n is None else f"n={n}, cache {'host' if cache else 'device'}, " \
                                          f"state {'host' if chosen.state_on_host else 'device'}"
    name = f"one call, {lr_side}² -> {side}² plan ({p.config}, {p.dtype}, {_gib(p.budget)}: {mode})"
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, lr_side, lr_side, generator=g) * 2 - 1
    vec = torch.randn(1, m.config.vector_dim, generator=g)
    shape, sdtype = (1, 3, side, side), chosen.state_dtype
    engine = _engine(m, Upsampled(lr, (side, side)), (lr, vec), n=n, cache_device=cache)
    with Scratch(tempfile.gettempdir()) if chosen.low_memory else contextlib.nullcontext() as scratch:
        if scratch is not None:
            x, out = (scratch.empty(k, shape, sdtype) for k in ("x", "out"))
        else:
            x, out = (torch.empty(shape, dtype=sdtype, device=state) for _ in range(2))
        for r0 in range(0, side, 512):  # noise row by row: no float32 image beside the state
            x[..., r0 : r0 + 512, :] = torch.randn(1, 3, min(512, side - r0), side, generator=g).to(x)
        if cuda:
            torch.cuda.synchronize(dev)
            free0 = torch.cuda.mem_get_info(dev)[0]
            torch.cuda.reset_peak_memory_stats(dev)
        pin_s = _prepare(engine, dev)
        put_s, put_bytes = _put_seconds(engine)
        sec = timed(lambda: engine(x, 2.0, out), dev)
        engine.close()
    numbers = {"seconds": sec, "predicted": chosen.estimate.total, "budget": p.budget, "n": n, "pin_s": pin_s,
               "put_s": put_s, "put_bytes": put_bytes}
    copies = _copy_extra(numbers)
    if not cuda:
        return Check("plan", name, "info", f"{sec:.3g} s; peak not measured off CUDA (predicted "
                     f"{_gib(chosen.estimate.total)}){copies}", "", time.perf_counter() - t0, numbers)
    peak = torch.cuda.max_memory_allocated(dev)
    numbers.update(measured=peak, max_memory_reserved=torch.cuda.max_memory_reserved(dev),
                   mem_get_info_drop=free0 - torch.cuda.mem_get_info(dev)[0])
    return Check("plan", name, "pass" if peak <= p.budget else "fail",
                 f"{sec:.3g} s, peak {_gib(peak)} (predicted {_gib(chosen.estimate.total)}); reserved "
                 f"{_gib(numbers['max_memory_reserved'])}, "
                 f"mem_get_info drop {_gib(numbers['mem_get_info_drop'])}"
                 f"{copies}", f"peak <= {_gib(p.budget)}", time.perf_counter() - t0, numbers)


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def calibrate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one matmul on `device` in `dtype`, best of 3 after a warm-up (about a second): (4096 x 1024)
    @ (1024 x 4096) on the CPU, 8192^3 on a GPU (a smaller one would time the launch, not the GPU), after
    ~0.3 s of the same GEMMs on a GPU (clocks up, cuBLAS's first-call costs paid). The time budget's
    predictions divide a check's FLOPs by half of it."""
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (4096, 1024, 4096)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    if device.type == "cuda":
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            timed(lambda: a @ b, device)
    times = [timed(lambda: a @ b, device) for _ in range(4)]
    return 2 * m * k * n / min(times[1:])


@dataclass(frozen=True)
class _Step:
    label: str
    run: Callable[[], Check | list[Check]]
    predicted: float  # seconds
    group: str


def _skipped(step: _Step, why: str) -> _Step:
    return _Step(step.label, lambda: Check(step.group, step.label, "skip", why, "", 0.0), 0.0, step.group)


def _steps(run: _Run, rate: float, cuda: bool | None = None) -> list[_Step]:
    """The checks in order of importance (correctness, memory, speed, the big plan, compile), each with
    its predicted seconds: its FLOPs at `rate`, plus the profile's fixed costs. `cuda`: predict as on a
    GPU (default: whether the run's device is one)."""
    p = run.profile
    cuda = run.device.type == "cuda" if cuda is None else cuda
    cfg = PRESETS[p.config]

    def calls(k: int, c, h: int, w: int) -> float:
        return k * (flops_per_call(c, h, w) / rate + p.call_s)

    fx_steps = [("fp32 denoiser call", lambda: check_fp32_call(run), "parity"),
                ("fp32 20-step sample", lambda: check_fp32_sample(run), "parity"),
                ("block modes and cache placement", lambda: check_block_modes(run), "parity"),
                ("bf16 vs the official bf16 path", lambda: check_bf16(run), "bf16")]
    if run.fixtures is None:
        why = "no fixtures (the package's selftest_data/ is missing; --fixtures DIR gives a copy)"
        steps = [_skipped(_Step(lab, fn, 0.0, grp), why) for lab, fn, grp in fx_steps]
    else:
        fx = _fixture_config(run.fixtures.config)
        fh, fw = (int(v) for v in run.io["x"].shape[-2:])
        bh, bw = p.block_image
        load = 2.0  # convert + load one fixture checkpoint
        cost = [load + calls(1, fx, fh, fw), calls(39, fx, fh, fw), calls(6, fx, bh, bw),
                load + calls(41, fx, fh, fw)]
        steps = [_Step(lab, fn, c, grp) for (lab, fn, grp), c in zip(fx_steps, cost)]
    steps += [_Step(f"peak memory at {s}²", lambda s=s: check_memory(run, s),
                    p.process_s + calls(2, cfg, s, s), "memory") for s in p.mem_sizes]
    full = p.full_size
    steps.append(_Step(f"default plan at {full}²" if full else "default plan", lambda: check_full_plan(run),
                       p.process_s + calls(1, cfg, full, full) if full and cuda else 0.0, "memory"))
    steps.append(_Step("attention kernels", lambda: check_sdpa(run), 2.5 if cuda else 0.0, "speed"))
    steps += [_Step(f"speed at {s}²", lambda s=s: check_speed(run, s),
                    p.process_s + calls(2 * (p.rounds + 1), cfg, s, s), "speed") for s in p.speed_sizes]
    s = p.speed_sizes[-1]
    steps.append(_Step("prefetch", lambda: check_prefetch(run),
                       calls(3 * (p.rounds + 1), cfg, s, s) if cuda else 0.0, "speed"))
    big = p.big[1]
    steps.append(_Step(f"one call at {big}²", lambda: check_big_plan(run),
                       p.process_s + calls(1, cfg, big, big), "plan"))
    s = p.speed_sizes[0]
    steps.append(_Step("torch.compile", lambda: check_compile(run),
                       p.compile_s + calls(3 + 2 * p.rounds, cfg, s, s) if cuda else 0.0, "speed"))
    return steps


def _fixture_config(config: dict):
    """The fixture model's `InfDiTConfig`, from its official arguments (for the FLOP count only)."""
    argv = config["argv"]
    get = {a.lstrip("-").replace("-", "_"): b for a, b in zip(argv, argv[1:]) if a.startswith("--")}
    return InfDiTConfig(hidden_size=int(get["hidden_size"]), num_layers=int(get["num_layers"]),
                        num_heads=int(get["num_attention_heads"]), vector_dim=int(get["vector_dim"]),
                        patch_size=int(get["patch_size"]), clip=None)


def run_selftest(*, device: str | torch.device = "auto", fixtures: str | Path | None = None,
                 profile: Profile | None = None, time_budget: float | None = None,
                 on_event: Callable[[object], None] | None = None) -> SelftestReport:
    """Run every check on `device` and return the rows; a failing check is a row, not an exception.

    Each row is sent to `on_event` (`CheckDone`) the moment its check ends, so a caller can keep it even
    if the run is killed later.

    Args:
        device: auto, cuda, cpu or mps.
        fixtures: a folder holding `upstream-a/` and `upstream-a-bf16/` (default: the package's copy).
            Without fixtures the parity and bf16 rows are "skip" rows.
        profile: the sizes; default `CUDA_PROFILE` on CUDA, else `TOY_PROFILE`.
        time_budget: seconds for the whole run: a check whose predicted time would overrun it is not
            started; its row says so ("skip", with the prediction). None: no limit.
        on_event: receives `SelftestStarted`, then `CheckStarted` and `CheckDone` per check.

    Raises:
        BadRequest: `fixtures` is not a folder, or the device does not exist here.
    """
    t_all = time.perf_counter()
    dev = resolve_device(str(device))
    profile = profile or (CUDA_PROFILE if dev.type == "cuda" else TOY_PROFILE)
    run = _Run(dev, profile, find_fixtures(fixtures))
    rate = 0.5 * calibrate(dev, getattr(torch, profile.dtype))
    steps = _steps(run, rate)
    env = environment()
    if on_event is not None:
        on_event(SelftestStarted(str(dev), profile.name, env, time_budget, rate,
                                 [(s.label, s.predicted) for s in steps]))
    checks = []
    for i, step in enumerate(steps, 1):
        if on_event is not None:
            on_event(CheckStarted(i, len(steps), step.label))
        t0 = time.perf_counter()
        left = None if time_budget is None else time_budget - (t0 - t_all)
        if left is not None and step.predicted > left:
            got = Check(step.group, step.label, "skip",
                        f"not run: predicted {step.predicted:.0f} s, {max(left, 0):.0f} s left of the "
                        f"{time_budget:.0f} s time budget", "", 0.0)
        else:
            try:
                got = step.run()
            except Exception as e:  # noqa: BLE001 - a check that crashes is a failed row; the others still run
                first = str(e).splitlines()[0] if str(e) else ""
                got = Check("error", step.label, "fail", f"{type(e).__name__}: {first}", "runs",
                            time.perf_counter() - t0)
        rows = got if isinstance(got, list) else [got]
        for c in rows:  # the check's prediction and when it was started (or skipped), on every row of it
            c.numbers.setdefault("predicted_s", round(step.predicted, 3))
            c.numbers.setdefault("started_s", round(t0 - t_all, 3))
            checks.append(c)
            if on_event is not None:
                on_event(CheckDone(i, len(steps), c))
    return SelftestReport(str(dev), profile.name, env, checks, time.perf_counter() - t_all)


if __name__ == "__main__":  # a measuring process (`_spawn`)
    print(json.dumps(_work(json.loads(sys.argv[1]))))
