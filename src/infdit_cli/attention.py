"""Unidirectional block attention (UniBA) and the layer-0 nearby-LR cross-attention.

Equivalent to THUDM/Inf-DiT `dit/model.py` `AdaLNMixin.attention_forward` (`direction="lt"`, the
whole-image training order) and `cross_attention_forward`, restructured so that the keys/values of a
rectangle of blocks can come partly from a cache of earlier rectangles.

Tensor letters: B batch, Gh/Gw blocks of the rectangle, T tokens per block (32x32 = 1024 officially),
H heads, d head dim, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "Prefetcher", "gather_neighbours", "block_attention", "lr_windows"]

Block = tuple[int, int]


class KVCache:
    """Per-layer keys/values of already computed blocks, keyed by (block row, block col).

    Storage is one slab of `slots` block entries, allocated on first use and reused as blocks are evicted,
    so the cache's memory is fixed and known in advance (no allocator churn over thousands of batches).
    Each entry holds (layers, 2, B, T, H, d). `device` is where the slab lives: the compute device, or the
    host ("cpu", pinned when the compute device is CUDA) when device memory is tight.
    """

    def __init__(self, slots: int, device: torch.device | None = None) -> None:
        self.slots = slots
        self.device = device
        self.slab: torch.Tensor | None = None
        self.index: dict[Block, int] = {}
        self.free: list[int] = list(range(slots - 1, -1, -1))

    def _alloc(self, k: torch.Tensor, layers: int) -> None:
        device = self.device or k.device
        pin = device.type == "cpu" and k.device.type == "cuda"
        shape = (self.slots, layers, 2, *k.shape)
        self.slab = torch.empty(shape, dtype=k.dtype, device=device, pin_memory=pin)

    def put(self, block: Block, layer: int, layers: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store block's K/V for `layer` (of `layers`); k, v: (B, T, H, d)."""
        if self.slab is None:
            self._alloc(k, layers)
        if block not in self.index:
            if not self.free:
                raise RuntimeError(f"K/V cache full ({self.slots} blocks)")
            self.index[block] = self.free.pop()
        entry = self.slab[self.index[block], layer]
        entry[0].copy_(k, non_blocking=True)
        entry[1].copy_(v, non_blocking=True)

    def get(self, block: Block, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.slab[self.index[block], layer].to(device, non_blocking=True)
        return entry[0], entry[1]

    def evict(self, blocks: list[Block]) -> None:
        for b in blocks:
            self.free.append(self.index.pop(b))

    @property
    def entries(self) -> list[Block]:
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)


class Prefetcher:
    """Brings layer i+1's cached neighbours to the GPU on a side stream while layer i computes.

    Used when the cache lives in pinned host memory and the model on CUDA; elsewhere `fetch` runs inline.
    """

    def __init__(self, fetch, layers: int, device: torch.device, enabled: bool) -> None:
        self.fetch, self.layers = fetch, layers
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.pending = self._start(0) if self.stream is not None else None

    def _start(self, layer: int):
        if layer >= self.layers:
            return None
        # Host entries may still be being written by copies queued on the compute stream.
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            return self.fetch(layer)

    def get(self, layer: int):
        if self.stream is None:
            return self.fetch(layer)
        out, current = self.pending, torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for t in out:
            if t is not None:
                t.record_stream(current)  # allocated on the side stream, used on this one
        self.pending = self._start(layer + 1)
        return out


def gather_neighbours(
    rect: torch.Tensor, left: torch.Tensor | None, top: torch.Tensor | None
) -> torch.Tensor:
    """Keys (or values) each block attends to: [self, top-left, left, top] along the token axis.

    Args:
        rect: (B, Gh, Gw, T, H, d) this rectangle's blocks.
        left: (B, Gh, T, H, d) the block column just left of the rectangle, or None at the image's left
            edge, where the grid is replicate-padded (official `get_cat_layer_left_top`).
        top: (B, Gw + 1, T, H, d) the block row just above, starting one column left of the rectangle
            (that first entry is the top-left corner; replicate-clamped at the left edge), or None at the
            image's top edge.

    Returns:
        (B, Gh, Gw, 4T, H, d).
    """
    gh, gw = rect.shape[1], rect.shape[2]
    left = rect[:, :, :1] if left is None else left.unsqueeze(2)
    ext = torch.cat([left, rect], dim=2)  # (B, Gh, Gw+1, T, H, d): column -1 added
    top = ext[:, :1] if top is None else top.unsqueeze(1)
    ext = torch.cat([top, ext], dim=1)  # (B, Gh+1, Gw+1, T, H, d): row -1 added
    # Block (i, j) sits at ext[i+1, j+1]. Kept for exactness: the official segment order.
    segments = [ext[:, 1:, 1:], ext[:, :gh, :gw], ext[:, 1:, :gw], ext[:, :gh, 1:]]
    return torch.cat(segments, dim=3)


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, re_pos: torch.Tensor) -> torch.Tensor:
    """Each block's queries against its 4 gathered segments, with one learned key offset per segment.

    Args:
        q: (B, Gh, Gw, T, H, d); k, v: (B, Gh, Gw, 4T, H, d) from `gather_neighbours`.
        re_pos: (4, H, d) the layer's `re_pos_embed`.

    Returns:
        (B, Gh, Gw, T, H, d).
    """
    b, gh, gw, t, h, d = q.shape
    k = k + re_pos.repeat_interleave(t, dim=0).to(k.dtype)  # (4T, H, d) broadcast over blocks
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
