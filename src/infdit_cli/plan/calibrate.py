"""The cost model's rates on this device, measured: `calibration(cfg, device, dtype)` -> `planner.Rates`.

A few seconds, once per device, dtype, thread count, torch version and model shape, then read from
`<cache root>/calibration.json` (`settings.cache_root`; `$INFDIT_CALIBRATION` names another file);
`infdit bench` measures again. What is measured,
after ~0.3 s of GEMMs that wake the device (clocks, cuBLAS's choices):

- `flops`: one real chunk (`planner.chunk_blocks`) of one layer through the model's own pieces, as the
  engine runs it (`layer_qkv` with RoPE and the v copy, the 4-segment K/V gather with `re_pos_embed`,
  attention, projection, MLP), on a random two-layer model of the config's shape, in the model's dtype:
  its FLOPs (`planner.layer_flops`) over its best time less what the cost model charges its operations,
  so the model predicts that chunk's measured time. Timed in rounds: where the rounds disagree by more
  than `STEADY`, or the load average exceeds the cores, the rates are used for this run but not cached.
- `op_seconds`: a tensor operation's fixed cost: small LayerNorm, linear and in-place add on tiny tensors.
- `copy_bytes`: a 64 MiB copy, pinned host memory to the GPU next to one, memory to memory on the CPU.
- `pixel_seconds`: one call's image work outside the model on a 512² image (`_pixel_seconds`: the LR
  conditioning's bicubic upsampling, the slices in and out, the sampler's arithmetic), per pixel.
- `sdpa` (CUDA, 16-bit): the attention backend the engine prefers, measured first (`sdpa.measure_backends`
  at a chunk's attention shapes, about two seconds); the chunk is then timed under it.

A finished job's own measured calls correct the cached rates (`observe`). `record_compile` keeps what
`infdit selftest` measured of `--compile` beside them (`compile.json`, the same keys): the pipeline's
default compiles where `planner.compile_pays` says that pays.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BadRequest
from ..files import atomic_write
from ..model.attention import gather_keys, neighbour_index
from ..model.infdit import random_model
from ..settings import cache_root, settings
from .grid import BlockRect
from .meter import sync
from .planner import DISPATCHES_PER_OP, OPS_PER_CHUNK_LAYER, Rates, chunk_blocks, layer_flops
from .sdpa import BACKENDS, measure_backends, prefer

__all__ = ["calibration", "measure_rates", "device_key", "observe", "busy", "record_compile",
           "compile_record", "CALIBRATION_FILE", "COMPILE_FILE"]

CALIBRATION_FILE = "calibration.json"
COMPILE_FILE = "compile.json"
COMPILE_FIELDS = ("eager_s", "compiled_s", "first_call_s")
WARM_SECONDS = 0.3  # GEMMs before anything is timed
ROUNDS = 3  # the chunk is timed this many times...
ROUND_SECONDS = 0.15  # ...for at least this long each (its best call)...
STEADY = 0.15  # ...and the rates are kept only if the rounds' bests agree within this
OBSERVE_CALLS = 3  # a job corrects the cache from at least this many timed calls...
OBSERVE_SECONDS = 2.0  # ...taking at least this long


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
        path = _table()
        table = _read(path)
        if not refresh and key in table:
            return Rates(**table[key], source="measured")
        rates = measure_rates(cfg, device, dtype)
        if rates.steady:  # taken while other work shared the machine: used now, measured again next run
            table[key] = _entry(rates)
            _write(path, table)
        return rates
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def measure_rates(cfg, device: torch.device, dtype: torch.dtype) -> Rates:
    """Measure this device's rates (a few seconds): warm the device, time a tensor operation's fixed cost,
    then one real chunk of the engine's layer (`_chunk`) in `ROUNDS` rounds; the rates make the cost model
    predict that chunk's measured time. `Rates.steady` is False when the rounds disagree by more than
    `STEADY` or the load average exceeds the cores (the caller uses the rates but does not keep them)."""
    with torch.no_grad():
        _warm(device, dtype)
        pixel = _pixel_seconds(device)  # before `_op_seconds`: its thread-count changes slow small work
        op = _op_seconds(device, dtype)
        sdpa = _attention_backend(cfg, device, dtype)
        flops, chunk = _chunk(cfg, device, dtype)
        with prefer(sdpa):
            times = [_best(chunk, device, 1, spend=ROUND_SECONDS, warm=k == 0) for k in range(ROUNDS)]
        seconds = min(times)
        steady = max(times) <= (1 + STEADY) * seconds and not busy()
        # what the cost model charges a chunk's layer beyond its FLOPs (`planner.call_seconds`)
        fixed = OPS_PER_CHUNK_LAYER * DISPATCHES_PER_OP * op
        compute = max(seconds - fixed, 0.1 * seconds)
        return Rates(flops=flops / compute, op_seconds=op, copy_bytes=_copy_rate(device), source="measured",
                     steady=steady, sdpa=sdpa, pixel_seconds=pixel)


def _attention_backend(cfg, device: torch.device, dtype: torch.dtype) -> str | None:
    """The fastest fused attention backend within the bf16 bound at one chunk's attention shapes (a block's
    T queries against its 4T keys, per block and head); None off CUDA, in float32, or where none passes."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    t = cfg.block_tokens**2
    return measure_backends(device, batch=chunk_blocks(cfg, device.type), heads=cfg.num_heads,
                            head_dim=cfg.head_dim, queries=t, keys=4 * t, dtype=dtype)["choice"]


