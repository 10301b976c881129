"""Measurements of one denoiser call: peak memory and seconds, each configuration in a fresh process.

Each mode builds one `BlockEngine` and its K/V cache once (allocated; pinned next to a CUDA model), times
that as `setup_seconds`, warms up, and only then times its calls: the timed calls reuse the
engine, as the calls of a real pass do. The cache's writes (the device->host "puts" of a host-side cache)
are also timed alone, as `put_seconds`.

Peak memory is what a call adds on top of what was resident before it (model, inputs): on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (taken before the engine is built, so its
cache counts), on the CPU the process's peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) minus its
RSS just before the engine's cache is made again. On the CPU the measured calls follow a warm-up call and
a `malloc_trim`: the library code a first call pages in (tens of MiB, and how much depends on the CPU's
kernels) and heap the allocator kept from the warm-up are not the call's working memory. The planner's
prediction of that same quantity is reported beside it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..engine.blocks import BlockEngine
from ..errors import signal_name
from ..events import MeasureDone
from ..model.config import PRESETS
from ..model.infdit import random_model
from ..plan import planner  # planner.call_seconds: looked up per call, so a test can stand in for it
from ..plan.grid import plan_rects
from ..plan.meter import host_status, reset_host_peak, rss, sync, timed
from ..plan.planner import Placement, estimate, flops_per_call, plan
from ..settings import settings
from ..units import format_seconds
from ..weights.format import load_model
from ..weights.hub import fetch_clip_tower

__all__ = ["CallSpec", "CallMeasurement", "BenchRow", "Skipped", "measure", "time_pair", "run_bench",
           "flops_per_call", "environment", "ROW_SECONDS_LIMIT"]

# Default sizes stop where the predicted time of one size's measurements passes this (sizes given
# explicitly always run).
ROW_SECONDS_LIMIT = 90.0


@dataclass(frozen=True)
class CallSpec:
    config: str  # a preset name (config.PRESETS)
    height: int
    width: int
    n: int | None  # None: the whole-image pass
    order: str = "auto"
    cache_on_host: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3  # timed calls after one warm-up call
    threads: int | None = None
    weights: str | None = None  # a converted file instead of the preset's random weights


@dataclass(frozen=True)
class CallMeasurement:
    spec: CallSpec
    peak_bytes: int
    predicted_bytes: int
    seconds: float  # median of the timed calls (the engine and its cache built before them)
    tokens: int
    flops: float
    setup_seconds: float = 0.0  # building the engine and its K/V cache (allocated, touched; pinned on CUDA)
    put_seconds: float | None = None  # one call's K/V cache writes (device->host next to a GPU), timed alone
    put_bytes: int = 0  # what those writes move


def environment() -> dict[str, str]:
    import platform

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    return env


def _child(args: list[str], timeout: float, what: str) -> str:
    """Run `python -m infdit_cli.tools.bench ARGS` and return its last stdout line. The child dies with this
    process: a stop here (Ctrl-C, SIGTERM: the CLI raises it as KeyboardInterrupt) kills it and waits for it
    before going on, and it is killed by the kernel if this process is killed outright."""
    cmd = [sys.executable, "-m", "infdit_cli.tools.bench", *args]
    env = {**os.environ, "INFDIT_BENCH_PARENT": str(os.getpid())}
    # A stop that came while Popen was starting the child (after its fork, before `proc` existed) would leave
    # the child to the kernel's death signal and a zombie for init to reap: stops are held until `proc` is
    # ours to kill (the child unblocks them first thing, `_unblock_stops`).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a stop held meanwhile is raised here
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} took longer than {timeout:.0f} s") from None
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        if proc.returncode < 0:
            raise RuntimeError(f"{what} was killed by {signal_name(-proc.returncode)}")
        tail = (err.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{what} failed: {tail}")
    return out.strip().splitlines()[-1]


def measure(spec: CallSpec, timeout: float = 1800) -> CallMeasurement:
    """Run `spec` in a fresh Python process and return what it measured."""
    data = json.loads(_child([json.dumps(asdict(spec))], timeout, f"measurement {spec}"))
    return CallMeasurement(spec=spec, **data)


def _setup(spec: CallSpec):
    """The model and seeded inputs one worker process measures: (model, x, lr_up, image)."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtype, dev = getattr(torch, spec.dtype), torch.device(spec.device)
    model = load_model(spec.weights, device=dev, dtype=dtype,
                       clip_tower=fetch_clip_tower) if spec.weights else \
        random_model(PRESETS[spec.config], seed=0, device=dev, dtype=dtype)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    h, w = spec.height, spec.width
    x = torch.randn(1, 3, h, w, generator=gen)
    lr_up = torch.randn(1, 3, h, w, generator=gen)
    lr = torch.randn(1, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=gen)
    image = (lr.to(dev), torch.randn(1, cfg.vector_dim, generator=gen))  # per-image conditioning: lr, vector
    return model, x.to(dev), lr_up.to(dev), image


