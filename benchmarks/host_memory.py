"""Whole-process peak memory of `infdit upscale` against the planner's prediction, by output size.

Each size runs `infdit upscale` in a fresh process (CPU, float32, 2 steps = 3 denoiser calls, the `micro`
config: real 128-px blocks, hidden 32) and reads its peak RSS from the kernel (wait4 rusage). The
prediction is the plan's `host_peak_bytes` from the same command's `--json`. Bytes per output pixel are
the slope between consecutive sizes (what each added pixel costs). Writes a Markdown table to stdout.

    python benchmarks/host_memory.py [--sizes 1024,2048,4096] [--block-batch 2] [--modes ram,low]

With both modes, each size runs in RAM and with `--low-memory` one after the other, so the time ratio
of the two is measured side by side.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def peak_rss(args: list[str]) -> tuple[dict, int, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "infdit_cli", "upscale", *args, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"infdit failed ({proc.returncode}): {err.decode().strip()}")
    return json.loads(out), usage.ru_maxrss * 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,2048,4096", help="output sides (square), comma-separated")
    ap.add_argument("--block-batch", type=int, default=2)
    ap.add_argument("--modes", default="ram,low", help="ram (--no-low-memory), low (--low-memory), or both")
    ap.add_argument("--config", default="micro")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from infdit_cli.model.config import PRESETS
    from infdit_cli.model.infdit import random_model
    from infdit_cli.weights.format import save_model_file

    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_model(PRESETS[args.config], seed=0)
        save_model_file(tmp / "w.safetensors", model.state_dict(), model.config)
        del model
        modes = args.modes.split(",")
        print(f"config `{args.config}`, CPU float32, `--steps 2 --block-batch {args.block_batch}`, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
        print("| output | mode | measured peak RSS | predicted host peak | predicted / measured | "
              "measured B/px (slope) | s | s low / s RAM |")
        print("|---|---|---|---|---|---|---|---|")
        prev: dict[str, tuple[int, int]] = {}
        for side in sizes:
            src = tmp / f"in{side}.png"
            g = torch.Generator().manual_seed(side)
            pixels = (torch.rand(side // 4, side // 4, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(src)
            secs_by_mode = {}
            for mode in modes:
                secs_by_mode[mode] = _row(tmp, src, side, mode, args.block_batch, prev, secs_by_mode)


def _row(tmp: Path, src: Path, side: int, mode: str, n: int, prev: dict, secs_by_mode: dict) -> float:
    dst = tmp / f"out{side}.png"
    flags = ["--low-memory"] if mode == "low" else ["--no-low-memory"]
    res, rss, secs = peak_rss([str(src), "-o", str(dst), "--scale", "4", "--steps", "2", "--device", "cpu",
                               "--weights", str(tmp / "w.safetensors"), "--block-batch", str(n), *flags])
    pred = max(m["host_peak_bytes"] for m in res["memory"])
    last = prev.get(mode)
    slope = "-" if last is None else f"{(rss - last[1]) / (side * side - last[0] ** 2):.1f}"
    ratio = f"{secs / secs_by_mode['ram']:.2f}" if mode == "low" and "ram" in secs_by_mode else "-"
    print(f"| {side}x{side} | {mode} | {rss / MiB:.0f} MiB | {pred / MiB:.0f} MiB | {pred / rss:.2f} | "
          f"{slope} | {secs:.1f} | {ratio} |", flush=True)
    prev[mode] = (side, rss)
    dst.unlink()
    leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no scratch folder left behind
    return secs


if __name__ == "__main__":
    main()
