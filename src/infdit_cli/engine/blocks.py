"""The UniBA block engine: denoiser calls D(x; sigma), n x n blocks at a time, in bounded memory.

The official code's memory-bounded modes do not reproduce its own whole-image pass (see
`docs/architecture.md`, "Known upstream limits"); this engine does, for every n, grid and traversal order:
each rectangle attends to itself and to the cached K/V of the blocks to its left, top and top-left, and a
block's K/V is dropped as soon as every block that reads it is done.

The engine owns everything about memory: traversal, the K/V cache (one slab per pass, on the device, in
pinned host memory, or memory-mapped), the prefetch of host-cached neighbours on a side CUDA stream, and
what happens on out-of-memory (step down to a leaner placement and keep it). It calls the model piece by
piece (`InfDiT.embed`, `layer_qkv`, `layer_out`, `head`); the model never calls back.

Image-sized tensors (x, the output, lr_up) stay wherever the caller keeps them (the "state device",
possibly the host or a memory-mapped file); only each rectangle's slices travel to the model's device, and
the LR conditioning is computed per rectangle from the LR pixels it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import OutOfMemory
from ..events import BatchDone, PlanChanged
from ..model.attention import gather_keys, neighbour_index
from ..model.infdit import out_kernel, qkv_into
from ..plan.grid import BlockRect, Order, cache_slots, choose_order, consumers, plan_rects
from ..plan.planner import Placement, batch_device_bytes, chunk_blocks, step_down
from ..plan.sdpa import prefer
from .storage import Scratch

__all__ = [
    "BlockEngine", "Fault", "KVCache", "Neighbours", "Sweep", "compiled_kernels", "denoise", "pad_to_blocks",
    "release_cached",
]

Block = tuple[int, int]
Fault = Callable[[int], None]  # called with a batch's predicted device bytes before it runs; may raise OOM


def pad_to_blocks(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Replicate-pad (…, H, W) at the bottom/right to whole multiples.

    Bottom/right because UniBA only looks left and up: padding there reaches real pixels only through
    blocks that are partly real and the layer-0 LR window; replicating the edge keeps those plausible,
    where zeros would put a black border next to the image.
    """
    h, w = t.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return t
    return F.pad(t, (0, pw, 0, ph), mode="replicate")