def _engine(model, lr_up: torch.Tensor, image, spec: CallSpec):
    """The engine of `spec`'s mode, nothing allocated yet (`_build` makes its cache)."""
    placement = Placement(n=spec.n or 1 << 30, order=spec.order, cache_on_host=spec.cache_on_host)
    return BlockEngine(model, image[0], image[1], lr_up, placement)


def _build(model, lr_up: torch.Tensor, image, spec: CallSpec, batch: int):
    """(engine, seconds): `spec`'s engine with its K/V cache made: allocated, and pinned next to a CUDA model
    (`Scratch(pin=True)`: every page faulted in and registered). On the CPU the slab's pages are left to be
    faulted in as the calls write them, as in a real pass: the peak RSS counts the slots a pass uses, not
    the whole slab (at 512², n=2 a pass writes about half of its 10 slots)."""
    dev = model.device
    sync(dev)
    t0 = time.perf_counter()
    engine = _engine(model, lr_up, image, spec)
    engine.prepare(batch)
    sync(dev)
    return engine, time.perf_counter() - t0


def _call(engine, x: torch.Tensor, out: torch.Tensor) -> float:
    """Seconds for one denoiser call on a prepared engine (synchronised on CUDA)."""
    return timed(lambda: engine(x, 2.0, out), x.device)


def _time_puts(engine, batch: int) -> tuple[float | None, int]:
    """One call's K/V cache writes (`KVCache.put`: device->host next to a GPU with the cache on the host)
    timed alone, with the engine's own cache and path: (seconds, bytes). (None, 0): no cache (whole image)."""
    cache = engine.cache
    if cache is None:
        return None, 0
    g, cfg, dev = engine.grid, engine.cfg, engine.model.device
    puts = sum(len(r.blocks_needed_later()) for r in plan_rects(g.gh, g.gw, engine.n, engine.order))
    entry = (batch, cfg.block_tokens**2, cfg.num_heads, cfg.head_dim)
    k = torch.randn(entry, device=dev).to(engine.model.dtype)
    v = torch.randn(entry, device=dev).to(engine.model.dtype)
    cache.clear()
    sync(dev)
    t0 = time.perf_counter()
    for i in range(puts):
        if i and i % cache.slots == 0:
            cache.clear()
        for layer in range(cfg.num_layers):
            cache.put((i, 0), layer, k, v)
    sync(dev)
    seconds = time.perf_counter() - t0
    cache.clear()
    return seconds, puts * cfg.num_layers * 2 * k.numel() * k.element_size()


def _measure_here(spec: CallSpec) -> dict:
    model, x, lr_up, image = _setup(spec)
    cfg, dev, b = model.config, x.device, x.shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        engine, setup = _build(model, lr_up, image, spec, b)  # pinned once, here
        out = torch.empty(x.shape, dtype=torch.float32, device=dev)
        _call(engine, x, out)  # warm-up (not timed)
    else:
        warm, _ = _build(model, lr_up, image, spec, b)
        _call(warm, x, torch.empty(x.shape, dtype=torch.float32))  # warm-up: pages the kernels' code in
        del warm  # the measured engine below makes its own cache and buffers, inside the measured peak
        hwm = reset_host_peak()
        before = rss()
        engine, setup = _build(model, lr_up, image, spec, b)
        # (the per-pass work buffers come with the first call)
        out = torch.zeros(x.shape, dtype=torch.float32)
    times = [_call(engine, x, out) for _ in range(spec.repeats)]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    elif hwm:
        peak = host_status("VmHWM") - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    put_seconds, put_bytes = _time_puts(engine, b)
    h, w = spec.height, spec.width
    est = estimate(cfg, (h, w), spec.n, dtype=model.dtype, device_type=dev.type,
                   cache_on_host=spec.cache_on_host, state_on_host=True, order=spec.order)
    predicted = est.cache + est.activations + est.overhead + 3 * h * w * 4  # + the call's output image
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    return dict(peak_bytes=int(peak), predicted_bytes=int(predicted), seconds=statistics.median(times),
                tokens=gh * gw * cfg.block_tokens**2, flops=flops_per_call(cfg, h, w), setup_seconds=setup,
                put_seconds=put_seconds, put_bytes=put_bytes)


