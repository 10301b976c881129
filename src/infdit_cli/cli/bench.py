"""`infdit bench`: what fits in a memory budget, and how fast, measured."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from ..errors import BadRequest, Interrupted, WeightsNotFound
from ..events import MeasureDone
from ..units import format_bytes, parse_bytes
from . import _options as O
from ._progress import FirstLines, device_note

EXAMPLES = """Examples:

  infdit bench --random-weights --config small --device cpu

  infdit bench --random-weights --config tiny --res 64 --json | jq .   # one JSON object a line

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
        "256,512,1024 on CPU, where a size after the first whose measurements are predicted to take over "
        "90 s is skipped, with a line saying so; sizes given here always run)."))] = None,
    weights: O.Weights = None,
    random_weights: Annotated[bool, typer.Option("--random-weights", help=(
        "Measure without downloading: seeded random weights of --config (memory and speed do not depend "
        "on weight values)."))] = False,
    config: Annotated[str, typer.Option(
        help="Architecture for --random-weights: official, small or tiny.")] = "official",
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    steps: O.Steps = 20,
    repeats: Annotated[int,
                       typer.Option(min=1, help="Timed calls per configuration (after one warm-up).")] = 3,
    json_: Annotated[bool, typer.Option("--json", help=(
        "JSON lines on stdout, each written as soon as it is known: first {\"event\": \"bench\"} (weights, "
        "device, budget, environment, calibration), then one {\"event\": \"row\"} per measured size or "
        "{\"event\": \"skipped\"} per skipped one. No summary follows: the last size's line is the last "
        "line."))] = False,
    quiet: O.Quiet = False,
) -> None:
    """Measure peak memory and speed of the block engine against the whole-image pass.

    Uses the same weights as `upscale` (--weights, else $INFDIT_WEIGHTS, else infdit-4x), or
    --random-weights to measure without any download. Each configuration runs in a fresh process; each
    mode there builds its engine and K/V cache once (the "setup" column: allocating, and pinning on CUDA),
    warms up, and then times its calls. Peaks are what one denoiser call adds to the resident model and
    inputs (CUDA: max_memory_allocated; CPU: peak RSS), shown beside the planner's prediction. Each size's
    row is printed as soon as it is measured.
    """
    from ..model.config import PRESETS
    from ..plan.device import resolve_device, resolve_dtype
    from ..plan.planner import HOST_RUNTIME, device_free, host_available
    from ..tools.bench import ROW_SECONDS_LIMIT, environment, run_bench

    if random_weights and weights is not None:
        raise BadRequest("give either --weights or --random-weights, not both")
    if random_weights and config not in PRESETS:
        raise BadRequest(f"unknown --config {config!r}; use one of {', '.join(PRESETS)}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        budget = (parse_bytes(mem_budget) if mem_budget
                  else device_free(dev) or host_available() - HOST_RUNTIME["cpu"])
    except ValueError as e:
        raise BadRequest(f"--mem-budget: {e}") from None
    sizes = parse_sizes(res or ("1024,2048,4096,8192" if dev.type == "cuda" else "256,512,1024"))
    row_limit = ROW_SECONDS_LIMIT if res is None and dev.type == "cpu" else None
    # what will be measured, and why --device auto is the CPU: said before any download starts
    plan = f"bench: {', '.join(f'{w}x{h}' for h, w in sizes)} on {dev.type} {str(dt).removeprefix('torch.')}"
    if row_limit:
        plan += f" (default sizes stop where one is predicted over {row_limit:.0f} s)"
    first = FirstLines([plan, device_note(device, dev.type)], quiet)
    weights_path = None
    if random_weights:
        cfg, source = PRESETS[config], f"random weights, {config} config"
    else:
        from ..weights.format import inspect_file
        from ..weights.hub import resolve_weights
        from ._fetch import ensure_weights

        ensure_weights(weights, None, False, quiet, first)  # first use: fetched once (not offline)
        try:
            weights_path = str(resolve_weights(weights))
        except WeightsNotFound as e:
            raise WeightsNotFound(f"{e}; or measure without weights: --random-weights") from None
        cfg, source = inspect_file(weights_path)[0], weights_path
    first()
    from ..plan.calibrate import calibration

    out = _Out(json_, steps, display=_Progress(enabled=not quiet and sys.stderr.isatty()))
    env = environment()
    dt_name = str(dt).removeprefix("torch.")
    done = 0
    try:
        if not json_:
            out.line(f"{source} ({cfg.hidden_size} hidden, {cfg.num_layers} layers), {dev.type} {dt_name}, "
                     f"budget {format_bytes(budget)}; " + ", ".join(f"{k} {v}" for k, v in env.items()))
        rates = calibration(cfg, dev, dt, refresh=True)  # the time estimates of later plans use these
        if json_:
            out.json({"event": "bench", "weights": source, "device": dev.type, "dtype": dt_name,
                      "budget": budget, "environment": env, "calibration": asdict(rates),
                      "sizes": [f"{w}x{h}" for h, w in sizes], "row_seconds_limit": row_limit})
        else:
            out.line(f"calibrated (cached for the time estimates): {rates.flops / 1e9:.1f} GFLOP/s "
                     f"per layer's "
                     f"work, {rates.op_seconds * 1e6:.1f} us per tensor operation, "
                     f"{rates.copy_bytes / 1e9:.1f} GB/s copies")
            out.titles()

        def on_row(row) -> None:
            nonlocal done
            done += 1
            out.row(row)

        run_bench(cfg, sizes, budget=budget, device=str(dev), dtype=dt, steps=steps, config_name=config,
                  weights=weights_path, repeats=repeats, rates=rates, row_limit=row_limit,
                  on_event=out.display, on_row=on_row)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (errors.Signalled): the worker is gone too
        out.display.stop()
        err = Interrupted(f"{getattr(e, 'what', 'interrupted')} after {done} of {len(sizes)} size(s)")
        err.exit_code = getattr(e, "exit_code", 130)
        raise err from None
    finally:
        out.display.stop()
    if not json_:
        out.line("s/call block and whole: medians of calls alternated in one process (so the overhead column "
                 "is their ratio); peaks: each mode in its own fresh process; setup: building the block "
                 "engine and its K/V cache (pinning on CUDA), outside the timed calls; put: one call's "
                 "K/V cache writes (device->host with the cache on the host) timed alone.")


