"""The planner's choices for the official model (bf16, CUDA) at 1024..16384 px: PREDICTED, not measured.

    python benchmarks/predicted_official.py
"""

import torch

from infdit_cli.config import PRESETS
from infdit_cli.errors import MemoryBudgetTooSmall
from infdit_cli.planner import estimate, format_bytes, parse_bytes, plan

cfg = PRESETS["official"]
for budget in ("8GB", "24GB"):
    b = parse_bytes(budget)
    print(f"\n**Budget {budget}** (predicted; official config, bf16, flash attention)\n")
    print("| output | n | K/V cache | image state | predicted peak | whole image would need |")
    print("|---|---|---|---|---|---|")
    for res in (1024, 2048, 4096, 8192, 16384):
        whole = estimate(cfg, (res, res), None, dtype=torch.bfloat16, device_type="cuda").total
        try:
            p = plan(cfg, (res, res), budget=b, dtype=torch.bfloat16, device="cuda")
        except MemoryBudgetTooSmall as e:
            print(f"| {res}² | does not fit: {e} | | | | {format_bytes(whole)} |")
            continue
        n = "whole" if p.whole_image else str(p.n)
        print(f"| {res}² | {n} | {'host' if p.cache_on_host else 'device'} | "
              f"{'host' if p.state_on_host else 'device'} | {format_bytes(p.estimate.total)} | "
              f"{format_bytes(whole)} |")