def time_pair(block: CallSpec, whole: CallSpec, rounds: int = 3, timeout: float = 1800
              ) -> tuple[float, float]:
    """Median seconds per call of `block` and `whole`, alternated in one fresh process (same model, same
    inputs, same machine state), so their ratio is not at the mercy of a noisy neighbour between runs.
    Each mode's engine and cache are built once, before the warm-up round."""
    line = _child([json.dumps(asdict(block)), json.dumps(asdict(whole)), str(rounds)], timeout,
                  "paired timing")
    a, b = json.loads(line)
    return a, b


def _time_pair_here(a: CallSpec, b: CallSpec, rounds: int) -> list[float]:
    model, x, lr_up, image = _setup(a)  # b differs from a only in its mode (n, order, cache placement)
    engines = [_build(model, lr_up, image, spec, x.shape[0])[0] for spec in (a, b)]
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    times: list[list[float]] = [[], []]
    for r in range(rounds + 1):  # round 0 warms both up
        for i, e in enumerate(engines):
            t = _call(e, x, out)
            if r > 0:
                times[i].append(t)
    return [statistics.median(t) for t in times]


@dataclass(frozen=True)
class BenchRow:
    """One output size: the planner's block mode and the whole-image pass, measured or predicted."""

    size: str  # "WxH", as everywhere else
    height: int
    width: int
    n: int
    cache_on_host: bool
    block: CallMeasurement
    block_predicted: int
    whole: CallMeasurement | None  # None: the whole image does not fit the budget (predicted only)
    whole_predicted: int
    calls_per_run: int
    paired_seconds: tuple[float, float] | None = None  # (block, whole) medians alternated in one process
    predicted_seconds: float | None = None  # the cost model's seconds per block-mode call

    @property
    def block_seconds(self) -> float:
        """Seconds per block-mode call: the paired median where there is one (agrees with `whole_seconds`)."""
        return self.paired_seconds[0] if self.paired_seconds else self.block.seconds

    @property
    def whole_seconds(self) -> float | None:
        return self.paired_seconds[1] if self.paired_seconds else None


@dataclass(frozen=True)
class Skipped:
    """A default size not measured: its measurements were predicted to take longer than `limit` seconds."""

    size: str  # "WxH"
    height: int
    width: int
    n: int
    predicted_seconds: float  # per block-mode call
    predicted_row_seconds: float  # all of this size's calls (block, whole, alternated)
    limit: float

    @property
    def reason(self) -> str:

        res = f"{self.width}" if self.width == self.height else self.size
        return (f"skipped: predicted {format_seconds(self.predicted_seconds)} per call, "
                f"{format_seconds(self.predicted_row_seconds)} for this size (default sizes stop at "
                f"{format_seconds(self.limit)}); give --res {res} to run it")


def _report(on_event, index: int, total: int, label: str, work: float,
            work_total: float) -> tuple[int, float]:
    if on_event is not None:
        on_event(MeasureDone(index + 1, total, label, work, work_total))
    return index + 1, work


