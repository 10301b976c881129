"""Our ViT tower is open_clip's: the same parameters, made in the same order (a seeded random tower is
open_clip's tensor for tensor), and the same output, bit for bit, in float32 and bfloat16. And no `infdit`
process imports open_clip (it cost 0.8 s of every start on a 2-core machine)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from infdit_cli.model.clip import VisionTower
from infdit_cli.model.config import ClipConfig

open_clip_transformer = pytest.importorskip("open_clip.transformer")


def _theirs(cfg: ClipConfig) -> nn.Module:
    return open_clip_transformer.VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
        heads=cfg.width // cfg.head_width, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.embed_dim,
        act_layer=nn.GELU, norm_layer=open_clip_transformer.LayerNorm)


@pytest.mark.parametrize("cfg", [ClipConfig(embed_dim=16, width=32, layers=2, head_width=16, patch_size=14,
                                            image_size=28),
                                 ClipConfig(embed_dim=48, width=64, layers=3, head_width=32, patch_size=8,
                                            image_size=40, mlp_ratio=2.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tower_is_open_clips(cfg, dtype):
    torch.manual_seed(5)
    ours = VisionTower(cfg)
    torch.manual_seed(5)
    theirs = _theirs(cfg)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same random tower from the same seed
    theirs.load_state_dict({k: torch.randn_like(v) for k, v in b.items()})  # and any weights alike
    ours.load_state_dict(theirs.state_dict())
    ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=g).to(dtype)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
        assert got.dtype == dtype and torch.equal(got, want)
        ours.train(), theirs.train()  # the training path (no fused kernel): the same too
        assert torch.equal(ours(x), theirs(x))


def test_no_infdit_process_imports_open_clip():
    code = ("import sys; from infdit_cli.model.config import PRESETS; from infdit_cli.model.infdit import "
            "random_model; m = random_model(PRESETS['tiny'], seed=0); import torch; "
            "m.encode_image(torch.zeros(1, 3, 8, 8)); print(sorted(k for k in sys.modules "
            "if k.split('.')[0] in ('open_clip', 'torchvision', 'timm')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
