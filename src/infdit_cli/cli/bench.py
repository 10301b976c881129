"""`infdit bench`: what fits in a memory budget, and how fast, measured."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from ..errors import BadRequest
from . import _options as O

EXAMPLES = """Examples:

  infdit bench --random-weights --config small --device cpu

  infdit bench --random-weights --config official --device cuda --mem-budget 8GB --res 1024,2048,4096
"""


def bench(
    mem_budget: O.MemBudget = None,
    res: Annotated[Optional[str], typer.Option(help=(
        "Comma-separated square output sizes (default: 1024,2048,4096,8192 on CUDA; 256,512,1024 on CPU)."))] = None,
    weights: O.Weights = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help=(
        "Seeded random weights of --config: no download; memory and speed do not depend on weight values."))] = False,
    config: Annotated[str, typer.Option(help="Architecture for --random-weights: official, small or tiny.")] = "official",
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    steps: O.Steps = 20,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per configuration (after one warm-up).")] = 3,
    json_: O.Json = False,
) -> None:
    """Measure peak memory and speed of the block engine against the whole-image pass.

    Each configuration runs in a fresh process; peaks are what one denoiser call adds to the resident
    model and inputs (CUDA: max_memory_allocated; CPU: peak RSS), shown beside the planner's prediction.
    """

    from ..bench import environment, flops_per_call, run_bench
    from ..config import PRESETS
    from ..planner import device_memory, format_bytes, parse_bytes
    from ..upscaler import resolve_device, resolve_dtype

    if random_weights == (weights is not None):
        raise BadRequest("give exactly one of --weights and --random-weights")
    if random_weights and config not in PRESETS:
        raise BadRequest(f"unknown --config {config!r}; use one of {', '.join(PRESETS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    weights_path = None
    if weights is not None:
        from ..hub import resolve_weights
        from ..weights import inspect_file

        weights_path = str(resolve_weights(weights))
        cfg = inspect_file(weights_path)[0]
    else:
        cfg = PRESETS[config]
    try:
        budget = parse_bytes(mem_budget) if mem_budget else device_memory(dev)
        sizes = [int(s) for s in (res or ("1024,2048,4096,8192" if dev.type == "cuda" else "256,512,1024"))
                 .split(",")]
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if any(s < 1 for s in sizes):
        raise BadRequest("--res sizes must be positive")
    env = environment()
    header = (f"config {config if random_weights else weights_path} ({cfg.hidden_size} hidden, {cfg.num_layers} "
              f"layers), {dev.type} {str(dt).removeprefix('torch.')}, budget {format_bytes(budget)}; "
              + ", ".join(f"{k} {v}" for k, v in env.items()))
    rows = []
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("measuring (each configuration in a fresh process)...") as status:
        def on_row(row):
            rows.append(row)
            status.update(f"measured {row.res} px; {len(sizes) - len(rows)} to go")

        run_bench(cfg, sizes, budget=budget, device=str(dev), dtype=dt, steps=steps,
                  config_name=config, weights=weights_path, repeats=repeats, on_row=on_row)
    if json_:
        typer.echo(json.dumps({"environment": env, "budget": budget, "device": dev.type,
                               "dtype": str(dt), "rows": [asdict(r) for r in rows]}))
        return
    from rich.table import Table

    table = Table(title=header, title_justify="left")
    for col in ("size", "n / cache", "block peak (pred.)", "whole peak (pred.)", "whole/block mem",
                "s/call block", "s/call whole", "block overhead", f"run ({2 * steps - 1} calls)", "tokens/s"):
        table.add_column(col, justify="right")
    for r in rows:
        b, w = r.block, r.whole
        tflops = ""
        if dev.type == "cuda":
            tflops = f", {flops_per_call(cfg, r.res, r.res) / b.seconds / 1e12:.1f} TFLOP/s"
        table.add_row(
            f"{r.res}", f"{r.n} / {'host' if r.cache_on_host else 'device'}",
            f"{format_bytes(b.peak_bytes)} ({format_bytes(b.predicted_bytes)})",
            f"{format_bytes(w.peak_bytes)} ({format_bytes(w.predicted_bytes)})" if w
            else f"over budget ({format_bytes(r.whole_predicted)})",
            f"{w.peak_bytes / b.peak_bytes:.1f}x" if w else "-",
            f"{b.seconds:.2f}", f"{w.seconds:.2f}" if w else "-",
            f"{(r.paired_seconds[0] / r.paired_seconds[1] - 1) * 100:+.0f}%" if r.paired_seconds else "-",
            f"{b.seconds * r.calls_per_run:.0f} s", f"{b.tokens / b.seconds:,.0f}{tflops}",
        )
    Console().print(table)
    Console().print("block overhead: block vs whole seconds per call, alternated in one process (medians).")
