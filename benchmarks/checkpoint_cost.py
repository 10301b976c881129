"""What a checkpoint costs per Heun step, in % of the step, by output size (CPU).

One 4x pass per size with checkpoints on (`--config`, default `small`; random weights, float32, the
planner's n), in RAM and under --low-memory (where the mapped state file is the checkpoint: flushed, not
copied).
In the same run, each step's compute time (the time between two steps' ends, minus the checkpoint) is
set beside the checkpoint's own time (write + fsync of x and meta.json, `CheckpointWritten.seconds`, which
includes the sha256 and the finite check taken while writing, issue 21);
steps after the first only (the first includes CLIP and the noise) and before the last (one call). Also prints
the compute rate `calibrate.calibration` measured for this model on this CPU beside the one measured here
(FLOPs per call / seconds per call).
Writes a Markdown table to stdout.

    python benchmarks/checkpoint_cost.py [--sizes 256,512,1024] [--steps 4] [--config small]

A smaller config makes each step cheaper and so the checkpoint's share larger: an upper bound for the
official model, whose step costs ~100x the `small` one's at the same size.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infdit_cli.events import CheckpointWritten, StepDone
from infdit_cli.jobs.pipeline import UpscaleOptions
from infdit_cli.jobs.upscaler import Upscaler
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model
from infdit_cli.plan.calibrate import calibration
from infdit_cli.tools.bench import flops_per_call


def run(up: Upscaler, size: int, steps: int, low_memory: bool, folder: Path) -> dict:
    src = folder / f"in{size}.png"
    Image.fromarray((np.random.default_rng(0).random((size // 4, size // 4, 3)) * 255)
                    .astype(np.uint8)).save(src)
    marks: list[tuple[str, float, float]] = []

    def on_event(e) -> None:
        if isinstance(e, CheckpointWritten):
            marks.append(("ckpt", time.perf_counter(), e.seconds))
        elif isinstance(e, StepDone):
            marks.append(("step", time.perf_counter(), 0.0))

    opts = UpscaleOptions(steps=steps, low_memory=low_memory)
    up.upscale_file(src, folder / f"out{size}.png", scale=4, options=opts, checkpoint=True, on_event=on_event,
                    overwrite=True)
    ends = [t for k, t, _ in marks if k == "step"]
    ckpt = [s for k, _, s in marks if k == "ckpt"]
    compute = [b - a - c for a, b, c in zip(ends, ends[1:], ckpt[1:])][:-1]  # the last step is one call
    step, cost = statistics.median(compute), statistics.median(ckpt[1:])
    return {"step": step, "ckpt": cost, "bytes": 3 * size * size * 4}


def verify_cost(size: int, rounds: int = 3) -> float:
    """Seconds for what a checkpoint adds to the write since issue 21 (sha256 of x's bytes and its finite
    check, chunk by chunk as `checkpoint.write_tensor` does), on a float32 x of a size x size output."""
    import hashlib

    from infdit_cli.jobs.checkpoint import _bytes_view, _rows

    x = torch.randn(1, 3, size, size)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        h = hashlib.sha256()
        for r in _rows(x):
            part = x[..., r, :].contiguous()
            bool(torch.isfinite(part).all())
            h.update(_bytes_view(part))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,512,1024", help="output sides (square), comma-separated")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--config", default="small", choices=sorted(PRESETS))
    args = ap.parse_args()
    cfg = PRESETS[args.config]
    up = Upscaler(random_model(cfg, seed=0), weights_id="bench")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"config `{args.config}`, CPU, float32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.steps} steps; step time: median over steps "
          f"2..{args.steps - 1}, checkpoint: over steps 2..{args.steps}")
    print()
    print("| output | x per checkpoint | step (2 calls) | checkpoint, RAM | % of step | "
          "checkpoint, --low-memory | % of step | of which sha256 + finite check | % of step | "
          "measured CPU FLOP/s per thread |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=".") as d:
        for size in sizes:
            ram = run(up, size, args.steps, False, Path(d))
            mapped = run(up, size, args.steps, True, Path(d))
            rate = 2 * flops_per_call(cfg, size, size) / ram["step"] / torch.get_num_threads()
            verify = verify_cost(size)
            print(f"| {size}² | {ram['bytes'] / 2**20:.1f} MiB | {ram['step']:.2f} s | "
                  f"{ram['ckpt'] * 1e3:.1f} ms | "
                  f"{100 * ram['ckpt'] / ram['step']:.2f} % | {mapped['ckpt'] * 1e3:.1f} ms | "
                  f"{100 * mapped['ckpt'] / mapped['step']:.2f} % | {verify * 1e3:.1f} ms | "
                  f"{100 * verify / ram['step']:.2f} % | {rate / 1e9:.0f} G |")
    print()
    rates = calibration(cfg, torch.device("cpu"), torch.float32)
    print(f"Calibrated for the time estimate (and the checkpoint default): {rates.flops / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads).")


if __name__ == "__main__":
    main()
