"""The planner's choices for the official model (bf16, CUDA) at 1024..16384 px: PREDICTED, not measured.

Host memory is planned for a machine with 32 GiB available (the figure is fixed so the table does not
depend on the machine it is printed on).

    python benchmarks/predicted_official.py
"""

import torch

from infdit_cli.errors import HostMemoryTooSmall, MemoryBudgetTooSmall
from infdit_cli.model.config import PRESETS
from infdit_cli.plan.planner import estimate, plan
from infdit_cli.units import format_bytes, parse_bytes

cfg = PRESETS["official"]
HOST = 32 * 2**30
for budget in ("8GB", "24GB"):
    b = parse_bytes(budget)
    print(f"\n**Budget {budget}** (predicted; official config, bf16, flash attention, "
          "32 GiB of host memory)\n")
    print("| output | n | K/V cache | image state | sampler state | device peak | host peak | "
          "whole image would need |")
    print("|---|---|---|---|---|---|---|---|")
    for res in (1024, 2048, 4096, 8192, 16384):
        whole = estimate(cfg, (res, res), None, dtype=torch.bfloat16, device_type="cuda").total
        try:
            p = plan(cfg, (res, res), budget=b, dtype=torch.bfloat16, device="cuda", host_budget=HOST)
        except (MemoryBudgetTooSmall, HostMemoryTooSmall) as e:
            print(f"| {res}² | does not fit: {e} | | | | | | {format_bytes(whole)} |")
            continue
        n = "whole" if p.whole_image else str(p.n)
        state = ("memory-mapped " if p.low_memory else "") + str(p.state_dtype).removeprefix("torch.")
        print(f"| {res}² | {n} | {'host' if p.cache_on_host else 'device'} | "
              f"{'host' if p.state_on_host else 'device'} | {state} | "
              f"{format_bytes(p.estimate.device_peak)} | {format_bytes(p.estimate.host_peak)} | "
              f"{format_bytes(whole)} |")
