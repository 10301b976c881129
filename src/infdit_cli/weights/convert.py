"""Convert the official SwissArmyTransformer checkpoint (`mp_rank_00_model_states.pt`) to safetensors.

One explicit key table; every official key is either mapped, or dropped because the official forward pass
never reads it (listed), and anything else is an error naming the key. Every hyper-parameter is inferred
from tensor shapes and stored as JSON in the safetensors metadata, so a converted file describes itself.
This is the only place infdit ever opens a pickle, and it does so with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConvertError
from ..model.config import ClipConfig, InfDiTConfig
from ..model.layers import rope_frequencies
from ..units import few
from .format import check_state_dict

__all__ = ["convert_checkpoint", "map_state_dict", "infer_config", "ConvertResult", "KEY_MAP", "CONVERTER"]

# Recorded in every converted file's metadata (`infdit_converter`); bump when the output changes.
CONVERTER_VERSION = 1
CONVERTER = f"infdit-convert/{CONVERTER_VERSION}"

_A = "mixins.adaln_layer."
# (official regex, our name template). `{0}` is the layer index where there is one.
KEY_MAP: list[tuple[str, str]] = [
    (r"mixins\.patch_embed\.proj\.(weight|bias)", "x_embedder.{1}"),
    (r"time_embed\.mlp\.([02])\.(weight|bias)", "t_embedder.{1}.{2}"),
    (r"cond_embed\.map_vector\.([02])\.(weight|bias)", "y_embedder.{1}.{2}"),
    (_A + r"adaLN_modulations\.(\d+)\.1\.(weight|bias)", "blocks.{1}.adaLN_modulation.{2}"),
    (r"transformer\.layers\.(\d+)\.attention\.query_key_value\.(weight|bias)", "blocks.{1}.qkv.{2}"),
    (r"transformer\.layers\.(\d+)\.attention\.dense\.(weight|bias)", "blocks.{1}.proj.{2}"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", "blocks.{1}.fc1.{2}"),
    (r"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", "blocks.{1}.fc2.{2}"),
    (_A + r"q_layer_norm\.(\d+)\.(weight|bias)", "blocks.{1}.q_norm.{2}"),
    (_A + r"re_pos_embed", "re_pos_embed"),
    (_A + r"proj_lr\.(weight|bias)", "lr_cross.lr_embedder.{1}"),
    (_A + r"cross_attention\.query\.(weight|bias)", "lr_cross.q.{1}"),
    (_A + r"cross_attention\.key_value\.(weight|bias)", "lr_cross.kv.{1}"),
    (_A + r"cross_attention\.dense\.(weight|bias)", "lr_cross.proj.{1}"),
    (_A + r"cross_q_ln\.(weight|bias)", "lr_cross.q_norm.{1}"),
    (_A + r"cross_k_ln\.(weight|bias)", "lr_cross.k_norm.{1}"),
    (_A + r"lr_query_position_embedding", "lr_cross.q_pos"),
    (_A + r"lr_key_position_embedding", "lr_cross.k_pos"),
    (_A + r"post_cross_attention_layernorm\.(weight|bias)", "lr_cross.post_norm.{1}"),
    (r"mixins\.final_layer\.adaLN_modulation\.1\.(weight|bias)", "final_layer.adaLN_modulation.{1}"),
    (r"mixins\.final_layer\.linear\.(weight|bias)", "final_layer.linear.{1}"),
    (r"image_encoder\.model\.visual\.(.+)", "clip.visual.{1}"),
]

# Present in the release, never read by the official forward pass (a perturbation leaves it bit-identical).
DROPPED: list[str] = [
    _A + r"k_layer_norm\.\d+\.(weight|bias)",  # keys are normed with the query LayerNorm instead
    r"transformer\.position_embeddings\.weight",  # position_embedding_forward returns None (RoPE instead)
    r"image_encoder\.model\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale)",
    _A + r"rope\.freqs_(cos|sin)",  # the RoPE table: recomputed from positions (R read from its shape)
]


@dataclass(frozen=True)
class ConvertResult:
    config: InfDiTConfig
    tensors: dict[str, torch.Tensor]
    dropped: list[str]


def map_state_dict(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename official keys to ours. Returns (mapped, dropped); unknown keys raise `ConvertError`."""
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if any(re.fullmatch(p, key) for p in DROPPED):
            dropped.append(key)
            continue
        for pattern, template in KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                mapped[template.format(None, *m.groups())] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConvertError(f"not an Inf-DiT checkpoint: unknown key(s) {few(unknown)}")
    return mapped, sorted(dropped)