def observe(cfg, device: torch.device | str, dtype: torch.dtype, rates: Rates, predicted: float,
            measured: float, calls: int) -> Rates | None:
    """A job's own calls correct the cached calibration: `measured` seconds per call over `calls` steady calls
    against the `predicted` per call (by `rates`) scale every rate by their ratio (the prediction is linear in
    1/flops, op_seconds, pixel_seconds and 1/copy_bytes), and the cache keeps the result.
    Nothing when the job saw too little (fewer than `OBSERVE_CALLS` calls or under `OBSERVE_SECONDS`), ran
    under contention, or its rates were not measured here. Returns the corrected rates (or None)."""
    device = torch.device(device)
    if (not rates.measured or calls < OBSERVE_CALLS or measured * calls < OBSERVE_SECONDS or predicted <= 0
            or measured <= 0 or busy()):
        return None
    r = measured / predicted
    fixed = Rates(flops=rates.flops / r, op_seconds=rates.op_seconds * r, copy_bytes=rates.copy_bytes / r,
                  source="measured", sdpa=rates.sdpa, pixel_seconds=rates.pixel_seconds * r)
    path = _table()
    table = _read(path)
    table[device_key(device, dtype, cfg)] = _entry(fixed)
    _write(path, table)
    return fixed


def record_compile(cfg, device: torch.device | str, dtype: torch.dtype, eager_s: float, compiled_s: float,
                   first_call_s: float) -> None:
    """Keep a `--compile` measurement of this device and model shape: seconds per eager and compiled call,
    and the first compiled call's (with the compile)."""
    path = _table().with_name(COMPILE_FILE)
    table = _read(path, COMPILE_FIELDS, {})
    table[device_key(torch.device(device), dtype, cfg)] = dict(
        zip(COMPILE_FIELDS, map(float, (eager_s, compiled_s, first_call_s))))
    _write(path, table)


def compile_record(cfg, device: torch.device | str, dtype: torch.dtype) -> dict | None:
    """The kept `--compile` measurement for this device and model shape, or None."""
    key = device_key(torch.device(device), dtype, cfg)
    return _read(_table().with_name(COMPILE_FILE), COMPILE_FIELDS, {}).get(key)


