"""One image across ranks: each rank denoises a band of block columns, passing its boundary K/V on.

UniBA's dependency is a wavefront: a block reads the keys/values of its left, top and top-left
neighbours (`engine.py`). Rank k owns block columns [lo_k, hi_k) and walks them in n x n rectangles,
row of rectangles by row of rectangles. Inside the band everything is `BlockEngine`'s (same model pieces,
same cache, same eviction); at the band's left edge the rectangle also needs the column lo_k - 1, which
rank k-1 computed: rank k-1 sends each rectangle row's last column (every layer's K/V, the cache's own
entries) with `isend` as soon as that rectangle is done, and goes on with its next row while rank k works.
The top-left corner of a left-edge rectangle is the previous row's received column, still in the cache.

Ranks start one rectangle row apart along the diagonal (pipeline fill; see docs/distributed.md). After
each denoiser call every rank broadcasts its band of D(x), so all ranks hold the same D(x) and the
sampler (elementwise) keeps the same x everywhere: the result is the one-process result, to float32
rounding of the per-rectangle matmuls.
"""

from __future__ import annotations

import torch

from .distributed import World
from .engine import BlockEngine, KVCache, _evict
from .events import BatchDone
from .planner import batch_device_bytes
from .schedule import BlockBatch, cache_slots

__all__ = ["BandEngine", "column_bands", "band_engine"]


def column_bands(grid_w: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous block-column ranges [lo, hi), as equal as can be; ranks past grid_w get empty bands."""
    base, extra = divmod(grid_w, ranks)
    out, lo = [], 0
    for k in range(ranks):
        hi = lo + base + (k < extra)
        out.append((lo, hi))
        lo = hi
    return out


class BandEngine(BlockEngine):
    """`BlockEngine` over this rank's column band; `engine(x, sigma, out)` = D(x; sigma) on every rank.

    Same arguments as `BlockEngine`, plus `world` (the process group must be initialised). Every rank
    calls it with the same x (the pipeline draws the same noise from the same seed on each).
    """

    def __init__(self, *args, world: World, **kw) -> None:
        super().__init__(*args, **kw)
        self.world = world
        self.bands = column_bands(self.grid.gw, world.size)
        self.band = self.bands[world.rank]

    def _band_cache(self, batch: int, dtype: torch.dtype, n: int) -> KVCache:
        lo, hi = self.band
        # own entries (a band's row-major bound) plus the received left column (n rows and the corner)
        return self._cache_of(cache_slots(self.grid.gh, hi - lo, n, "row") + n + 1, batch, dtype)

    def _run(self, x: torch.Tensor, out: torch.Tensor, step) -> None:
        import torch.distributed as dist

        cfg, g, model = self.cfg, self.grid, self.model
        (lo, hi), rank = self.band, self.world.rank
        dev, dt = model.device, model.dtype
        sends = []
        # Sender and receiver must cut the same rectangle rows: every rank takes the smallest n (the
        # planner's n may differ where the GPUs' free memory does).
        agreed = torch.tensor([self.n])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        n = min(int(agreed), g.gh)
        if hi > lo:
            rects = [BlockBatch(r0, min(r0 + n, g.gh), c0, min(c0 + n, hi), g.gh, g.gw)
                     for r0 in range(0, g.gh, n) for c0 in range(lo, hi, n)]
            cache = self._band_cache(x.shape[0], dt, n)
            done = torch.ones(g.gh, g.gw, dtype=torch.bool)  # other bands: nobody here waits on them
            done[:, lo:hi] = False
            scales = tuple(t.to(dev).view(-1, 1, 1, 1) for t in (step.c_in, step.c_out, step.c_skip))
            for idx, rect in enumerate(rects):
                if rect.c0 == lo and lo > 0:
                    self._receive(rect, cache, rank - 1)
                if self.fault is not None:
                    self.fault(batch_device_bytes(cfg, rect, x.shape[0], dt, self.placement.cache_on_host,
                                              model.device.type))
                self._rect(x, out, rect, step, cache, scales)
                if rect.c1 == hi and hi < g.gw:  # the next band's left column: send it now, keep going
                    kv = torch.stack([cache.slab[cache.index[(r, hi - 1)]] for r in range(rect.r0, rect.r1)])
                    sends.append((dist.isend(kv, dst=rank + 1), kv))
                _evict(cache, rect, done)
                if self.on_event is not None:
                    self.on_event(BatchDone(index=idx + 1, total=len(rects), n=n, cached_blocks=len(cache)))
        for work, _ in sends:
            work.wait()
        self._share(out)

    def _receive(self, rect: BlockBatch, cache: KVCache, src: int) -> None:
        """The left band's last column for this rectangle's rows (every layer), into the cache."""
        import torch.distributed as dist

        rows = rect.r1 - rect.r0
        buf = torch.empty((rows, *cache.slab.shape[1:]), dtype=cache.slab.dtype, device=cache.device)
        dist.recv(buf, src=src)
        for i, r in enumerate(range(rect.r0, rect.r1)):
            for layer in range(self.cfg.num_layers):
                cache.put((r, rect.c0 - 1), layer, buf[i, layer, 0], buf[i, layer, 1])

    def _share(self, out: torch.Tensor) -> None:
        """Every band of D(x) to every rank (one broadcast per band, from its owner)."""
        import torch.distributed as dist

        bs, w = self.cfg.block_size, self.grid.w
        for k, (lo, hi) in enumerate(self.bands):
            if hi <= lo:
                continue
            xs = slice(lo * bs, min(hi * bs, w))
            buf = out[..., xs].contiguous() if k == self.world.rank else torch.empty_like(out[..., xs])
            dist.broadcast(buf, src=k)
            if k != self.world.rank:
                out[..., xs] = buf


def band_engine(world: World):
    """An engine factory for `pipeline.upscale(..., engine=...)`: `BandEngine` on `world`."""

    def make(*args, **kw) -> BandEngine:
        return BandEngine(*args, world=world, **kw)

    return make
