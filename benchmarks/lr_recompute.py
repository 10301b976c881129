"""What recomputing the LR conditioning per rectangle costs: one denoiser call with `lr_context` computed
for every rectangle (what the engine does) against the same call with every rectangle's result computed
beforehand and handed back (what holding an image-sized LR map would save), alternated in one process.

    python benchmarks/lr_recompute.py [--config small] [--size 1024] [--rounds 3]
"""

import argparse
import statistics
import time

import torch

from infdit_cli.engine.blocks import denoise
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = random_model(PRESETS[args.config], seed=0)
    cfg, s = model.config, args.size
    g = torch.Generator().manual_seed(0)
    x, lr_up = torch.randn(1, 3, s, s, generator=g), torch.randn(1, 3, s, s, generator=g)
    lr, vec = torch.randn(1, 3, s // 4, s // 4, generator=g), torch.randn(1, cfg.vector_dim, generator=g)
    real = model.lr_context
    print(f"config `{args.config}`, {s}x{s}, fp32 CPU, {torch.get_num_threads()} threads; medians of "
          f"{args.rounds} alternated rounds\n")
    print("| n | s/call, recomputed | s/call, precomputed | cost of recomputing |")
    print("|---|---|---|---|")
    for n in (1, 2, 4):
        cached = {}

        def keep(pixels, rect, hl, wl, cached=cached):
            cached[rect] = real(pixels, rect, hl, wl)
            return cached[rect]

        model.lr_context = keep
        denoise(model, x, 2.0, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)  # warm-up, fills the cache
        times = {"re": [], "pre": []}
        for _ in range(args.rounds):
            for mode in ("re", "pre"):
                model.lr_context = real if mode == "re" else (
                    lambda p, rect, hl, wl, cached=cached: cached[rect])
                t0 = time.perf_counter()
                denoise(model, x, 2.0, lr_up=lr_up, lr=lr, vector=vec, block_batch=n)
                times[mode].append(time.perf_counter() - t0)
        re, pre = statistics.median(times["re"]), statistics.median(times["pre"])
        print(f"| {n} | {re:.2f} | {pre:.2f} | {100 * (re / pre - 1):+.1f}% |", flush=True)
    model.lr_context = real


if __name__ == "__main__":
    main()
