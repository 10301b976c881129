"""Memory planner: arithmetic on the config. Predicted peak bytes on the device and on the host, and the
choice of n, placements, sampler-state dtype and memory-mapped state for a budget.

Device peak = weights + image-sized state kept there + K/V cache there + one batch's activations + slack.
Host peak (resident, whole process) = runtime + the larger of (loading the weights) and (image state and
K/V cache kept on the host, or their resident window when memory-mapped, + the LR images). Every term is
counted from shapes (no tensors, no model is built); the few coefficients that depend on how many
temporaries PyTorch keeps alive were checked against measured peaks (`benchmarks/memory_vs_size.py`,
`docs/benchmarks.md`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from ..errors import BadRequest, HostMemoryTooSmall, MemoryBudgetTooSmall
from ..model.config import InfDiTConfig
from ..settings import settings
from ..units import format_bytes, format_seconds, parse_bytes
from .grid import BlockRect, cache_slots, choose_order

__all__ = [
    "HEUN_IMAGES", "NOMINAL_RATES", "REPLAN_FACTOR", "MemoryEstimate", "Placement", "Plan", "Rates",
    "batch_device_bytes", "call_seconds", "chunk_blocks", "compile_pays", "device_free", "estimate",
    "flops_per_call", "format_bytes", "format_seconds", "host_available", "layer_flops", "leanest",
    "nominal_rates", "param_count", "parse_bytes", "plan", "replan", "step_down"
]

# The engine runs each layer's per-token work over chunks of a rectangle's blocks, while the rectangle's
# queries and gathered keys/values stay in buffers: small chunks keep a CPU's temporaries in its caches and
# its allocator's free lists (measured at 512², whole image, small config: 282 K page faults per call in
# one chunk, 151 K in 4096-token chunks, 74 K in 2048; 5-10 % faster than one chunk, 2048 and 4096 within
# the noise); a GPU wants enough tokens per kernel to stay busy (16 official blocks; not measured).
CHUNK_TOKENS = {"cpu": 2048}
CHUNK_TOKENS_DEFAULT = 16384
# Live (tokens x hidden) tensors. Kept for the whole rectangle during a layer: h, q and the key and value
# tables (4), and at the head its two LayerNorms and projection -> 7 counted, 8 fitted. For one chunk:
# its gathered 4-segment keys and values (8) and, at the MLP peak, the modulated LayerNorm, fc1 and GELU
# outputs and fc2's (8) -> 16. The rectangle's LR tokens (keys and values, one LR block all round) and
# the chunk's LR windows (2 x 9 lb^2 per block). Fitted to CPU peak RSS at 512^2-1024^2, whole image and
# n = 1, 2 (`benchmarks/memory_vs_plan.py`; docs/benchmarks.md has the table).
RECT_TOKEN_COPIES = 8
CHUNK_TOKEN_COPIES = 16
LR_WINDOW_COPIES = 2
HEUN_IMAGES = 4  # sampler state: x, d, the Euler point, the denoiser output (the second derivative reuses it)
# Allocator slack and kernel workspaces (cuBLAS/cuDNN on a GPU). The CPU's is fitted to a steady call's peak
# RSS (`bench.measure`: after a warm-up call and a malloc_trim). The library code a process's first call
# pages in (25-60 MiB, more on some CPUs and environments) is counted once, in HOST_RUNTIME.
DEVICE_SLACK = {"cpu": 20 * 2**20}
DEVICE_SLACK_DEFAULT = 64 * 2**20
# Kept free on a CUDA device below what it reports free: the larger of a fixed floor and a share of the free
# memory. The coefficients above were fitted on CPU RSS; a GPU adds what they do not see (cuBLAS/cuDNN/NCCL
# workspaces, the caching allocator's fragmentation, other processes): plans that packed 97 % of an 80 GB
# card (8192² n=44 at 74.1 GiB) left no room for them. An out-of-memory all the same re-plans at
# `REPLAN_FACTOR` of the budget before the engine halves n (`replan`).
DEVICE_MARGIN = 512 * 2**20
DEVICE_MARGIN_FRACTION = 0.10
REPLAN_FACTOR = 0.9
# The band pipeline (`bands.BandEngine`, ranks > 1) keeps copies of its right edge's K/V in flight until the
# rank to its right has them: up to this many rectangle rows of n blocks, every layer.
SEND_ROWS_IN_FLIGHT = 3
# Resident bytes of the process before any image work: interpreter, torch, CUDA context (the CPU's fitted to
# `benchmarks/host_memory.py`: 949-971 MiB peak for a whole 1024² job of the micro config, measured while
# infdit still imported open_clip and torchvision; a little high since).
HOST_RUNTIME = {"cpu": 1000 * 2**20, "cuda": 2048 * 2**20, "mps": 1536 * 2**20}
LOW_MEMORY_WINDOW = 256 * 2**20  # resident pages of memory-mapped state/cache between two trims, at most


@dataclass(frozen=True)
class Rates:
    """What a device does per second: the cost model's coefficients (`call_seconds`). Measured by
    `calibrate.calibration` (a few seconds, cached per device, dtype, torch version and model shape);
    `nominal_rates` where nothing was measured."""

    flops: float  # FLOP/s of the model's per-token work: one layer on one chunk (matmuls, attention, norms)
    op_seconds: float  # fixed cost of one tensor operation: Python, dispatch, a kernel launch
    copy_bytes: float  # bytes/s of a large copy: host <-> device next to a GPU, memory to memory on the CPU
    source: str = "assumed"  # "measured": calibrated on this device
    steady: bool = True  # False: measured while other work shared the device (used, not cached)
    sdpa: str | None = None  # CUDA: the attention backend fastest within the bf16 bound (`plan.sdpa`)
    pixel_seconds: float = 0.0  # a call's image work per output pixel outside the model (the LR upsampling
    # per rectangle, the slices in and out, the sampler's arithmetic), on the state's device

    @property
    def measured(self) -> bool:
        return self.source == "measured"


# Where nothing was measured (`plan(..., rates=None)`, `--dry-run` callers that do not calibrate): the low
# end of what `calibrate` measured on an idle 2-core Xeon for the CPU (per thread), and for CUDA a bf16
# H100-class card at ~40 % of its peak (fp32 a quarter), PCIe 4 copies. Assumptions, used for ordering.
NOMINAL_RATES = {"cpu": Rates(25e9, 3e-6, 4e9, pixel_seconds=80e-9),
                 "cuda": Rates(400e12, 2e-6, 12e9, pixel_seconds=0.3e-9),
                 "cuda-fp32": Rates(100e12, 2e-6, 12e9, pixel_seconds=0.3e-9),
                 "mps": Rates(10e12, 3e-6, 20e9, pixel_seconds=1e-9)}


def nominal_rates(device_type: str, dtype: torch.dtype = torch.float32) -> Rates:
    if device_type == "cpu":
        r = NOMINAL_RATES["cpu"]
        return replace(r, flops=r.flops * max(1, torch.get_num_threads()))
    if device_type == "cuda":
        return NOMINAL_RATES["cuda" if dtype in (torch.bfloat16, torch.float16) else "cuda-fp32"]
    return NOMINAL_RATES.get(device_type, NOMINAL_RATES["mps"])


@dataclass(frozen=True)
class Placement:
    """Where the engine runs a pass: n x n blocks per batch, traversal order, and where things live."""

    n: int  # block batch side; n >= the grid's longer side means the whole-image pass
    order: str = "auto"
    cache_on_host: bool = False
    state_on_host: bool = False

    def describe(self) -> str:
        parts = [f"n={self.n}" if self.n < 1 << 20 else "whole image"]
        where = (("cache on host", self.cache_on_host), ("state on host", self.state_on_host))
        parts += [s for s, on in where if on]
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peaks, by part. `total` is the device peak: what our computation holds on the compute
    device (on the CPU: in host memory, less the runtime); `host_peak` the whole process's resident peak."""

    weights: int
    state: int  # image-sized sampler state on the compute device (0 when it lives on the host)
    cache: int  # K/V cache on the compute device (only the batch's neighbours when it is on the host)
    activations: int
    overhead: int
    host: dict[str, int] = field(default_factory=dict)  # resident host bytes by part
    disk: int = 0  # --low-memory: bytes of the memory-mapped files (allocated on disk before the pass)

    @property
    def device_peak(self) -> int:
        return self.weights + self.state + self.cache + self.activations + self.overhead

    @property
    def host_peak(self) -> int:
        h = self.host
        return h["runtime"] + max(h["weights_load"], h["weights"] + h["state"] + h["cache"] + h["images"])

    total = device_peak


