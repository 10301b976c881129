"""A job's predicted time (the plan's, `UpscalePlan.seconds`) against its measured time, on the CPU.

    python benchmarks/predicted_time.py [--configs tiny,small] [--sizes 256,1024] [--steps 20]

For each config and output side: a random model of that preset, this device's rates measured afresh
(`calibrate.calibration(refresh=True)`, so the rates and the run see the same machine, however loaded),
one 4x pass planned as `infdit upscale` plans it
(this machine's memory), then `Upscaler.upscale_tensor` timed on a random image (the model passes only:
what the prediction covers). Printed as a Markdown table, measured / predicted per row.
"""

from __future__ import annotations

import argparse
import time

import torch

from infdit_cli.calibrate import calibration
from infdit_cli.config import PRESETS
from infdit_cli.planner import format_seconds
from infdit_cli.pipeline import UpscaleOptions
from infdit_cli.upscaler import Upscaler
from infdit_cli.weights import random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--sizes", default="256,1024", help="output sides (one 4x pass each)")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"CPU, {torch.get_num_threads()} threads, {args.steps} steps (one 4x pass: {2 * args.steps - 1} calls)\n")
    print("| config | output | plan | calibrated rates | predicted | measured | measured / predicted |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = PRESETS[name]
        model = random_model(cfg, seed=0)
        for side in (int(s) for s in args.sizes.split(",")):
            rates = calibration(cfg, torch.device("cpu"), torch.float32, refresh=True)
            up = Upscaler(model, options=UpscaleOptions(steps=args.steps), rates=rates, weights_id="bench")
            rgb = torch.rand(1, 3, side // 4, side // 4, generator=torch.Generator().manual_seed(0))
            plan = up.plan((side // 4, side // 4), scale=4)
            t0 = time.perf_counter()
            up.upscale_tensor(rgb, plan)
            took = time.perf_counter() - t0
            how = "whole image" if plan.passes[0].memory.whole_image else f"n={plan.passes[0].memory.n}"
            r = (f"{rates.flops / 1e9:.0f} GFLOP/s, {rates.op_seconds * 1e6:.1f} us/op, "
                 f"{rates.copy_bytes / 1e9:.1f} GB/s")
            print(f"| {name} | {side}x{side} | {how} | {r} | {format_seconds(plan.seconds)} "
                  f"({plan.seconds:.2f} s) | {took:.2f} s | {took / plan.seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
