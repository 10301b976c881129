"""Measurements of one denoiser call: peak memory and seconds, each configuration in a fresh process.

Peak memory is what a call adds on top of what was resident before it (model, inputs): on CUDA
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, on the CPU the process's peak RSS
(`VmHWM`, reset through `/proc/self/clear_refs`) minus its RSS just before the call. On the CPU the
measured call follows a warm-up call and a `malloc_trim`: the library code a first call pages in (tens
of MiB, and how much depends on the CPU's kernels) and heap the allocator kept from the warm-up are not
the call's working memory. The planner's prediction of that same quantity is reported beside it.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .engine import denoise
from .planner import flops_per_call

__all__ = ["CallSpec", "CallMeasurement", "BenchRow", "measure", "time_pair", "run_bench", "flops_per_call",
           "environment"]


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
    seconds: float  # median of the timed calls
    tokens: int
    flops: float


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


def measure(spec: CallSpec, timeout: float = 1800) -> CallMeasurement:
    """Run `spec` in a fresh Python process and return what it measured."""
    cmd = [sys.executable, "-m", "infdit_cli.bench", json.dumps(asdict(spec))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"measurement {spec} failed: {tail}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    return CallMeasurement(spec=spec, **data)


def _status(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def _rss() -> int:
    return _status("VmRSS")


def _reset_host_peak() -> bool:
    """Give the heap's free memory back (glibc `malloc_trim`) and reset the peak RSS (`VmHWM`) to the
    RSS now; False where the kernel does not allow it (then the peak since the process began counts)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _setup(spec: CallSpec):
    """The model and seeded inputs one worker process measures: (model, x, lr_up, image)."""
    from .config import PRESETS
    from .hub import fetch_clip_tower
    from .weights import load_model, random_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    dtype, dev = getattr(torch, spec.dtype), torch.device(spec.device)
    model = load_model(spec.weights, device=dev, dtype=dtype, clip_tower=fetch_clip_tower) if spec.weights else \
        random_model(PRESETS[spec.config], seed=0, device=dev, dtype=dtype)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    h, w = spec.height, spec.width
    x = torch.randn(1, 3, h, w, generator=gen)
    lr_up = torch.randn(1, 3, h, w, generator=gen)
    lr = torch.randn(1, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=gen)
    image = (lr.to(dev), torch.randn(1, cfg.vector_dim, generator=gen))  # per-image conditioning: lr, vector
    return model, x.to(dev), lr_up.to(dev), image


def _timed_call(model, x: torch.Tensor, lr_up: torch.Tensor, image, spec: CallSpec) -> float:
    """Seconds for one denoiser call of `spec`'s mode (synchronised on CUDA)."""
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    denoise(model, x, 2.0, lr_up=lr_up, lr=image[0], vector=image[1], block_batch=spec.n, order=spec.order,
                  cache_device="cpu" if spec.cache_on_host else None)
    if cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def _measure_here(spec: CallSpec) -> dict:
    from .planner import estimate

    model, x, lr_up, image = _setup(spec)
    cfg, dev = model.config, x.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        _timed_call(model, x, lr_up, image, spec)  # warm-up (not timed)
    else:
        _timed_call(model, x, lr_up, image, spec)  # warm-up: pages the kernels' code in (not timed)
        hwm = _reset_host_peak()
        before = _rss()
    times = [_timed_call(model, x, lr_up, image, spec) for _ in range(spec.repeats)]
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    elif hwm:
        peak = _status("VmHWM") - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    h, w = spec.height, spec.width
    est = estimate(cfg, (h, w), spec.n, dtype=model.dtype, device_type=dev.type,
                   cache_on_host=spec.cache_on_host, state_on_host=True, order=spec.order)
    predicted = est.cache + est.activations + est.overhead + 3 * h * w * 4  # + the call's output image
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    return dict(peak_bytes=int(peak), predicted_bytes=int(predicted), seconds=statistics.median(times),
                tokens=gh * gw * cfg.block_tokens**2, flops=flops_per_call(cfg, h, w))


