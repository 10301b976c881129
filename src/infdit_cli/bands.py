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
from .errors import OutOfMemory
from .events import BatchDone, Notice
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
    calls it with the same x (the pipeline draws the same noise from the same seed on each) and the same
    placement (`distributed.agree_plan`; n is agreed again here, `all_reduce(MIN)`).

    Out of memory is collective: a rank that runs out keeps every message of the call it owes (it sends
    its right edge's remaining layers from any slot of its cache and receives what its left neighbour
    sends) without computing, so no send or receive is left unpaired; one `all_reduce` after the last
    rectangle tells every rank whether any failed, and then all step down to the same leaner placement
    and redo the call from the same x. (The ranks to its right compute the rest of the call on what it
    sent, in vain: a failure flag per row would spare that, but one more message per row made every call
    of benchmarks/ranks.py about 7 % slower on the 2-core test machine, where messages cost latency.) At the leanest, every rank raises the same
    `OutOfMemory` (marked `collective`: rank 0 alone reports it).
    """

    def __init__(self, *args, world: World, **kw) -> None:
        super().__init__(*args, **kw)
        self.world = world
        self.bands = column_bands(self.grid.gw, world.size)
        self.band = self.bands[world.rank]
        self._sends: list[tuple] = []  # (work, tensor, rectangle row) of isends not yet waited for
        self._rx = self._tx = 0  # layers of the current rectangle received from the left / sent to the right
        self._spare: torch.Tensor | None = None  # what a failed rank sends and receives into

    def _band_cache(self, batch: int, dtype: torch.dtype, n: int) -> KVCache:
        lo, hi = self.band
        # own entries (a band's row-major bound) plus the received left column (n rows and the corner)
        return self._cache_of(cache_slots(self.grid.gh, hi - lo, n, "row") + n + 1, batch, dtype)

    # ---- one try, decided together ----------------------------------------------------------------------

    def _attempt(self, x: torch.Tensor, out: torch.Tensor, step) -> bool:
        import torch.distributed as dist

        failed = torch.zeros(self.world.size, dtype=torch.int32)
        failed[self.world.rank] = not self._band_pass(x, out, step)
        dist.all_reduce(failed)  # every rank learns which ran out of memory: the same decision everywhere
        if bool(failed.any()):
            if self.on_event is not None:
                ranks = failed.nonzero().flatten().tolist()
                which = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
                self.on_event(Notice(f"out of device memory on {which}: every rank steps down"))
            return False
        self._share(out)
        return True

    def _step_down(self) -> None:
        try:
            super()._step_down()
        except OutOfMemory as e:
            e.collective = True  # raised on every rank alike
            raise

    def _band_pass(self, x: torch.Tensor, out: torch.Tensor, step) -> bool:
        """This rank's band of D(x) into `out`; False when it ran out of device memory (its messages are
        all sent and received all the same)."""
        import torch.distributed as dist

        cfg, g, model = self.cfg, self.grid, self.model
        lo, hi = self.band
        dev, dt = model.device, model.dtype
        # Sender and receiver must cut the same rectangle rows: every rank takes the smallest n.
        agreed = torch.tensor([self.n])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        n = min(int(agreed), g.gh)
        failed = False
        self._spare = None
        if hi > lo:
            rects = [BlockBatch(r0, min(r0 + n, g.gh), c0, min(c0 + n, hi), g.gh, g.gw)
                     for r0 in range(0, g.gh, n) for c0 in range(lo, hi, n)]
            cache = None
            try:
                cache = self._band_cache(x.shape[0], dt, n)
                scales = tuple(t.to(dev).view(-1, 1, 1, 1) for t in (step.c_in, step.c_out, step.c_skip))
            except torch.OutOfMemoryError:
                failed = True
            done = torch.ones(g.gh, g.gw, dtype=torch.bool)  # other bands: nobody here waits on them
            done[:, lo:hi] = False
            self._sends = []
            for idx, rect in enumerate(rects):
                self._rx = self._tx = 0
                self._idx = rect.r0 // n  # the rectangle row: what the sends are kept by
                if not failed:
                    try:
                        if self.fault is not None:
                            self.fault(batch_device_bytes(cfg, rect, x.shape[0], dt, self.placement.cache_on_host,
                                                          model.device.type))
                        self._rect(x, out, rect, step, cache, scales)
                    except torch.OutOfMemoryError:
                        failed = True
                if failed:
                    self._pass_on(rect, cache, x.shape[0])
                if not failed:
                    # the copies sent two rows back can go: the next rank, a row behind, has them by now
                    # (waiting on the last row's would stall this rank on the next one's every jitter)
                    self._wait_sends(before=self._idx - 1)
                    _evict(cache, rect, done, self._puts)
                    if self.on_event is not None:
                        self.on_event(BatchDone(index=idx + 1, total=len(rects), n=n, cached_blocks=len(cache)))
        self._wait_sends()
        self._spare = None
        return not failed

    # ---- the messages between neighbouring bands --------------------------------------------------------

    def _neighbours(self, cache: KVCache, rect: BlockBatch, layer: int, device: torch.device):
        """At the band's left edge, layer `layer` of the left band's last column first (rank - 1 sends it
        as soon as that layer is done), straight into this rank's cache."""
        import torch.distributed as dist

        lo = self.band[0]
        if rect.c0 == lo and lo > 0:
            for r in range(rect.r0, rect.r1):
                slot = cache.claim((r, lo - 1), host_write=cache.device.type == "cpu")
                dist.recv(cache.slab[slot, layer], src=self.world.rank - 1)
            self._rx += 1
        return super()._neighbours(cache, rect, layer, device)

    def _layer_done(self, rect: BlockBatch, layer: int, cache: KVCache) -> None:
        """At the band's right edge, this layer's K/V of the last column to rank + 1 at once: it starts its
        layer `layer` while this rank computes the next."""
        import torch.distributed as dist

        hi = self.band[1]
        if rect.c1 == hi and hi < self.grid.gw:
            if cache.device.type == "cpu":  # this layer's puts of the column have landed (copy stream)
                cache.host_ready([cache.index[(r, hi - 1)] for r in range(rect.r0, rect.r1)])
            # copies: the slots may be evicted and reused before the sends complete; all made before the
            # first send, so running out of memory here leaves the layer wholly unsent (`_pass_on` sends it)
            kv = [cache.slab[cache.index[(r, hi - 1)], layer].clone() for r in range(rect.r0, rect.r1)]
            for t in kv:
                self._sends.append((dist.isend(t, dst=self.world.rank + 1), t, self._idx))
            self._tx += 1

    def _spare_entry(self, cache: KVCache | None, batch: int) -> torch.Tensor:
        """One block-layer entry of the cache's shape and place, for a failed rank's messages."""
        if cache is not None:
            return cache.slab[0, 0]
        if self._spare is None:
            c = self.cfg
            where = torch.device("cpu") if self.placement.cache_on_host else self.model.device
            self._spare = torch.empty((2, batch, c.block_tokens**2, c.num_heads, c.head_dim), dtype=self.model.dtype,
                                      device=where)
        return self._spare

    def _pass_on(self, rect: BlockBatch, cache: KVCache | None, batch: int) -> None:
        """A failed rank's part of the protocol for `rect`: the layers still to receive and to send."""
        import torch.distributed as dist

        (lo, hi), rank, layers = self.band, self.world.rank, self.cfg.num_layers
        spare = self._spare_entry(cache, batch)
        if rect.c0 == lo and lo > 0:
            for _ in range((layers - self._rx) * (rect.r1 - rect.r0)):
                dist.recv(spare, src=rank - 1)
        if rect.c1 == hi and hi < self.grid.gw:
            for _ in range((layers - self._tx) * (rect.r1 - rect.r0)):
                self._sends.append((dist.isend(spare, dst=rank + 1), spare, self._idx))
        self._rx = self._tx = layers

    def _wait_sends(self, before: int | None = None) -> None:
        keep = []
        for work, t, idx in self._sends:
            if before is None or idx < before:
                work.wait()
            else:
                keep.append((work, t, idx))
        self._sends = keep

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

    make.ranks = world.size  # the planner counts the bands' in-flight sends (`planner.estimate(ranks=)`)
    return make
