"""One wide image on 1, 2, 3 ranks (column bands, `bands.py`), on the CPU with gloo, side by side.

Each round starts `torchrun --standalone --nproc-per-node R` for every R in --ranks in turn (R = 1: the
one-process `BlockEngine`, same n and row-major traversal; R > 1: `BandEngine`), every rank on one
thread; each run times a few warm denoiser calls and reports the median. The table gives the measured
speed-up next to the pipeline-fill model of docs/distributed.md (per-layer sends) and, for reference, the
model of per-rectangle sends.

    python benchmarks/ranks.py [--config tiny] [--size 128x1024] [--block-batch 1] [--ranks 1,2,3]
                               [--calls 3] [--rounds 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def predicted(gh: int, gw: int, n: int, ranks: int, layers: int, per_layer: bool = True) -> float:
    """T1 / TR from the fill model: R bands, m rectangle rows, W columns in the widest band; the busiest
    band sets the pace. Each rank lags the one on its left by a row of rectangles; with per-layer sends,
    less the part of the row's last rectangle that overlaps (all but its first layer)."""
    from infdit_cli.engine.bands import column_bands

    if ranks == 1:
        return 1.0
    nn = min(n, gh)
    m = -(-gh // nn)
    wide = max(hi - lo for lo, hi in column_bands(gw, ranks))
    row = nn * wide  # blocks of one rectangle row of the widest band
    lag = row - (nn * min(n, wide) * (layers - 1) / layers if per_layer else 0)
    return (gh * gw) / (m * row + (ranks - 1) * lag)


def worker(args) -> None:
    from infdit_cli.distributed import world as D
    from infdit_cli.engine.bands import BandEngine
    from infdit_cli.engine.blocks import BlockEngine
    from infdit_cli.model.config import PRESETS
    from infdit_cli.model.infdit import random_model
    from infdit_cli.plan.planner import Placement

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
    ap.add_argument("--ranks", default="1,2,3", help="rank counts, comma-separated (1 first: the baseline)")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.hw = tuple(int(v) for v in args.size.lower().split("x"))
    if args.worker:
        return worker(args)

    from infdit_cli.model.config import PRESETS

    cfg = PRESETS[args.config]
    bs = cfg.block_size
    gh, gw = -(-args.hw[0] // bs), -(-args.hw[1] // bs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    counts = [int(r) for r in args.ranks.split(",")]
    load = os.getloadavg()
    runs: dict[int, list[float]] = {r: [] for r in counts}
    for _ in range(args.rounds):
        for ranks in counts:  # interleaved: every round runs each count once, in turn
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   __file__, "--worker", "--config", args.config, "--size", args.size,
                   "--block-batch", str(args.n),
                   "--calls", str(args.calls)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.exit(f"{ranks} ranks failed ({res.returncode}):\n{res.stderr[-3000:]}")
            out = res.stdout
            runs[ranks].append(json.loads(out.strip().splitlines()[-1])["median"])
    t1 = statistics.median(runs[counts[0]]) if counts[0] == 1 else None
    print(f"config `{args.config}` ({cfg.num_layers} layers), HR {args.hw[1]}x{args.hw[0]} "
          f"({gw}x{gh} blocks), n={args.n}, fp32 CPU, gloo, 1 thread per rank, {os.cpu_count()} cores; "
          f"medians of {args.rounds} "
          f"interleaved rounds of {args.calls} calls; load average before: "
          f"{' '.join(f'{v:.1f}' for v in load)}\n")
    print("| ranks | s/call | speed-up measured | predicted (per-layer sends) | "
          "predicted (per-rectangle sends) |")
    print("|---|---|---|---|---|")
    for r in counts:
        t = statistics.median(runs[r])
        got = f"{t1 / t:.2f}" if t1 is not None else "-"
        print(f"| {r} | {t:.3f} | {got} | {predicted(gh, gw, args.n, r, cfg.num_layers):.2f} | "
              f"{predicted(gh, gw, args.n, r, cfg.num_layers, per_layer=False):.2f} |")


if __name__ == "__main__":
    main()
