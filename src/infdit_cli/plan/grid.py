"""Block-batch schedules: which n x n rectangles of the block grid run in which order. Integers only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["BlockRect", "Order", "plan_rects", "choose_order", "consumers", "cache_bound", "cache_slots"]

Order = Literal["row", "col"]


@dataclass(frozen=True)
class BlockRect:
    """Block rows [r0, r1) and columns [c0, c1) of a grid of grid_h x grid_w blocks."""

    r0: int
    r1: int
    c0: int
    c1: int
    grid_h: int
    grid_w: int

    def blocks(self) -> list[tuple[int, int]]:
        return [(r, c) for r in range(self.r0, self.r1) for c in range(self.c0, self.c1)]

    def blocks_needed_later(self) -> list[tuple[int, int]]:
        """Blocks whose K/V a later rectangle reads: the last row (if a row follows), the last column
        (if a column follows). Every other block's readers lie inside this rectangle."""
        out: set[tuple[int, int]] = set()
        if self.r1 < self.grid_h:
            out.update((self.r1 - 1, c) for c in range(self.c0, self.c1))
        if self.c1 < self.grid_w:
            out.update((r, self.c1 - 1) for r in range(self.r0, self.r1))
        return sorted(out)


def consumers(block: tuple[int, int], grid_h: int, grid_w: int) -> list[tuple[int, int]]:
    """The blocks that read `block` as their left, top or top-left neighbour."""
    r, c = block
    cand = [(r, c + 1), (r + 1, c), (r + 1, c + 1)]
    return [(i, j) for i, j in cand if i < grid_h and j < grid_w]


def choose_order(grid_h: int, grid_w: int) -> Order:
    """Row-major keeps about one block row (grid_w blocks) cached, column-major one column (grid_h
    blocks): take the smaller, so *wide* images go column-major and tall ones row-major."""
    return "col" if grid_w > grid_h else "row"


def cache_bound(grid_h: int, grid_w: int, n: int, order: Order) -> int:
    """Most blocks the cache holds at once: one block row (or column) plus one batch edge."""
    return (grid_w if order == "row" else grid_h) + n


def cache_slots(grid_h: int, grid_w: int, n: int, order: Order) -> int:
    """Blocks the K/V slab must hold: `cache_bound` after a batch plus the batch's own new entries (its
    last row and column) stored before the previous ones are evicted."""
    return cache_bound(grid_h, grid_w, n, order) + min(n, grid_h) + min(n, grid_w)


def plan_rects(grid_h: int, grid_w: int, n: int | None, order: Order = "row") -> list[BlockRect]:
    """The n x n rectangles covering the grid, in raster order (ragged at the right and bottom edges).

    `n=None` (or n covering the grid) is one rectangle: the whole-image pass.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"empty block grid {grid_h}x{grid_w}")
    if n is None:
        n = max(grid_h, grid_w)
    if n < 1:
        raise ValueError(f"block_batch must be >= 1, got {n}")
    rows = [(r, min(r + n, grid_h)) for r in range(0, grid_h, n)]
    cols = [(c, min(c + n, grid_w)) for c in range(0, grid_w, n)]
    if order == "row":
        pairs = [(r, c) for r in rows for c in cols]
    elif order == "col":
        pairs = [(r, c) for c in cols for r in rows]
    else:
        raise ValueError(f"unknown traversal order {order!r}")
    return [BlockRect(r0, r1, c0, c1, grid_h, grid_w) for (r0, r1), (c0, c1) in pairs]
