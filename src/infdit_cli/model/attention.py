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

__all__ = ["neighbour_index", "gather_keys", "block_attention", "cross_attention", "lr_windows"]


def neighbour_index(gh: int, gw: int, has_left: bool, has_top: bool) -> torch.Tensor:
    """Where each block's 4 key segments come from, for `gather_keys`: (Gh*Gw*4,) indices, per block
    (row-major) its [self, top-left, left, top] (the official segment order), into a rectangle's key table
    laid out as

        [the rectangle's Gh*Gw blocks (row-major) | the block column left of it (Gh) | the row above (Gw + 1)]

    where the row above starts one column left of the rectangle (its first entry is the top-left corner).
    Without a left column (the image's left edge) the grid is replicate-padded: a block's left is the
    rectangle's own first column (official `get_cat_layer_left_top`); without a row above, that row repeats
    row 0 and its corner is the left column's first block. The table's tail is then not read.
    """
    nb = gh * gw
    left = (lambda r: nb + r) if has_left else (lambda r: r * gw)
    top = (lambda j: nb + gh + j) if has_top else (lambda j: left(0) if j == 0 else j - 1)
    idx = []
    for r in range(gh):
        for c in range(gw):
            idx += [r * gw + c,
                    (r - 1) * gw + c - 1 if r and c else (top(c) if r == 0 else left(r - 1)),
                    r * gw + c - 1 if c else left(r),
                    (r - 1) * gw + c if r else top(c + 1)]
    return torch.tensor(idx, dtype=torch.long)


def gather_keys(table: torch.Tensor, index: torch.Tensor, re_pos: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Keys (or values) some blocks attend to: the 4 segments `index` names for each, from `table`.

    Args:
        table: (B, E, T, H, d) a rectangle's key table (see `neighbour_index`).
        index: (N*4,) a slice of `neighbour_index`: N blocks' segments.
        re_pos: (4, H, d) the layer's `re_pos_embed`, added per segment (keys only).
        out: a (B, N*4, T, H, d) contiguous buffer to fill, else a new one.

    Returns:
        (B, N, 4T, H, d).
    """
    b, _, t, h, d = table.shape
    out = torch.index_select(table, 1, index.to(table.device), out=out)
    if re_pos is not None:  # one learned offset per segment, the same rounding as `k + re_pos`
        out.unflatten(1, (-1, 4)).add_(re_pos[:, None].to(out.dtype))
    return out.view(b, -1, 4 * t, h, d)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each block's queries against its 4 gathered segments.

    Args:
        q: (B, Gh, Gw, T, H, d); k, v: (B, Gh, Gw, 4T, H, d) from `gather_keys` (k with `re_pos`).

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


def lr_windows(region: torch.Tensor, lr_block: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Cut the 3x3-block LR neighbourhoods of some HR blocks from a zero-padded LR token region.

    Args:
        region: (B, (Gh+2)*lb, (Gw+2)*lb, C) LR tokens around a rectangle (one LR block of padding).
        lr_block: LR tokens per block side (16 officially).
        rows, cols: (N,) the blocks, relative to the rectangle.

    Returns:
        (B, N, (3 lb)^2, C) contiguous, window tokens row-major, as `torch.nn.Unfold(48, stride=16,
        padding=16)` cuts them; only these N windows are materialised.
    """
    win = region.unfold(1, 3 * lr_block, lr_block).unfold(2, 3 * lr_block, lr_block)  # (B,Gh,Gw,C,3lb,3lb)
    return win[:, rows, cols].permute(0, 1, 3, 4, 2).flatten(2, 3).contiguous()
