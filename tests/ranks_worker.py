"""Run by test_ranks.py on 2-3 gloo ranks: a whole upscale across ranks (`BandEngine`, agreed plans) with
faults injected through the engine's hook. Writes rank 0's JSON to the path given; each rank's exit status
says how it ended.

    ranks_worker.py MODE OUT   MODE: stepdown | midlayer | budget | kill | stop
"""

import json
import os
import signal
import sys

import torch

from infdit_cli.distributed import world as D
from infdit_cli.engine.bands import band_engine
from infdit_cli.events import Notice, PlanChanged
from infdit_cli.jobs.pipeline import UpscaleOptions
from infdit_cli.jobs.upscaler import Upscaler
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model

SIZE = (24, 100)  # LR; x4: 96x400, a 6x25-block grid of the tiny config


def rgb() -> torch.Tensor:
    return torch.rand(1, 3, *SIZE, generator=torch.Generator().manual_seed(3))


def upscaler(world, options, agree: bool = True) -> Upscaler:
    ranks = world.distributed
    return Upscaler(random_model(PRESETS["tiny"], seed=0), options=options, device_budget=None,
                    engine=band_engine(world) if ranks else None,
                    agree=D.agree_plan(world) if ranks and agree else None)


def main(mode: str, out_path: str) -> None:
    world = D.world_from_env()
    D.init(world, "cpu")
    result: dict = {"rank": world.rank}
    opts = UpscaleOptions(steps=2, block_batch=2)
    if mode == "stepdown":
        # rank 1 runs out of memory at its 2nd rectangle of the 2nd denoiser call, once
        events: list = []
        count = {"n": 0}

        def fault(nbytes: int) -> None:
            count["n"] += 1
            if world.rank == 1 and count["n"] == 9:  # past the first call's 6 (3 rows x 2 rects of n=2)
                raise torch.OutOfMemoryError("injected")

        up = upscaler(world, opts)
        p = up.plan(SIZE, scale=4)
        got = up.upscale_tensor(rgb(), p, on_event=events.append, fault=fault)
        result["changes"] = [f"{e.old} -> {e.new}" for e in events if isinstance(e, PlanChanged)]
        result["notices"] = [e.text for e in events if isinstance(e, Notice)]
        changes = D.gather(result["changes"], world)
        if world.main:
            ref = upscaler(D.World(), opts).upscale_tensor(rgb(), p)  # one process, no fault
            result["every_rank_changes"] = changes
            result["max_abs"] = float((got - ref).abs().max())
            result["pixels_equal"] = bool(torch.equal((got * 255).round(), (ref * 255).round()))
    elif mode == "midlayer":
        # 3 ranks; in the 2nd call, in the 2nd rectangle row, two ranks run out of memory between layers:
        # rank 0 in its right-edge rectangle after layer 1 (layer 0 sent, layer 1 not yet), rank 1 in its
        # left-edge rectangle after layer 0 (both layers' receives posted, layer 1's still in flight)
        from infdit_cli.engine.bands import BandNeighbours

        calls, sweep, done = {"n": 0}, BandNeighbours.sweep, BandNeighbours.layer_done
        events = []

        def counting(self, engine, batch):
            calls["n"] += 1
            return sweep(self, engine, batch)

        def failing(self, rect, layer, cache):
            done(self, rect, layer, cache)
            lo, hi = self.band
            if calls["n"] == 2 and rect.r0 == 2 and (
                    (world.rank == 0 and rect.c1 == hi and layer == 1)
                    or (world.rank == 1 and rect.c0 == lo and layer == 0)):
                raise torch.OutOfMemoryError("injected")

        BandNeighbours.sweep, BandNeighbours.layer_done = counting, failing
        up = upscaler(world, opts)
        p = up.plan(SIZE, scale=4)
        got = up.upscale_tensor(rgb(), p, on_event=events.append)
        BandNeighbours.sweep, BandNeighbours.layer_done = sweep, done
        result["changes"] = [f"{e.old} -> {e.new}" for e in events if isinstance(e, PlanChanged)]
        result["notices"] = [e.text for e in events if isinstance(e, Notice)]
        changes = D.gather(result["changes"], world)
        if world.main:
            ref = upscaler(D.World(), opts).upscale_tensor(rgb(), p)
            result["every_rank_changes"] = changes
            result["max_abs"] = float((got - ref).abs().max())
            result["pixels_equal"] = bool(torch.equal((got * 255).round(), (ref * 255).round()))
    elif mode == "budget":
        # the ranks see different free memory: rank 0 fits the whole image, the others only n=2
        probe = upscaler(D.World(), opts).plan(SIZE, scale=4)
        small = probe.passes[0].memory.estimate.device_peak
        budget = 1 << 30 if world.main else small
        up = upscaler(world, UpscaleOptions(steps=2, block_batch="auto", mem_budget=budget))
        own = upscaler(world, UpscaleOptions(steps=2, block_batch="auto", mem_budget=budget), agree=False)
        result["own"] = own.plan(SIZE, scale=4).passes[0].memory.placement.describe()
        p = up.plan(SIZE, scale=4)
        result["agreed"] = p.passes[0].memory.placement.describe()
        result["reason"] = p.passes[0].memory.reason
        got = up.upscale_tensor(rgb(), p)
        every = D.gather({k: result[k] for k in ("own", "agreed")}, world)
        if world.main:
            ref = upscaler(D.World(), opts).upscale_tensor(rgb(), p)
            result["every_rank"] = every
            result["max_abs"] = float((got - ref).abs().max())
    elif mode in ("kill", "stop"):  # rank 1 dies (SIGKILL) or hangs (SIGSTOP) at its 4th rectangle
        count = {"n": 0}

        def fault(nbytes: int) -> None:
            count["n"] += 1
            if world.rank == 1 and count["n"] == 4:
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)

        up = upscaler(world, opts)
        up.upscale_tensor(rgb(), up.plan(SIZE, scale=4), fault=fault)
    if world.main:
        with open(out_path, "w") as f:
            json.dump(result, f)
    D.teardown()
    D.leave(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
