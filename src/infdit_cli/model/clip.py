"""The CLIP image encoder: an open_clip vision tower and the official preprocessing.

Equivalent to THUDM/Inf-DiT `dit/encoders.py` `OpenClipImageEncoder` (text prompts unused): (lr+1)/2,
torchvision `Resize(224, BICUBIC)` (shortest side, antialiased), `CenterCrop(224)`, CLIP mean/std,
`encode_image(normalize=True)`, then L2-normalised again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig

__all__ = ["ClipImageEncoder", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_vision_tower(cfg: ClipConfig) -> nn.Module:
    """An open_clip `VisionTransformer` for `cfg` (imported lazily: open_clip is slow to import).

    Built from the public class directly, with what open_clip's CLIP uses for a float32 ViT tower
    (`nn.GELU`, not QuickGELU: the datacomp models are trained with GELU; open_clip's `LayerNorm`).
    open_clip's only public constructors build a whole named CLIP, text tower included.
    """
    from open_clip.transformer import LayerNorm, VisionTransformer

    return VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
        heads=cfg.width // cfg.head_width, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.embed_dim,
        act_layer=nn.GELU, norm_layer=LayerNorm,
    )


class ClipImageEncoder(nn.Module):
    """LR image in [-1, 1] (B, 3, h, w) -> unit CLIP image vector (B, embed_dim)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = build_vision_tower(cfg)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, lr: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        x = (lr + 1) / 2
        h, w = x.shape[-2:]
        # torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short).
        if h <= w:
            new_h, new_w = size, int(size * w / h)
        else:
            new_h, new_w = int(size * h / w), size
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top = int(round((new_h - size) / 2.0))  # torchvision CenterCrop
        left = int(round((new_w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        x = self.preprocess(lr.float()).to(dtype)
        emb = F.normalize(self.visual(x), dim=-1)  # open_clip encode_image(normalize=True)
        return F.normalize(emb, dim=-1)  # the official encoder normalises once more
