"""`infdit bench`: what fits in a memory budget, and how fast, measured."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from ..errors import BadRequest
from . import _options as O

EXAMPLES = """Examples:

  infdit bench --random-weights --config small --device cpu

  infdit bench --mem-budget 8GB                      # default weights (infdit-4x or $INFDIT_WEIGHTS)

  infdit bench --random-weights --config official --device cuda --mem-budget 8GB --res 1024,2048,4096x2048
"""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024,2048x1024' -> [(1024, 1024), (1024, 2048)]: (H, W) from a side or WxH."""
    sizes = []
    for item in text.split(","):
        try:
            w, h = (int(v) for v in item.lower().split("x")) if "x" in item.lower() else (int(item),) * 2
        except ValueError:
            raise BadRequest(f"--res: {item.strip()!r} is not a size like 1024 or 2048x1024 (WxH)") from None
        if w < 1 or h < 1:
            raise BadRequest(f"--res: sizes must be positive, got {item.strip()!r}")
        sizes.append((h, w))
    return sizes


def bench(
    mem_budget: O.MemBudget = None,
    res: Annotated[Optional[str], typer.Option(help=(
        "Comma-separated output sizes, a side (square) or WxH (default: 1024,2048,4096,8192 on CUDA; "
        "256,512,1024 on CPU)."))] = None,
    weights: O.Weights = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help=(
        "Measure without downloading: seeded random weights of --config (memory and speed do not depend "
        "on weight values)."))] = False,
    config: Annotated[str, typer.Option(
        help="Architecture for --random-weights: official, small or tiny.")] = "official",
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    steps: O.Steps = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per configuration (after one warm-up).")] = 3,
    json_: O.Json = False,
    quiet: O.Quiet = False,
) -> None:
    """Measure peak memory and speed of the block engine against the whole-image pass.

    Uses the same weights as `upscale` (--weights, else $INFDIT_WEIGHTS, else infdit-4x), or
    --random-weights to measure without any download. Each configuration runs in a fresh process;
    peaks are what one denoiser call adds to the resident model and inputs (CUDA: max_memory_allocated;
    CPU: peak RSS), shown beside the planner's prediction.
    """
    from ..bench import environment, run_bench
    from ..config import PRESETS
    from ..planner import HOST_RUNTIME, device_free, format_bytes, host_available, parse_bytes
    from ..upscaler import resolve_device, resolve_dtype

    if random_weights and weights is not None:
        raise BadRequest("give either --weights or --random-weights, not both")
    if random_weights and config not in PRESETS:
        raise BadRequest(f"unknown --config {config!r}; use one of {', '.join(PRESETS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        budget = parse_bytes(mem_budget) if mem_budget else (device_free(dev) or host_available() - HOST_RUNTIME["cpu"])
    except ValueError as e:
        raise BadRequest(f"--mem-budget: {e}") from None
    sizes = parse_sizes(res or ("1024,2048,4096,8192" if dev.type == "cuda" else "256,512,1024"))
    weights_path = None
    if random_weights:
        cfg, source = PRESETS[config], f"random weights, {config} config"
    else:
        from ..errors import WeightsNotFound
        from ..hub import resolve_weights
        from ..weights import inspect_file

        from ._fetch import ensure_weights

        ensure_weights(weights, None, False, quiet)  # first use: fetched once (not under HF/INFDIT_OFFLINE)
        try:
            weights_path = str(resolve_weights(weights))
        except WeightsNotFound as e:
            raise WeightsNotFound(f"{e}; or measure without weights: --random-weights") from None
        cfg, source = inspect_file(weights_path)[0], weights_path
    from ..calibrate import calibration

    rates = calibration(cfg, dev, dt, refresh=True)  # the time estimates of later plans use these
    env = environment()
    dt_name = str(dt).removeprefix("torch.")
    header = (f"{source} ({cfg.hidden_size} hidden, {cfg.num_layers} layers), {dev.type} {dt_name}, "
              f"budget {format_bytes(budget)}; " + ", ".join(f"{k} {v}" for k, v in env.items())
              + f"\ncalibrated (cached for the time estimates): {rates.flops / 1e9:.1f} GFLOP/s per layer's "
              f"work, {rates.op_seconds * 1e6:.1f} us per tensor operation, {rates.copy_bytes / 1e9:.1f} GB/s copies")
    display = _Progress(enabled=not quiet and sys.stderr.isatty())
    try:
        rows = run_bench(cfg, sizes, budget=budget, device=str(dev), dtype=dt, steps=steps,
                         config_name=config, weights=weights_path, repeats=repeats, on_event=display)
    finally:
        display.stop()
    if json_:
        typer.echo(json.dumps({"environment": env, "weights": source, "budget": budget, "device": dev.type,
                               "dtype": dt_name, "calibration": asdict(rates),
                               "rows": [_row_json(r) for r in rows]}))
        return
    _print_table(rows, header, steps, dev.type)


def _row_json(r) -> dict:
    d = asdict(r)
    d["block_seconds"], d["whole_seconds"] = r.block_seconds, r.whole_seconds
    return d


class _Progress:
    """One bar over the measurements with an ETA (rich, stderr); nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.progress = self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task("measuring (each configuration in a fresh process)",
                                               total=None)

    def __call__(self, event: object) -> None:
        from ..events import MeasureDone

        if self.progress is not None and isinstance(event, MeasureDone):
            # Work is FLOPs x calls, so the ETA weighs big sizes by what they cost.
            self.progress.update(self.task, total=event.work_total, completed=event.work,
                                 description=f"measured {event.label} ({event.index}/{event.total})")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_table(rows, header: str, steps: int, device_type: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..planner import format_bytes

    table = Table(title=header, title_justify="left")
    for col in ("size WxH", "n / cache", "peak block (pred.)", "peak whole (pred.)", "mem whole/block",
                "s/call block", "s/call whole", "block overhead", "TFLOP/s block",
                f"run: {2 * steps - 1} calls"):
        table.add_column(col, justify="right")
    for r in rows:
        b, w = r.block, r.whole
        tb, tw = r.block_seconds, r.whole_seconds
        table.add_row(
            r.size, f"{r.n} / {'host' if r.cache_on_host else 'device'}",
            f"{format_bytes(b.peak_bytes)} ({format_bytes(b.predicted_bytes)})",
            f"{format_bytes(w.peak_bytes)} ({format_bytes(w.predicted_bytes)})" if w
            else f"over budget ({format_bytes(r.whole_predicted)})",
            f"{w.peak_bytes / b.peak_bytes:.1f}x" if w else "-",
            f"{tb:.3g}", f"{tw:.3g}" if tw else "-",
            f"{(tb / tw - 1) * 100:+.0f}%" if tw else "-",
            f"{b.flops / tb / 1e12:.3g}",
            f"{tb * r.calls_per_run:.3g} s",
        )
    console = Console() if sys.stdout.isatty() else Console(width=180)  # a file or pipe gets the whole table
    console.print(table)
    console.print("s/call block and whole: medians of calls alternated in one process (so the overhead "
                  "column is their ratio); peaks: each mode in its own fresh process.")