@dataclass(frozen=True)
class Plan:
    placement: Placement
    whole_image: bool
    state_dtype: torch.dtype  # dtype of the sampler state (float32; bfloat16 where the host needs it)
    low_memory: bool  # sampler state and host K/V cache in memory-mapped files
    estimate: MemoryEstimate
    budget: int  # device bytes planned for
    host_budget: int  # host bytes available
    reason: str
    seconds_per_call: float = 0.0  # the cost model's prediction (`call_seconds`) with the plan's `rates`
    rates: Rates | None = None

    n = property(lambda self: self.placement.n)
    order = property(lambda self: self.placement.order)
    cache_on_host = property(lambda self: self.placement.cache_on_host)
    state_on_host = property(lambda self: self.placement.state_on_host)

    @property
    def memory(self) -> dict[str, int]:
        return {"device_peak_bytes": self.estimate.device_peak, "host_peak_bytes": self.estimate.host_peak,
                "scratch_disk_bytes": self.estimate.disk}


# --------------------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------------------


def param_count(cfg: InfDiTConfig) -> int:
    """Parameters of `InfDiT(cfg)`, CLIP vision tower included, by arithmetic (tests check it against the
    real module)."""
    d, hd, layers, mlp = cfg.hidden_size, cfg.head_dim, cfg.num_layers, cfg.mlp_ratio
    p = cfg.patch_size
    def lin(i: int, o: int) -> int:
        return i * o + o

    n = cfg.in_channels * d * p * p + d  # x_embedder
    n += lin(cfg.time_channels, d) + lin(d, d) + lin(cfg.vector_dim, d) + lin(d, d)  # t/y embedders
    n += layers * (lin(d, 4 * d) + lin(d, 3 * d) + 2 * hd + lin(d, d) + lin(d, mlp * d) + lin(mlp * d, d))
    n += layers * 4 * d  # re_pos_embed
    lp = cfg.lr_patch_size
    n += 3 * d * lp * lp + d + lin(d, d) + lin(d, 2 * d) + lin(d, d) + 4 * hd  # lr_cross
    n += cfg.block_tokens**2 * d + (3 * cfg.lr_block) ** 2 * d + 2 * d  # q_pos, k_pos, post_norm
    n += lin(d, 2 * d) + lin(d, p * p * cfg.out_channels)  # final layer
    c = cfg.clip
    if c is not None:  # the CLIP tower (model.clip.VisionTower)
        w, grid = c.width, c.image_size // c.patch_size
        n += 3 * w * c.patch_size**2 + w + (grid * grid + 1) * w + 2 * w  # conv1, class, pos, ln_pre
        hidden = int(w * c.mlp_ratio)
        n += c.layers * (2 * w + lin(w, 3 * w) + lin(w, w) + 2 * w + lin(w, hidden) + lin(hidden, w))
        n += 2 * w + w * c.embed_dim  # ln_post, proj
    return n