def _row_json(r) -> dict:
    from ..tools.bench import Skipped  # torch: kept off start-up (--help, usage errors)

    if isinstance(r, Skipped):
        return {"event": "skipped", **asdict(r), "reason": r.reason}
    d = {"event": "row", **asdict(r)}
    d["block_seconds"], d["whole_seconds"] = r.block_seconds, r.whole_seconds
    d["setup_seconds"], d["put_seconds"] = r.block.setup_seconds, r.block.put_seconds
    return d


COLUMNS = ("size WxH", "n / cache", "peak block (pred.)", "peak whole (pred.)", "mem whole/block",
           "s/call block", "s/call whole", "block overhead", "TFLOP/s block", "setup", "put", "run")


def _cells(r) -> list[str]:
    """One measured row's cells, in `COLUMNS` order."""

    b, w = r.block, r.whole
    tb, tw = r.block_seconds, r.whole_seconds
    return [
        r.size, f"{r.n} / {'host' if r.cache_on_host else 'device'}",
        f"{format_bytes(b.peak_bytes)} ({format_bytes(b.predicted_bytes)})",
        f"{format_bytes(w.peak_bytes)} ({format_bytes(w.predicted_bytes)})" if w
        else f"over budget ({format_bytes(r.whole_predicted)})",
        f"{w.peak_bytes / b.peak_bytes:.1f}x" if w else "-",
        f"{tb:.3g}", f"{tw:.3g}" if tw else "-",
        f"{(tb / tw - 1) * 100:+.0f}%" if tw else "-",
        f"{b.flops / tb / 1e12:.3g}",
        f"{b.setup_seconds:.2g} s",
        f"{b.put_seconds:.2g} s" if b.put_seconds is not None else "-",
        f"{tb * r.calls_per_run:.3g} s",
    ]


class _Out:
    """Rows on stdout as they come, flushed (a file or pipe gets each row at once too): aligned text, or
    JSON lines with --json. With the progress bar on the same terminal, text goes above the bar."""

    def __init__(self, json_: bool, steps: int, display: _Progress) -> None:
        self.json_, self.steps, self.display = json_, steps, display
        self.widths = [max(len(c), 9) for c in COLUMNS]
        self.widths[0] = max(self.widths[0], 11)
        self.widths[2] = self.widths[3] = 24

    def line(self, text: str) -> None:
        if self.display.progress is not None and sys.stdout.isatty():
            self.display.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def json(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def _join(self, cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, self.widths)).rstrip()

    def titles(self) -> None:
        titles = list(COLUMNS)
        titles[-1] = f"run: {2 * self.steps - 1} calls"
        self.line(self._join(titles))

    def row(self, r) -> None:
        from ..tools.bench import Skipped  # torch: kept off start-up (--help, usage errors)

        if self.json_:
            self.json(_row_json(r))
        elif isinstance(r, Skipped):
            self.line(f"{r.size.rjust(self.widths[0])}  {r.reason}")
        else:
            self.line(self._join(_cells(r)))


class _Progress:
    """One bar over the measurements with an ETA (rich, stderr); nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.progress = self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            # stdout is not redirected through the bar's console (rich's default): rows stay on stdout
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                                     transient=True, redirect_stdout=False, redirect_stderr=False)
            self.progress.start()
            self.task = self.progress.add_task("measuring (each configuration in a fresh process)",
                                               total=None)

    def __call__(self, event: object) -> None:
        if self.progress is not None and isinstance(event, MeasureDone):
            # Work is FLOPs x calls, so the ETA weighs big sizes by what they cost.
            self.progress.update(self.task, total=event.work_total, completed=event.work,
                                 description=f"measured {event.label} ({event.index}/{event.total})")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