def _need(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ConvertError(f"not an Inf-DiT checkpoint: missing key {key}")
    return tensors[key]


def infer_config(tensors: dict[str, torch.Tensor], clip_head_width: int = 64) -> InfDiTConfig:
    """Every hyper-parameter from official tensor shapes (keys in the official naming).

    Raises:
        ConvertError: a tensor is missing, or the shapes make no valid config (zero or absurd sizes).
    """
    try:
        return _infer_config(tensors, clip_head_width)
    except (ZeroDivisionError, ValueError, IndexError) as e:
        raise ConvertError(f"not an Inf-DiT checkpoint: {' '.join(str(e).split())[:200]}") from None


def _infer_config(tensors: dict[str, torch.Tensor], clip_head_width: int) -> InfDiTConfig:
    patch_w = _need(tensors, "mixins.patch_embed.proj.weight")  # (D, in, p, p)
    hidden, in_ch, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    layers = len({int(m.group(1)) for k in tensors if (m := re.match(r"transformer\.layers\.(\d+)\.", k))})
    head_dim = _need(tensors, _A + "q_layer_norm.0.weight").shape[0]
    bt = math.isqrt(_need(tensors, _A + "lr_query_position_embedding").shape[1])
    lr_patch = _need(tensors, _A + "proj_lr.weight").shape[-1]
    lr_block = math.isqrt(_need(tensors, _A + "lr_key_position_embedding").shape[1]) // 3
    block_size = bt * patch
    final_out = _need(tensors, "mixins.final_layer.linear.weight").shape[0]
    cfg = dict(
        hidden_size=hidden, num_layers=layers, num_heads=hidden // head_dim, patch_size=patch,
        in_channels=in_ch, out_channels=final_out // patch**2, block_size=block_size,
        vector_dim=_need(tensors, "cond_embed.map_vector.0.weight").shape[1],
        sr_scale=block_size // (lr_block * lr_patch), lr_patch_size=lr_patch,
        rope_table_size=_need(tensors, _A + "rope.freqs_cos").shape[0],
        mlp_ratio=_need(tensors, "transformer.layers.0.mlp.dense_h_to_4h.weight").shape[0] // hidden,
        time_channels=_need(tensors, "time_embed.mlp.0.weight").shape[1],
    )
    clip = None
    if any(k.startswith("image_encoder.model.visual.") for k in tensors):
        v = "image_encoder.model.visual."
        conv = _need(tensors, v + "conv1.weight")  # (width, 3, p, p)
        width, cpatch = conv.shape[0], conv.shape[-1]
        grid = math.isqrt(_need(tensors, v + "positional_embedding").shape[0] - 1)
        clip = dict(
            embed_dim=_need(tensors, v + "proj").shape[1], width=width,
            layers=len({k.split(".")[5] for k in tensors if k.startswith(v + "transformer.resblocks.")}),
            head_width=clip_head_width, patch_size=cpatch, image_size=grid * cpatch,
            mlp_ratio=_need(tensors, v + "transformer.resblocks.0.mlp.c_fc.weight").shape[0] / width,
        )
    return InfDiTConfig(**cfg, clip=ClipConfig(**clip) if clip is not None else None)


def _check_rope_table(tensors: dict[str, torch.Tensor], cfg: InfDiTConfig) -> None:
    """The stored RoPE table must be the one we recompute, or our positions would differ."""
    table = tensors[_A + "rope.freqs_cos"].float()
    r = cfg.rope_table_size
    if table.shape != (r, r, cfg.head_dim):
        raise ConvertError(f"RoPE table shape {tuple(table.shape)} != ({r}, {r}, {cfg.head_dim})")
    pos = torch.arange(r, dtype=torch.float32)[:, None] * rope_frequencies(cfg.head_dim)  # (R, hd/2)
    probe = torch.cat([pos[:, None].expand(r, r, -1), pos[None].expand(r, r, -1)], dim=-1).cos()
    if not torch.allclose(table, probe, atol=1e-4, rtol=0):
        raise ConvertError("the checkpoint's RoPE table is not the 2-D RoPE Inf-DiT uses")


def _is_checkpoint(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a pickle (protocol 2+ starts with 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def convert_checkpoint(path: str | Path, *, clip_head_width: int = 64) -> ConvertResult:
    """Read an official checkpoint and return our config and renamed tensors (nothing is written)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"no such file: {path}")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's business
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for non-pickles, truncation and foreign classes
        # torch's advice to unpickle anyway: not ours
        if "weights_only" in str(e) or "Weights only" in str(e):
            what = ("holds objects other than tensors, which infdit never unpickles" if _is_checkpoint(path)
                    else "is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
            raise ConvertError(f"cannot read {path}: it {what}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"cannot read {path} as a PyTorch checkpoint: {first}") from None
    if not isinstance(obj, dict) or "module" not in obj or not isinstance(obj["module"], dict):
        raise ConvertError(f'{path} is not an official Inf-DiT checkpoint: no {{"module": state_dict}} in it')
    tensors = obj["module"]
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
        raise ConvertError(f"{path}: 'module' is not a state dict of tensors")
    cfg = infer_config(tensors, clip_head_width=clip_head_width)
    _check_rope_table(tensors, cfg)
    mapped, dropped = map_state_dict(tensors)
    mapped = {k: t.contiguous() for k, t in mapped.items()}
    check_state_dict(mapped, cfg, error=ConvertError)
    return ConvertResult(config=cfg, tensors=mapped, dropped=dropped)
