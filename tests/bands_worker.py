"""Run by test_distributed.py under torchrun: BandEngine on every rank against engine.denoise in one."""

import json
import sys

import torch

from infdit_cli.distributed import world as D
from infdit_cli.engine.bands import BandEngine
from infdit_cli.engine.blocks import denoise
from infdit_cli.model.config import PRESETS
from infdit_cli.model.infdit import random_model
from infdit_cli.plan.planner import Placement


def main(out_path: str) -> None:
    world = D.world_from_env()
    D.init(world, "cpu")
    model = random_model(PRESETS["tiny"], seed=0)
    bs = model.config.block_size
    results = []
    # grids: 3x7 blocks (7 columns: bands 4 + 3), 5x2 (one column each), ragged pixels 40x90
    for (h, w), n in [((3 * bs, 7 * bs), 1), ((3 * bs, 7 * bs), 2), ((5 * bs, 2 * bs), 2), ((40, 90), 3),
                      ((3 * bs, 7 * bs), 64)]:
        g = torch.Generator().manual_seed(h * 1000 + w)
        lr = torch.rand(1, 3, -(-h // bs) * bs // 4, -(-w // bs) * bs // 4, generator=g) * 2 - 1
        lr_up = torch.rand(1, 3, h, w, generator=g) * 2 - 1
        x = torch.randn(1, 3, h, w, generator=g)
        vector = model.encode_image(lr)
        ref = denoise(model, x, 1.5, lr_up=lr_up, lr=lr, vector=vector, block_batch=None)
        eng = BandEngine(model, lr, vector, lr_up, Placement(n=n, order="row", cache_on_host=False),
                         world=world)
        got = eng(x, 1.5)
        results.append({"size": [h, w], "n": n, "max_abs": float((got - ref).abs().max()),
                        "band": list(eng.band)})
    gathered = D.gather(results, world)
    if world.main:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    D.teardown()
    D.leave(0)


if __name__ == "__main__":
    main(sys.argv[1])
