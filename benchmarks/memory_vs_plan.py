"""One denoiser call's measured peak memory against the planner's prediction, whole image and block modes.

Each row is `infdit_cli.tools.bench.measure` (a fresh process: the call's peak RSS above the process's
before-call baseline on the CPU, `torch.cuda.max_memory_allocated` on CUDA) beside the same command's
prediction (`planner.estimate`: cache + activations + slack + the output image). The planner's
activation coefficients (`RECT_TOKEN_COPIES`, `CHUNK_TOKEN_COPIES`, `LR_WINDOW_COPIES`, the CPU's
`DEVICE_SLACK`) are fitted to this table.

    python benchmarks/memory_vs_plan.py [--config small] [--device cpu]
"""

import argparse

from infdit_cli.tools.bench import CallSpec, measure

CASES = [(512, 1), (768, 1), (512, 2), (512, None), (768, None), (1024, None)]  # (side, n); None: whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    print(f"config `{args.config}`, {args.device} {args.dtype}, one call per fresh process\n")
    print("| output | mode | measured peak | predicted | measured / predicted |")
    print("|---|---|---|---|---|")
    for side, n in CASES:
        m = measure(CallSpec(config=args.config, height=side, width=side, n=n, device=args.device,
                             dtype=args.dtype, repeats=1))
        mode = "whole image" if n is None else f"n={n}"
        print(f"| {side}x{side} | {mode} | {m.peak_bytes / 2**20:.0f} MiB | "
              f"{m.predicted_bytes / 2**20:.0f} MiB | {m.peak_bytes / m.predicted_bytes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
