"""`infdit selftest`: does everything hold on this device? Parity, bf16, memory, speed and one big plan.

The library runs the checks and returns `Check` rows in a `SelftestReport`; `cli/selftest.py` renders
them. On CUDA the sizes are the product's (official config in bf16, 8 GB budget, 1024² to 16384²);
elsewhere the same checks run at toy sizes, so CI exercises every code path in under two minutes.

Fixtures (`find_fixtures`): `upstream-a` (the official code's float32 outputs) and `upstream-a-bf16`
(the same under `--bf16`), looked up in `--fixtures DIR`, then the repository's `tests/data` and
`../shared/fixtures`.

All calls into the engine and the planner go through `_denoise`, `_plan` and `_prefetch_disabled`.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import BadRequest
from .events import CheckDone, CheckStarted

__all__ = ["Check", "SelftestReport", "Profile", "CUDA_PROFILE", "TOY_PROFILE", "find_fixtures",
           "calibrate", "run_selftest"]

RATIO_BF16 = 1.5  # our bf16 RMS from the official fp32 outputs, at most this times the official bf16 path's
MEMORY_TOL = 0.20  # measured peak within +-20 % of the planner's prediction


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
CUDA_PROFILE = Profile("cuda", 3e-5, (640, 640), "official", "bfloat16", 8 * 2**30, (1024, 2048, 4096),
                       (1024, 2048), (4096, 16384), 3, process_s=15.0, call_s=0.05, compile_s=120.0)
# The toy budget makes the plan n = 2 at 512² and n = 1 at 768², where a steady call's peak RSS tracks the
# planner: -6 % and +3 % (`benchmarks/memory_vs_plan.py`, docs/benchmarks.md, which also has whole-image rows).
TOY_PROFILE = Profile("toy", 1e-5, (256, 640), "small", "float32", 220 * 2**20, (512, 768), (256,), (64, 256),
                      1, process_s=5.0, call_s=0.15, compile_s=0.0)


# --------------------------------------------------------------------------------------------------------
# Engine and planner: every call the checks make into them
# --------------------------------------------------------------------------------------------------------


def _denoise(model, x: torch.Tensor, sigma, *, lr_up: torch.Tensor, image, n: int | None = None,
             cache_device: str | None = None, compile: bool = False, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """`image`: (lr, vector), the per-image conditioning."""
    from .engine import denoise

    lr, vector = image
    return denoise(model, x, sigma, lr_up=lr_up, lr=lr, vector=vector, block_batch=n,
                   cache_device=cache_device, compile=compile, out=out)


def _plan(cfg, size: tuple[int, int], budget: int, dtype: torch.dtype, device: torch.device):
    from .planner import plan

    return plan(cfg, size, budget=budget, dtype=dtype, device=device)


@contextlib.contextmanager
def _prefetch_disabled():
    """Host-cache fetches inline on the compute stream, to time what the side-stream prefetch hides."""
    from . import engine as engine_mod

    real = engine_mod._Prefetch
    engine_mod._Prefetch = lambda fetch, layers, stream: real(fetch, layers, None)
    try:
        yield
    finally:
        engine_mod._Prefetch = real


# --------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------


def _repo_root() -> Path | None:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "tests").is_dir() else None


def find_fixtures(fixtures: str | Path | None = None) -> tuple[Path, Path]:
    """(upstream-a, upstream-a-bf16) directories.

    Raises:
        BadRequest: one of them is in none of the places looked at.
    """
    if fixtures is not None and not Path(fixtures).is_dir():
        raise BadRequest(f"--fixtures: no such folder: {fixtures}")
    places = [Path(fixtures)] if fixtures is not None else []
    root = _repo_root()
    if root is not None:
        places += [root / "tests" / "data", root.parent / "shared" / "fixtures"]
    found = []
    for name in ("upstream-a", "upstream-a-bf16"):
        hits = [p / name for p in places if (p / name / "io.safetensors").is_file()]
        if not hits:
            where = ", ".join(str(p) for p in places) or "nowhere (not installed from the repository)"
            raise BadRequest(f"test fixture {name} not found (looked in {where}); pass --fixtures DIR, "
                             f"the folder holding upstream-a/ and upstream-a-bf16/")
        found.append(hits[0])
    return found[0], found[1]


# --------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float().cpu() - b.float().cpu()).abs().max().item()


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).pow(2).mean().sqrt().item()


def _gib(n: float) -> str:
    from .planner import format_bytes

    return format_bytes(n)


class _Run:
    """Loaded fixtures and models, shared by the checks of one selftest run."""

    def __init__(self, device: torch.device, profile: Profile, fixture_a: Path, fixture_bf16: Path) -> None:
        from safetensors.torch import load_file

        self.device, self.profile = device, profile
        self.fixture_a, self.fixture_bf16 = fixture_a, fixture_bf16
        self.io = {k: v.to(device) for k, v in load_file(str(fixture_a / "io.safetensors")).items()}
        self.bio = {k: v.to(device) for k, v in load_file(str(fixture_bf16 / "io.safetensors")).items()}
        self._models: dict[str, object] = {}

    def model(self, which: str):
        """'fp32' / 'bf16': the fixture checkpoint converted and loaded; 'random': the profile's preset."""
        if which not in self._models:
            if which == "random":
                from .config import PRESETS
                from .weights import random_model

                self._models[which] = random_model(PRESETS[self.profile.config], seed=0, device=self.device,
                                                   dtype=getattr(torch, self.profile.dtype))
            else:
                self._models[which] = _load_fixture_model(
                    self.fixture_a if which == "fp32" else self.fixture_bf16, self.device,
                    torch.float32 if which == "fp32" else torch.bfloat16)
        return self._models[which]

    def drop(self, which: str) -> None:
        self._models.pop(which, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _load_fixture_model(fixture: Path, device: torch.device, dtype: torch.dtype):
    """The fixture's official checkpoint through the real path: convert, write safetensors, load."""
    import json

    from .convert import convert_checkpoint
    from .weights import load_model, save_model_file

    clip_cfg = json.loads((fixture / "config.json").read_text())["open_clip_model_cfg"]
    head_width = clip_cfg["vision_cfg"]["head_width"]
    res = convert_checkpoint(fixture / "checkpoint.pt", clip_head_width=head_width)
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
    from .sampling import edm_sigmas, sample_heun

    image = (io["lr"], vector)
    sigmas = edm_sigmas(steps)
    x0 = io["concat"] + io["init_noise"] * sigmas[0].item()
    return sample_heun(lambda x, s: _denoise(model, x, s, lr_up=io["concat"], image=image), x0, sigmas)


def check_fp32_call(run: _Run) -> Check:
    t0, io, m = time.perf_counter(), run.io, run.model("fp32")
    with _exact_fp32():
        den = _denoise(m, io["x"], io["sigma"], lr_up=io["concat"], image=(io["lr"], io["vector"]))
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
        whole = _denoise(m, x, 2.5, lr_up=lr_up, image=image)
        rows = []
        for n in (1, 2, 4):
            out = _denoise(m, x, 2.5, lr_up=lr_up, image=image, n=n)
            name = f"block n={n} vs whole image ({x.shape[-1]}x{x.shape[-2]})"
            rows.append(_bound("parity", name, _maxdiff(out, whole), run.profile.parity_tol, t0))
            t0 = time.perf_counter()
        on_device = _denoise(m, x, 2.5, lr_up=lr_up, image=image, n=2)
        on_host = _denoise(m, x, 2.5, lr_up=lr_up, image=image, n=2, cache_device="cpu")
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
    den = _denoise(m, bio["x"], bio["sigma"], lr_up=bio["concat"], image=(bio["lr"], vector))
    rows.append(_bf16_check(run, "denoised_full", den, t0, "bf16 denoiser call vs official fp32"))
    t0 = time.perf_counter()
    out = _sample(m, bio, vector, 20)
    rows.append(_bf16_check(run, "sample_20", out, t0, "bf16 20-step sample vs official fp32"))
    run.drop("bf16")
    return rows


def check_memory(run: _Run, size: int) -> Check:
    from .bench import CallSpec, measure
    from .config import PRESETS

    t0, p = time.perf_counter(), run.profile
    dtype = getattr(torch, p.dtype)
    cfg = PRESETS[p.config]
    chosen = _plan(cfg, (size, size), p.budget, dtype, run.device)
    grid = -(-size // cfg.block_size)
    # Block mode is what the planner's memory model is for (the whole-image pass's CPU peak carries
    # allocator slack it does not model): where the plan is the whole image, check the next smaller n.
    n = (grid - 1 if grid > 1 else None) if chosen.whole_image else chosen.n
    spec = CallSpec(config=p.config, height=size, width=size, n=n,
                    cache_on_host=chosen.cache_on_host, device=run.device.type, dtype=p.dtype, repeats=1)
    got = measure(spec)
    err = got.peak_bytes / got.predicted_bytes - 1
    where = "host" if chosen.cache_on_host else "device"
    mode = "whole image" if n is None else f"n={n}, cache {where}"
    return Check("memory", f"peak {size}² ({p.config}, {p.dtype}, {_gib(p.budget)} plan: {mode})",
                 "pass" if abs(err) <= MEMORY_TOL else "fail",
                 f"measured {_gib(got.peak_bytes)} / predicted {_gib(got.predicted_bytes)} ({err:+.0%})",
                 f"within ±{MEMORY_TOL:.0%}", time.perf_counter() - t0,
                 {"measured": got.peak_bytes, "predicted": got.predicted_bytes, "n": spec.n,
                  "size": f"{size}x{size}"})


def check_speed(run: _Run, size: int) -> Check:
    from .bench import CallSpec, flops_per_call, time_pair
    from .config import PRESETS
    from .planner import device_free, estimate, host_available

    t0, p = time.perf_counter(), run.profile
    cfg, dtype = PRESETS[p.config], getattr(torch, p.dtype)
    chosen = _plan(cfg, (size, size), p.budget, dtype, run.device)
    grid = -(-size // cfg.block_size)
    n = min(chosen.n, max(grid - 1, 1)) if chosen.whole_image else chosen.n  # a real block mode
    common = dict(config=p.config, height=size, width=size, device=run.device.type, dtype=p.dtype)
    block = CallSpec(n=n, cache_on_host=chosen.cache_on_host, **common)
    whole_fits = estimate(cfg, (size, size), None, dtype=dtype, device_type=run.device.type,
                          state_on_host=True).total <= 0.9 * (device_free(run.device) or host_available())
    flops = flops_per_call(cfg, size, size)
    from .calibrate import calibration
    from .planner import call_seconds

    rates = calibration(cfg, run.device, dtype)  # the cost model's prediction beside the measurement
    kw = dict(dtype=dtype, device_type=run.device.type)
    pb = call_seconds(cfg, (size, size), n, rates, cache_on_host=chosen.cache_on_host, **kw)
    pw = call_seconds(cfg, (size, size), 1 << 30, rates, **kw)
    if whole_fits:
        tb, tw = time_pair(block, CallSpec(n=None, **common), rounds=p.rounds)
        value = (f"whole {tw:.3g} s ({flops / tw / 1e12:.3g} TFLOP/s), n={n} {tb:.3g} s "
                 f"({flops / tb / 1e12:.3g} TFLOP/s), block overhead {tb / tw - 1:+.0%}; "
                 f"predicted whole {pw:.3g} s, n={n} {pb:.3g} s")
    else:
        from .bench import measure

        spec = CallSpec(n=n, cache_on_host=chosen.cache_on_host, repeats=p.rounds, **common)
        tb, tw = measure(spec).seconds, None
        value = (f"n={n} {tb:.3g} s ({flops / tb / 1e12:.3g} TFLOP/s; predicted {pb:.3g} s); whole image "
                 "does not fit this device")
    return Check("speed", f"s/call {size}² ({p.config}, {p.dtype})", "info", value, "",
                 time.perf_counter() - t0,
                 {"flops": flops, "n": n, "block_s": tb, "whole_s": tw, "size": f"{size}x{size}",
                  "predicted_block_s": pb, "predicted_whole_s": pw, "calibrated_flops": rates.flops,
                  "calibrated_op_s": rates.op_seconds, "calibrated_copy_bytes": rates.copy_bytes})


def _random_inputs(cfg, side: int, state: torch.device, gen_seed: int = 0):
    g = torch.Generator().manual_seed(gen_seed)
    lr = torch.rand(1, 3, side // cfg.sr_scale, side // cfg.sr_scale, generator=g) * 2 - 1
    x = torch.randn(1, 3, side, side, generator=g)
    lr_up = torch.rand(1, 3, side, side, generator=g) * 2 - 1
    return x.to(state), lr_up.to(state), lr, torch.randn(1, cfg.vector_dim, generator=g)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def check_prefetch(run: _Run) -> Check:
    t0 = time.perf_counter()
    if run.device.type != "cuda":
        return Check("speed", "host-copy time hidden by the prefetch", "skip",
                     "needs CUDA (on the CPU the host cache is the device's memory)", "", 0.0)
    m, size = run.model("random"), run.profile.speed_sizes[-1]
    cfg = m.config
    n = max(1, -(-size // cfg.block_size) // 2)
    x, lr_up, lr, vec = _random_inputs(cfg, size, run.device)
    image = (lr.to(run.device), vec)
    modes = {"device": {}, "host": {"cache_device": "cpu"}, "host_sync": {"cache_device": "cpu"}}
    times: dict[str, list[float]] = {k: [] for k in modes}
    for r in range(run.profile.rounds + 1):  # round 0 warms up
        for name, kw in modes.items():
            ctx = _prefetch_disabled() if name == "host_sync" else contextlib.nullcontext()
            with ctx:
                t = _timed(lambda: _denoise(m, x, 2.0, lr_up=lr_up, image=image, n=n, **kw), run.device)
            if r > 0:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    copy = med["host_sync"] - med["device"]
    hidden = (med["host_sync"] - med["host"]) / copy if copy > 0 else None  # None: no copy cost to hide
    verdict = "no copy cost measured" if hidden is None else f"{hidden:.0%} of the copy time hidden"
    return Check("speed", f"host-copy time hidden by the prefetch ({size}², n={n})", "info",
                 f"device cache {med['device']:.3g} s, host cache {med['host']:.3g} s (inline copies "
                 f"{med['host_sync']:.3g} s): {verdict}", "",
                 time.perf_counter() - t0,
                 {**{f"{k}_s": v for k, v in med.items()}, "hidden_fraction": hidden})


def check_compile(run: _Run) -> Check:
    """`--compile`: its one-off compile time, and eager against compiled seconds per call (auto n)."""
    t0, p = time.perf_counter(), run.profile
    if run.device.type != "cuda":
        return Check("speed", "torch.compile (--compile)", "skip", "offered on CUDA only", "", 0.0)
    m, size = run.model("random"), p.speed_sizes[0]
    chosen = _plan(m.config, (size, size), p.budget, m.dtype, run.device)
    n = None if chosen.whole_image else chosen.n
    cache = "cpu" if chosen.cache_on_host else None
    x, lr_up, lr, vec = _random_inputs(m.config, size, run.device)
    image = (lr.to(run.device), vec)

    def call(compiled: bool):
        return _denoise(m, x, 2.0, lr_up=lr_up, image=image, n=n, cache_device=cache, compile=compiled)

    first = _timed(lambda: call(True), run.device)  # compiles
    eager_out, compiled_out = call(False), call(True)
    diff = float((eager_out - compiled_out).abs().max())
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(p.rounds):
        for compiled in (False, True):
            times[compiled].append(_timed(lambda compiled=compiled: call(compiled), run.device))
    te, tc = statistics.median(times[False]), statistics.median(times[True])
    mode = "whole image" if n is None else f"n={n}"
    return Check("speed", f"torch.compile (--compile), {size}² ({p.config}, {p.dtype}, {mode})", "info",
                 f"eager {te:.3g} s, compiled {tc:.3g} s per call (x{te / tc:.2f}); first compiled call "
                 f"{first:.3g} s; max |compiled - eager| {diff:.2g}", "", time.perf_counter() - t0,
                 {"eager_s": te, "compiled_s": tc, "first_call_s": first, "max_diff": diff, "n": n})


def check_big_plan(run: _Run) -> Check:
    """One call of the big plan with the plan's own storage: state in its dtype (memory-mapped when the
    plan says so), the LR conditioning upsampled per rectangle as the pipeline does, not held."""
    from .pipeline import Upsampled
    from .storage import Scratch

    t0, p = time.perf_counter(), run.profile
    m = run.model("random")
    lr_side, side = p.big
    chosen = _plan(m.config, (side, side), p.budget, m.dtype, run.device)
    state = torch.device("cpu") if chosen.state_on_host else run.device
    n = None if chosen.whole_image else chosen.n
    cache = "cpu" if chosen.cache_on_host else None
    mode = "whole image" if n is None else f"n={n}, cache {'host' if cache else 'device'}, " \
                                          f"state {'host' if chosen.state_on_host else 'device'}"
    name = f"one call, {lr_side}² -> {side}² plan ({p.config}, {p.dtype}, {_gib(p.budget)}: {mode})"
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 3, lr_side, lr_side, generator=g) * 2 - 1
    vec = torch.randn(1, m.config.vector_dim, generator=g)
    shape, sdtype = (1, 3, side, side), chosen.state_dtype
    with Scratch(tempfile.gettempdir()) if chosen.low_memory else contextlib.nullcontext() as scratch:
        if scratch is not None:
            x, out = (scratch.empty(k, shape, sdtype) for k in ("x", "out"))
        else:
            x, out = (torch.empty(shape, dtype=sdtype, device=state) for _ in range(2))
        for r0 in range(0, side, 512):  # noise row by row: no float32 image beside the state
            x[..., r0 : r0 + 512, :] = torch.randn(1, 3, min(512, side - r0), side, generator=g).to(x)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        sec = _timed(lambda: _denoise(m, x, 2.0, lr_up=Upsampled(lr, (side, side)), image=(lr, vec), n=n,
                                      cache_device=cache, out=out), run.device)
    numbers = {"seconds": sec, "predicted": chosen.estimate.total, "budget": p.budget, "n": n}
    if run.device.type != "cuda":
        return Check("plan", name, "info", f"{sec:.3g} s; peak not measured off CUDA (predicted "
                     f"{_gib(chosen.estimate.total)})", "", time.perf_counter() - t0, numbers)
    peak = torch.cuda.max_memory_allocated(run.device)
    numbers["measured"] = peak
    return Check("plan", name, "pass" if peak <= p.budget else "fail",
                 f"{sec:.3g} s, peak {_gib(peak)} (predicted {_gib(chosen.estimate.total)})",
                 f"peak <= {_gib(p.budget)}", time.perf_counter() - t0, numbers)


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def calibrate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of one matmul on `device` in `dtype`, best of 3 after a warm-up (about a second): (4096 x 1024)
    @ (1024 x 4096) on the CPU, 8192^3 on a GPU (a smaller one would time the launch, not the GPU). The
    time budget's predictions divide a check's FLOPs by half of it."""
    m, k, n = (8192, 8192, 8192) if device.type == "cuda" else (4096, 1024, 4096)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    times = [_timed(lambda: a @ b, device) for _ in range(4)]
    return 2 * m * k * n / min(times[1:])


@dataclass(frozen=True)
class _Step:
    label: str
    run: Callable[[], Check | list[Check]]
    predicted: float  # seconds
    group: str


def _steps(run: _Run, rate: float) -> list[_Step]:
    """The checks in order of importance (correctness, memory, speed, the big plan, compile), each with
    its predicted seconds: its FLOPs at `rate`, plus the profile's fixed costs."""
    from .bench import flops_per_call
    from .config import PRESETS

    p = run.profile
    cfg = PRESETS[p.config]
    fx = _fixture_config(run.fixture_a)
    fh, fw = (int(v) for v in run.io["x"].shape[-2:])
    bh, bw = p.block_image

    def calls(k: int, c, h: int, w: int) -> float:
        return k * (flops_per_call(c, h, w) / rate + p.call_s)

    load = 2.0  # convert + load one fixture checkpoint
    steps = [
        _Step("fp32 denoiser call", lambda: check_fp32_call(run), load + calls(1, fx, fh, fw), "parity"),
        _Step("fp32 20-step sample", lambda: check_fp32_sample(run), calls(39, fx, fh, fw), "parity"),
        _Step("block modes and cache placement", lambda: check_block_modes(run), calls(6, fx, bh, bw), "parity"),
        _Step("bf16 vs the official bf16 path", lambda: check_bf16(run), load + calls(41, fx, fh, fw), "bf16"),
        *[_Step(f"peak memory at {s}²", lambda s=s: check_memory(run, s), p.process_s + calls(2, cfg, s, s),
                "memory") for s in p.mem_sizes],
        *[_Step(f"speed at {s}²", lambda s=s: check_speed(run, s),
                p.process_s + calls(2 * (p.rounds + 1), cfg, s, s), "speed") for s in p.speed_sizes],
    ]
    s = p.speed_sizes[-1]
    steps.append(_Step("prefetch", lambda: check_prefetch(run),
                       calls(3 * (p.rounds + 1), cfg, s, s) if run.device.type == "cuda" else 0.0, "speed"))
    big = p.big[1]
    steps.append(_Step(f"one call at {big}²", lambda: check_big_plan(run), p.process_s + calls(1, cfg, big, big),
                       "plan"))
    s = p.speed_sizes[0]
    steps.append(_Step("torch.compile", lambda: check_compile(run),
                       p.compile_s + calls(3 + 2 * p.rounds, cfg, s, s) if run.device.type == "cuda" else 0.0,
                       "speed"))
    return steps


def _fixture_config(fixture: Path):
    """The fixture model's `InfDiTConfig`, from its official arguments (for the FLOP count only)."""
    import json

    from .config import InfDiTConfig

    argv = json.loads((fixture / "config.json").read_text())["argv"]
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
        fixtures: a folder holding `upstream-a/` and `upstream-a-bf16/` (default: the repository's).
        profile: the sizes; default `CUDA_PROFILE` on CUDA, else `TOY_PROFILE`.
        time_budget: seconds for the whole run: a check whose predicted time would overrun it is not
            started; its row says so ("skip", with the prediction). None: no limit.
        on_event: receives `SelftestStarted`, then `CheckStarted` and `CheckDone` per check.

    Raises:
        BadRequest: a fixture is not found, or the device does not exist here.
    """
    from .bench import environment
    from .events import SelftestStarted
    from .upscaler import resolve_device

    t_all = time.perf_counter()
    dev = resolve_device(str(device))
    profile = profile or (CUDA_PROFILE if dev.type == "cuda" else TOY_PROFILE)
    run = _Run(dev, profile, *find_fixtures(fixtures))
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