def busy() -> bool:
    """Whether other work shares the CPUs now: the 1-minute load average above the core count."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def _warm(device: torch.device, dtype: torch.dtype, seconds: float = WARM_SECONDS) -> None:
    """GEMMs for about `seconds`: a GPU leaves its idle clocks and cuBLAS has chosen its kernels, a CPU's
    cores are awake, before anything is timed (three cold GEMMs read a card well below its rate)."""
    side = 4096 if device.type == "cuda" else 256
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    c = torch.empty_like(a)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            torch.mm(a, b, out=c)  # the same operands every time: no overflow, no denormals
        sync(device)


def _best(fn, device: torch.device, runs: int, spend: float = 0.3, warm: bool = True) -> float:
    """The fastest of at least `runs` timed calls after a warm-up (unless `warm` is False), and more (up to
    2000) until `spend` seconds have passed: the least disturbed by other processes, sampled over long
    enough that a busy moment of the machine does not decide it. On CUDA each call is timed by events on
    its stream."""
    if warm:
        fn()  # warm-up: kernels chosen, memory allocated
        sync(device)
    best, count, start = math.inf, 0, time.perf_counter()
    while count < runs or (time.perf_counter() - start < spend and count < 2000):
        if device.type == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            t1.synchronize()
            took = t0.elapsed_time(t1) / 1000
        else:
            t0 = time.perf_counter()
            fn()
            took = time.perf_counter() - t0
        best, count = min(best, took), count + 1
    return max(best, 1e-9)


def _chunk(cfg, device: torch.device, dtype: torch.dtype):
    """(FLOPs, a function running them): one chunk (`planner.chunk_blocks`) of one layer as the engine runs
    it, through the model's own pieces: `layer_qkv` into the rectangle's buffers (modulated LayerNorm, qkv,
    q/k norms, RoPE, the v copy), `gather_keys` of the 4-segment keys (with the layer's `re_pos_embed`) and
    values from a key table with the neighbours behind it, and `layer_out` (block attention, projection,
    MLP). A random two-layer model of `cfg`'s width; the second layer (the first has the LR cross-attention,
    counted apart by the cost model)."""
    small = replace(cfg, num_layers=2, clip=None)
    model = random_model(small, seed=0, device=device, dtype=dtype)
    t = (small.num_heads, small.head_dim)
    bt2 = cfg.block_tokens**2
    blocks = chunk_blocks(cfg, device.type)
    gh = max(1, math.isqrt(blocks))
    gw = -(-blocks // gh)
    nb = gh * gw
    rect = BlockRect(1, 1 + gh, 1, 1 + gw, gh + 2, gw + 2)  # inside a grid: left and top neighbours
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(1, 1, nb, bt2, cfg.hidden_size, generator=g).to(device, dtype)
    h = h0.clone()
    step = model.prepare_step(torch.ones(1), torch.randn(1, cfg.vector_dim, generator=g))
    angles = model.rope(range(rect.r0, rect.r1), range(rect.c0, rect.c1))
    rope = tuple(z.reshape(1, nb, *z.shape[2:]) for z in angles)
    entries = nb + gh + gw + 1
    qbuf, ktab, vtab = (torch.randn(1, entries, bt2, *t, generator=g).to(device, dtype) for _ in range(3))
    index = neighbour_index(gh, gw, True, True).to(device)[: blocks * 4]
    kg, vg = (torch.empty(1, blocks * 4, bt2, *t, device=device, dtype=dtype) for _ in range(2))
    c = slice(0, blocks)
    qf, kf, vf = (z[:, :nb].unsqueeze(1) for z in (qbuf, ktab, vtab))

    def run() -> None:
        h.copy_(h0)  # the residual stream is updated in place: the same numbers every run
        model.layer_qkv(1, h[:, :, c], step, (rope[0][:, c], rope[1][:, c]),
                        out=(qf[:, :, c], kf[:, :, c], vf[:, :, c]))
        kc = gather_keys(ktab, index, model.re_pos_embed[1], out=kg).unsqueeze(1)
        vc = gather_keys(vtab, index, out=vg).unsqueeze(1)
        model.layer_out(1, h[:, :, c], qf[:, :, c], kc, vc, step, None)

    return layer_flops(cfg, blocks * bt2), run


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


RATE_FIELDS = ("flops", "op_seconds", "copy_bytes", "pixel_seconds")
RATE_CHOICES = {"sdpa": BACKENDS}  # an entry's optional keys, each with the values it may take


def _entry(rates: Rates) -> dict:
    """What the cache keeps of `rates`: the measured rates, and the attention backend where one was chosen."""
    out = {f: getattr(rates, f) for f in RATE_FIELDS}
    if rates.sdpa is not None:
        out["sdpa"] = rates.sdpa
    return out


def _table() -> Path:
    """The calibration table: `$INFDIT_CALIBRATION` (followed through symbolic links, so a shared table is
    updated where it lives), else calibration.json in the infdit cache (`compile.json` sits beside it).

    Raises:
        BadRequest: `$INFDIT_CALIBRATION` names something that is not a calibration table (a folder, another
            file): infdit writes the file it names, and never over what someone else put there.
    """
    own = settings().calibration
    if not own:
        return cache_root() / CALIBRATION_FILE
    path = Path(own).expanduser().resolve()
    for table, fields, choices in ((path, RATE_FIELDS, RATE_CHOICES),
                                   (path.with_name(COMPILE_FILE), COMPILE_FIELDS, {})):
        if table.exists() or table.is_symlink():
            data = _load(table)
            if not isinstance(data, dict) or len(_entries(data, fields, choices)) != len(data):
                raise BadRequest(f"INFDIT_CALIBRATION: {table} is not a table of measured rates that infdit "
                                 "wrote; name a new file (or remove that one)")
    return path


def _pixel_seconds(device: torch.device, side: int = 512) -> float:
    """Seconds per output pixel of one call's image work outside the model, as the pipeline and the
    sampler do it on a `side`² image of float32 RGB: the LR conditioning's antialiased bicubic 4x upsampling
    from a haloed source (`jobs.pipeline.Upsampled`), clamped; the state's slice in with it, scaled; the
    output written from the model's result and the state (c_out, c_skip); half a Heun step's arithmetic."""
    g = torch.Generator().manual_seed(0)
    src = (torch.rand(1, 3, side // 4 + 8, side // 4 + 8, generator=g) * 2 - 1).to(device)
    x = torch.randn(1, 3, side, side, generator=g).to(device)
    out, d, x2 = (torch.empty_like(x) for _ in range(3))

    def work() -> None:
        up = F.interpolate(src, scale_factor=4, mode="bicubic", align_corners=False, antialias=True)
        up = up.clamp_(-1, 1)[..., 16 : 16 + side, 16 : 16 + side]
        xin = torch.cat([x, up], dim=1) * 0.5
        torch.add(xin[:, :3] * 0.5, x * 0.5, out=out)  # (the model's output stands in for itself)
        torch.sub(x, out, out=d).div_(0.7)
        torch.mul(d, -0.1, out=x2).add_(x)

    return _best(work, device, 5, spend=0.5) / (side * side)


def _read(path: Path, fields: tuple[str, ...] = RATE_FIELDS, choices: dict = RATE_CHOICES) -> dict:
    """A cached table, keeping only well-formed entries: every one of `fields` a positive number, and each
    key of `choices` (default: the rates' attention backend) absent or one of its values (a damaged file is
    a cache miss)."""
    data = _load(path)
    return _entries(data, fields, choices) if isinstance(data, dict) else {}


def _load(path: Path):
    """The file's JSON, or None where it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _entries(data: dict, fields: tuple[str, ...], choices: dict) -> dict:
    """The well-formed entries of a table (`_read`)."""
    good = {}
    for key, v in data.items():
        if not isinstance(v, dict) or set(v) - set(choices) != set(fields):
            continue
        if not all(isinstance(v[f], (int, float)) and math.isfinite(v[f]) and v[f] > 0 for f in fields):
            continue
        if any(name in v and v[name] not in allowed for name, allowed in choices.items()):
            continue
        good[key] = {f: float(v[f]) for f in fields} | {name: v[name] for name in choices if name in v}
    return good


def _write(path: Path, table: dict) -> None:
    """Atomically (`files.atomic_write`); nothing when the folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(table, indent=1, sort_keys=True), mode=0o600)
    except OSError:
        pass
