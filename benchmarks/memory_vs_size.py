"""Peak memory of one denoiser call vs image size: whole-image pass vs block mode at a fixed n.

Each configuration runs in a fresh process (`infdit_cli.tools.bench.measure`); the planner's prediction of the
same quantity is printed beside the measurement. Writes a Markdown table to stdout.

    python benchmarks/memory_vs_size.py [--config small] [--n 1]
"""

import argparse

from infdit_cli.tools.bench import CallSpec, environment, measure

MiB = 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    env = environment()
    print(f"config `{args.config}`, float32, CPU ({env['cpu']}, {env['cpu_threads']} threads), "
          f"torch {env['torch']}; block mode n={args.n}, row-major traversal.\n")
    print("| H x W | whole: measured | whole: predicted | blocks: measured | blocks: predicted | "
          "whole / blocks | s/call whole | s/call blocks |")
    print("|---|---|---|---|---|---|---|---|")
    sizes = [(512, 512), (1024, 512), (2048, 512), (4096, 512), (512, 1024), (512, 2048), (512, 4096)]
    for h, w in sizes:
        whole = measure(CallSpec(args.config, h, w, None, "row", repeats=args.repeats))
        blocks = measure(CallSpec(args.config, h, w, args.n, "row", repeats=args.repeats))
        print(f"| {h} x {w} | {whole.peak_bytes / MiB:.0f} MiB | {whole.predicted_bytes / MiB:.0f} MiB | "
              f"{blocks.peak_bytes / MiB:.0f} MiB | {blocks.predicted_bytes / MiB:.0f} MiB | "
              f"{whole.peak_bytes / blocks.peak_bytes:.1f}x | {whole.seconds:.2f} | {blocks.seconds:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
