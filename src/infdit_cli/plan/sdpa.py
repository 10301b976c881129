"""Which attention kernel to use on this GPU: `torch.nn.functional.scaled_dot_product_attention` timed at the
model's shapes under each fused backend (flash, cuDNN, memory-efficient), each held to a bf16 accuracy bound.

`measure_backends` times them (about two seconds in all) and `choice` returns the fastest one that meets
the bound, or None. The rule: the reference is the exact attention of the same bf16 inputs (the math
backend in float64, batch by batch); a backend passes when its RMS distance from it is at most `ratio`
times that of the math backend computing in bf16 (`torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp`
on: its softmax weights rounded to bf16, as the fused kernels round them). Where torch lacks that switch
(before 2.5) the math backend computes bf16 inputs in bf16 anyway; from 2.5 on, left off, it computes them
in float32, and its distance is then mostly the output's rounding, which a fused kernel could miss.

`calibrate` measures it once per device with the rates (`Rates.sdpa`), at a chunk's attention shapes, and
the engine computes under `prefer(Rates.sdpa)`: that backend first, torch's others behind it for shapes
it refuses. `infdit selftest` reports the measurement as a row.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from .meter import sync

__all__ = ["BACKENDS", "measure_backends", "choice", "prefer"]

BACKENDS = ("flash", "cudnn", "efficient")


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def _bf16_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The math backend's attention with its reductions in the inputs' dtype (bf16 softmax weights) where
    torch can be asked for them (>= 2.5; before, it computed so anyway); the caller picks the backend."""
    cb = torch.backends.cuda
    if not hasattr(cb, "allow_fp16_bf16_reduction_math_sdp"):
        return F.scaled_dot_product_attention(q, k, v)
    was = cb.fp16_bf16_reduction_math_sdp_allowed()
    cb.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        return F.scaled_dot_product_attention(q, k, v)
    finally:
        cb.allow_fp16_bf16_reduction_math_sdp(was)


def measure_backends(device: torch.device | str, *, batch: int = 16, heads: int = 16, head_dim: int = 80,
                     queries: int = 1024, keys: int = 4096, dtype: torch.dtype = torch.bfloat16,
                     seconds: float = 2.0, ratio: float = 1.5, backends: tuple[str, ...] = BACKENDS) -> dict:
    """Time each backend on (batch, heads, queries, head_dim) queries against `keys` keys/values.

    Returns {"backends": {name: {"seconds", "tflops", "rms", "meets_bound", "error"}}, "math_rms",
    "bound", "choice"}: seconds per call (None where the backend refused these shapes: its "error"),
    "choice" the fastest backend that meets the bound (None if none does).
    """
    from torch.nn.attention import sdpa_kernel

    device = torch.device(device)
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device=device, dtype=dtype)
               for n in (queries, keys, keys))
    with sdpa_kernel(_backend("math")):  # the exact attention of these inputs, one batch at a time
        ref = torch.cat([F.scaled_dot_product_attention(q[i:i + 1].double(), k[i:i + 1].double(),
                                                        v[i:i + 1].double()) for i in range(batch)])
        math_rms = _rms(_bf16_math(q, k, v), ref)
    bound = ratio * math_rms
    flops = 4 * batch * heads * queries * keys * head_dim
    per = seconds / max(len(backends), 1)
    out: dict[str, dict] = {}
    for name in backends:
        row: dict = {"seconds": None, "tflops": None, "rms": None, "meets_bound": False, "error": None}
        try:
            with sdpa_kernel(_backend(name)):
                o = F.scaled_dot_product_attention(q, k, v)  # warm-up, and the accuracy sample
                sync(device)
                row["rms"] = _rms(o, ref)
                calls, t0 = 0, time.perf_counter()
                while True:
                    F.scaled_dot_product_attention(q, k, v)
                    calls += 1
                    if calls % 4 == 0 or device.type != "cuda":
                        sync(device)
                        if time.perf_counter() - t0 >= per:
                            break
                sec = (time.perf_counter() - t0) / calls
        except RuntimeError as e:  # "No available kernel" and the like: this backend cannot run these shapes
            row["error"] = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        else:
            row.update(seconds=sec, tflops=flops / sec / 1e12, meets_bound=row["rms"] <= bound)
        out[name] = row
    res = {"backends": out, "math_rms": math_rms, "bound": bound,
           "shape": f"{batch}x{heads} heads, {queries} queries x {keys} keys, head dim {head_dim}, "
                    f"{str(dtype).removeprefix('torch.')}"}
    res["choice"] = choice(res)
    return res


def choice(measured: dict) -> str | None:
    """The fastest backend of a `measure_backends` result that meets its bound (None: none does)."""
    ok = [(r["seconds"], name) for name, r in measured["backends"].items()
          if r["seconds"] is not None and r["meets_bound"]]
    return min(ok)[1] if ok else None


def prefer(name: str | None):
    """Context: attention tries backend `name` first, then torch's others (flash, memory-efficient, cuDNN,
    math) for any shapes it refuses; nothing changes for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    order = [_backend(b) for b in (name, "flash", "efficient", "cudnn", "math")]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch before `set_priority` (2.6): that backend, with math behind it
        return sdpa_kernel([_backend(name), _backend("math")])