def run_bench(cfg, sizes: list[tuple[int, int]], *, budget: int, device: str, dtype: torch.dtype, steps: int,
              config_name: str, weights: str | None = None, repeats: int = 3, rates=None,
              row_limit: float | None = None, on_event: Callable[[object], None] | None = None,
              on_row: Callable[[BenchRow | Skipped], None] | None = None) -> list[BenchRow | Skipped]:
    """For each (H, W): plan under `budget`, then measure that plan and the whole-image pass.

    `rates`: the device's calibrated rates, for the plans and their predicted times (default nominal).
    `row_limit`: sizes after the first whose measurements are predicted to take longer (seconds, all calls
    of the size) are not measured but returned as `Skipped` (the first always runs, so a calibration taken
    on a busy machine, which predicts everything long, still leaves one row). `on_row` receives each row
    as soon as it is measured (or skipped). `on_event` receives a `MeasureDone` after each fresh-process
    measurement; its `work` counts FLOPs x calls, so `work / work_total` tracks the time spent (an ETA).
    """
    dev = torch.device(device)
    kw = dict(dtype=dtype, device_type=dev.type)
    todo = []  # (h, w, plan, n, whole estimate, skipped): planned up front so the total work is known
    for h, w in sizes:
        p = plan(cfg, (h, w), budget=budget, dtype=dtype, device=dev, rates=rates)
        grid = max(-(-h // cfg.block_size), -(-w // cfg.block_size))
        n = min(p.n, max(grid - 1, 1)) if p.whole_image and grid > 1 else p.n  # a real block mode
        w_est = estimate(cfg, (h, w), None, dtype=dtype, device_type=dev.type, state_on_host=True)
        skip = None
        if row_limit is not None and todo:  # the first size always runs: there is always a row
            r = rates if rates is not None else p.rates
            tb = planner.call_seconds(cfg, (h, w), n, r, cache_on_host=p.cache_on_host, **kw)
            row = tb * (1 + repeats)
            if w_est.total <= budget:  # the whole image's own process, and both alternated
                tw = planner.call_seconds(cfg, (h, w), 1 << 30, r, **kw)
                row += tw * (1 + repeats) + (tb + tw) * (1 + repeats)
            if row > row_limit:
                skip = Skipped(f"{w}x{h}", h, w, n, tb, row, row_limit)
        todo.append((h, w, p, n, w_est, skip))
    calls = 1 + repeats  # per fresh-process measurement; the alternated pair makes twice as many
    fits = [e.total <= budget for *_, e, _ in todo]
    run = [s is None for *_, s in todo]
    work_total = sum(flops_per_call(cfg, h, w) * calls * (4 if f else 1)
                     for (h, w, *_), f, go in zip(todo, fits, run) if go)
    work, index = 0.0, 0
    total = sum((3 if f else 1) for f, go in zip(fits, run) if go)

    rows: list[BenchRow | Skipped] = []
    for (h, w, p, n, w_est, skip), fits_budget in zip(todo, fits):
        if skip is not None:
            rows.append(skip)
            if on_row is not None:
                on_row(skip)
            continue
        size = f"{w}x{h}"
        common = dict(config=config_name, height=h, width=w, device=dev.type,
                      dtype=str(dtype).removeprefix("torch."), repeats=repeats, weights=weights)
        flops = flops_per_call(cfg, h, w)
        block = measure(CallSpec(n=n, cache_on_host=p.cache_on_host, **common))
        index, work = _report(on_event, index, total, f"{size} n={n}", work + flops * calls, work_total)
        whole = paired = None
        if fits_budget:
            whole = measure(CallSpec(n=None, **common))
            index, work = _report(on_event, index, total, f"{size} whole image", work + flops * calls,
                                  work_total)
            paired = time_pair(block.spec, whole.spec, rounds=repeats)
            index, work = _report(on_event, index, total, f"{size} n={n} and whole alternated",
                                  work + 2 * flops * calls, work_total)
        predicted = planner.call_seconds(cfg, (h, w), n, rates if rates is not None else p.rates,
                                 cache_on_host=p.cache_on_host, **kw)
        row = BenchRow(size, h, w, n, p.cache_on_host, block, block.predicted_bytes, whole, w_est.total,
                       2 * steps - 1, paired, predicted)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


_STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _unblock_stops() -> None:
    """The signal mask is inherited across exec: `_child` starts this worker with the stops blocked."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the `infdit bench` that started it dies, however it dies."""
    parent = settings().bench_parent
    if parent is None:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the line above
        os._exit(1)


if __name__ == "__main__":  # the fresh process behind `measure` and `time_pair`
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _unblock_stops()
    _die_with_parent()
    if len(sys.argv) == 4:
        pair = [CallSpec(**json.loads(v)) for v in sys.argv[1:3]]
        print(json.dumps(_time_pair_here(*pair, int(sys.argv[3]))))
    else:
        print(json.dumps(_measure_here(CallSpec(**json.loads(sys.argv[1])))))
