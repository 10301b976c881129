"""This tree's denoiser call against another revision's, side by side in one run.

    python benchmarks/speed_vs_main.py                 # against HEAD~1: medium model, 512², 1024², 512x1024
    python benchmarks/speed_vs_main.py --base main~3   # any git revision
    python benchmarks/speed_vs_main.py --quick         # small sizes, to check the script itself
    python benchmarks/speed_vs_main.py --base 7608f75 --sizes 512,1024,2048 --json runs.json
    python benchmarks/speed_vs_main.py --report runs.json   # the tables again, with today's planner

The base revision is checked out into a temporary `git worktree`. For every size, each round runs the
base's code and then this tree's, each in its own fresh Python process (PYTHONPATH = that tree's `src`),
rounds alternating A B A B; each process times `--calls` denoiser calls per mode (whole image, block
n = 1, 2; default one) after a warm-up call of that mode. Both build the same seeded random model
(`weights.random_model`, preset `small`: hidden 256, 4 layers) and the same seeded inputs, in float32 on
the CPU. Printed: per
size and mode the median seconds of each side and the ratio base / current (> 1: this tree is faster);
then, for this tree, each mode against the whole image and the planner's choice (`planner.plan` on the
CPU with this machine's memory and its calibrated rates, and the cost model's predicted seconds per
mode, `planner.call_seconds`)
against the fastest mode measured.
Only `random_model`, `prepare_image` and `denoise` are called, through a small adapter, so a base with
another internal API still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = [(512, 512), (1024, 1024), (512, 1024)]  # (H, W)
QUICK_SIZES = [(128, 128), (128, 256)]
MODES = [None, 1, 2]  # None: the whole-image pass


# ---- the worker: runs inside one tree's code ---------------------------------------------------------


def _call(model, x, lr_up, lr, vector, n):
    """A zero-argument denoiser call of mode `n`, for whichever API this tree has."""
    import inspect

    try:  # the engine owns the call (this main): denoise(model, ...)
        from infdit_cli.engine.blocks import BlockEngine, denoise  # noqa: F401
    except ImportError:
        pass
    else:
        return lambda: denoise(model, x, 2.0, lr_up=lr_up, lr=lr, vector=vector, block_batch=n)
    params = inspect.signature(model.denoise).parameters
    if hasattr(model, "prepare_image") and "image" in params:
        try:
            image = model.prepare_image(lr, vector)
        except TypeError:  # another signature: let denoise prepare the image itself
            image = None
        if image is not None:
            return lambda: model.denoise(x, 2.0, lr_up=lr_up, image=image, block_batch=n)
    return lambda: model.denoise(x, 2.0, lr_up=lr_up, lr=lr, vector=vector, block_batch=n)


def worker(h: int, w: int, modes: list, config: str, threads: int | None, calls: int) -> dict:
    import time

    import torch

    import infdit_cli
    from infdit_cli.model.config import PRESETS
    from infdit_cli.model.infdit import random_model

    if threads:
        torch.set_num_threads(threads)
    cfg = PRESETS[config]
    model = random_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, h, w, generator=gen)
    lr_up = torch.randn(1, 3, h, w, generator=gen)
    lr = torch.randn(1, 3, h // cfg.sr_scale, w // cfg.sr_scale, generator=gen)
    vector = torch.randn(1, cfg.vector_dim, generator=gen)
    seconds, sums = {}, {}
    for n in modes:
        call = _call(model, x, lr_up, lr, vector, n)
        call()  # warm-up
        ts = []
        for _ in range(calls):
            t0 = time.perf_counter()
            out = call()
            ts.append(time.perf_counter() - t0)
        seconds[str(n)] = statistics.median(ts)
        sums[str(n)] = float(out.double().sum())
    return {"code": str(Path(infdit_cli.__file__).resolve()), "seconds": seconds, "sums": sums,
            "threads": torch.get_num_threads()}


# ---- the driver --------------------------------------------------------------------------------------


def run_worker(src: Path, h: int, w: int, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    spec = json.dumps({"h": h, "w": w, "modes": MODES, "config": args.config, "threads": args.threads,
                       "calls": args.calls})
    res = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                         env=env)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"worker for {src} failed: {tail}")
    data = json.loads(res.stdout.strip().splitlines()[-1])
    if not data["code"].startswith(str(src.resolve())):  # an installed copy shadowing PYTHONPATH
        raise SystemExit(f"worker imported {data['code']}, not the tree at {src}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="comma-separated sides or HxW (default 512, 1024, 512x1024)")
    ap.add_argument("--modes", default="whole,1,2", help="comma-separated: whole and block batches n")
    ap.add_argument("--json", help="write the raw timings here")
    ap.add_argument("--report", help="print the tables from a --json file (no runs)")
    ap.add_argument("--base", default="HEAD~1", help="git revision to compare against (default HEAD~1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes and 2 rounds (checks the script)")
    ap.add_argument("--config", default="small", help="preset (default small: hidden 256, 4 layers)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    ap.add_argument("--calls", type=int, default=1, help="timed calls per process and mode (their median)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["h"], spec["w"], spec["modes"], spec["config"], spec["threads"],
                                spec["calls"])))
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    global MODES
    MODES = [None if m == "whole" else int(m) for m in args.modes.split(",")]
    sizes, rounds = (QUICK_SIZES, min(args.rounds, 2)) if args.quick else (FULL_SIZES, args.rounds)
    if args.sizes:
        sizes = [tuple(int(v) for v in (s.split("x") if "x" in s else (s, s))) for s in args.sizes.split(",")]
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True,
                         text=True)
    if rev.returncode != 0:
        raise SystemExit(f"unknown git revision {args.base!r}")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True,
                           text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="infdit-base-") as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base_tree),
                        rev.stdout.strip()], check=True)
        try:
            trees = {"base": base_tree / "src", "current": ROOT / "src"}
            times = {(s, m, t): [] for s in sizes for m in MODES for t in trees}
            sums = {}
            threads = None
            for h, w in sizes:
                for r in range(rounds):
                    for name, src in trees.items():  # A B A B ...
                        data = run_worker(src, h, w, args)
                        threads = data["threads"]
                        for m in MODES:
                            times[((h, w), m, name)].append(data["seconds"][str(m)])
                            sums[((h, w), m, name)] = data["sums"][str(m)]
                        print(f"  {w}x{h} round {r + 1}/{rounds} {name}: "
                              + ", ".join(f"{_mode(m)} {data['seconds'][str(m)]:.2f} s" for m in MODES),
                              file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                           check=False)
    extra = " + uncommitted changes" if dirty else ""
    runs = {"title": f"base {args.base} ({rev.stdout.strip()}) vs current {head}{extra}; "
                     f"preset {args.config}, float32, CPU, {threads} threads, {rounds} rounds alternated, "
                     f"{args.calls} timed call(s) per process and mode after a warm-up (median)",
            "config": args.config, "threads": threads, "sizes": sizes, "modes": MODES,
            "times": [[list(k[0]), k[1], k[2], v] for k, v in times.items()],
            "sums": [[list(k[0]), k[1], k[2], v] for k, v in sums.items()]}
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    report(runs)


def report(runs: dict) -> None:
    sizes, modes = [tuple(s) for s in runs["sizes"]], runs["modes"]
    times = {(tuple(s), m, t): v for s, m, t, v in runs["times"]}
    sums = {(tuple(s), m, t): v for s, m, t, v in runs["sums"]}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(runs["title"] + "\n")
    print("| size (WxH) | mode | base s/call | current s/call | base / current | same output |")
    print("|---|---|---|---|---|---|")
    for h, w in sizes:
        for m in modes:
            tb, tc = med[((h, w), m, "base")], med[((h, w), m, "current")]
            a, b = sums[((h, w), m, "base")], sums[((h, w), m, "current")]
            same = "yes" if abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1.0) else f"no ({a:.6g} vs {b:.6g})"
            print(f"| {w}x{h} | {_mode(m)} | {tb:.3f} | {tc:.3f} | {tb / tc:.2f}x | {same} |")
    try:
        choice_table(runs, sizes, modes, med)
    except ImportError as e:  # a tree without the cost model
        print(f"\n(no planner table: {e})")


def choice_table(runs: dict, sizes, modes, med) -> None:
    """This tree: every mode against the whole image, and the planner's choice against the fastest."""
    import torch

    from infdit_cli.model.config import PRESETS
    from infdit_cli.plan.calibrate import calibration
    from infdit_cli.plan.planner import call_seconds, plan

    cfg = PRESETS[runs["config"]]
    rates = calibration(cfg, torch.device("cpu"), torch.float32, threads=runs["threads"])
    print("\nThis tree: each mode against the whole image; the planner's choice (this machine's memory) "
          "against the fastest mode measured; the cost model's prediction per mode.\n")
    print("| size (WxH) | mode | s/call | / whole | predicted s | planner's choice | choice / fastest |")
    print("|---|---|---|---|---|---|---|")
    for h, w in sizes:
        p = plan(cfg, (h, w), device="cpu", low_memory=False, rates=rates)
        chosen = None if p.whole_image else p.n
        fastest = min(med[((h, w), m, "current")] for m in modes)
        whole = med.get(((h, w), None, "current"))
        for m in modes:
            t = med[((h, w), m, "current")]
            pred = call_seconds(cfg, (h, w), m or 1 << 30, rates)
            mark = "yes" if m == chosen else ""
            ratio = f"{t / fastest:.2f}" if m == chosen else ""
            rel = f"{t / whole:.2f}" if whole else "-"
            print(f"| {w}x{h} | {_mode(m)} | {t:.3f} | {rel} | {pred:.2f} | {mark} | {ratio} |")


def _mode(m) -> str:
    return "whole" if m is None else f"n={m}"


if __name__ == "__main__":
    main()