def release_cached(device: torch.device) -> None:
    """Give the caching allocator's free blocks on `device` back to the driver (that device, not the
    current one: `--device cuda:1`); nothing elsewhere."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------
# K/V cache
# --------------------------------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys/values of already computed blocks, keyed by (block row, block col).

    Storage is one slab of `slots` block entries of shape (layers, 2, B, T, H, d), allocated once per pass
    and reused as blocks are evicted, so the cache's memory is fixed and known in advance. It lives on the
    compute device, in pinned host memory, or in a memory-mapped file (`scratch`).
    """

    def __init__(self, slots: int, entry: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 scratch: Scratch | None = None) -> None:
        self.slots = slots
        shape = (slots, *entry)
        if device.type == "cpu" and scratch is not None:
            self.slab = scratch.empty("kv_cache", shape, dtype)
        else:
            self.slab = torch.empty(shape, dtype=dtype, device=device)
        self.scratch = scratch
        self.pending: dict[int, object] = {}  # slot -> event after which the device is done with it
        self.index: dict[Block, int] = {}
        self.free: list[int] = list(range(slots - 1, -1, -1))

    @property
    def device(self) -> torch.device:
        return self.slab.device

    def put(self, block: Block, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store block's K/V for `layer`; k, v: (B, T, H, d). Queued on the current stream (the engine's
        copy stream for a host cache next to a GPU): see `_Puts`."""
        entry = self.slab[self.claim(block), layer]
        entry[0].copy_(k, non_blocking=True)
        entry[1].copy_(v, non_blocking=True)

    def claim(self, block: Block, host_write: bool = False) -> int:
        """`block`'s slot, taken from the free list if it has none. `host_write`: the CPU is about to write
        it (a received edge): whatever the device still does with the slot (its last put, reads of what it
        held before it was evicted) is waited for first. Device-side writers need no wait: the copy stream
        runs puts in order, after the compute stream's reads (`_Puts.start`)."""
        slot = self.index.get(block)
        if slot is None:
            if not self.free:
                raise RuntimeError(f"K/V cache full ({self.slots} blocks)")
            slot = self.index[block] = self.free.pop()
        if host_write:
            self.host_ready([slot])
        return slot

    def mark(self, slots, event) -> None:
        """`event` completes the device's last work on `slots` (a put, or the reads before an eviction)."""
        if event is not None:
            for slot in slots:
                self.pending[slot] = event

    def events(self, slots) -> list:
        """The events of the device's last work on `slots` as of now (their latest puts), to wait for
        later: `host_ready` then would wait for whatever is queued by that time."""
        return list({id(ev): ev for s in slots if (ev := self.pending.get(s)) is not None}.values())

    def host_ready(self, slots) -> None:
        """Wait (the CPU) until the device is done with `slots`: their host pages are then the CPU's."""
        for slot in slots:
            ev = self.pending.pop(slot, None)
            if ev is not None:
                ev.synchronize()

    def get(self, block: Block, layer: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.slab[self.index[block], layer].to(device, non_blocking=True)
        return entry[0], entry[1]

    def evict(self, blocks: list[Block], event=None) -> None:
        """Free the blocks' slots; `event` (if any) completes the device's reads of them."""
        for b in blocks:
            slot = self.index.pop(b)
            self.free.append(slot)
            if event is not None:
                self.pending[slot] = event

    def clear(self) -> None:
        self.index.clear()
        self.free = list(range(self.slots - 1, -1, -1))
        self.host_ready(list(self.pending))

    def __len__(self) -> int:
        return len(self.index)


class _Puts:
    """Where the engine's device -> host K/V puts run: a dedicated copy stream, so ~340 GB per 16384² call
    of host-cache copies run beside the compute, not in its queue.

    The order it keeps (CUDA; on the CPU, and for a cache on the device, there are no streams: every method
    is a no-op and the puts run inline, in the same code):
    - `start`: the copy stream waits for the compute stream (the keys/values to put were just computed, and
      reads of a reused slot's old contents, by the prefetch, were waited for by the compute stream);
    - `finish`: an event after a layer's puts; the cache marks the slots it wrote with it;
    - `before_table_write`: the compute stream waits for the last puts' event before it rewrites the
      key/value tables the puts read from (the next layer's qkv, a new rectangle's buffers): the copy has a
      layer's attention and MLP to run beside;
    - `evicted`: an event on the compute stream after a rectangle, for the slots it frees (a CPU writer,
      `KVCache.claim(host_write=True)`, waits for it; a device-side put is ordered by `start`).
    """

    def __init__(self, copy=None, device: torch.device | None = None) -> None:
        self.copy, self.device = copy, device
        self.last = None  # event of the last puts not yet waited for by the compute stream

    @property
    def compute(self):
        """The stream the engine computes on: the device's current one when asked (a caller may run the
        engine under `torch.cuda.stream(...)`, another one at each call), not the one when the cache was
        made."""
        return torch.cuda.current_stream(self.device)

    @property
    def active(self) -> bool:
        return self.copy is not None

    def start(self) -> None:
        if self.copy is not None:
            self.copy.wait_stream(self.compute)

    def on(self):
        """Context: the puts' stream (nothing to switch to without one)."""
        return torch.cuda.stream(self.copy) if self.copy is not None else contextlib.nullcontext()

    def finish(self):
        if self.copy is None:
            return None
        self.last = self.copy.record_event()
        return self.last

    def before_table_write(self) -> None:
        if self.last is not None:
            self.compute.wait_event(self.last)
            self.last = None

    def evicted(self):
        if self.copy is None:
            return None
        self.before_table_write()  # so the event covers the slots' last puts too
        return self.compute.record_event()

    def synchronize(self) -> None:
        """The CPU waits for every put (before buffers the puts read are freed)."""
        if self.copy is not None:
            self.copy.synchronize()
        self.last = None


def _on_device(device: torch.device):
    """Context: `device` is CUDA's current device (a runtime call in it binds that GPU's context, not GPU
    0's); nothing for another device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _copy_streams(device: torch.device):
    """(copy stream, its device) for a host-side cache next to a CUDA model; (None, None) elsewhere."""
    if device.type != "cuda":
        return None, None
    return torch.cuda.Stream(device), device


class _Prefetch:
    """Brings layer i+1's cached neighbours to the GPU on a side stream while layer i computes.

    Used when the cache lives in host memory and the model on CUDA; elsewhere `fetch` runs inline.
    """

    def __init__(self, fetch: Callable[[int], tuple], layers: int, stream: torch.cuda.Stream | None) -> None:
        self.fetch, self.layers, self.stream = fetch, layers, stream
        self.pending = self._start(0) if stream is not None else None

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


# --------------------------------------------------------------------------------------------------------
# torch.compile of the layer pieces (`--compile`)
# --------------------------------------------------------------------------------------------------------

_COMPILED: dict[str, tuple[Callable, Callable]] = {}


def compiled_kernels(backend: str = "inductor") -> tuple[Callable, Callable]:
    """`torch.compile`d `model.qkv_into` and `model.out_kernel`, made once per process and backend; both
    write into their arguments (the engine's buffers, the residual stream), so no copies follow them.

    They take the layer's weights as arguments, so every layer (and every model) shares their graphs;
    shapes become dynamic after the first change (edge rectangles, the last chunk), so a pass compiles a
    few graphs, not one per rectangle.
    """
    if backend not in _COMPILED:
        _COMPILED[backend] = (torch.compile(qkv_into, backend=backend),
                              torch.compile(out_kernel, backend=backend))
    return _COMPILED[backend]


# --------------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Grid:
    h: int  # image pixels
    w: int
    gh: int  # blocks
    gw: int


class Sweep(NamedTuple):
    """One pass of `BlockEngine`'s loop: the rectangles it walks and the cache it keeps."""

    rects: list[BlockRect]  # in traversal order
    n: int  # the block batch they are cut with
    slots: int | None  # the K/V cache's entries; None: no cache (the whole image at once)
    done: torch.Tensor  # (Gh, Gw) bool: blocks marked done up front (nobody in this process waits on them)


class Neighbours:
    """Where a rectangle's left/top neighbours come from and where its finished edge goes: the one thing
    `BlockEngine`'s block loop leaves open.

    This one is the whole grid in one process: every neighbour is in the local K/V cache, and past the
    image's left/top edge `neighbour_index` replicate-pads. `bands.BandNeighbours` walks a column band and
    trades its edges with the neighbouring ranks.
    """

    collective = False  # an `OutOfMemory` at the leanest placement is raised on every process alike

    def sweep(self, engine: BlockEngine, batch: int) -> Sweep:
        """The pass's rectangles and cache, at the start of each denoiser call."""
        g, n, order = engine.grid, engine.n, engine.order
        slots = None if n >= max(g.gh, g.gw) else cache_slots(g.gh, g.gw, n, order)
        return Sweep(plan_rects(g.gh, g.gw, n, order), n, slots, torch.zeros(g.gh, g.gw, dtype=torch.bool))

    def start(self, rect: BlockRect) -> None:
        """Before `rect` is computed."""

    def fetch(self, cache: KVCache, rect: BlockRect, layer: int, device: torch.device):
        """Layer `layer`'s left column and top row of `rect`: (left_k, left_v, top_k, top_v)."""
        return _neighbours(cache, rect, layer, device)

    def layer_done(self, rect: BlockRect, layer: int, cache: KVCache) -> None:
        """Layer `layer` of `rect` is in the cache."""

    def rect_done(self, rect: BlockRect) -> None:
        """`rect` is computed (its blocks not yet evicted)."""

    def owe(self, rect: BlockRect, cache: KVCache | None, batch: int) -> bool:
        """After running out of memory: this process's part in `rect` without computing it. False when it
        owes nothing: the pass ends there."""
        return False

    def finish(self) -> None:
        """After the pass's last rectangle, or its failure."""

    def settle(self, ok: bool, out: torch.Tensor) -> bool:
        """Whether the call succeeded (`ok`: this process's pass did), `out` then holding all of D(x)."""
        return ok


class BlockEngine:
    """The denoiser of one sampling pass: `engine(x, sigma, out)` = D(x; sigma), any number of calls.

    Args:
        model: an `InfDiT`.
        lr: (B, 3, h, w) the LR image in [-1, 1] for an HR image of (B, 3, 4h, 4w) (padded here to blocks).
        vector: (B, vector_dim) its CLIP vector.
        lr_up: (B, 3, H, W) the upsampled LR image, or any object sliced as `lr_up[..., ys, xs]` into such
            tensors (the pipeline computes it per rectangle instead of holding it).
        placement: n, traversal order and where the K/V cache lives (`planner.Placement`).
        scratch: where a host-side cache lives (memory-mapped under `--low-memory`); None: RAM.
        on_event: receives `BatchDone` after each rectangle and `PlanChanged` when out of memory.
        fault: test hook called with each batch's predicted device bytes before it runs.
        compile: run the layers' per-token work through `torch.compile` (`compiled_kernels`): True for
            Inductor, or a backend name.
        replan: the first rung on out-of-memory, before `planner.step_down` halves n: the placement to
            take instead (the pipeline's: `planner.replan` at 0.9x the plan's budget), or None.
        neighbours: where each rectangle's neighbours come from (`Neighbours`: this process's cache).
        attention: the attention backend tried first (`plan.sdpa.prefer`; the calibration's `Rates.sdpa`);
            None: torch's own order.
    """

    def __init__(self, model, lr: torch.Tensor, vector: torch.Tensor, lr_up, placement: Placement, *,
                 scratch: Scratch | None = None, on_event: Callable[[object], None] | None = None,
                 fault: Fault | None = None, compile: bool | str = False,
                 replan: Callable[[Placement], Placement | None] | None = None,
                 neighbours: Neighbours | None = None, attention: str | None = None) -> None:
        cfg = self.cfg = model.config
        self.model = model
        h, w = lr_up.shape[-2:]
        self.grid = _Grid(h, w, -(-h // cfg.block_size), -(-w // cfg.block_size))
        self.lr = pad_to_blocks(lr, cfg.block_size // cfg.sr_scale)  # small: 1/16 of the image's pixels
        lb, lp = cfg.lr_block, cfg.lr_patch_size
        if tuple(self.lr.shape[-2:]) != (self.grid.gh * lb * lp, self.grid.gw * lb * lp):
            raise ValueError(f"lr {tuple(lr.shape[-2:])} does not match an HR image of {h}x{w}; "
                             f"lr must be (B, 3, {h // cfg.sr_scale}, {w // cfg.sr_scale})")
        self.vector, self.lr_up = vector, lr_up
        self.scratch, self.on_event, self.fault = scratch, on_event, fault
        self.placement = placement
        self.replan = replan
        self.attention = attention
        self.neighbours = neighbours if neighbours is not None else Neighbours()
        self.cache: KVCache | None = None
        self._stream = None
        self._puts = _Puts()
        self._bufs, self._buf_key, self._chunk_bufs = None, None, None
        self._index_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._compiled = None
        if compile:
            self._compiled = compiled_kernels("inductor" if compile is True else compile)

    # ---- placement and memory ---------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return min(self.placement.n, max(self.grid.gh, self.grid.gw))

    @property
    def order(self) -> Order:
        o = self.placement.order
        return choose_order(self.grid.gh, self.grid.gw) if o == "auto" else o

    def _ensure_cache(self, slots: int | None, batch: int, dtype: torch.dtype) -> KVCache | None:
        """The pass's cache with `slots` entries (kept while it fits), emptied; None: no cache. On the host
        next to a CUDA model it is pinned (else unpinned: copies then wait) and fetched ahead on a side
        stream."""
        if slots is None:
            self.cache = None
            return None
        cfg = self.cfg
        dev = torch.device("cpu") if self.placement.cache_on_host else self.model.device
        entry = (cfg.num_layers, 2, batch, cfg.block_tokens**2, cfg.num_heads, cfg.head_dim)
        c = self.cache
        with _on_device(self.model.device):  # the pinning (and unpinning) binds the model's GPU, not GPU 0
            if c is None or c.slots != slots or c.device != dev or tuple(c.slab.shape[1:]) != entry:
                self.cache = c = None  # free the old slab first
                scratch = self.scratch
                if scratch is None:  # RAM, pinned for asynchronous copies when the model is on CUDA
                    scratch = Scratch(pin=self.model.device.type == "cuda")
                self.cache = KVCache(slots, entry, dtype, dev, scratch=scratch)
            self.cache.clear()
        if self.model.device.type == "cuda" and dev.type == "cpu" and self._stream is None:
            self._stream = torch.cuda.Stream(self.model.device)
        if dev.type == "cpu" and not self._puts.active:
            self._puts = _Puts(*_copy_streams(self.model.device))
        return self.cache

    def _step_down(self) -> None:
        """Free what the failed attempt held, then take the next leaner placement (for good). Called after
        the `except` has ended: while it runs, its traceback keeps the failed attempt's tensors alive."""
        self.close()
        release_cached(self.model.device)
        new = None
        if self.replan is not None:  # once: the plan's estimate missed by a little, not by half
            new, self.replan = self.replan(self.placement), None
        if new is None:
            new = step_down(self.placement, self.grid.gh, self.grid.gw)
        if new is None:
            err = OutOfMemory("out of device memory even at block batch 1 with the K/V cache on the host; "
                              "try a smaller --mem-budget, --low-memory, or --device cpu")
            err.collective = self.neighbours.collective  # raised on every rank alike: rank 0 reports it
            raise err from None
        if self.on_event is not None:
            self.on_event(PlanChanged(old=self.placement.describe(), new=new.describe()))
        self.placement = new

    def prepare(self, batch: int = 1) -> KVCache | None:
        """Make the pass's K/V cache now (allocated; pinned next to a CUDA model), as the first call would,
        so a caller can time it apart from the calls (`infdit bench`); later calls reuse it. None: the
        whole-image pass has no cache."""
        return self._ensure_cache(self.neighbours.sweep(self, batch).slots, batch, self.model.dtype)

    def close(self) -> None:
        self._puts.synchronize()  # the puts read the tables and write the cache about to be freed
        with _on_device(self.model.device):  # unpinning synchronises the model's GPU
            self.cache = None
        self._bufs = self._buf_key = self._chunk_bufs = None

    # ---- one denoiser call ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """D(x; sigma) into `out` (a new float32 tensor like x when None). x: (B, 3, H, W)."""
        b = x.shape[0]
        if tuple(x.shape[-2:]) != (self.grid.h, self.grid.w):
            raise ValueError(f"x {tuple(x.shape)} does not match lr_up {tuple(self.lr_up.shape)}")
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        sigma_t = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(b).cpu()
        step = self.model.prepare_step(sigma_t, self.vector)
        with prefer(self.attention):
            while not self._attempt(x, out, step):
                self._step_down()
        return out

    def _attempt(self, x: torch.Tensor, out: torch.Tensor, step) -> bool:
        """One try at the call: False when it ran out of device memory (the caller then steps down, once
        this frame, and with it the failed attempt's tensors, is gone)."""
        return self.neighbours.settle(self._run(x, out, step), out)

    def _run(self, x: torch.Tensor, out: torch.Tensor, step) -> bool:
        """The block loop: D(x) into `out`, rectangle by rectangle; False when it ran out of device memory
        (the rest of the sweep is then only what `Neighbours.owe` says)."""
        cfg, model, edges = self.cfg, self.model, self.neighbours
        dev, dt, b = model.device, model.dtype, x.shape[0]
        sweep = edges.sweep(self, b)
        cache, failed = None, False
        try:
            cache = self._ensure_cache(sweep.slots, b, dt)
            scales = tuple(t.to(dev).view(-1, 1, 1, 1) for t in (step.c_in, step.c_out, step.c_skip))
        except torch.OutOfMemoryError:
            failed = True
        for idx, rect in enumerate(sweep.rects):
            edges.start(rect)
            if not failed:
                try:
                    if self.fault is not None:
                        on_host = self.placement.cache_on_host
                        self.fault(batch_device_bytes(cfg, rect, b, dt, on_host, dev.type))
                    self._rect(x, out, rect, step, cache, scales)
                    edges.rect_done(rect)
                    if cache is not None:
                        _evict(cache, rect, sweep.done, self._puts)
                except torch.OutOfMemoryError:
                    failed = True
            if failed:
                if edges.owe(rect, cache, b):
                    continue
                break
            if self.scratch is not None:
                self.scratch.trim()
            if self.on_event is not None:
                self.on_event(BatchDone(index=idx + 1, total=len(sweep.rects), n=sweep.n,
                                        cached_blocks=len(cache) if cache is not None else 0))
        edges.finish()
        return not failed

    def _rect(self, x: torch.Tensor, out: torch.Tensor, rect: BlockRect, step, cache: KVCache | None,
              scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """D(x) on one rectangle into `out`: its slices travel to the model's device and back."""
        bs, g, dev = self.cfg.block_size, self.grid, self.model.device
        c_in, c_out, c_skip = scales
        ys = slice(rect.r0 * bs, min(rect.r1 * bs, g.h))
        xs = slice(rect.c0 * bs, min(rect.c1 * bs, g.w))
        x_r = x[..., ys, xs].to(dev, torch.float32)
        xin = torch.cat([x_r, self.lr_up[..., ys, xs].to(dev, torch.float32)], dim=1)
        xin = pad_to_blocks(xin, bs) * c_in  # the LR channels are scaled by c_in too
        f = self._forward(xin.to(self.model.dtype), rect, step, cache)
        f = f[..., : x_r.shape[-2], : x_r.shape[-1]].float()
        out[..., ys, xs] = (f * c_out + x_r * c_skip).to(out.device)

    def _forward(self, xin: torch.Tensor, rect: BlockRect, step, cache: KVCache | None) -> torch.Tensor:
        """The network on one rectangle: the model's pieces, with the cache between `layer_qkv` and
        `layer_out`, each piece run over chunks of blocks (`chunk_blocks`).

        A layer computes the rectangle's queries, keys and values into buffers kept for the pass (the keys
        and values in a table with the cached left column and row above behind them: `neighbour_index`);
        then, chunk by chunk, it gathers the chunk's 4-segment keys/values and its LR windows into
        chunk-sized buffers and finishes the chunk. Nothing image-sized is gathered: what a chunk reads
        stays in the CPU's caches, and every n, the whole image included, does the same work per block.
        """
        model, cfg = self.model, self.cfg
        h = model.embed(xin).contiguous()  # (B, Gh, Gw, T, D)
        b, gh, gw, t = h.shape[:4]
        nb, dev = gh * gw, h.device
        span = (range(rect.r0, rect.r1), range(rect.c0, rect.c1))  # the rectangle's block rows, columns
        rope = model.rope(*span)
        lr_ctx = model.lr_context(self.lr_pixel_region(rect), *span, *self.lr_token_size)
        puts = self._puts if cache is not None else _Puts()
        # the last rectangle's puts are done before anything reads the cache (the prefetch, from here) or
        # rewrites the tables they read from (which may be reallocated below)
        puts.before_table_write()
        prefetch = None
        if cache is not None:
            stream = self._stream if cache.device.type == "cpu" and dev.type == "cuda" else None
            prefetch = _Prefetch(lambda layer: self.neighbours.fetch(cache, rect, layer, dev), cfg.num_layers,
                                 stream)
        later = rect.blocks_needed_later() if cache is not None else []
        index, rows, cols = self._indices(gh, gw, False, False, dev)  # (no neighbours: the image's corner)
        qbuf, ktab, vtab = self._buffers(b, nb + gh + gw + 1, t, h.dtype, dev)
        # Block axes flattened: (B, 1, Gh*Gw, ...), chunks are slices of the third axis.
        hf = h.reshape(b, 1, nb, *h.shape[3:])
        qf = qbuf[:, :nb].unsqueeze(1)
        kf, vf = ktab[:, :nb].unsqueeze(1), vtab[:, :nb].unsqueeze(1)
        ropef = tuple(z.reshape(1, nb, *z.shape[2:]) for z in rope)
        per = chunk_blocks(cfg, dev.type)
        chunks = [slice(a, min(a + per, nb)) for a in range(0, nb, per)]
        for i in range(cfg.num_layers):
            puts.before_table_write()  # layer i-1's puts have read the tables qkv now rewrites
            for c in chunks:
                rope_c = (ropef[0][:, c], ropef[1][:, c])
                dst = (qf[:, :, c], kf[:, :, c], vf[:, :, c])
                kernel = self._compiled[0] if self._compiled is not None else None
                model.layer_qkv(i, hf[:, :, c], step, rope_c, out=dst, kernel=kernel)
            if cache is not None:
                left_k, left_v, top_k, top_v = prefetch.get(i)
                # what the table holds decides where each block's segments come from (None: an image edge)
                index = self._indices(gh, gw, left_k is not None, top_k is not None, dev)[0]
                k, v = (z[:, :nb].view(b, gh, gw, *z.shape[2:]) for z in (ktab, vtab))
                if later:
                    puts.start()
                    with puts.on():
                        for r, cc in later:
                            cache.put((r, cc), i, k[:, r - rect.r0, cc - rect.c0],
                                      v[:, r - rect.r0, cc - rect.c0])
                    cache.mark([cache.index[b] for b in later], puts.finish())
                self.neighbours.layer_done(rect, i, cache)
                for tab, left, top in ((ktab, left_k, top_k), (vtab, left_v, top_v)):
                    if left is not None:
                        tab[:, nb : nb + gh].copy_(left)
                    if top is not None:
                        tab[:, nb + gh : nb + gh + gw + 1].copy_(top)
                if self.scratch is not None and cache.slab.device.type == "cpu" and self.scratch.mapped:
                    self.scratch.trim()  # a mapped cache: keep only this layer's pages resident
            kernel = self._compiled[1] if self._compiled is not None else None
            for c in chunks:
                kg, vg = self._chunk_buffers(b, c.stop - c.start, t, h.dtype, dev)
                idx = index[c.start * 4 : c.stop * 4]
                kc = gather_keys(ktab, idx, model.re_pos_embed[i], out=kg).unsqueeze(1)  # (B,1,N,4T,H,d)
                vc = gather_keys(vtab, idx, out=vg).unsqueeze(1)
                lr = None
                if i == 0:
                    lr = tuple(z.unsqueeze(1) for z in model.lr_windows(lr_ctx, rows[c], cols[c]))
                model.layer_out(i, hf[:, :, c], qf[:, :, c], kc, vc, step, lr, kernel=kernel)
        return model.head(h, step)

    def _indices(self, gh: int, gw: int, has_left: bool, has_top: bool, device: torch.device):
        """`neighbour_index` and each block's (row, column) for a gh x gw rectangle, on the device; made
        once per shape (a pass has a few: full, edge and first-row/column rectangles)."""
        key = (gh, gw, has_left, has_top, device)
        if key not in self._index_cache:
            blocks = torch.arange(gh * gw)
            self._index_cache[key] = tuple(z.to(device) for z in (neighbour_index(gh, gw, has_left, has_top),
                                                                   blocks // gw, blocks % gw))
        return self._index_cache[key]

    def _buffers(self, b: int, entries: int, t: int, dtype: torch.dtype, device: torch.device):
        """The rectangle's queries (B, E, T, H, d) and its key/value tables (`neighbour_index`), allocated
        for the largest rectangle so far and kept for the pass (smaller rectangles use a prefix)."""
        heads = (self.cfg.num_heads, self.cfg.head_dim)
        key = (b, t, dtype, device)
        if self._buf_key is None or self._buf_key[0] != key or self._buf_key[1] < entries:
            self._bufs = self._chunk_bufs = None  # free the old ones first
            self._bufs = tuple(torch.empty((b, entries, t, *heads), dtype=dtype,
                                           device=device) for _ in range(3))
            self._chunk_bufs = {}
            self._buf_key = (key, entries)
        return self._bufs

    def _chunk_buffers(self, b: int, blocks: int, t: int, dtype: torch.dtype, device: torch.device):
        """A chunk's gathered keys and values, (B, blocks*4, T, H, d) each, kept for the pass (a pass's
        chunks come in at most a few sizes: the full one and the rectangles' last)."""
        bufs = self._chunk_bufs.get(blocks)
        if bufs is None:
            heads = (self.cfg.num_heads, self.cfg.head_dim)
            bufs = self._chunk_bufs[blocks] = tuple(
                torch.empty((b, blocks * 4, t, *heads), dtype=dtype, device=device) for _ in range(2))
        return bufs

    @property
    def lr_token_size(self) -> tuple[int, int]:
        lp = self.cfg.lr_patch_size
        return self.lr.shape[-2] // lp, self.lr.shape[-1] // lp

    def lr_pixel_region(self, rect: BlockRect) -> torch.Tensor:
        """LR pixels under the rectangle plus one LR block all round, clipped to the LR image."""
        span = self.cfg.lr_block * self.cfg.lr_patch_size  # LR pixels per block side
        hl, wl = self.lr.shape[-2:]
        r0, r1 = max((rect.r0 - 1) * span, 0), min((rect.r1 + 1) * span, hl)
        c0, c1 = max((rect.c0 - 1) * span, 0), min((rect.c1 + 1) * span, wl)
        return self.lr[..., r0:r1, c0:c1]


def _neighbours(cache: KVCache, rect: BlockRect, layer: int, device: torch.device):
    """Left column (rows r0..r1-1 at c0-1) and top row (row r0-1, columns c0-1..c1-1) from the cache.

    At the image's left/top edge the grid is replicate-padded: None lets `neighbour_index` pad, and the
    top row's first entry is clamped to column 0.
    """
    left_k = left_v = top_k = top_v = None
    if rect.c0 > 0:
        kv = [cache.get((r, rect.c0 - 1), layer, device) for r in range(rect.r0, rect.r1)]
        left_k, left_v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)
    if rect.r0 > 0:
        kv = [cache.get((rect.r0 - 1, max(c, 0)), layer, device) for c in range(rect.c0 - 1, rect.c1)]
        top_k, top_v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)
    return left_k, left_v, top_k, top_v


def _evict(cache: KVCache, rect: BlockRect, done: torch.Tensor, puts: _Puts | None = None) -> None:
    """Mark the rectangle done; drop cached blocks that no block still to come reads."""
    done[rect.r0 : rect.r1, rect.c0 : rect.c1] = True
    grid_h, grid_w = done.shape
    stale = [blk for blk in cache.index if all(done[i, j] for i, j in consumers(blk, grid_h, grid_w))]
    cache.evict(stale, puts.evicted() if puts is not None and stale else None)


# --------------------------------------------------------------------------------------------------------
# One call, for library users and tests
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def denoise(model, x: torch.Tensor, sigma: float | torch.Tensor, *, lr_up: torch.Tensor, lr: torch.Tensor,
            vector: torch.Tensor | None = None, block_batch: int | None = None, order: Order | str = "auto",
            cache_device: torch.device | str | None = None,
            on_event: Callable[[object], None] | None = None, fault: Fault | None = None,
            compile: bool | str = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """One EDM denoiser call D(x; sigma) = c_skip x + c_out F(c_in [x, lr_up]; c_noise).

    Args:
        model: an `InfDiT`.
        x, lr_up: (B, 3, H, W) in [-1, 1], any H, W; they and the result stay on x's device.
        lr: (B, 3, H/4, W/4) the LR image.
        vector: (B, vector_dim) CLIP vector of `lr`; computed when omitted.
        block_batch: None for the whole-image pass, n for n x n block batches with a K/V cache.
        order: "row", "col" or "auto" (the one with the smaller cache).
        cache_device: "cpu" to keep the cache on the host; default the model's device.
        on_event, fault, compile: see `BlockEngine`.
        out: where to write the result (any dtype; default a new float32 tensor like x).

    Returns:
        `out`: (B, 3, H, W) on x's device.
    """
    if lr_up.shape != x.shape:
        raise ValueError(f"lr_up {tuple(lr_up.shape)} must match x {tuple(x.shape)}")
    if block_batch is not None and (not isinstance(block_batch, int) or block_batch < 1):
        raise ValueError(f"block_batch must be None or an int >= 1, got {block_batch!r}")
    vector = model.encode_image(lr) if vector is None else vector
    on_host = cache_device is not None and torch.device(cache_device).type == "cpu"
    placement = Placement(n=block_batch or 1 << 30, order=order, cache_on_host=on_host)
    engine = BlockEngine(model, lr, vector, lr_up, placement, on_event=on_event, fault=fault, compile=compile)
    return engine(x, sigma, out)


