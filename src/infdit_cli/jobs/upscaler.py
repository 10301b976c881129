"""`Upscaler`: a loaded model plus the device choices, upscaling files, PIL images or tensors.

This is the library entry point the CLI wraps:

    from infdit_cli import Upscaler, UpscaleOptions
    up = Upscaler.from_weights("model.safetensors", device="auto")
    result = up.upscale_file("photo.jpg", "photo_4k.png", res="4096")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..events import CheckpointDiscarded, Notice, PlanChanged
from ..images.load import DEFAULT_MAX_PIXELS, fill_transparent, load_image, resize
from ..images.save import check_format_size, check_output, save_image
from ..plan import calibrate
from ..plan.device import resolve_device, resolve_dtype
from ..plan.planner import Rates, device_free
from ..weights.cache import sha256_file
from ..weights.format import load_model
from ..weights.hub import fetch_clip_tower, resolve_weights
from .checkpoint import RunFolder, fingerprint, model_identity, output_lock, run_folder_for, weights_identity
from .pipeline import (
    UpscaleOptions,
    UpscalePlan,
    check_disk,
    checkpoint_by_default,
    disk_need,
    plan_upscale,
    predicted_seconds,
    target_size,
    upscale,
)

Agree = Callable[[UpscalePlan], UpscalePlan]

__all__ = ["UpscaleResult", "Upscaler", "default_output"]


@dataclass(frozen=True)
class UpscaleResult:
    input: str
    output: str
    input_size: tuple[int, int]  # (h, w)
    output_size: tuple[int, int]
    passes: list[int]  # the scale of each model pass
    block_batch: list[int | None]  # n of each pass (None: whole image)
    model_calls: int
    seconds: float
    predicted_seconds: float  # the cost model's for the model passes (`UpscalePlan.seconds`)
    peak_memory: int | None  # bytes on the compute device (CUDA), None where not measured
    seed: int
    memory: list[dict[str, int]] = field(default_factory=list)  # each pass's predicted device/host peaks
    plan_changes: list[str] = field(default_factory=list)  # placements learned from running out of memory


def default_output(path: Path) -> Path:
    """`photo.jpg` -> `photo_infdit.jpg` beside it."""
    return path.with_name(f"{path.stem}_infdit{path.suffix}")


class Upscaler:
    """A loaded Inf-DiT model, ready to upscale many images."""

    def __init__(self, model, *, options: UpscaleOptions | None = None, device_budget: int | None = None,
                 weights_id: str | None = None, rates: Rates | None = None, engine=None,
                 agree: Agree | None = None) -> None:
        """`device_budget`: device bytes the plans may use when `options.mem_budget` is unset (what was free
        before the weights were loaded, minus a margin; `from_weights` measures it). `weights_id`: what
        identifies the weights in a checkpoint's fingerprint (default: a hash of the model's tensors).
        `rates`: the cost model's rates for plans and their predicted times (default: this device's,
        `calibrate.calibration`, measured on first use and cached). `engine`: builds each pass's denoiser
        (`pipeline.upscale`'s; None: `BlockEngine`; `bands.band_engine` under torchrun). `agree`: makes a
        plan the job's (`distributed.agree_plan` under torchrun: the leanest of the ranks'); None: as is."""
        self.model = model
        self.options = options if options is not None else UpscaleOptions()
        self.device_budget = device_budget
        self._weights_id = weights_id
        self._rates = rates
        self.engine = engine
        self.agree = agree

    @property
    def weights_id(self) -> str:
        if self._weights_id is None:
            self._weights_id = model_identity(self.model)
        return self._weights_id

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, *, device: str = "auto", dtype: str = "auto",
                     options: UpscaleOptions | None = None, engine=None, agree: Agree | None = None,
                     **resolve_kw) -> Upscaler:
        """The model of `weights` (`hub.resolve_weights(weights, **resolve_kw)`) on `device`; `engine`,
        `agree`: as the constructor's."""
        dev = resolve_device(device)
        path = resolve_weights(weights, **resolve_kw)
        free = device_free(dev)  # before our weights: they are counted once, in every plan's estimate
        return cls(load_model(path, device=dev, dtype=resolve_dtype(dtype, dev), clip_tower=fetch_clip_tower),
                   options=options, device_budget=free, weights_id=weights_identity(path), engine=engine,
                   agree=agree)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def rates(self) -> Rates:
        if self._rates is None:
            self._rates = calibrate.calibration(self.model.config, self.device, self.model.dtype)
        return self._rates

    def plan(self, input_size: tuple[int, int], *, res: str | None = None, scale: float | None = None,
             options: UpscaleOptions | None = None) -> UpscalePlan:
        opts = options or self.options
        if opts.mem_budget is None and self.device_budget is not None:
            opts = replace(opts, mem_budget=self.device_budget)
        target = target_size(input_size, res=res, scale=scale)
        up_plan = plan_upscale(self.model.config, input_size, target, opts, dtype=self.model.dtype,
                               device=self.device, rates=self.rates, ranks=getattr(self.engine, "ranks", 1))
        return self.agree(up_plan) if self.agree is not None else up_plan

    def upscale_tensor(self, rgb: torch.Tensor, up_plan: UpscalePlan, *,
                       options: UpscaleOptions | None = None,
                       on_event: Callable[[object], None] | None = None,
                       scratch_dir: str | Path | None = None,
                       fault=None, run: RunFolder | None = None,
                       on_preview: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """(1, 3, h, w) in [0, 1] -> (1, 3, H, W) in [0, 1]. `scratch_dir`: where --low-memory files go;
        `run`, `on_preview`: see `pipeline.upscale`."""
        return upscale(self.model, rgb, up_plan, options or self.options, on_event=on_event,
                       scratch_dir=None if scratch_dir is None else str(scratch_dir), fault=fault, run=run,
                       on_preview=on_preview, engine=self.engine)

    def upscale_file(self, src: str | Path, dst: str | Path | None = None, *, res: str | None = None,
                     scale: float | None = None, options: UpscaleOptions | None = None, quality: int = 95,
                     overwrite: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     on_event: Callable[[object], None] | None = None, checkpoint: bool | None = None,
                     checkpoint_dir: str | Path | None = None, resume: bool = True,
                     on_preview: Callable[[torch.Tensor], None] | None = None, write: bool = True,
                     depth: int | None = None) -> UpscaleResult:
        """Read `src`, upscale, write `dst` (default `<stem>_infdit<suffix>`) atomically.

        `write=False`: compute only (the ranks other than 0 of one image under torchrun).

        Args:
            checkpoint: save the sampler state after every step (True), never (False), or when the job is
                predicted to take more than `pipeline.CHECKPOINT_AFTER` seconds (None).
            checkpoint_dir: the run folder (default `.<dst name>.infdit-run` beside `dst`). Removed when
                the output is written; kept, holding only the last step, when this raises.
            resume: continue from a run folder whose fingerprint matches (input bytes, weights, target,
                passes, steps, seed, dtype, colour fix, version); one that does not match, or is damaged,
                is removed with a `CheckpointDiscarded` event and the job starts over. False: start over.
            on_preview: gets the model's current estimate of the image after every step (see
                `pipeline.upscale`).
            depth: bits per sample of a PNG or TIFF output, 8 or 16; None: the input's. JPEG and WebP
                are always 8-bit.
        """
        src = Path(src)
        dst = Path(dst) if dst is not None else default_output(src)
        fmt = check_output(dst, overwrite)  # before any work: no compute for an output that cannot be written
        job = _FileJob(src=src, dst=dst, fmt=fmt, res=res, scale=scale, options=options or self.options,
                       quality=quality, overwrite=overwrite, max_pixels=max_pixels, on_event=on_event,
                       checkpoint=checkpoint, checkpoint_dir=checkpoint_dir, resume=resume,
                       on_preview=on_preview, write=write, depth=depth)
        with output_lock(dst) if write else contextlib.nullcontext():  # one writer per output (Busy at once)
            return self._upscale_file(job)

    def _upscale_file(self, job: _FileJob) -> UpscaleResult:
        src, dst, fmt, opts, on_event = job.src, job.dst, job.fmt, job.options, job.on_event
        img = load_image(src, max_pixels=job.max_pixels)
        notices = list(img.notices)
        if img.alpha is not None and fmt == "JPEG":
            notices.append(f"{dst}: JPEG has no alpha; transparency is dropped (use .png to keep it)")
        if on_event is not None:
            for text in notices:
                on_event(Notice(text))
        up_plan = self.plan(img.size, res=job.res, scale=job.scale, options=opts)
        check_format_size(fmt, up_plan.target_size)
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        rgb = fill_transparent(img.rgb, img.alpha) if img.alpha is not None else img.rgb
        changes: list[str] = []

        def relay(event: object) -> None:
            if isinstance(event, PlanChanged):
                changes.append(f"{event.old} -> {event.new}")
            if on_event is not None:
                on_event(event)

        run = None
        folder = Path(job.checkpoint_dir) if job.checkpoint_dir is not None else run_folder_for(dst)
        checkpoint = job.checkpoint
        if checkpoint is None:
            checkpoint = checkpoint_by_default(folder, predicted_seconds(up_plan))
        # before any work: DiskTooSmall
        check_disk(folder.parent if checkpoint else dst.parent, disk_need(up_plan, bool(checkpoint)))
        if checkpoint:
            run = RunFolder(folder, fingerprint(input_sha256=sha256_file(src), weights=self.weights_id,
                                                up_plan=up_plan, options=opts, dtype=self.model.dtype))
            if not job.resume:
                run.remove()
            _, why = run.load()
            if why is not None and on_event is not None:
                on_event(CheckpointDiscarded(str(folder), why))
        out = self.upscale_tensor(rgb, up_plan, options=opts, on_event=relay, scratch_dir=dst.parent, run=run,
                                  on_preview=job.on_preview)
        alpha = resize(img.alpha, up_plan.target_size).clamp(0, 1) if img.alpha is not None else None
        (h, w), (th, tw) = img.size, up_plan.target_size
        dpi = (img.dpi[0] * tw / w, img.dpi[1] * th / h) if img.dpi else None  # same physical size
        if job.write:
            bits = (job.depth or img.bits) if fmt in ("PNG", "TIFF") else 8
            save_image(dst, out, alpha=alpha, gray=img.gray, bits=bits, icc=img.icc, exif=img.exif,
                       dpi=dpi, quality=job.quality, overwrite=job.overwrite)
        if run is not None and not run.remove(strict=False) and on_event is not None:
            on_event(Notice(f"kept the run folder {folder}: it holds files infdit did not make"))
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return UpscaleResult(
            input=str(src), output=str(dst), input_size=img.size, output_size=up_plan.target_size,
            passes=[p.scale for p in up_plan.passes],
            block_batch=[None if p.memory.whole_image else p.memory.n for p in up_plan.passes],
            memory=[p.memory.memory for p in up_plan.passes],
            model_calls=up_plan.model_calls, seconds=time.perf_counter() - t0,
            predicted_seconds=round(up_plan.seconds, 3), peak_memory=peak, seed=opts.seed,
            plan_changes=changes,
        )


@dataclass(frozen=True, kw_only=True)
class _FileJob:
    """One `Upscaler.upscale_file` call's arguments, checked (`fmt`: the output's format)."""

    src: Path
    dst: Path
    fmt: str
    res: str | None
    scale: float | None
    options: UpscaleOptions
    quality: int
    overwrite: bool
    max_pixels: int | None
    on_event: Callable[[object], None] | None
    checkpoint: bool | None
    checkpoint_dir: str | Path | None
    resume: bool
    on_preview: Callable[[torch.Tensor], None] | None
    write: bool
    depth: int | None