def _elem(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def chunk_blocks(cfg: InfDiTConfig, device_type: str) -> int:
    """Blocks per chunk of a rectangle's per-token work on this kind of device."""
    return max(1, CHUNK_TOKENS.get(device_type, CHUNK_TOKENS_DEFAULT) // cfg.block_tokens**2)


def _act_bytes(cfg: InfDiTConfig, bh: int, bw: int, batch: int, e: int, flash: bool, device_type: str) -> int:
    """Activations of one bh x bw batch on the device."""
    t, d, heads = cfg.block_tokens**2, cfg.hidden_size, cfg.num_heads
    blocks = bh * bw
    chunk = min(blocks, chunk_blocks(cfg, device_type))
    tokens, chunk_tokens = batch * blocks * t, batch * chunk * t
    act = (RECT_TOKEN_COPIES * tokens + CHUNK_TOKEN_COPIES * chunk_tokens) * d * e
    lb = cfg.lr_block
    act += 2 * batch * (bh + 2) * (bw + 2) * lb * lb * d * e  # the rectangle's LR keys and values
    act += LR_WINDOW_COPIES * batch * chunk * (3 * lb) ** 2 * d * e  # the chunk's LR windows
    if not flash:  # the math kernel materialises one chunk's attention scores (and their softmax)
        act += 2 * batch * chunk * heads * t * 4 * t * e
    return act + batch * blocks * cfg.block_size**2 * (6 + 3) * 4  # the rectangle's pixels in and out


def _neighbour_bytes(cfg: InfDiTConfig, bh: int, bw: int, batch: int, e: int) -> int:
    """A host-cached batch's neighbours on the device: one layer in use and the next being prefetched."""
    return 2 * batch * 2 * (bh + bw + 1) * cfg.block_tokens**2 * cfg.hidden_size * e


def batch_device_bytes(cfg: InfDiTConfig, rect: BlockRect, batch: int, dtype: torch.dtype,
                       cache_on_host: bool, device_type: str = "cuda") -> int:
    """What one rectangle asks of the device beyond weights, state and a device-side cache."""
    e = _elem(dtype)
    bh, bw = rect.r1 - rect.r0, rect.c1 - rect.c0
    extra = _neighbour_bytes(cfg, bh, bw, batch, e) if cache_on_host else 0
    return _act_bytes(cfg, bh, bw, batch, e, True, device_type) + extra


def estimate(cfg: InfDiTConfig, size: tuple[int, int], n: int | None, *, dtype: torch.dtype = torch.float32,
             device_type: str = "cpu", cache_on_host: bool = False, state_on_host: bool = False,
             batch: int = 1, flash: bool | None = None, order: str = "auto",
             state_dtype: torch.dtype = torch.float32, low_memory: bool = False, scale: int = 4,
             weights_file_dtype: torch.dtype | None = None, ranks: int = 1) -> MemoryEstimate:
    """Predicted peak bytes for one sampling pass whose (block-padded) output is `size` (H, W).

    `scale` is the pass's factor (its input is H/scale x W/scale); `weights_file_dtype` the dtype the
    weights are stored in (loading holds them once in that dtype and once converted); `ranks` > 1: the
    band pipeline's in-flight sends (`SEND_ROWS_IN_FLIGHT` rows of n blocks' K/V, next to the cache).
    """
    e, es = _elem(dtype), _elem(state_dtype)
    h, w = size
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    n_eff = min(n or max(gh, gw), max(gh, gw))
    whole = n_eff >= max(gh, gw)
    bh, bw = min(n_eff, gh), min(n_eff, gw)  # the largest rectangle
    on_cpu = device_type == "cpu"
    if flash is None:
        flash = device_type in ("cuda", "cpu")  # torch has flash-style SDPA kernels for both
    hp, wp = gh * cfg.block_size, gw * cfg.block_size
    order = choose_order(gh, gw) if order == "auto" else order

    params = param_count(cfg)
    state_bytes = HEUN_IMAGES * batch * 3 * hp * wp * es
    block_kv = batch * 2 * cfg.num_layers * cfg.block_tokens**2 * cfg.hidden_size * e
    slab = 0 if whole else cache_slots(gh, gw, n_eff, order) * block_kv
    sends = SEND_ROWS_IN_FLIGHT * min(n_eff, gh) * block_kv if ranks > 1 else 0
    images = batch * 3 * hp * wp * 4 // (scale * scale) + batch * 3 * hp * wp * 4 // 16  # pass input, LR

    # Device.
    weights = params * e
    act = _act_bytes(cfg, bh, bw, batch, e, flash, device_type)
    # Host (resident).
    host_state = state_bytes if (on_cpu or state_on_host) else 0
    host_cache = slab + sends if (on_cpu or cache_on_host) else 0
    if low_memory:  # mapped: only a window stays resident
        host_state = min(host_state, LOW_MEMORY_WINDOW + 2 * batch * 3 * bh * cfg.block_size * wp * es)
        host_cache = min(host_cache, LOW_MEMORY_WINDOW)
    if on_cpu:  # the device's memory is the host's: the same state and cache
        state, cache = host_state, host_cache
    else:
        state = 0 if state_on_host else state_bytes
        cache = 0 if whole else (_neighbour_bytes(cfg, bh, bw, batch, e) if cache_on_host else slab)
        cache += 0 if cache_on_host else sends
    file_e = _elem(weights_file_dtype) if weights_file_dtype is not None else e
    host = {
        "runtime": HOST_RUNTIME.get(device_type, HOST_RUNTIME["cuda"]),
        "weights": params * e if on_cpu else 0,
        "weights_load": params * (file_e + (e if file_e != e else 0)),
        "state": host_state,
        "cache": host_cache,
        "images": images + (act if on_cpu else 0),
    }
    slack = DEVICE_SLACK.get(device_type, DEVICE_SLACK_DEFAULT)
    disk = state_bytes + (slab if on_cpu or cache_on_host else 0) if low_memory else 0
    return MemoryEstimate(weights, state, cache, act, slack, host, disk)


# --------------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------------

# Tensor operations the engine issues (counted in engine/blocks.py; each costs `Rates.op_seconds` beyond its
# FLOPs, times DISPATCHES_PER_OP: what one of them costs in views, strides and outputs around its kernel,
# fitted to `benchmarks/predicted_time.py`'s block modes of the tiny, micro and small presets, whose n = 1
# calls 10 predicted at 0.44-0.62 of what they took; docs/benchmarks.md).
DISPATCHES_PER_OP = 5
OPS_PER_CHUNK_LAYER = 24  # qkv (norms, projection, RoPE: 11), gather (3), attention and MLP (10)
OPS_PER_RECT = 40  # slices in and out, embedding, RoPE tables, LR context, head, the step's bookkeeping
OPS_PER_RECT_LAYER = 4  # the key table's neighbours, the cache's trim and bookkeeping
OPS_PER_CACHED_BLOCK = 2  # per layer: each cached neighbour fetched and each block kept for later (k, v)
OPS_PER_LAYER0_CHUNK = 12  # layer 0's LR windows and cross-attention
STATE_BYTES_PER_PIXEL = 3 * 4 * 8  # per call: x, lr_up in, the output out, the sampler's image arithmetic
MAPPED_BYTES = 1e9  # bytes/s of memory-mapped state's traffic when its pages go to disk (assumed: an SSD)


def layer_flops(cfg: InfDiTConfig, tokens: int) -> float:
    """FLOPs of one layer's per-token work on `tokens` tokens (2 per multiply-add): qkv 3D^2, proj D^2,
    MLP 2rD^2, attention scores and values 2 * 4T * D."""
    d, t = cfg.hidden_size, cfg.block_tokens**2
    return 2.0 * tokens * ((4 + 2 * cfg.mlp_ratio) * d * d + 2 * 4 * t * d)


def flops_per_call(cfg: InfDiTConfig, height: int, width: int) -> float:
    """Matmul FLOPs of one denoiser call (2 per multiply-add), the same for every n.

    Per token and layer: `layer_flops`. Layer 0 adds the LR cross-attention: q and proj 2D^2, scores and
    values 2 * 9*lb^2 * D, and the k/v projection of the LR tokens 2D^2 per LR token. The final layer adds
    D * p^2 * c per token; patch embedding in_ch * p^2 * D.
    """
    t = cfg.block_tokens**2
    d = cfg.hidden_size
    gh, gw = -(-height // cfg.block_size), -(-width // cfg.block_size)
    tokens = gh * gw * t
    lr_tokens = gh * gw * cfg.lr_block**2
    cross = 2 * d * d + 2 * 9 * cfg.lr_block**2 * d
    per_token = cross + d * cfg.patch_size**2 * (cfg.out_channels + cfg.in_channels)
    return cfg.num_layers * layer_flops(cfg, tokens) + 2.0 * (tokens * per_token + lr_tokens * 2 * d * d)


def call_seconds(cfg: InfDiTConfig, size: tuple[int, int], n: int, rates: Rates, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device_type: str = "cpu", cache_on_host: bool = False,
                 state_on_host: bool = False) -> float:
    """Predicted seconds of one denoiser call whose output is `size` (H, W), in n x n blocks.

    compute (`flops_per_call`, plus each rectangle's ring of LR tokens, at `rates.flops`) + tensor operations
    (`OPS_*` per chunk, rectangle, layer and cached block, at `rates.op_seconds`) + the image work outside the
    model at `rates.pixel_seconds` per output pixel + copies at `rates.copy_bytes` (a host-side cache's
    neighbours next to a GPU; a host-side state's slices to the GPU and back). Apart from the LR ring the
    compute is the same for every n: what n changes is how many rectangles, chunks and cached blocks the call
    has, and what crosses to the device.
    """
    h, w = size
    gh, gw = -(-h // cfg.block_size), -(-w // cfg.block_size)
    n = min(n, max(gh, gw))
    per = chunk_blocks(cfg, device_type)
    t, layers = cfg.block_tokens**2, cfg.num_layers
    rows, cols = _spans(gh, n), _spans(gw, n)
    rects = len(rows) * len(cols)
    chunks = sum(kr * kc * -(-(rh * rw) // per) for rh, kr in _counts(rows) for rw, kc in _counts(cols))
    cached = 0
    if rects > 1:  # block mode, any order: per rectangle and layer, the blocks kept for later rectangles
        r, c = len(rows) - 1, len(cols) - 1  # (last row, last column) and the neighbours read (left, above)
        cached = gw * r + gh * c - r * c + gh * c + r * (gw + len(cols))
    ops = (rects * OPS_PER_RECT + chunks * (layers * OPS_PER_CHUNK_LAYER + OPS_PER_LAYER0_CHUNK)
           + layers * (rects * OPS_PER_RECT_LAYER + cached * OPS_PER_CACHED_BLOCK))
    # Each rectangle projects the LR tokens of a one-block ring around it too (`InfDiT.lr_context`): k and v,
    # 2 x D^2 multiply-adds per LR token, beyond the call's own (`flops_per_call`).
    ring = 2 * len(cols) * gh + 2 * len(rows) * gw + 4 * rects
    extra = ring * cfg.lr_block**2 * 4.0 * cfg.hidden_size**2
    moved = 0.0
    if cache_on_host and device_type != "cpu":
        moved += layers * cached * 2 * batch * t * cfg.hidden_size * _elem(dtype)
    pixels = batch * gh * gw * cfg.block_size**2
    if state_on_host and device_type != "cpu":
        moved += STATE_BYTES_PER_PIXEL * pixels
    return (batch * (flops_per_call(cfg, h, w) + extra) / rates.flops
            + ops * DISPATCHES_PER_OP * rates.op_seconds + pixels * rates.pixel_seconds
            + moved / rates.copy_bytes)


# `--compile` by default (neither --compile nor --no-compile): on CUDA, for a pass predicted to take at least
# COMPILE_AFTER_S, when this GPU's measured compiled calls (`infdit selftest`'s compile row, kept by
# `calibrate.record_compile`) were at least COMPILE_MIN_GAIN times faster than eager ones and the time that
# saves over the pass is at least COMPILE_PAYBACK times the compile's own.
COMPILE_AFTER_S = 180.0
COMPILE_MIN_GAIN = 1.10
COMPILE_PAYBACK = 2.0


def compile_pays(pass_seconds: float, measured: dict | None) -> bool:
    """Whether a pass predicted at `pass_seconds` (eager) should compile, by `measured` = {"eager_s",
    "compiled_s", "first_call_s"} (one call each, and the first compiled call with its compile); None:
    nothing measured on this GPU, so no."""
    if not measured or pass_seconds < COMPILE_AFTER_S:
        return False
    gain = measured["eager_s"] / measured["compiled_s"]
    compile_s = max(measured["first_call_s"] - measured["compiled_s"], 0.0)
    return gain >= COMPILE_MIN_GAIN and pass_seconds * (1 - 1 / gain) >= COMPILE_PAYBACK * compile_s


def _spans(cells: int, n: int) -> list[int]:
    return [min(n, cells - a) for a in range(0, cells, n)]


def _counts(spans: list[int]) -> list[tuple[int, int]]:
    """(span, how many): at most two kinds, the full one and the edge's."""
    return [(v, spans.count(v)) for v in sorted(set(spans))]


# --------------------------------------------------------------------------------------------------------
# What the machine has
# --------------------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _own_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def host_available() -> int:
    """Host bytes this process can hold: MemAvailable (and the cgroup limit's headroom, where one applies)
    plus what the process already holds; `INFDIT_HOST_MEMORY` (e.g. 96GB) instead, where the kernel's
    figures do not tell (a VM whose memory grows on demand starts with a low MemTotal)."""
    override = settings().host_memory
    if override:
        try:
            return parse_bytes(override)
        except ValueError:
            raise BadRequest(f"INFDIT_HOST_MEMORY: not a memory size: {override!r} (try 96GB)") from None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        headroom = max(limit - used, 0)
        avail = headroom if avail is None else min(avail, headroom)
    return (avail if avail is not None else 8 * 2**30) + _own_rss()


def device_free(device: torch.device) -> int | None:
    """Free bytes on a CUDA device less a margin (`DEVICE_MARGIN_FRACTION` of it, at least
    `DEVICE_MARGIN`), or None when it cannot be asked (CPU, absent GPU)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return max(free - max(DEVICE_MARGIN, int(DEVICE_MARGIN_FRACTION * free)), 0)


# --------------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------------


def plan(cfg: InfDiTConfig, size: tuple[int, int], *, budget: int | None = None,
         dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", batch: int = 1,
         n: int | None = None, host_budget: int | None = None, low_memory: bool | None = None,
         scale: int = 4, weights_file_dtype: torch.dtype | None = None, rates: Rates | None = None,
         ranks: int = 1) -> Plan:
    """The fastest placement whose predicted peaks fit: device within `budget`, host within `host_budget`,
    fastest by the cost model (`call_seconds` with `rates`).

    Args:
        budget: device bytes for everything of ours, weights included (default: what is free; on the CPU,
            where the device's memory is the host's, `host_budget` less the runtime).
        n: fixed block batch (`--block-batch`): everything else is still planned.
        host_budget: resident host bytes available (default: `host_available()`).
        low_memory: True forces memory-mapped state, False forbids it, None lets the planner turn it on
            when the host is short.
        rates: the device's calibrated rates (`calibrate.calibration`); default `nominal_rates`.
        ranks: processes sharing the image (`bands.py`): their in-flight sends are counted.

    Device placements: everything on the device; the K/V cache on the host; cache and image state on the
    host (on the CPU only the first). Of every (placement, n) that fits the device and the host, the one
    with the least predicted time (ties: the larger n, then the earlier placement): usually the largest n,
    but not an n that leaves ragged edge rectangles with more chunks than the n below it, and not one that
    needs memory-mapped state (its disk traffic counted at `MAPPED_BYTES`) where one in RAM is as fast.
    Then, only if the host is short: the sampler state in bf16 (when the model computes in bf16, as the
    official sampler does), then memory-mapped state.

    Raises:
        MemoryBudgetTooSmall: not even n = 1 with everything on the host fits the device budget.
        HostMemoryTooSmall: the host cannot hold even the leanest plan.
    """
    device = torch.device(device)
    host_budget = host_available() if host_budget is None else int(host_budget)
    on_cpu = device.type == "cpu"
    defaulted = budget is None
    if budget is None:
        budget = host_budget - HOST_RUNTIME["cpu"] if on_cpu else device_free(device)
        if budget is None:
            raise MemoryBudgetTooSmall(f"cannot ask {device} for its free memory here; give --mem-budget")
    h, w = size
    top = max(-(-h // cfg.block_size), -(-w // cfg.block_size))
    placements = [(False, False)] if on_cpu else [(False, False), (True, False), (True, True)]
    state_dtypes = [torch.float32] + ([torch.bfloat16] if dtype == torch.bfloat16 else [])
    mapped = [False, True] if low_memory is None else [bool(low_memory)]
    ask = _Ask(cfg, size, int(budget), host_budget, on_cpu,
               rates if rates is not None else nominal_rates(device.type, dtype),
               [(mm, dt) for mm in mapped for dt in state_dtypes],  # RAM first; in RAM, float32 first
               {"dtype": dtype, "device_type": device.type, "batch": batch, "scale": scale,
                "weights_file_dtype": weights_file_dtype, "ranks": ranks})
    sizes = [n] if n is not None else range(top, 0, -1)
    candidates = [ask.candidate(cand, *where) for where in placements for cand in ask.fitting(sizes, *where)]
    # The least time; among equals the larger n, then the earlier placement (min keeps the first). Plans the
    # host cannot hold only when none can (then the error says what the host would need).
    hosted = [c for c in candidates if c.estimate is not None]
    best = min(hosted or candidates, key=lambda c: (c.seconds, -c.n), default=None)
    if best is None:
        if n is None:
            raise ask.too_small(placements[-1], defaulted, low_memory)
        best = ask.candidate(n, *placements[-1])  # the user fixed n: as lean as can be; out-of-memory acts
    if best.estimate is None:
        raise HostMemoryTooSmall(
            f"a {w}x{h} output needs {format_bytes(best.host_need)} of host memory, "
            f"{format_bytes(host_budget)} is available; try {_host_hint(low_memory)}")
    return ask.plan(best, whole=best.n >= top)


@dataclass(frozen=True)
class _Candidate:
    """One (n, placement) of `plan`, with the first host storage that holds it."""

    n: int
    cache_on_host: bool
    state_on_host: bool
    seconds: float  # predicted per call
    estimate: MemoryEstimate | None  # None: no host storage holds it
    state_dtype: torch.dtype
    low_memory: bool
    host_need: int  # the least host peak of the storages tried


@dataclass(frozen=True)
class _Ask:
    """What `plan` weighs each candidate against."""

    cfg: InfDiTConfig
    size: tuple[int, int]
    budget: int  # device bytes
    host_budget: int
    on_cpu: bool
    rates: Rates
    storage: list[tuple[bool, torch.dtype]]  # (memory-mapped, state dtype), leanest last
    kw: dict  # `estimate`'s arguments common to every candidate

    @property
    def lean(self) -> dict:
        """On the CPU, where the device is the host, n is chosen with the leanest host storage allowed."""
        return {"low_memory": self.storage[-1][0], "state_dtype": self.storage[-1][1]} if self.on_cpu else {}

    def fitting(self, sizes, cache_host: bool, state_host: bool) -> list[int]:
        """The n of `sizes` (descending) from the first that fits the device on: memory grows with n, so
        every n below it fits too. On the CPU, with the leanest host storage (`lean`), which `candidate`
        then relaxes as far as the budget lets it."""
        sizes = list(sizes)
        for i, cand in enumerate(sizes):
            est = estimate(self.cfg, self.size, cand, cache_on_host=cache_host, state_on_host=state_host,
                           **self.kw, **self.lean)
            if est.total <= self.budget and (not self.on_cpu or est.host_peak <= self.host_budget):
                return sizes[i:]
        return []

    def candidate(self, n: int, cache_host: bool, state_host: bool) -> _Candidate:
        """n on this placement with the first storage the host holds (and the device still fits)."""
        tried = []
        for mm, state_dtype in self.storage:
            est = estimate(self.cfg, self.size, n, cache_on_host=cache_host, state_on_host=state_host,
                           state_dtype=state_dtype, low_memory=mm, **self.kw)
            tried.append(est.host_peak)
            if est.host_peak <= self.host_budget and est.device_peak <= self.budget:
                return _Candidate(n, cache_host, state_host, self.seconds(n, cache_host, state_host, mm), est,
                                  state_dtype, mm, min(tried))
        return _Candidate(n, cache_host, state_host, self.seconds(n, cache_host, state_host, False), None,
                          torch.float32, False, min(tried))

    def seconds(self, n: int, cache_host: bool, state_host: bool, mapped: bool) -> float:
        """The call's predicted time; memory-mapped state adds its traffic at `MAPPED_BYTES` per second."""
        kw = self.kw
        t = call_seconds(self.cfg, self.size, n, self.rates, batch=kw["batch"], dtype=kw["dtype"],
                         device_type=kw["device_type"], cache_on_host=cache_host, state_on_host=state_host)
        bs = self.cfg.block_size
        pixels = -(-self.size[0] // bs) * -(-self.size[1] // bs) * bs**2
        return t + (kw["batch"] * STATE_BYTES_PER_PIXEL * pixels / MAPPED_BYTES if mapped else 0.0)

    def too_small(self, leanest: tuple[bool, bool], defaulted: bool, low_memory: bool | None) -> Exception:
        """The error when not even n = 1 on the leanest placement fits."""
        h, w = self.size
        est = estimate(self.cfg, self.size, 1, cache_on_host=leanest[0], state_on_host=leanest[1], **self.kw,
                       **self.lean)
        if self.on_cpu and defaulted:
            return HostMemoryTooSmall(
                f"a {w}x{h} output needs at least {format_bytes(est.host_peak)} of host memory, "
                f"{format_bytes(self.host_budget)} is available; try {_host_hint(low_memory)}")
        return MemoryBudgetTooSmall(
            f"a {w}x{h} output needs at least {format_bytes(est.total)} on {self.kw['device_type']} "
            f"(weights {format_bytes(est.weights)}); the budget is {format_bytes(self.budget)}")

    def plan(self, c: _Candidate, whole: bool) -> Plan:
        gh, gw = (-(-s // self.cfg.block_size) for s in self.size)
        placement = Placement(c.n, choose_order(gh, gw), c.cache_on_host, c.state_on_host)
        notes = [placement.describe()]
        if c.state_dtype != torch.float32:
            notes.append("sampler state bf16")
        if c.low_memory:
            notes.append("low-memory (memory-mapped state)")
        est, where = c.estimate, self.kw["device_type"]
        reason = (f"{', '.join(notes)}: predicted {format_bytes(est.device_peak)} on {where} "
                  f"(budget {format_bytes(self.budget)}), {format_bytes(est.host_peak)} on the host "
                  f"({format_bytes(self.host_budget)} available), {format_seconds(c.seconds)} per call")
        return Plan(placement, whole, c.state_dtype, c.low_memory, est, self.budget, self.host_budget, reason,
                    c.seconds, self.rates)


def _host_hint(low_memory: bool | None) -> str:
    if low_memory is False:
        return "--low-memory (memory-mapped state)"
    return "a smaller target or --block-batch, or freeing memory"


def step_down(p: Placement, grid_h: int, grid_w: int) -> Placement | None:
    """The next leaner placement after running out of device memory: halve n, then move the K/V cache to
    the host; None when nothing leaner is left (the sampler state is the pipeline's to move)."""
    n = min(p.n, max(grid_h, grid_w))
    if n > 1:
        return replace(p, n=n // 2)
    if not p.cache_on_host:
        return replace(p, cache_on_host=True)
    return None


def replan(cfg: InfDiTConfig, size: tuple[int, int], p: Placement, budget: int, *,
           factor: float = REPLAN_FACTOR, **kw) -> Placement | None:
    """After an out-of-memory at `p`: the largest n below p.n whose estimate fits `factor` x `budget`
    (the plan's budget: the estimate missed by a few per cent, not by half), with p's placements; None when
    no n below p.n does (then `step_down` halves). `kw`: `estimate`'s (dtype, device_type, batch, ...)."""
    h, w = size
    top = max(-(-h // cfg.block_size), -(-w // cfg.block_size))
    n = min(p.n, top)
    target = factor * budget
    for cand in range(n - 1, 0, -1):
        est = estimate(cfg, size, cand, cache_on_host=p.cache_on_host, state_on_host=p.state_on_host, **kw)
        if est.total <= target:
            return replace(p, n=cand)
    return None


def leanest(plans: list[Plan]) -> Plan:
    """One plan that every rank can run (under torchrun each rank plans from its own free memory): the
    smallest n, the cache and the state on the host where any rank has them there, the narrowest state
    dtype, memory-mapped files where any rank needs them; the estimate is that of the plan with the
    smallest n (ties: the first). The same list gives the same plan on every rank."""
    base = min(plans, key=lambda p: p.placement.n)
    placement = Placement(n=base.placement.n, order=base.placement.order,
                          cache_on_host=any(p.cache_on_host for p in plans),
                          state_on_host=any(p.state_on_host for p in plans))
    dtype = min((p.state_dtype for p in plans), key=lambda d: torch.empty(0, dtype=d).element_size())
    if len({(p.placement, p.state_dtype, p.low_memory) for p in plans}) == 1:
        return plans[0]
    return replace(base, placement=placement, whole_image=all(p.whole_image for p in plans),
                   state_dtype=dtype, low_memory=any(p.low_memory for p in plans),
                   reason=f"{base.reason}; the leanest of {len(plans)} ranks' plans")
