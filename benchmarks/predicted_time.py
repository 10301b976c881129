"""The cost model's predicted time per denoiser call against the measured one, for every mode beside the
planner's choice, on the CPU; writes its table into docs/benchmarks.md.

    python benchmarks/predicted_time.py                       # tiny, micro, small at 512² and 1024²
    python benchmarks/predicted_time.py --configs tiny --sizes 256 --no-write

For each config: a random model of that preset and this device's rates measured afresh
(`calibrate.calibration(refresh=True)`: warm-up, one real chunk of the engine's layer in rounds; "steady"
says whether the rounds agreed and the load average stayed under the cores). For each output side, one 4x
pass planned as `infdit upscale` plans it (this machine's memory: the planner's choice), and the modes
beside it: the whole image and n = 1, 2, 4, ... below the grid's side. Each mode runs `--steps` Heun steps
through `Upscaler.upscale_tensor` (the real sampler and engine); measured per call: the time between the
first and the last step's end over the calls between them (the first step, with its warm-up, is left
out; the best of two runs), against the plan's `seconds_per_call` for that mode. The planner's choice is
then compared with the fastest mode measured.

The `small` preset (hidden 256, 4 layers, 4 heads) is the model issue 32 calls medium. Timings depend on
what else runs: the table's header records the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch

from infdit_cli.events import StepDone
from infdit_cli.jobs.pipeline import UpscaleOptions
from infdit_cli.jobs.upscaler import Upscaler
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model
from infdit_cli.plan.calibrate import calibration

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "### Predicted against measured time per call, every mode (CPU)"
OLD_HEADING = "### Predicted against measured job time (CPU)"  # this benchmark's earlier section: replaced


def modes(top: int, chosen: int) -> list[int]:
    """n values to measure: the whole image (top), the choice, and 1, 2, 4, ... below top."""
    out, n = {top, min(chosen, top)}, 1
    while n < top:
        out.add(n)
        n *= 2
    return sorted(out, reverse=True)


def per_call(up: Upscaler, rgb: torch.Tensor, plan, runs: int = 2) -> float:
    """Seconds per call after the first step, the best of `runs` runs (one run of the tiny preset varies
    by 20 % from the next on this 2-core machine)."""
    best = float("inf")
    for _ in range(runs):
        stamps: list[tuple[int, float]] = []

        def on_event(ev, stamps=stamps) -> None:
            if isinstance(ev, StepDone):
                stamps.append((ev.calls, time.perf_counter()))

        up.upscale_tensor(rgb, plan, on_event=on_event)
        (c0, t0), (c1, t1) = stamps[0], stamps[-1]
        best = min(best, (t1 - t0) / (c1 - c0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,micro,small")
    ap.add_argument("--sizes", default="512,1024", help="output sides (one 4x pass each)")
    ap.add_argument("--steps", type=int, default=3, help="Heun steps per mode (2 x steps - 1 calls)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md as it is")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step is not timed)")
    load0 = os.getloadavg()[0]
    started = time.perf_counter()
    rows, summary = [], []
    for name in args.configs.split(","):
        cfg = PRESETS[name]
        model = random_model(cfg, seed=0)
        rates = calibration(cfg, torch.device("cpu"), torch.float32, refresh=True)
        r = (f"{rates.flops / 1e9:.3g} GFLOP/s, {rates.op_seconds * 1e6:.1f} us/op"
             f"{'' if rates.steady else ', not steady'}")
        for side in (int(s) for s in args.sizes.split(",")):
            rgb = torch.rand(1, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(0))
            auto = Upscaler(model, options=UpscaleOptions(steps=args.steps), rates=rates, weights_id="bench")
            choice = auto.plan((side // 4, side // 4), scale=4).passes[0].memory
            top = max(-(-side // cfg.block_size), 1)
            measured: dict[int, tuple[float, float]] = {}
            for n in modes(top, choice.n):
                opts = UpscaleOptions(steps=args.steps, block_batch=None if n >= top else n)
                up = Upscaler(model, options=opts, rates=rates, weights_id="bench")
                plan = up.plan((side // 4, side // 4), scale=4)
                predicted = plan.passes[0].memory.seconds_per_call
                measured[n] = (predicted, per_call(up, rgb, plan))
            fastest = min(m for _, m in measured.values())
            chosen = min(choice.n, top)
            for n, (pred, took) in measured.items():
                mode = "whole image" if n >= top else f"n={n}"
                rows.append(f"| {name} | {side}x{side} | {mode} | {'yes' if n == chosen else ''} | "
                            f"{pred:.3f} | {took:.3f} | {took / pred:.2f} | {took / fastest:.2f} |")
                print(rows[-1], flush=True)
            summary.append(f"| {name} | {side}x{side} | {r} | "
                           f"{'whole image' if chosen >= top else f'n={chosen}'} | "
                           f"{measured[chosen][1] / fastest:.2f} |")
    load1 = os.getloadavg()[0]
    took = time.perf_counter() - started
    cmd = "python benchmarks/predicted_time.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("configs", args.configs), ("sizes", args.sizes),
                                                      ("steps", args.steps))
        if v != ap.get_default(k))
    text = [
        HEADING,
        "",
        f"Command: `{cmd}` ({took / 60:.0f} min; {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load0:.1f} before, {load1:.1f} after). "
        f"Every mode runs {args.steps} Heun steps of one 4x pass through `Upscaler.upscale_tensor`; "
        "measured: seconds per call after the first step, the best of two runs; predicted: the plan's "
        "`seconds_per_call` with the rates `calibrate` measured at the start of the config's rows.",
        "",
        "| config | output | mode | planner's choice | predicted s/call | measured s/call | "
        "measured / predicted | / fastest |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "| config | output | calibrated rates | planner's choice | choice / fastest measured |",
        "|---|---|---|---|---|",
        *summary,
        "",
    ]
    print("\n" + "\n".join(text[-len(summary) - 3:]))
    if not args.no_write:
        write(text)
        print(f"written: {DOC.relative_to(ROOT)}, section {HEADING[4:]!r}", file=sys.stderr)


def write(text: list[str]) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (from its heading to the next heading of its
    level or above), or add it at the end."""
    doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = "\n".join(text) + "\n"
    heads = "|".join(re.escape(h) for h in (HEADING, OLD_HEADING))
    m = re.search(rf"^(?:{heads})\n.*?(?=^#{{1,3}} |\Z)", doc, flags=re.S | re.M)
    if m:
        doc = doc[: m.start()] + block + ("\n" if m.end() < len(doc) else "") + doc[m.end():]
    else:
        doc = doc.rstrip("\n") + "\n\n" + block
    DOC.write_text(doc)


if __name__ == "__main__":
    main()
