"""Unidirectional block attention (UniBA) and the layer-0 nearby-LR cross-attention.

Equivalent to THUDM/Inf-DiT `dit/model.py` `AdaLNMixin.attention_forward` (`direction="lt"`, the
whole-image training order) and `cross_attention_forward`, restructured so that the keys/values of a
rectangle of blocks can come partly from a cache of earlier rectangles. Pure functions: no state.

Tensor letters: B batch, Gh/Gw blocks of the rectangle, T tokens per block (32x32 = 1024 officially),
H heads, d head dim, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_neighbours", "block_attention", "cross_attention", "lr_windows"]


def gather_neighbours(rect: torch.Tensor, left: torch.Tensor | None, top: torch.Tensor | None,
                      re_pos: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys (or values) each block attends to: [self, top-left, left, top] along the token axis.

    Args:
        rect: (B, Gh, Gw, T, H, d) this rectangle's blocks.
        left: (B, Gh, T, H, d) the block column just left of the rectangle, or None at the image's left
            edge, where the grid is replicate-padded (official `get_cat_layer_left_top`).
        top: (B, Gw + 1, T, H, d) the block row just above, starting one column left of the rectangle
            (that first entry is the top-left corner; replicate-clamped at the left edge), or None at the
            image's top edge.
        re_pos: (4, H, d) the layer's `re_pos_embed`, added per segment (keys only).
        out: a (B, Gh, Gw, 4T, H, d) buffer to fill (reused across layers), else a new one.

    Returns:
        (B, Gh, Gw, 4T, H, d).
    """
    b, gh, gw, t = rect.shape[:4]
    if left is None:
        left = rect[:, :, 0]
    if top is None:  # the row above the image repeats row 0, its corner the left column's first block
        top = torch.cat([left[:, :1], rect[:, 0]], dim=1)
    if out is None:
        out = rect.new_empty(b, gh, gw, 4 * t, *rect.shape[4:])
    me, top_left, lft, up = (out[:, :, :, s * t : (s + 1) * t] for s in range(4))  # official segment order
    if rect.data_ptr() != me.data_ptr() or rect.stride() != me.stride():  # else already in place
        me.copy_(rect)
    top_left[:, 1:, 1:].copy_(rect[:, :-1, :-1])
    top_left[:, 0].copy_(top[:, :gw])
    top_left[:, 1:, 0].copy_(left[:, :-1])
    lft[:, :, 1:].copy_(rect[:, :, :-1])
    lft[:, :, 0].copy_(left)
    up[:, 1:].copy_(rect[:, :-1])
    up[:, 0].copy_(top[:, 1:])
    if re_pos is not None:  # one learned offset per segment, the same rounding as `k + re_pos`
        out.unflatten(3, (4, t)).add_(re_pos[:, None].to(out.dtype))
    return out


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each block's queries against its 4 gathered segments.

    Args:
        q: (B, Gh, Gw, T, H, d); k, v: (B, Gh, Gw, 4T, H, d) from `gather_neighbours` (k with `re_pos`).

    Returns:
        (B, Gh, Gw, T, H, d).
    """
    b, gh, gw, t, h, d = q.shape
    out = _sdpa(q.reshape(-1, t, h, d), k.reshape(-1, 4 * t, h, d), v.reshape(-1, 4 * t, h, d))
    return out.reshape(b, gh, gw, t, h, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (N, L, H, d) tensors (flash/memory-efficient kernels where available)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block queries (B, Gh, Gw, T, H, d) against their LR windows (B, Gh, Gw, W, H, d)."""
    b, gh, gw, t, h, d = q.shape
    w = k.shape[3]
    out = _sdpa(q.reshape(-1, t, h, d), k.reshape(-1, w, h, d), v.reshape(-1, w, h, d))
    return out.reshape(b, gh, gw, t, h, d)


def lr_windows(region: torch.Tensor, lr_block: int) -> torch.Tensor:
    """Cut the 3x3-block LR neighbourhood of every HR block from a zero-padded LR token region.

    Args:
        region: (B, (Gh+2)*lb, (Gw+2)*lb, C) LR tokens around the rectangle (one LR block of padding).
        lr_block: LR tokens per block side (16 officially).

    Returns:
        (B, Gh, Gw, (3 lb)^2, C), window tokens row-major, as `torch.nn.Unfold(48, stride=16, padding=16)`.
    """
    win = region.unfold(1, 3 * lr_block, lr_block).unfold(2, 3 * lr_block, lr_block)  # (B,Gh,Gw,C,3lb,3lb)
    return win.permute(0, 1, 2, 4, 5, 3).flatten(3, 4)
