"""Model hyper-parameters: `InfDiTConfig` (the official 4x model's values by default) and presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

__all__ = ["ClipConfig", "InfDiTConfig", "PRESETS"]


@dataclass(frozen=True)
class ClipConfig:
    """The open_clip vision tower that embeds the LR image (ViT-L-14 `datacomp_xl_s13b_b90k` officially)."""

    embed_dim: int = 768  # output vector size (= InfDiTConfig.vector_dim)
    width: int = 1024  # transformer width
    layers: int = 24
    head_width: int = 64  # width per head; not recoverable from weight shapes (open_clip's default)
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        _check_fields(self, "clip.", {"embed_dim": 16384, "width": 16384, "layers": 256, "head_width": 16384,
                                      "patch_size": 1024, "image_size": 4096})
        if not (isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
                and 0 < self.mlp_ratio <= 64):
            raise ValueError(f"clip.mlp_ratio must be a number in (0, 64], got {self.mlp_ratio!r}")
        if self.width % self.head_width:
            raise ValueError(f"clip.width {self.width} is not divisible by clip.head_width {self.head_width}")
        if self.image_size % self.patch_size:
            raise ValueError(f"clip.image_size {self.image_size} is not a multiple of clip.patch_size "
                             f"{self.patch_size}")


def _check_fields(cfg, prefix: str, bounds: dict[str, int]) -> None:
    """Each named field is an int in 1..bound: a file's config is checked before anything is built from it
    (a 7-byte edit must not ask for 30000 layers, and 0 heads must not divide by zero)."""
    for name, top in bounds.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= top:
            raise ValueError(f"{prefix}{name} must be an integer from 1 to {top}, got {v!r}")


@dataclass(frozen=True)
class InfDiTConfig:
    """Inf-DiT hyper-parameters, each with the official flag it comes from (`generate_sr_big_cli.sh`)."""

    hidden_size: int = 1280  # --hidden-size
    num_layers: int = 28  # --num-layers
    num_heads: int = 16  # --num-attention-heads
    patch_size: int = 4  # --patch-size
    in_channels: int = 6  # --in-channels: 3 noisy + 3 LR-upsampled
    out_channels: int = 3  # --out-channels
    block_size: int = 128  # --image-block-size, pixels per UniBA block side
    vector_dim: int = 768  # --vector-dim, CLIP image embedding size
    sr_scale: int = 4  # --sr-scale: HR/LR ratio the network sees
    lr_patch_size: int = 2  # proj_lr kernel (hard-coded upstream)
    rope_table_size: int = 1024  # R = 8 * image_size / patch_size (--image-size 512); positions wrap mod R
    mlp_ratio: int = 4
    time_channels: int = 192  # TimeEmbedding num_channels
    layernorm_eps: float = 1e-6  # --layernorm-epsilon
    sigma_data: float = 0.5  # EDMPrecond
    clip: ClipConfig | None = field(default_factory=ClipConfig)  # None: no CLIP tower in this file

    def __post_init__(self) -> None:
        _check_fields(self, "", {"hidden_size": 16384, "num_layers": 256, "num_heads": 1024, "patch_size": 64,
                                 "in_channels": 64, "out_channels": 64, "block_size": 4096,
                                 "vector_dim": 16384, "sr_scale": 16, "lr_patch_size": 64,
                                 "rope_table_size": 65536, "mlp_ratio": 64, "time_channels": 16384})
        for name in ("layernorm_eps", "sigma_data"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e6):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.block_size % self.patch_size:
            raise ValueError(f"block_size {self.block_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.block_size % (self.sr_scale * self.lr_patch_size):
            raise ValueError("block_size must be a multiple of sr_scale * lr_patch_size")
        if self.clip is not None and self.clip.embed_dim != self.vector_dim:
            raise ValueError(f"CLIP embed_dim {self.clip.embed_dim} != vector_dim {self.vector_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def block_tokens(self) -> int:
        """Tokens per block side (32 officially)."""
        return self.block_size // self.patch_size

    @property
    def lr_block(self) -> int:
        """LR tokens per block side (16 officially): 128 px HR = 32 px LR = 16 LR tokens."""
        return self.block_size // self.sr_scale // self.lr_patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> InfDiTConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        clip = data.pop("clip", None)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)[:5]}")
        if clip is not None:
            if not isinstance(clip, dict):
                raise ValueError("clip must be an object or null")
            unknown = set(clip) - set(ClipConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown clip fields: {sorted(unknown)[:5]}")
        return cls(**data, clip=ClipConfig(**clip) if clip is not None else None)

    def with_(self, **changes: object) -> InfDiTConfig:
        return replace(self, **changes)



PRESETS: dict[str, InfDiTConfig] = {
    # The released 4x model: ~734 M DiT parameters + ~304 M CLIP ViT-L-14 vision tower.
    "official": InfDiTConfig(),
    # Big enough for meaningful CPU measurements, small enough for a 2-core machine.
    "small": InfDiTConfig(
        hidden_size=256, num_layers=4, num_heads=4, vector_dim=64,
        clip=ClipConfig(embed_dim=64, width=64, layers=1, head_width=32, patch_size=14),
    ),
    # Whole-process memory benchmarks at real block size (128 px) and 4096^2 outputs on 2 CPU cores.
    "micro": InfDiTConfig(
        hidden_size=32, num_layers=1, num_heads=1, vector_dim=16,
        clip=ClipConfig(embed_dim=16, width=32, layers=1, head_width=16, patch_size=14, image_size=28),
    ),
    # The packaged demo model (`--weights demo`): trained on 12 photos on a 2-core CPU (docs/demo.md). 64-px
    # blocks (128-px crops hold 2 x 2 of them, so neighbour attention is trained), the official 4x scale and
    # RoPE table of 1024 positions: training draws its origins over the whole table, and outputs up to
    # 4096 px never wrap a position.
    "demo": InfDiTConfig(
        hidden_size=64, num_layers=4, num_heads=2, block_size=64, vector_dim=16,
        clip=ClipConfig(embed_dim=16, width=32, layers=1, head_width=16, patch_size=14, image_size=28),
    ),
    # Tests: tiny everything, 4-token blocks (16 px).
    "tiny": InfDiTConfig(
        hidden_size=32, num_layers=2, num_heads=2, block_size=16, vector_dim=16, rope_table_size=64,
        clip=ClipConfig(embed_dim=16, width=32, layers=1, head_width=16, patch_size=14, image_size=28),
    ),
}
