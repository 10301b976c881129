"""The CLIP image encoder: open_clip's ViT vision tower and the official preprocessing.

Equivalent to THUDM/Inf-DiT `dit/encoders.py` `OpenClipImageEncoder` (text prompts unused): (lr+1)/2,
torchvision `Resize(224, BICUBIC)` (shortest side, antialiased), `CenterCrop(224)`, CLIP mean/std,
`encode_image(normalize=True)`, then L2-normalised again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig

__all__ = ["ClipImageEncoder", "VisionTower", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose output keeps the input's dtype (open_clip's `transformer.LayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm attention and GELU MLP, each added to the stream (open_clip's block without layer scale)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTower(nn.Module):
    """The ViT image tower of open_clip's CLIP (`open_clip.transformer.VisionTransformer` as the official
    ViT-L-14 uses it: a class token, learned positions, `ln_pre`, GELU blocks, `ln_post` on every token,
    the class token projected by `proj`), with open_clip's parameter names and creation order: its state
    dict, and a seeded random tower, are open_clip's (tests/test_clip.py holds it to open_clip's class).

    Our own rather than open_clip's class: `import open_clip` brings torchvision, timm and its whole model
    zoo: a tiny `infdit upscale` took 4.1 s with it and takes 3.3 s without, 60 MiB less at its peak
    (farm-bench, median of 6, 2-core machine), for these sixty lines.
    """

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, width // cfg.head_width, cfg.mlp_ratio)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, cfg.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, embed_dim), not normalised."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj


class ClipImageEncoder(nn.Module):
    """LR image in [-1, 1] (B, 3, h, w) -> unit CLIP image vector (B, embed_dim)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg)
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
