"""Upscaling an image: plan the model passes, pad, draw the noise, sample, crop, resample to the target.

The only place that pads and crops, draws noise and plans passes. Each pass is one Inf-DiT sampling run:
4x, or 2x the way the official script does it (the model always sees HR/LR = 4: for 2x, `lr` is the
input downscaled by 2 and `lr_up` the input's 2x upsample). Inputs are replicate-padded at the bottom and
right to whole blocks (UniBA looks only left and up, so padding there barely reaches real pixels) and the
result is cropped back: no input pixel is ever cropped away.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..engine.blocks import BlockEngine, pad_to_blocks, release_cached
from ..engine.sampling import HeunState, edm_sigmas, sample_heun
from ..engine.storage import Scratch, reclaim_stale
from ..errors import BadRequest, DiskTooSmall, NonFinite, OutOfMemory
from ..events import CheckpointWritten, JobStarted, Notice, PassDone, PassStarted, PlanChanged, Resumed
from ..images.load import resize
from ..plan import calibrate
from ..plan.planner import (
    Placement,
    Plan,
    Rates,
    call_seconds,
    compile_pays,
    flops_per_call,
    nominal_rates,
    plan,
)
from ..plan.planner import replan as planner_replan
from ..units import format_bytes, format_seconds, row_chunks
from .checkpoint import RunFolder, Saved

__all__ = ["checkpoint_by_default", "UpscaleOptions", "Pass", "UpscalePlan", "plan_upscale", "upscale",
           "target_size",
           "color_fix", "Upsampled", "pass_inputs", "predicted_seconds", "gpu_seconds", "preview_image",
           "disk_need", "check_disk", "plan_lines", "plan_json"]

MAX_OUTPUT_SIDE = 65535


@dataclass(frozen=True)
class UpscaleOptions:
    steps: int = 20
    seed: int = 0
    block_batch: int | str | None = "auto"  # None: whole image; "auto": the planner's n; or a fixed n
    mem_budget: int | None = None  # device bytes; None: what the device has free before our weights
    color_fix: str = "none"  # none | wavelet | adain
    low_memory: bool | None = None  # memory-mapped sampler state: True, False, or None (when RAM is short)
    host_budget: int | None = None  # host bytes; None: what the machine (and its cgroup) can give
    compile: bool | None = None  # the layers' per-token work through torch.compile (engine.compiled_kernels);
    # None: where it pays by this GPU's measurement (`planner.compile_pays`, `calibrate.compile_record`)


@dataclass(frozen=True)
class Pass:
    scale: int  # 4 or 2
    in_size: tuple[int, int]  # (h, w) of this pass's input
    out_size: tuple[int, int]  # in_size * scale
    padded_out: tuple[int, int]  # the whole-block canvas the sampler runs on
    memory: Plan = None  # the planner's choice for this pass (always set by plan_upscale)
    seconds: float = 0.0  # predicted: its calls at the plan's `seconds_per_call`


@dataclass(frozen=True)
class UpscalePlan:
    input_size: tuple[int, int]
    target_size: tuple[int, int]
    passes: list[Pass]
    steps: int
    resample: bool  # a final resample from the last pass's size to target_size

    @property
    def model_calls(self) -> int:
        return len(self.passes) * (2 * self.steps - 1)

    @property
    def seconds(self) -> float:
        """Predicted wall time of the model passes (the cost model with the plans' rates)."""
        return sum(p.seconds for p in self.passes)


def target_size(size: tuple[int, int], *, res: str | None = None, scale: float | None = None
                ) -> tuple[int, int]:
    """(H, W) from `--res 4096` (long side, aspect kept), `--res 3840x2160` (W x H) or `--scale 2.5`."""
    h, w = size
    if (res is None) == (scale is None):
        raise BadRequest("give exactly one of --res and --scale")
    too_big = f"exceeds {MAX_OUTPUT_SIDE} px per side"
    if scale is not None:
        if not (scale > 1 and math.isfinite(scale)):
            raise BadRequest(f"--scale must be greater than 1, got {scale:.4g}")
        if max(h, w) * scale > MAX_OUTPUT_SIDE + 0.5:  # before any rounding: 1e308 would overflow it
            raise BadRequest(f"--scale {scale:.4g} makes {w}x{h} {w * scale:.4g}x{h * scale:.4g}, "
                             f"which {too_big}")
        out = (round(h * scale), round(w * scale))
    else:
        text = res.lower().strip()
        try:
            sides = [int(v) for v in text.split("x")]
        except ValueError:
            raise BadRequest(f"--res must be a long side like 4096 or WxH like 3840x2160, "
                             f"got {res!r}") from None
        if len(sides) > 2:
            raise BadRequest(f"--res must be a long side like 4096 or WxH like 3840x2160, got {res!r}")
        if max(sides) > MAX_OUTPUT_SIDE:
            raise BadRequest(f"--res {res.strip()[:20]}{'...' if len(res.strip()) > 20 else ''} {too_big}")
        if len(sides) == 2:
            out = (sides[1], sides[0])
        else:
            long = sides[0]
            out = (round(h * long / max(h, w)), round(w * long / max(h, w)))
    if min(out) < 1:
        raise BadRequest(f"target size {out[1]}x{out[0]} is empty")
    if out[0] <= h and out[1] <= w:
        raise BadRequest(f"target {out[1]}x{out[0]} is not larger than the input {w}x{h}; "
                         f"infdit only upscales")
    if max(out) > MAX_OUTPUT_SIDE:
        raise BadRequest(f"target {out[1]}x{out[0]} exceeds {MAX_OUTPUT_SIDE} px per side")
    return out


def plan_upscale(cfg, input_size: tuple[int, int], target: tuple[int, int], options: UpscaleOptions, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 weights_file_dtype: torch.dtype | None = None, rates: Rates | None = None,
                 ranks: int = 1) -> UpscalePlan:
    """The fewest 4x/2x passes whose result covers `target`, each with its memory plan and predicted time
    (`rates`: the device's, from `calibrate.calibration`; default the planner's nominal ones); `ranks`
    processes sharing each image (their in-flight sends are planned for).

    Raises:
        MemoryBudgetTooSmall, HostMemoryTooSmall: some pass cannot fit (before any weights are loaded).
    """
    h, w = input_size
    need = max(target[0] / h, target[1] / w)
    scales: list[int] = []
    total = 1
    while total < need - 1e-9:
        scales.append(2 if total * 2 >= need - 1e-9 else 4)
        total *= scales[-1]
    passes = []
    size = input_size
    for s in scales:
        unit = cfg.block_size // s  # input multiple that makes whole blocks (and an integer LR for 2x)
        padded_in = (-(-size[0] // unit) * unit, -(-size[1] // unit) * unit)
        padded_out = (padded_in[0] * s, padded_in[1] * s)
        n = None
        if options.block_batch is None:
            n = max(-(-padded_out[0] // cfg.block_size), -(-padded_out[1] // cfg.block_size))
        elif options.block_batch != "auto":
            n = int(options.block_batch)
        mem = plan(cfg, padded_out, budget=options.mem_budget, dtype=dtype, device=device, n=n,
                   host_budget=options.host_budget, low_memory=options.low_memory, scale=s,
                   weights_file_dtype=weights_file_dtype, rates=rates, ranks=ranks)
        calls = 2 * options.steps - 1
        passes.append(Pass(s, size, (size[0] * s, size[1] * s), padded_out, mem,
                           calls * mem.seconds_per_call))
        size = (size[0] * s, size[1] * s)
    return UpscalePlan(input_size, target, passes, options.steps, resample=size != tuple(target))


CHECKPOINT_AFTER = 300.0  # seconds: checkpoints are on by default when a job is predicted to take longer


def checkpoint_by_default(run_folder: str | os.PathLike, seconds: float) -> bool:
    """Whether a job told neither --checkpoint nor --no-checkpoint keeps one: its run folder is there (an
    interrupted run to resume), or it is predicted to take more than `CHECKPOINT_AFTER` seconds."""
    return os.path.lexists(run_folder) or seconds > CHECKPOINT_AFTER


SLOW_ON_CPU = 3600.0  # seconds: a CPU job predicted to take longer says what a GPU would take


def predicted_seconds(up_plan: UpscalePlan) -> float:
    """The job's predicted wall time (`UpscalePlan.seconds`): for the default of --checkpoint and the
    plan's first line."""
    return up_plan.seconds


def gpu_seconds(cfg, up_plan: UpscalePlan) -> float:
    """What the same job would take on a CUDA GPU by the nominal rates (bf16, an H100-class card at ~40 %
    of its peak: `planner.NOMINAL_RATES`), whole image or n as large as such a card holds."""
    rates = nominal_rates("cuda", torch.bfloat16)
    return sum((2 * up_plan.steps - 1) * call_seconds(cfg, p.padded_out, 1 << 30, rates, dtype=torch.bfloat16,
                                                      device_type="cuda") for p in up_plan.passes)


def disk_need(up_plan: UpscalePlan, checkpoint: bool) -> dict[str, int]:
    """Disk bytes the job's files take at their peak, beside the output: the --low-memory scratch files of
    every pass (`Plan.estimate.disk`; a run folder keeps each pass's until the end) and, with checkpoints,
    the largest pass's two x files (the new one is complete before the old one goes) and its input. The
    output file itself is not counted."""
    scratch = sum(p.memory.estimate.disk for p in up_plan.passes)
    ckpt = 0
    if checkpoint:
        for p in up_plan.passes:
            es = torch.empty(0, dtype=p.memory.state_dtype).element_size()
            x = 3 * p.padded_out[0] * p.padded_out[1] * es
            inp = 3 * p.in_size[0] * p.in_size[1] * 4 if p is not up_plan.passes[0] else 0
            ckpt = max(ckpt, (0 if p.memory.low_memory else 2 * x) + inp)
    return {"scratch_bytes": scratch, "checkpoint_bytes": ckpt, "total_bytes": scratch + ckpt}


def check_disk(folder, need: dict[str, int], refuse: bool = True) -> int | None:
    """Refuse (DiskTooSmall, exit 2) a job whose files do not fit the free space of `folder`; returns the
    free bytes (None where the folder cannot be asked). `refuse=False`: only return them."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if need["total_bytes"] > free and refuse:
        kinds = (("scratch", "scratch_bytes"), ("checkpoints", "checkpoint_bytes"))
        parts = [f"{what} {format_bytes(need[k])}" for what, k in kinds if need[k]]
        raise DiskTooSmall(f"not enough disk in {folder}: the job needs {format_bytes(need['total_bytes'])} "
                           f"({', '.join(parts)}), {format_bytes(free)} is free; free some space, write the "
                           "output elsewhere, or drop --low-memory/--checkpoint")
    return free


def color_fix(out: torch.Tensor, ref, method: str) -> torch.Tensor:
    """Transfer the low-frequency colour of `ref` (the upsampled input: a tensor or an `Upsampled`) to
    `out`; both (B, 3, H, W) in [-1, 1].

    adain: per-channel mean/std matching. wavelet: replace the output's low-frequency band (a
    5-level dilated blur, as in StableSR's wavelet colour fix) with the reference's.
    """
    if method == "none":
        return out
    if method == "wavelet":
        return _wavelet_fix(out, ref)
    if method == "adain":
        ref = ref[..., :, :].to(out.device)  # (an `Upsampled` computes itself)
        dims = (-2, -1)
        mu_o, std_o = out.mean(dims, keepdim=True), out.std(dims, keepdim=True).clamp_min(1e-6)
        mu_r, std_r = ref.mean(dims, keepdim=True), ref.std(dims, keepdim=True)
        return ((out - mu_o) / std_o * std_r + mu_r).clamp(-1, 1)
    raise BadRequest(f"unknown --color-fix {method!r}; use none, wavelet or adain")


def _wavelet_fix(out: torch.Tensor, ref, levels: int = 5, budget: int = 64 * 2**20) -> torch.Tensor:
    """The wavelet fix in row bands of about `budget` bytes, each with the blur's reach (2^levels - 1 rows)
    above and below: the same numbers as over the whole image (each band's rows see exactly the pixels the
    whole image's would), at any size (one convolution over a whole 27k² image passes the 2^31 elements a
    GPU kernel's 32-bit indices reach) and without image-sized temporaries beyond the result. `ref`: a
    tensor or an `Upsampled` (computed band by band)."""
    halo = 2**levels - 1
    h, w = out.shape[-2:]
    result = torch.empty_like(out)
    for r in _rows(h, w, budget):
        a, b = max(r.start - halo, 0), min(r.stop + halo, h)
        o = out[..., a:b, :]
        band = o - _low_freq(o, levels) + _low_freq(ref[..., a:b, :].to(out.device, out.dtype), levels)
        result[..., r, :] = band[..., r.start - a : r.stop - a, :].clamp_(-1, 1)
    return result


def _low_freq(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    k = k.expand(x.shape[1], 1, 3, 3)
    for i in range(levels):
        d = 2**i
        pad = torch.nn.functional.pad(x, (d, d, d, d), mode="replicate")
        x = torch.nn.functional.conv2d(pad, k, groups=x.shape[1], dilation=d)
    return x


def upscale(model, rgb: torch.Tensor, up_plan: UpscalePlan, options: UpscaleOptions = UpscaleOptions(), *,
            generator: torch.Generator | None = None, on_event: Callable[[object], None] | None = None,
            scratch_dir: str | None = None, fault=None, run: RunFolder | None = None,
            on_preview: Callable[[torch.Tensor], None] | None = None, engine=None) -> torch.Tensor:
    """Upscale `rgb` (1, 3, h, w) in [0, 1] to `up_plan.target_size`; returns (1, 3, H, W) in [0, 1] on the
    host.

    Noise is drawn on the CPU from `generator` (seeded from `options.seed` when None), so the same seed gives
    the same image whatever n, cache placement or device. A placement learned from running out of memory
    in one pass is kept for the passes after it. Memory-mapped state (`--low-memory`) lives in a scratch
    folder in `scratch_dir` (default: the system's temporary folder), removed however this returns.

    Args:
        run: a run folder: every finished step is saved there, and its `saved` checkpoint (from
            `RunFolder.load`) is where this starts. Memory-mapped state then lives in the run folder
            itself; on an exception the folder keeps only the last checkpoint.
        on_preview: receives, after every step, the model's current estimate of the pass's result
            (1, 3, h, w) in [0, 1], downscaled to at most PREVIEW_SIDE px on the long side.
        engine: what builds each pass's denoiser (default `BlockEngine`; `bands.band_engine` under
            torchrun).
    """
    if generator is None:
        generator = torch.Generator().manual_seed(options.seed)
    x = rgb.float().cpu() * 2 - 1  # [-1, 1]
    mapped = any(p.memory.low_memory for p in up_plan.passes)
    scratch = None
    if mapped:
        if run is None:
            parent = scratch_dir if scratch_dir is not None else tempfile.gettempdir()
            for path, pid, freed in reclaim_stale(parent):  # left by a run that was killed
                if on_event is not None:

                    on_event(Notice(f"removed the scratch folder {path} of a stopped run (pid {pid}): "
                                    f"{format_bytes(freed)} freed"))
            scratch = Scratch(parent)
        else:
            scratch = Scratch(safe=run.folder())
    if on_event is not None:
        work = [flops_per_call(model.config, *p.padded_out) for p in up_plan.passes]
        gpu = None
        if model.device.type == "cpu" and up_plan.seconds > SLOW_ON_CPU:
            gpu = gpu_seconds(model.config, up_plan)
        on_event(JobStarted([w / sum(work) for w in work], 2 * up_plan.steps - 1,
                            [p.seconds for p in up_plan.passes], model.device.type, gpu))
    saved = run.saved if run is not None else None
    first = 0
    if saved is not None:
        first = saved.pass_ - 1
        if saved.input_file is not None:
            x = saved.read_input()  # in the dtype the previous pass returned it: the same arithmetic
        if on_event is not None:
            on_event(Resumed(saved.pass_, saved.passes, saved.step, saved.steps, saved.saved_at,
                             str(run.path)))
    learned: Placement | None = None
    ok = False
    try:
        for i, p in enumerate(up_plan.passes):
            if i < first:
                continue
            placement = p.memory.placement
            if learned is not None:  # never go back above what ran out of memory
                placement = Placement(min(placement.n, learned.n), placement.order,
                                      placement.cache_on_host or learned.cache_on_host,
                                      placement.state_on_host or learned.state_on_host)
            if on_event is not None:
                on_event(PassStarted(i + 1, len(up_plan.passes), p,
                                     None if p.memory.whole_image else placement.n))
            ckpt = None
            if run is not None:
                ckpt = _Checkpointer(run, i + 1, len(up_plan.passes), x if i > 0 else None,
                                     saved if i == first else None, on_event)
            x, final = _one_pass(model, x, p, placement, options, generator, on_event,
                                 scratch if p.memory.low_memory else None, fault, ckpt, on_preview, engine)
            if final != p.memory.placement:
                learned = final
            if on_event is not None:
                on_event(PassDone(i + 1, len(up_plan.passes)))
        if up_plan.resample:
            x = resize(x.float(), up_plan.target_size)
        x = x.float()  # a copy only if the state was bf16; then in place: no second float image
        for r in _rows(*x.shape[-2:]):
            if not bool(torch.isfinite(x[..., r, :]).all()):
                raise NonFinite("the upscaled image holds NaN or Inf (broken weights or an unstable dtype); "
                                "no output was written")
        ok = True
        return x.clamp_(-1, 1).add_(1).div_(2)
    finally:
        if scratch is not None:  # the last checkpoint's files stay until the output is written
            kept = () if run is None else tuple(n.removesuffix(".bin") for n in run.committed_files())
            scratch.close(keep=kept)
        if run is not None and not ok:
            run.tidy()


class _Checkpointer:
    """Saves one pass's steps to a run folder and knows where that pass resumes."""

    def __init__(self, run: RunFolder, pass_: int, passes: int, lr_in: torch.Tensor | None,
                 saved: Saved | None, on_event) -> None:
        self.run, self.pass_, self.passes, self.on_event = run, pass_, passes, on_event
        self.saved = saved
        self.lr_in = lr_in
        self.input_entry: dict | None = None
        if saved is not None and saved.input_file is not None:  # the saved input is this pass's input
            self.input_entry = run.entry("input")

    def save(self, st: HeunState, step: int, steps: int, rng: torch.Tensor) -> None:
        if self.lr_in is not None and self.input_entry is None:
            self.input_entry = self.run.save_input(self.pass_, self.lr_in)
        mapped_file = None
        if st.names is not None and st.scratch is not None and st.scratch.path == self.run.path:
            st.scratch.flush(st.names["x"])
            mapped_file = st.scratch.file(st.names["x"])
        nbytes = self.run.save(self.pass_, self.passes, step, steps, st.x, rng=rng,
                               input_entry=self.input_entry, mapped_file=mapped_file)
        if self.on_event is not None:
            self.on_event(CheckpointWritten(self.pass_, self.passes, step, steps, nbytes,
                                            self.run.last_write_seconds, str(self.run.path)))


PREVIEW_SIDE = 2048


def preview_image(den: torch.Tensor, size: tuple[int, int], side: int = PREVIEW_SIDE) -> torch.Tensor:
    """The top-left `size` of `den` (1, 3, H, W) in [-1, 1], as (1, 3, h, w) in [0, 1] with max(h, w) <= side:
    mean of f x f pixels (f the smallest integer that fits; a last partial row/column of blocks is dropped),
    computed in row chunks, so a memory-mapped image is never read whole into memory."""
    h, w = size
    f = max(1, -(-max(h, w) // side))
    oh, ow = max(1, h // f), max(1, w // f)
    out = torch.empty(den.shape[0], 3, oh, ow)
    for rows in row_chunks(oh, 3 * 4 * w * f, 32 * 2**20):  # output rows: f float32 RGB input rows each
        r, r1 = rows.start, rows.stop
        part = den[..., r * f : r1 * f, : ow * f].float().cpu()
        out[..., r:r1, :] = torch.nn.functional.avg_pool2d(part, f) if f > 1 else part
    return out.clamp_(-1, 1).add_(1).div_(2)


class Upsampled:
    """`clamp(resize(src, size), -1, 1)` without holding it: `up[..., ys, xs]` computes just that slice
    from the source pixels it reads (plus a halo), with the same numbers as the whole-image resize."""

    HALO = 4  # source pixels beyond a slice on each side; the bicubic kernel reads 2 when upsampling

    def __init__(self, src: torch.Tensor, size: tuple[int, int]) -> None:
        self.src = src
        self.scale = size[0] // src.shape[-2]
        if (src.shape[-2] * self.scale, src.shape[-1] * self.scale) != tuple(size):
            raise ValueError(f"Upsampled needs an integer factor, got {tuple(src.shape[-2:])} -> {size}")
        self.shape = torch.Size((*src.shape[:-2], *size))

    def __getitem__(self, idx) -> torch.Tensor:
        if not (isinstance(idx, tuple) and len(idx) == 3 and idx[0] is Ellipsis):
            raise TypeError("Upsampled is sliced as up[..., rows, cols]")
        (y0, y1, _), (x0, x1, _) = (sl.indices(n) for sl, n in zip(idx[1:], self.shape[-2:]))
        s, hs, ws = self.scale, self.src.shape[-2], self.src.shape[-1]
        sy0, sy1 = max(y0 // s - self.HALO, 0), min(-(-y1 // s) + self.HALO, hs)
        sx0, sx1 = max(x0 // s - self.HALO, 0), min(-(-x1 // s) + self.HALO, ws)
        part = self.src[..., sy0:sy1, sx0:sx1].float()
        up = resize(part, ((sy1 - sy0) * s, (sx1 - sx0) * s)).clamp_(-1, 1)
        return up[..., y0 - sy0 * s : y1 - sy0 * s, x0 - sx0 * s : x1 - sx0 * s]


def _rows(h: int, w: int, budget: int = 32 * 2**20) -> list[slice]:
    return row_chunks(h, 3 * 4 * w, budget)  # float32 RGB rows


def pass_inputs(lr_in: torch.Tensor, scale: int, cfg) -> tuple[torch.Tensor, Upsampled, torch.Tensor]:
    """The model inputs of one pass over `lr_in` (B, 3, h, w) in [-1, 1]: (lr, lr_up, clip_in).

    `lr_up` is the padded input's bicubic upsample by `scale`, clipped to [-1, 1] (the official `concat`),
    computed per slice (`lr_up[..., :, :]` is the whole image); `lr` the image the LR cross-attention sees,
    `clip_in` the one CLIP encodes. For 4x both are the input; for the official 2x they are the input at
    half size, so HR/LR stays 4.
    """
    padded = pad_to_blocks(lr_in, cfg.block_size // scale)  # (1, 3, ph, pw), replicate at bottom/right
    hr = (padded.shape[-2] * scale, padded.shape[-1] * scale)
    lr_up = Upsampled(padded, hr)
    if scale == 4:
        return padded, lr_up, lr_in
    lr = resize(padded, (hr[0] // cfg.sr_scale, hr[1] // cfg.sr_scale))
    clip_in = resize(lr_in, (round(lr_in.shape[-2] / 2), round(lr_in.shape[-1] / 2)))
    return lr, lr_up, clip_in


def compiles(model, p: Pass, options: UpscaleOptions) -> bool:
    """`--compile` or `--no-compile` as given; neither: on CUDA where this GPU's measured compile pays over
    the pass's predicted time."""
    if options.compile is not None:
        return options.compile
    if model.device.type != "cuda":
        return False
    return compile_pays(p.seconds, calibrate.compile_record(model.config, model.device, model.dtype))


def _one_pass(model, lr_in: torch.Tensor, p: Pass, placement: Placement, options: UpscaleOptions,
              generator, on_event, scratch: Scratch | None, fault, ckpt: _Checkpointer | None = None,
              on_preview=None, engine_cls=None) -> tuple[torch.Tensor, Placement]:
    """One sampling run; returns the cropped result and the placement it ended with."""
    lr, lr_up, clip_in = pass_inputs(lr_in, p.scale, model.config)
    hr = tuple(lr_up.shape[-2:])
    vector = model.encode_image(clip_in)
    sigmas = edm_sigmas(options.steps)

    # x_0 = lr_up + noise * sigma_0: noise drawn on the CPU in one call (independent of device and n),
    # straight into the state when it is float32 on the host, else through one float32 image.
    state_dev = torch.device("cpu") if placement.state_on_host else model.device
    sdtype = p.memory.state_dtype
    shape = (lr_in.shape[0], 3, *hr)
    saved = ckpt.saved if ckpt is not None else None
    prefix = f"p{ckpt.pass_}_heun" if ckpt is not None else "heun"
    reuse = (saved.x_file.stem,) if saved is not None and scratch is not None else ()
    st = HeunState.allocate(shape, sdtype, state_dev, scratch, prefix=prefix, reuse=reuse)
    done = 0
    # resume: x at step `saved.step`, and the generator as it was after this pass's noise
    if saved is not None:
        if tuple(saved.x_shape) != shape:
            raise ValueError(f"checkpoint x is {saved.x_shape}, this pass needs {shape}")
        if st.names is not None and saved.x_file.stem == st.names["x2"]:
            st.swap_x()
        if not (st.names is not None and saved.x_file.stem == st.names["x"] and saved.x_dtype == sdtype):
            if saved.x_dtype == sdtype:
                saved.read_x(st.x)
            else:
                tmp = torch.empty(shape, dtype=saved.x_dtype)
                saved.read_x(tmp)
                st.x.copy_(tmp)
                del tmp
        generator.set_state(saved.rng)
        done = saved.step
    else:
        direct = state_dev.type == "cpu" and sdtype == torch.float32
        noise = None if direct else torch.randn(shape, generator=generator)
        if direct:
            torch.randn(shape, generator=generator, out=st.x)
        for r in _rows(*hr):
            src = st.x[..., r, :] if direct else noise[..., r, :].to(state_dev)
            st.x[..., r, :] = (src * sigmas[0]).add_(lr_up[..., r, :].to(state_dev))
            st.trim()
        del noise
    rng = generator.get_state()

    state_on_host = state_dev.type == "cpu"

    def replan(at: Placement) -> Placement | None:
        """Out of memory at `at`: the largest smaller n the plan's estimate fits in 0.9x its budget."""
        new = planner_replan(model.config, p.padded_out, replace(at, state_on_host=state_on_host),
                             p.memory.budget, dtype=model.dtype, device_type=model.device.type,
                             batch=lr_in.shape[0], scale=p.scale, ranks=getattr(engine_cls, "ranks", 1),
                             state_dtype=p.memory.state_dtype, low_memory=p.memory.low_memory, order=at.order)
        return None if new is None else replace(new, state_on_host=False)  # (the engine's never is)

    engine = (engine_cls or BlockEngine)(model, lr, vector, lr_up, replace(placement, state_on_host=False),
                                         scratch=scratch, on_event=on_event, fault=fault,
                                         compile=compiles(model, p, options), replan=replan,
                                         attention=getattr(p.memory.rates, "sdpa", None))
    preview: list[torch.Tensor] = []

    # (calls, time) after each step, less the time spent in the callbacks (checkpoint saves, previews,
    # progress events) until then: the sampler's own pace, which `calibrate.observe` compares with the plan
    stamps: list[tuple[int, float]] = []
    aside = 0.0  # seconds spent in the callbacks so far

    def denoised(i: int, den: torch.Tensor) -> None:
        nonlocal aside
        t = time.perf_counter()
        preview[:] = [preview_image(den, p.out_size)]
        aside += time.perf_counter() - t

    def step_done(ev) -> None:
        nonlocal done, aside
        t = time.perf_counter()
        stamps.append((ev.calls, t - aside))
        done = ev.i
        if ckpt is not None:
            ckpt.save(st, ev.i, ev.steps, rng)
        if on_event is not None:
            on_event(ev)
        if on_preview is not None and preview:
            on_preview(preview.pop())
        aside += time.perf_counter() - t

    while True:
        try:
            sample_heun(engine, st.x, sigmas, callback=step_done, state=st, start=done,
                        on_denoised=denoised if on_preview is not None else None)
            break
        except OutOfMemory:
            if state_on_host:
                raise
        # Last rung, once the except has let go of the failed step's tensors: the image state leaves the
        # device (the interrupted step restarts from x, which no step overwrites), and n starts again from
        # the pass's plan, now that the device holds no image (the engine steps down from there if needed).
        old = replace(engine.placement, state_on_host=False).describe()
        st, state_on_host = st.to("cpu", scratch, prefix=f"{prefix}_host"), True
        release_cached(model.device)
        engine.placement = replace(placement, state_on_host=False)
        if on_event is not None:
            on_event(PlanChanged(old=old, new=replace(engine.placement, state_on_host=True).describe()))
    engine.close()
    final = replace(engine.placement, state_on_host=state_on_host)
    # CPU jobs are not observed (final != planned there): a CPU job slowed by anything else (SIGSTOP in the
    # tests, a busy machine) scaled the cached rates every later plan reads (seen: 17x in a full run)
    if (final == p.memory.placement and p.memory.rates is not None and len(stamps) >= 2
            and getattr(engine_cls, "ranks", 1) == 1):
        # the pass's calls after its first step (warm-up, compilation) correct the cached calibration
        (c0, t0), (c1, t1) = stamps[0], stamps[-1]
        if c1 > c0:
            calibrate.observe(model.config, model.device, model.dtype, p.memory.rates,
                              p.memory.seconds_per_call, (t1 - t0) / (c1 - c0), c1 - c0)
    out = st.x
    if options.color_fix != "none":
        out = color_fix(out.float(), lr_up, options.color_fix)  # wavelet: in row bands of lr_up
    return out[..., : p.out_size[0], : p.out_size[1]].cpu(), final


def plan_lines(plan: UpscalePlan, device: str, dtype: str, gpu: float | None = None) -> list[str]:
    """The plan as `infdit upscale --dry-run` prints it (and `infdit serve` shows it): one line for the job,
    one per pass (mode, placement, predicted peaks and time), the resample, the predicted time."""

    ih, iw = plan.input_size
    th, tw = plan.target_size
    lines = [f"{iw}x{ih} -> {tw}x{th}: {len(plan.passes)} model pass(es), {plan.model_calls} model calls "
             f"({plan.steps} steps), {device} {dtype}"]
    for i, p in enumerate(plan.passes, 1):
        mem = p.memory
        where = [s for s, on in (("cache on host", mem.cache_on_host), ("state on host", mem.state_on_host),
                                 ("state bf16", mem.state_dtype != torch.float32),
                                 ("low-memory", mem.low_memory)) if on]
        how = (f"{'whole image' if mem.whole_image else f'n={mem.n} ({mem.n}x{mem.n} blocks)'}, "
               + "".join(f"{w}, " for w in where)
               + f"predicted peak {format_bytes(mem.estimate.device_peak)} {device}, "
               + f"{format_bytes(mem.estimate.host_peak)} host, {format_seconds(p.seconds)}")
        lines.append(f"  pass {i}: {p.scale}x {p.in_size[1]}x{p.in_size[0]} "
                     f"-> {p.out_size[1]}x{p.out_size[0]} "
                     f"(canvas {p.padded_out[1]}x{p.padded_out[0]}); {how}")
    if plan.resample:
        last = plan.passes[-1].out_size
        lines.append(f"  resample {last[1]}x{last[0]} -> {tw}x{th} (antialiased bicubic)")
    rates = plan.passes[0].memory.rates if plan.passes else None
    how = "rates measured on this device" if rates is not None and rates.measured else "assumed rates"
    lines.append(f"  time: predicted {format_seconds(plan.seconds)} ({how})")
    if gpu is not None:
        lines.append(f"  (more than an hour on the CPU: a CUDA GPU, H100-class in bf16, would take about "
                     f"{format_seconds(gpu)})")
    return lines


def plan_json(plan: UpscalePlan) -> dict:
    """The plan as JSON-able data (`--dry-run --json`, `infdit serve`): every field, each pass's predicted
    peaks, and the predicted seconds of all passes."""
    from dataclasses import asdict

    out = asdict(plan)
    for p, d in zip(plan.passes, out["passes"]):
        d["memory"].update(p.memory.memory)  # device_peak_bytes, host_peak_bytes
    out["seconds"] = plan.seconds  # predicted, all passes
    return out
