"""The cost model's rates on this device, measured: `calibration(cfg, device, dtype)` -> `planner.Rates`.

A few seconds, once per device, dtype, thread count, torch version and model shape, then read from
`<cache root>/calibration.json` (`cache.cache_root`); `infdit bench` measures again. What is measured:

- `flops`: one transformer layer's per-token work on one chunk of blocks at the model's width, heads and
  MLP ratio (modulated LayerNorm, qkv projection, q/k norms, block attention over 4 segments, projection,
  MLP with tanh GELU), random tensors in the model's dtype; its FLOPs (`planner.layer_flops`) over the
  best of two timed runs after a warm-up.
- `op_seconds`: a tensor operation's fixed cost: small LayerNorm, linear and in-place add on tiny tensors.
- `copy_bytes`: a 64 MiB copy, pinned host memory to the GPU next to one, memory to memory on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cache import cache_root
from .planner import Rates, chunk_blocks, layer_flops

__all__ = ["calibration", "measure_rates", "device_key", "CALIBRATION_FILE"]

CALIBRATION_FILE = "calibration.json"
LAYER_OPS = 16  # tensor operations in `_layer_seconds`'s layer
MIN_FLOPS = {"cpu": 2e9, "cuda": 1e11}  # a timed layer does at least this much arithmetic...
MAX_TOKENS = 2**17  # ...on at most this many tokens


def device_key(device: torch.device, dtype: torch.dtype, cfg) -> str:
    """What a calibration is valid for: device model, dtype, threads, torch version, model shape."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
    return (f"{device.type}:{name}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}"
            f"|torch={torch.__version__}|D={cfg.hidden_size},H={cfg.num_heads},r={cfg.mlp_ratio},"
            f"T={cfg.block_tokens**2}")


def calibration(cfg, device: torch.device | str, dtype: torch.dtype, *, refresh: bool = False,
                threads: int | None = None) -> Rates:
    """This device's rates for `cfg` in `dtype`: cached, else measured (a few seconds) and cached.

    `refresh` measures again; `threads` measures (or looks up) with that many torch threads. A cache that
    cannot be read or written (damaged, read-only) only costs the measurement.
    """
    device = torch.device(device)
    old = torch.get_num_threads()
    if threads and threads != old:  # (changing it back and forth slows OpenMP's later small operations)
        torch.set_num_threads(threads)
    try:
        key = device_key(device, dtype, cfg)
        path = cache_root() / CALIBRATION_FILE
        table = _read(path)
        if not refresh and key in table:
            return Rates(**table[key], source="measured")
        rates = measure_rates(cfg, device, dtype)
        table[key] = {"flops": rates.flops, "op_seconds": rates.op_seconds, "copy_bytes": rates.copy_bytes}
        _write(path, table)
        return rates
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def measure_rates(cfg, device: torch.device, dtype: torch.dtype) -> Rates:
    with torch.no_grad():
        op = _op_seconds(device, dtype)
        flops, seconds = _layer_seconds(cfg, device, dtype)
        compute = max(seconds - LAYER_OPS * op, 0.1 * seconds)  # the ops' fixed cost is counted apart
        return Rates(flops=flops / compute, op_seconds=op, copy_bytes=_copy_rate(device), source="measured")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, runs: int, spend: float = 0.3) -> float:
    """The fastest of at least `runs` timed calls after a warm-up, and more (up to 2000) until `spend`
    seconds have passed: the least disturbed by other processes, sampled over long enough that a busy
    moment of the machine does not decide it."""
    fn()  # warm-up: kernels chosen, memory allocated
    _sync(device)
    best, count, start = math.inf, 0, time.perf_counter()
    while count < runs or (time.perf_counter() - start < spend and count < 2000):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best, count = min(best, time.perf_counter() - t0), count + 1
    return max(best, 1e-9)


def _layer_seconds(cfg, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs, seconds) of one layer on one chunk (one block on the CPU), or on as many blocks as make
    `MIN_FLOPS` (a small model's layer would time its operations' fixed costs, not its arithmetic)."""
    d, heads, hd, t = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.block_tokens**2
    blocks = 1 if device.type == "cpu" else chunk_blocks(cfg, device.type)
    need = MIN_FLOPS.get(device.type, MIN_FLOPS["cuda"])
    blocks = max(blocks, min(math.ceil(need / layer_flops(cfg, t)), MAX_TOKENS // t))
    tokens, hidden = blocks * t, int(cfg.mlp_ratio * d)
    kw = dict(device=device, dtype=dtype)
    h = torch.randn(1, tokens, d, **kw)
    w_qkv, w_proj = torch.randn(3 * d, d, **kw) * d**-0.5, torch.randn(d, d, **kw) * d**-0.5
    w1, w2 = torch.randn(hidden, d, **kw) * d**-0.5, torch.randn(d, hidden, **kw) * hidden**-0.5
    ones, zeros = torch.ones(d, **kw), torch.zeros(d, **kw)
    keys = torch.randn(blocks, heads, 4 * t, hd, **kw)
    values = torch.randn(blocks, heads, 4 * t, hd, **kw)

    def layer() -> torch.Tensor:
        a = F.layer_norm(h, (d,), ones, zeros)
        q = F.linear(a, w_qkv)[..., :d].reshape(blocks, t, heads, hd)
        q = F.layer_norm(q, (hd,)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape(1, tokens, d)
        x = h + F.linear(o, w_proj)
        m = F.layer_norm(x, (d,), ones, zeros)
        return x + F.linear(F.gelu(F.linear(m, w1), approximate="tanh"), w2)

    return layer_flops(cfg, tokens), _best(layer, device, 2)


def _op_seconds(device: torch.device, dtype: torch.dtype, reps: int = 50) -> float:
    kw = dict(device=device, dtype=dtype)
    x, w = torch.randn(4, 16, **kw), torch.randn(16, 16, **kw)

    def ops() -> None:
        for _ in range(reps):
            y = F.layer_norm(x, (16,))
            y = F.linear(y, w)
            y.add_(1.0)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny operations run on one thread; a pool's barrier would time the others
    try:
            return _best(ops, device, 5) / (3 * reps)
    finally:
        torch.set_num_threads(threads)


def _copy_rate(device: torch.device, nbytes: int = 64 * 2**20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        try:
            src = src.pin_memory()
        except RuntimeError:
            pass
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    return nbytes / _best(lambda: dst.copy_(src, non_blocking=device.type == "cuda"), device, 3)


def _read(path: Path) -> dict:
    """The cached table, keeping only well-formed entries (a damaged file is a cache miss)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    good = {}
    for key, v in data.items():
        fields = ("flops", "op_seconds", "copy_bytes")
        if (isinstance(v, dict) and set(v) == set(fields)
                and all(isinstance(v[f], (int, float)) and math.isfinite(v[f]) and v[f] > 0 for f in fields)):
            good[key] = {f: float(v[f]) for f in fields}
    return good


def _write(path: Path, table: dict) -> None:
    """Atomically (a temporary file renamed over it); nothing when the folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass
