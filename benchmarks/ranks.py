"""One wide image on 1 rank against 2 ranks (column bands, `bands.py`), on the CPU with gloo, side by side.

Each round starts `torchrun --standalone --nproc-per-node 1` (the one-process `BlockEngine`, same n and
row-major traversal) and then `--nproc-per-node 2` (`BandEngine`), alternately, every rank on one thread;
each run times a few warm denoiser calls and reports the median. The table gives the measured speed-up
next to the pipeline-fill model of docs/distributed.md.

    python benchmarks/ranks.py [--config tiny] [--size 128x1024] [--block-batch 1] [--calls 3] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def predicted(gh: int, gw: int, n: int, ranks: int) -> float:
    """T1 / TR from the fill model: R bands, m rectangle rows; the busiest band sets the pace."""
    from infdit_cli.bands import column_bands

    m = -(-gh // n)
    widest = max(hi - lo for lo, hi in column_bands(gw, ranks))
    return (gh * gw) / ((m + ranks - 1) * min(n, gh) * widest) if ranks > 1 else 1.0


def worker(args) -> None:
    from infdit_cli import distributed as D
    from infdit_cli.bands import BandEngine
    from infdit_cli.config import PRESETS
    from infdit_cli.engine import BlockEngine
    from infdit_cli.planner import Placement
    from infdit_cli.weights import random_model

    world = D.world_from_env()
    D.init(world, "cpu")
    model = random_model(PRESETS[args.config], seed=0)
    h, w = args.hw
    g = torch.Generator().manual_seed(0)
    x, lr_up = torch.randn(1, 3, h, w, generator=g), torch.rand(1, 3, h, w, generator=g) * 2 - 1
    lr = torch.rand(1, 3, h // 4, w // 4, generator=g) * 2 - 1
    vec = model.encode_image(lr)
    placement = Placement(n=args.n, order="row", cache_on_host=False)
    if world.distributed:
        eng = BandEngine(model, lr, vec, lr_up, placement, world=world)
    else:
        eng = BlockEngine(model, lr, vec, lr_up, placement)
    eng(x, 2.0)  # warm-up
    times = []
    for _ in range(args.calls):
        if world.distributed:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        eng(x, 2.0)
        times.append(time.perf_counter() - t0)
    if world.main:
        print(json.dumps({"median": statistics.median(times)}))
    D.teardown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--size", default="128x1024", help="HxW of the HR image")
    ap.add_argument("--block-batch", dest="n", type=int, default=1)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hw = tuple(int(v) for v in args.size.lower().split("x"))
    if args.worker:
        return worker(args)

    from infdit_cli.config import PRESETS

    bs = PRESETS[args.config].block_size
    gh, gw = -(-args.hw[0] // bs), -(-args.hw[1] // bs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for ranks in (1, 2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   __file__, "--worker", "--config", args.config, "--size", args.size,
                   "--block-batch", str(args.n),
                   "--calls", str(args.calls)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs[ranks].append(json.loads(out.strip().splitlines()[-1])["median"])
    t1, t2 = statistics.median(runs[1]), statistics.median(runs[2])
    print(f"config `{args.config}`, HR {args.hw[1]}x{args.hw[0]} ({gw}x{gh} blocks), n={args.n}, fp32 CPU, "
          f"gloo, 1 thread per rank; medians of {args.rounds} alternated rounds of {args.calls} calls\n")
    print("| ranks | s/call | speed-up measured | speed-up predicted (fill model) |")
    print("|---|---|---|---|")
    print(f"| 1 | {t1:.3f} | 1.00 | 1.00 |")
    print(f"| 2 | {t2:.3f} | {t1 / t2:.2f} | {predicted(gh, gw, args.n, 2):.2f} |")


if __name__ == "__main__":
    main()
