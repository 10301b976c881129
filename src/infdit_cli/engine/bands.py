"""One image across ranks: each rank denoises a band of block columns, passing its boundary K/V on.

UniBA's dependency is a wavefront: a block reads the keys/values of its left, top and top-left
neighbours (`blocks.py`). Rank k owns block columns [lo_k, hi_k) and walks them in n x n rectangles,
row of rectangles by row of rectangles. Inside the band everything is `BlockEngine`'s (same model pieces,
same cache, same eviction); at the band's left edge the rectangle also needs the column lo_k - 1, which
rank k-1 computed: rank k-1 sends each rectangle row's last column (every layer's K/V, the cache's own
entries) with `isend` layer by layer as it computes, and goes on with its next row while rank k works;
rank k posts the receives when it starts the rectangle, so the column lands while it computes.
The top-left corner of a left-edge rectangle is the previous row's received column, still in the cache.

Ranks start one rectangle row apart along the diagonal (pipeline fill; see docs/distributed.md). After
each denoiser call every rank broadcasts its band of D(x), so all ranks hold the same D(x) and the
sampler (elementwise) keeps the same x everywhere: the result is the one-process result, to float32
rounding of the per-rectangle matmuls.
"""

from __future__ import annotations

import torch

from ..distributed.world import World
from ..events import Notice
from ..plan.grid import BlockRect, cache_slots
from .blocks import BlockEngine, KVCache, Neighbours, Sweep

__all__ = ["BandEngine", "BandNeighbours", "band_engine", "column_bands"]


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
    placement (`distributed.agree_plan`; n is agreed again at each call, `all_reduce(MIN)`).
    """

    def __init__(self, *args, world: World, **kw) -> None:
        super().__init__(*args, neighbours=BandNeighbours(world), **kw)
        self.world = world

    @property
    def band(self) -> tuple[int, int]:
        """This rank's block columns [lo, hi)."""
        return column_bands(self.grid.gw, self.world.size)[self.world.rank]