def time_pair(block: CallSpec, whole: CallSpec, rounds: int = 3, timeout: float = 1800) -> tuple[float, float]:
    """Median seconds per call of `block` and `whole`, alternated in one fresh process (same model, same
    inputs, same machine state), so their ratio is not at the mercy of a noisy neighbour between runs."""
    cmd = [sys.executable, "-m", "infdit_cli.bench", json.dumps(asdict(block)), json.dumps(asdict(whole)),
           str(rounds)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"paired timing failed: {tail}")
    a, b = json.loads(res.stdout.strip().splitlines()[-1])
    return a, b


def _time_pair_here(a: CallSpec, b: CallSpec, rounds: int) -> list[float]:
    model, x, lr_up, image = _setup(a)  # b differs from a only in its mode (n, order, cache placement)
    times: list[list[float]] = [[], []]
    for r in range(rounds + 1):  # round 0 warms both up
        for i, spec in enumerate((a, b)):
            t = _timed_call(model, x, lr_up, image, spec)
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

    @property
    def block_seconds(self) -> float:
        """Seconds per block-mode call: the paired median where there is one (agrees with `whole_seconds`)."""
        return self.paired_seconds[0] if self.paired_seconds else self.block.seconds

    @property
    def whole_seconds(self) -> float | None:
        return self.paired_seconds[1] if self.paired_seconds else None


def _report(on_event, index: int, total: int, label: str, work: float,
            work_total: float) -> tuple[int, float]:
    from .events import MeasureDone

    if on_event is not None:
        on_event(MeasureDone(index + 1, total, label, work, work_total))
    return index + 1, work


def run_bench(cfg, sizes: list[tuple[int, int]], *, budget: int, device: str, dtype: torch.dtype, steps: int,
              config_name: str, weights: str | None = None, repeats: int = 3,
              on_event: Callable[[object], None] | None = None) -> list[BenchRow]:
    """For each (H, W): plan under `budget`, then measure that plan and the whole-image pass.

    `on_event` receives a `MeasureDone` after each fresh-process measurement; its `work` counts
    FLOPs x calls, so `work / work_total` tracks the time spent (for an ETA).
    """
    from .planner import estimate, plan

    dev = torch.device(device)
    todo = []  # (h, w, plan, n, whole fits): planned up front so the total work is known
    for h, w in sizes:
        p = plan(cfg, (h, w), budget=budget, dtype=dtype, device=dev)
        grid = max(-(-h // cfg.block_size), -(-w // cfg.block_size))
        n = min(p.n, max(grid - 1, 1)) if p.whole_image and grid > 1 else p.n  # a real block mode
        w_est = estimate(cfg, (h, w), None, dtype=dtype, device_type=dev.type, state_on_host=True)
        todo.append((h, w, p, n, w_est))
    calls = 1 + repeats  # per fresh-process measurement; the alternated pair makes twice as many
    fits = [e.total <= budget for *_, e in todo]
    work_total = sum(flops_per_call(cfg, h, w) * calls * (4 if f else 1) for (h, w, *_), f in zip(todo, fits))
    work, index = 0.0, 0
    total = sum(3 if f else 1 for f in fits)

    rows = []
    for (h, w, p, n, w_est), fits_budget in zip(todo, fits):
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
        rows.append(BenchRow(size, h, w, n, p.cache_on_host, block, block.predicted_bytes, whole, w_est.total,
                             2 * steps - 1, paired))
    return rows


if __name__ == "__main__":  # the fresh process behind `measure` and `time_pair`
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if len(sys.argv) == 4:
        pair = [CallSpec(**json.loads(v)) for v in sys.argv[1:3]]
        print(json.dumps(_time_pair_here(*pair, int(sys.argv[3]))))
    else:
        print(json.dumps(_measure_here(CallSpec(**json.loads(sys.argv[1])))))