class BandNeighbours(Neighbours):
    """The neighbours of a column band on rank k of `world`: at the band's left edge, the left band's last
    column, received from rank k - 1 layer by layer (every layer's receive posted at once); at its right
    edge, the band's last column sent on to rank k + 1 one layer after it is done (`layer_done`). Inside the
    band, the local cache.

    Out of memory is collective: a rank that runs out keeps every message of the call it owes (`owe`: it
    sends its right edge's remaining layers from any slot of its cache and receives what its left
    neighbour sends) without computing, so no send or receive is left unpaired; one `all_reduce` after the
    last rectangle (`settle`) tells every rank whether any failed, and then all step down to the same
    leaner placement and redo the call from the same x. (The ranks to its right compute the rest of the
    call on what it sent, in vain: a failure flag per row would spare that, but one more message per row
    made every call of benchmarks/ranks.py about 7 % slower on the 2-core test machine, where messages
    cost latency.) At the leanest, every rank raises the same `OutOfMemory` (`collective`: rank 0 alone
    reports it).
    """

    collective = True

    def __init__(self, world: World) -> None:
        self.world = world
        self.bands: list[tuple[int, int]] = []
        self.band = (0, 0)
        self._sends: list[tuple] = []  # (work, tensor, rectangle row) of isends not yet waited for
        self._rx = self._tx = 0  # layers of the current rectangle received from the left / sent to the right
        self._row = 0  # the current rectangle row: what the sends are kept by
        self._spare: torch.Tensor | None = None  # what a failed rank sends and receives into
        self._recvs: list[list] = []  # per layer still to fetch: the posted receives of the left column
        self._unsent: tuple | None = None  # (layer, cache, the column's slots, their puts' events): next send

    def sweep(self, engine: BlockEngine, batch: int) -> Sweep:
        """This rank's band in n x n rectangles, row of rectangles by row of rectangles, with a cache for
        its own entries and the received left column."""
        import torch.distributed as dist

        g, cfg = engine.grid, engine.cfg
        self.bands = column_bands(g.gw, self.world.size)
        lo, hi = self.band = self.bands[self.world.rank]
        self._grid, self._layers, self._block_size = g, cfg.num_layers, cfg.block_size
        self._on_event = engine.on_event
        where = torch.device("cpu") if engine.placement.cache_on_host else engine.model.device
        entry = (2, batch, cfg.block_tokens**2, cfg.num_heads, cfg.head_dim)
        self._entry = (entry, engine.model.dtype, where)  # a block-layer entry of the cache
        self._sends, self._spare = [], None
        # Sender and receiver must cut the same rectangle rows: every rank takes the smallest n.
        agreed = torch.tensor([engine.n])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        n = self._n = min(int(agreed), g.gh)
        done = torch.ones(g.gh, g.gw, dtype=torch.bool)  # other bands: nobody here waits on them
        done[:, lo:hi] = False
        if hi <= lo:
            return Sweep([], n, None, done)
        rects = [BlockRect(r0, min(r0 + n, g.gh), c0, min(c0 + n, hi), g.gh, g.gw)
                 for r0 in range(0, g.gh, n) for c0 in range(lo, hi, n)]
        # own entries (a band's row-major bound) plus the received left column (n rows and the corner)
        return Sweep(rects, n, cache_slots(g.gh, hi - lo, n, "row") + n + 1, done)

    def start(self, rect: BlockRect) -> None:
        self._rx = self._tx = 0
        self._recvs, self._unsent = [], None
        self._row = rect.r0 // self._n

    def fetch(self, cache: KVCache, rect: BlockRect, layer: int, device: torch.device):
        """At the band's left edge, layer `layer` of the left band's last column first, straight into this
        rank's cache. Every layer's receives are posted with the first (`irecv`, in the order rank - 1
        sends them), so the column arrives while this rank computes: fetching a layer waits only for what
        has not landed yet (gloo: the CPU; NCCL: the current stream)."""
        lo = self.band[0]
        if rect.c0 == lo and lo > 0:
            if layer == 0:
                self._post_receives(cache, rect)
            for work in self._recvs.pop(0):
                work.wait()
            self._rx += 1
        return super().fetch(cache, rect, layer, device)

    def _post_receives(self, cache: KVCache, rect: BlockRect) -> None:
        import torch.distributed as dist

        lo, src = self.band[0], self.world.rank - 1
        host = cache.device.type == "cpu"
        slots = [cache.claim((r, lo - 1), host_write=host) for r in range(rect.r0, rect.r1)]
        self._recvs = [[dist.irecv(cache.slab[slot, layer], src=src) for slot in slots]
                       for layer in range(self._layers)]

    def layer_done(self, rect: BlockRect, layer: int, cache: KVCache) -> None:
        """At the band's right edge, the last column's K/V to rank + 1, a layer late: layer `layer - 1`
        goes now (`_send`), while the device still has this layer's attention and MLP queued, so waiting
        for its puts to land stalls nothing; the last layer goes in `rect_done`."""
        hi = self.band[1]
        if rect.c1 == hi and hi < self._grid.gw:
            if self._unsent is not None:
                self._send(*self._unsent)
            slots = [cache.index[(r, hi - 1)] for r in range(rect.r0, rect.r1)]
            self._unsent = (layer, cache, slots, cache.events(slots))

    def _send(self, layer: int, cache: KVCache, slots: list[int], puts: list) -> None:
        import torch.distributed as dist

        self._unsent = None
        for event in puts:  # this layer's puts of the column have landed (a host cache: the copy stream)
            event.synchronize()
        # copies: the slots may be evicted and reused before the sends complete; all made before the
        # first send, so running out of memory here leaves the layer wholly unsent (`owe` sends it)
        kv = [cache.slab[slot, layer].clone() for slot in slots]
        for t in kv:
            self._sends.append((dist.isend(t, dst=self.world.rank + 1), t, self._row))
        self._tx += 1

    def rect_done(self, rect: BlockRect) -> None:
        if self._unsent is not None:
            self._send(*self._unsent)
        # the copies sent two rows back can go: the next rank, a row behind, has them by now
        # (waiting on the last row's would stall this rank on the next one's every jitter)
        self._wait_sends(before=self._row - 1)

    def owe(self, rect: BlockRect, cache: KVCache | None, batch: int) -> bool:
        """A failed rank's part of the protocol for `rect`: the layers still to receive and to send."""
        import torch.distributed as dist

        (lo, hi), rank, layers = self.band, self.world.rank, self._layers
        spare = self._spare_entry(cache)
        if rect.c0 == lo and lo > 0:
            if self._recvs:  # posted: they land in the cache
                for works in self._recvs:
                    for work in works:
                        work.wait()
                self._recvs, self._rx = [], layers
            for _ in range((layers - self._rx) * (rect.r1 - rect.r0)):
                dist.recv(spare, src=rank - 1)
        self._unsent = None  # a layer not yet sent is owed like the rest
        if rect.c1 == hi and hi < self._grid.gw:
            for _ in range((layers - self._tx) * (rect.r1 - rect.r0)):
                self._sends.append((dist.isend(spare, dst=rank + 1), spare, self._row))
        self._rx = self._tx = layers
        return True

    def finish(self) -> None:
        self._wait_sends()
        self._spare, self._recvs, self._unsent = None, [], None

    def settle(self, ok: bool, out: torch.Tensor) -> bool:
        """Every rank learns which ran out of memory (the same decision everywhere); when none did, every
        band of D(x) goes to every rank."""
        import torch.distributed as dist

        failed = torch.zeros(self.world.size, dtype=torch.int32)
        failed[self.world.rank] = not ok
        dist.all_reduce(failed)
        if bool(failed.any()):
            if self._on_event is not None:
                ranks = failed.nonzero().flatten().tolist()
                which = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
                self._on_event(Notice(f"out of device memory on {which}: every rank steps down"))
            return False
        self._share(out)
        return True

    def _spare_entry(self, cache: KVCache | None) -> torch.Tensor:
        """One block-layer entry of the cache's shape and place, for a failed rank's messages."""
        if cache is not None:
            return cache.slab[0, 0]
        if self._spare is None:
            shape, dtype, where = self._entry
            self._spare = torch.empty(shape, dtype=dtype, device=where)
        return self._spare

    def _wait_sends(self, before: int | None = None) -> None:
        keep = []
        for work, t, row in self._sends:
            if before is None or row < before:
                work.wait()
            else:
                keep.append((work, t, row))
        self._sends = keep

    def _share(self, out: torch.Tensor) -> None:
        """Every band of D(x) to every rank (one broadcast per band, from its owner)."""
        import torch.distributed as dist

        bs, w = self._block_size, self._grid.w
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
