"""The training loop behind `infdit train`: AdamW with warm-up, clipping, EMA, accumulation, DDP, validation,
checkpoints that resume bit-identically, and the output file `upscale --weights` reads.

    from infdit_cli.train.loop import TrainConfig, train
    result = train(TrainConfig(data="photos/", output="mine.safetensors", config="tiny", steps=200))

A step's randomness lives in its samples (`data`: seeded by (seed, epoch, index)) and its RoPE origin (seeded
by (seed, step)), so the step computes the same on one process or several, and after a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import __version__
from ..distributed import world as D
from ..engine.blocks import denoise
from ..engine.sampling import edm_sigmas, sample_heun
from ..engine.storage import SafeFolder
from ..errors import (
    BadRequest,
    DiskFull,
    MemoryBudgetTooSmall,
    NonFinite,
    OutputExists,
    Signalled,
    UnsafePath,
    no_space,
)
from ..events import Notice, TrainSaved, TrainStarted, TrainStep, TrainValidated
from ..jobs.checkpoint import model_identity, output_lock, weights_identity
from ..model.config import PRESETS
from ..model.infdit import random_model
from ..plan.device import resolve_device, resolve_dtype
from ..units import format_bytes
from ..weights.format import load_model, save_model_file
from ..weights.hub import fetch_clip_tower, resolve_weights
from . import recipe as R
from .data import Item, TrainSet, ValSet, files_digest, positions, sample_generator, scan, worker_init
from .memory import MemoryPlan, plan_memory, synthetic_batch

__all__ = ["FORMAT", "TrainConfig", "TrainResult", "build_model", "run_folder_for", "train"]

FORMAT = 1  # the run folder's meta.json format
KIND = "training run folder"
_ORIGIN = (1 << 30) + 2  # generator key of the steps' RoPE origins (apart from data's keys)
RECIPE_VERSION = "inf-dit-official-1"  # the recipe a trained file's provenance names
EMA_DECAY = 0.999  # --ema: per step (the official FusedEmaAdam's own value is not in the released configs)
VAL_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)  # validation sigmas: these quantiles of the training distribution


@dataclass(frozen=True)
class TrainConfig:
    """The options of `infdit train` (None: the recipe's or the model's default)."""
    data: Path
    output: Path
    base: str | None = None  # --from: weights to fine-tune (registry name, file or Hub reference)
    config: str | None = None  # --config: a `config.PRESETS` name, trained from scratch
    steps: int = 1000
    batch: int = 4  # the global batch of one optimizer step (all ranks and accumulation together)
    crop: int | None = None  # HR crop side; default 4 blocks (the official 512 for 128-px blocks)
    lr: float | None = None
    warmup: int | None = None  # linear warm-up steps; default min(1000, steps // 10)
    seed: int = 0
    val: Path | None = None
    val_count: int = 4  # images of DATA held out when there is no --val
    every: int = 500  # validation and checkpoint cadence
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"
    mem_budget: int | None = None
    workers: int = 2
    accum: int = 1
    ema: bool = False
    checkpointing: bool = False  # activation checkpointing, where the model offers it
    sample_steps: int = 8  # Heun steps of the validation sample grid
    sigma_mean: float | None = None  # training log-sigma ~ N(sigma_mean, sigma_std^2); default the recipe's
    sigma_std: float | None = None
    overwrite: bool = False
    resume: bool = True
    repo: str | None = None
    offline: bool | None = None


@dataclass(frozen=True)
class TrainResult:
    output: str
    steps: int
    resumed_from: int
    seconds: float
    final_loss: float | None
    val_loss: float | None
    run_folder: str
    provenance: dict = field(default_factory=dict)


def run_folder_for(output: str | Path) -> Path:
    """`out/model.safetensors` -> `out/.model.safetensors.infdit-train` (checkpoints, sample grids)."""
    output = Path(output)
    return output.with_name(f".{output.name}.infdit-train")


# --------------------------------------------------------------------------------------------------------
# The model and the loss
# --------------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, str, str]:
    """(model in float32 on `device`, base description, base identity): the weights `--from` names, or a
    seeded random model of the preset `--config` names. Only the CLIP tower stays frozen."""
    if (cfg.base is None) == (cfg.config is None):
        raise BadRequest("give one of --from WEIGHTS (fine-tune) or --config NAME (train from scratch)")
    if cfg.base is not None:

        path = resolve_weights(cfg.base, repo=cfg.repo, offline=cfg.offline)
        model = load_model(path, device=device, dtype=torch.float32, clip_tower=fetch_clip_tower)
        base, ident = str(cfg.base), weights_identity(path)
    else:
        if cfg.config not in PRESETS:
            raise BadRequest(f"--config {cfg.config!r}: use one of {', '.join(PRESETS)}")
        model = random_model(PRESETS[cfg.config], seed=cfg.seed, device=device)
        base, ident = f"config:{cfg.config}", model_identity(model)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("clip."))
    model.grad_checkpointing = cfg.checkpointing
    return model.train(), base, ident


def _origin(seed: int, step: int, model, crop: int, recipe) -> tuple[int, int]:
    """The RoPE origin of optimizer step `step` (the official random position, one per batch), the same on
    every rank and micro-batch of the step."""
    if not recipe.random_position:
        return (0, 0)
    cfg = model.config
    gen = sample_generator(seed, _ORIGIN, step)
    return R.sample_rope_origin(gen, crop // cfg.patch_size, cfg.rope_table_size)


def _warmup_lr(step: int, lr: float, warmup: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear from lr/warmup up to lr."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


# --------------------------------------------------------------------------------------------------------
# The run folder: checkpoint (safetensors, sha256 in meta.json), sample grids
# --------------------------------------------------------------------------------------------------------


class TrainRun:
    """The verified run folder of one output (`storage.SafeFolder`: ours, no links, recorded names only).

    `meta.json` names one `state.sN.safetensors` (model, optimizer, EMA, generator states) and its sha256;
    it is replaced atomically after the state file is complete on disk, so a stop at any instant leaves the
    last committed step. A folder made with other options is refused, never reused or removed."""
    def __init__(self, path: Path, fingerprint: dict) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.safe: SafeFolder | None = None
        self.meta: dict | None = None

    def folder(self) -> SafeFolder:
        if self.safe is None or self.safe.fd < 0:
            self.safe = SafeFolder(self.path, KIND)
        return self.safe

    def load(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(step, tensors) of the committed checkpoint; None without one.

        Raises:
            BadRequest: the folder was made with other options, or its checkpoint is damaged (one line).
            UnsafePath: what is at the path is not infdit's.
        """
        from safetensors.torch import load as st_load

        if not os.path.lexists(self.path):
            return None
        safe = self.folder()
        try:
            fd = safe.open("meta.json")
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 20)
        hint = f"remove {self.path} (or pass --no-resume) to start over"
        try:
            meta = json.loads(raw)
            old = meta["fingerprint"]
            step, name, digest = int(meta["step"]), str(meta["file"]), str(meta["sha256"])
        except (ValueError, KeyError, TypeError):
            raise BadRequest(f"{self.path}: damaged checkpoint (meta.json); {hint}") from None
        if meta.get("format") != FORMAT or not isinstance(old, dict):
            raise BadRequest(f"{self.path}: a checkpoint of another format; {hint}")
        if old != self.fingerprint:
            new = self.fingerprint
            diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            shown = ", ".join(f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in diff[:3])
            raise BadRequest(f"{self.path} holds a training run with other options or data ({shown}); run "
                             f"the command that made it to resume, or {hint}")
        try:
            fd = safe.open(name)
        except OSError:
            raise BadRequest(f"{self.path}: damaged checkpoint ({name} is missing); {hint}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BadRequest(f"{self.path}: damaged checkpoint ({name} does not match its checksum); {hint}")
        self.meta = meta
        return step, st_load(data)

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> int:
        """Commit the state after `step`; returns its bytes. The previous state file is removed after."""
        from safetensors.torch import save as st_save

        bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFinite(f"the training state holds NaN or Inf after step {step} ({bad[0]}): the loss "
                            "diverged; nothing was saved (try a lower --lr)")
        data = st_save({k: t.detach().contiguous().cpu() for k, t in tensors.items()})
        safe = self.folder()
        name = f"state.s{step}.safetensors"
        try:
            safe.write(name, data, "a checkpoint")
            meta = {"format": FORMAT, "fingerprint": self.fingerprint, "step": step, "file": name,
                    "sha256": hashlib.sha256(data).hexdigest(), "nbytes": len(data), "saved_at": time.time()}
            safe.write("meta.json", json.dumps(meta).encode(), "a checkpoint")
        except OSError as e:
            if no_space(e):
                raise DiskFull(f"no space left in {self.path} for a checkpoint") from None
            raise
        old, self.meta = self.meta, meta
        if old is not None and old["file"] != name:
            safe.unlink(old["file"])
        return len(data)

    def write_png(self, name: str, image: torch.Tensor) -> Path:
        """(3, H, W) in [0, 1] as a PNG in the folder."""
        from PIL import Image

        arr = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        self.folder().write(name, buf.getvalue(), "a sample grid")
        return self.path / name

    def finish(self) -> None:
        """After the output is written: the checkpoint goes (the sample grids stay)."""
        if self.safe is None or self.meta is None:
            return
        self.safe.unlink(self.meta["file"])
        self.safe.unlink("meta.json")
        self.meta = None

    def close(self) -> None:
        if self.safe is not None:
            self.safe.close()


def _short(v) -> str:
    t = json.dumps(v) if not isinstance(v, str) else v
    return t if len(t) <= 24 else t[:12] + "..."


# --------------------------------------------------------------------------------------------------------
# Stops: SIGINT / SIGTERM / SIGHUP end the run at the next step boundary, after a save
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stops_at_boundaries(flag: list[int]):
    """While training, a stop signal only sets `flag` (in the main thread; elsewhere signals stay as they
    are): the loop saves the step it finished and raises `Signalled`. A half-done optimizer update is never
    saved."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        before = {s: signal.getsignal(s) for s in sigs}
        for s in sigs:
            if before[s] is not signal.SIG_IGN:
                signal.signal(s, lambda signum, frame: flag.append(signum))
    except ValueError:  # not the main thread
        before = {}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------------------


def recipe_for(cfg: TrainConfig) -> R.Recipe:
    """The official recipe with the options' noise-level distribution (BadRequest, exit 2, if invalid)."""
    recipe = R.Recipe()
    mean = cfg.sigma_mean if cfg.sigma_mean is not None else recipe.p_mean
    std = cfg.sigma_std if cfg.sigma_std is not None else recipe.p_std
    if not math.isfinite(mean):
        raise BadRequest(f"--sigma-mean must be a finite number, got {mean}")
    if not (std > 0 and math.isfinite(std)):
        raise BadRequest(f"--sigma-std must be a positive number, got {std}")
    return dataclasses.replace(recipe, p_mean=mean, p_std=std)


def _resolve(cfg: TrainConfig, model_cfg, device: torch.device, recipe) -> dict:
    """The options after defaults, checked (BadRequest, exit 2)."""
    bs = model_cfg.block_size
    crop = cfg.crop or 4 * bs
    if crop % bs or crop < bs:
        raise BadRequest(f"--crop {crop} must be a multiple of the model's {bs} px block")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.accum < 1 or cfg.every < 1:
        raise BadRequest("--steps, --batch, --accum and --every must be at least 1")
    lr = cfg.lr if cfg.lr is not None else recipe.lr
    if not (lr > 0 and math.isfinite(lr)):
        raise BadRequest(f"--lr must be a positive number, got {lr}")
    dt = resolve_dtype(cfg.dtype, device)
    warmup = cfg.warmup if cfg.warmup is not None else min(1000, cfg.steps // 10)
    return {"crop": crop, "lr": lr, "warmup": warmup,
            "amp": dt if device.type == "cuda" and dt != torch.float32 else None,
            "clip": recipe.grad_clip, "wd": recipe.weight_decay, "betas": tuple(recipe.betas),
            "eps": recipe.eps, "ema_decay": EMA_DECAY}


def _held_out(items: list[Item], count: int) -> tuple[list[Item], list[Item]]:
    """(training, validation) without --val: the last `count` images by name (at most a tenth) are held out;
    one or two images are all for training and there is no validation."""
    k = min(count, len(items) // 10 if len(items) >= 20 else (1 if len(items) >= 3 else 0))
    return (items[:-k], items[-k:]) if k else (items, [])


def _loader(dataset, pos: list[int], micro: int, workers: int, pin: bool):
    return torch.utils.data.DataLoader(dataset, batch_size=micro, sampler=pos, num_workers=workers,
                                       worker_init_fn=worker_init if workers else None, pin_memory=pin,
                                       prefetch_factor=4 if workers else None, persistent_workers=False)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def _memory_plan(model, cfg: TrainConfig, o: dict, world) -> MemoryPlan:
    """The step's memory plan under --mem-budget: rank 0 plans (on CUDA it measures), every rank follows, and
    a budget too small is the same one line on every rank."""
    plan = refused = None
    if world.main:
        try:
            plan = plan_memory(model, batch=cfg.batch, ranks=world.size, accum=cfg.accum, crop=o["crop"],
                               checkpointing=cfg.checkpointing, ema=cfg.ema, budget=cfg.mem_budget,
                               amp=o["amp"])
        except MemoryBudgetTooSmall as e:
            refused = str(e)
    plan, refused = D.broadcast((plan, refused), world)
    if refused is not None:
        raise MemoryBudgetTooSmall(refused)
    return plan


def train(cfg: TrainConfig, on_event: Callable[[object], None] | None = None) -> TrainResult:
    """Train (or fine-tune) and write `cfg.output`. Under torchrun every rank calls this alike.

    Raises:
        BadRequest: options that cannot work, no usable data, a run folder of other options (exit 2).
        OutputExists: the output is there and `overwrite` is off (before any work).
        Signalled: SIGINT/SIGTERM/SIGHUP, after the finished step was saved in the run folder.
    """
    emit = on_event or (lambda e: None)
    t_start = time.perf_counter()
    out = Path(cfg.output)
    if out.suffix != ".safetensors":
        raise BadRequest(f"-o {out}: the output is a .safetensors weights file")
    if os.path.lexists(out) and not cfg.overwrite:  # a dangling link is there too
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise BadRequest(f"-o {out}: the folder {out.parent} does not exist")
    world = D.world_from_env()
    device = resolve_device(D.rank_device(cfg.device, world))
    recipe = recipe_for(cfg)
    with D.group(world, str(device)), contextlib.ExitStack() as held:
        if world.main:
            held.enter_context(output_lock(out))
        say = emit if world.main else (lambda e: None)
        model, base, base_id = build_model(cfg, device)
        mc = model.config
        o = _resolve(cfg, mc, device, recipe)
        if cfg.batch % (world.size * cfg.accum):
            raise BadRequest(f"--batch {cfg.batch} must be a multiple of ranks x --accum = "
                             f"{world.size} x {cfg.accum}")
        mem = _memory_plan(model, cfg, o, world)
        accum, micro = mem.accum, mem.micro_batch
        model.grad_checkpointing = mem.checkpointing
        for change in mem.changes:
            say(Notice(f"--mem-budget {format_bytes(mem.budget)}: {change}"))
        items = scan(cfg.data, crop=o["crop"], scale=mc.sr_scale, on_skip=lambda t: say(Notice(t)))
        if cfg.val is not None:
            val_items = scan(cfg.val, crop=o["crop"], scale=mc.sr_scale, on_skip=lambda t: say(Notice(t)))
        else:
            items, val_items = _held_out(items, cfg.val_count)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in trainable]
        fp = {"base": base_id, "config": json.loads(mc.to_json()), "data": files_digest(items, cfg.data),
              "data_files": len(items), "val": [str(it.hr) for it in val_items], "batch": cfg.batch,
              "crop": o["crop"], "lr": o["lr"], "warmup": o["warmup"], "seed": cfg.seed, "accum": accum,
              "ema": cfg.ema, "amp": str(o["amp"]), "ranks": world.size,
              "sigma_mean": recipe.p_mean, "sigma_std": recipe.p_std, "recipe": RECIPE_VERSION}

        fp["version"] = __version__
        run = TrainRun(run_folder_for(out), fp)
        held.callback(run.close)
        opt = torch.optim.AdamW(params, lr=o["lr"], betas=o["betas"], eps=o["eps"], weight_decay=o["wd"])
        ema = [p.detach().clone() for p in params] if cfg.ema else None
        start = 0
        if (world.main and not cfg.resume and os.path.lexists(run.path)
                and not SafeFolder(run.path, KIND, create=False).remove()):
            raise UnsafePath(f"{run.path} holds files infdit did not make; move them away")
        loaded = run.load() if cfg.resume or not world.main else None
        if loaded is not None:
            start, state = loaded
            _restore(state, trainable, opt, ema)
        ddp = None
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
        forward = ddp if ddp is not None else model
        n_params = sum(p.numel() for p in params)
        say(TrainStarted(start, cfg.steps, n_params, len(items), world.size, device.type, str(run.path),
                         loaded is not None))
        pos = positions(start, cfg.steps, cfg.batch, world.rank, world.size)
        data = TrainSet(items, crop=o["crop"], scale=mc.sr_scale, seed=cfg.seed, recipe=recipe)
        loader = _loader(data, pos, micro, cfg.workers, device.type == "cuda")
        stops: list[int] = []
        last_loss = val_loss = None
        pace: list[float] = []

        def amp():
            if o["amp"] is None:
                return contextlib.nullcontext()
            return torch.autocast("cuda", dtype=o["amp"])

        with _stops_at_boundaries(stops):
            batches = iter(loader)
            step = start
            saved = start
            while step < cfg.steps:
                t0 = time.perf_counter()
                try:
                    micro_batches = [_to(next(batches), device) for _ in range(accum)]
                except Exception:
                    if stops:  # a worker stopped by the same signal: the state is that of `step`
                        break
                    raise
                for b in micro_batches:
                    for line in b.get("skipped", []):
                        if line:
                            for one in line.split("\n"):
                                say(Notice(one))
                origin = _origin(cfg.seed, step, model, o["crop"], recipe)
                for g in opt.param_groups:
                    g["lr"] = _warmup_lr(step, o["lr"], o["warmup"])
                opt.zero_grad(set_to_none=True)
                total = torch.zeros((), device=device)
                for k, b in enumerate(micro_batches):
                    last = ddp is None or k == accum - 1
                    sync = contextlib.nullcontext() if last else ddp.no_sync()
                    with sync:
                        with amp():
                            loss, _ = R.batch_loss(forward, model, b, origin)
                        (loss / accum).backward()
                    total += loss.detach().float() / accum
                torch.nn.utils.clip_grad_norm_(params, o["clip"])
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, params, 1 - o["ema_decay"])
                step += 1
                if world.distributed:
                    import torch.distributed as dist

                    flag = torch.tensor([total.item(), float(bool(stops))], dtype=torch.float64)
                    dist.all_reduce(flag)  # a CPU tensor: gloo's side of the group
                    last_loss, stop_now = flag[0].item() / world.size, flag[1].item() > 0
                else:
                    last_loss, stop_now = total.item(), bool(stops)
                if not math.isfinite(last_loss):
                    raise NonFinite(f"the loss is {last_loss} at step {step}: training diverged (try a lower "
                                    "--lr); the run folder keeps the last good checkpoint")
                pace = (pace + [time.perf_counter() - t0])[-20:]
                say(TrainStep(step, cfg.steps, last_loss, opt.param_groups[0]["lr"], len(pace) / sum(pace)))
                if step % cfg.every == 0 or step == cfg.steps or stop_now:
                    if world.main:
                        t1 = time.perf_counter()
                        nbytes = run.save(step, _state(trainable, opt, ema))
                        saved = step
                        say(TrainSaved(step, cfg.steps, nbytes, time.perf_counter() - t1, str(run.path)))
                    due = step % cfg.every == 0 or step == cfg.steps
                    if due and val_items and world.main and not stop_now:
                        val_loss = validate(model, val_items, run, step, o["crop"], cfg, recipe, ema, params,
                                            say)
                if stop_now:
                    break
            if stops or step < cfg.steps:
                if world.main and saved != step:
                    run.save(step, _state(trainable, opt, ema))
                del batches, loader
                raise Signalled(stops[0] if stops else signal.SIGINT)
            del batches, loader
        prov = {}
        if world.main:
            weights = _final_weights(model, trainable, ema)
            prov = {"base": base, "base_sha256": base_id, "data_files": len(items),
                    "data_sha256": files_digest(items, cfg.data), "steps": cfg.steps, "batch": cfg.batch,
                    "crop": o["crop"], "lr": o["lr"], "seed": cfg.seed, "ema": cfg.ema,
                    "sigma_mean": recipe.p_mean, "sigma_std": recipe.p_std, "recipe": RECIPE_VERSION,
                    "infdit": __version__}

            save_model_file(out, weights, mc, {"infdit_train": json.dumps(prov, sort_keys=True)},
                            overwrite=cfg.overwrite)
            run.finish()
    return TrainResult(str(out), cfg.steps, start, time.perf_counter() - t_start, last_loss, val_loss,
                       str(run.path), prov)


def _state(trainable, opt: torch.optim.Optimizer, ema) -> dict[str, torch.Tensor]:
    """Everything a resume needs, as named tensors: the trainable weights, AdamW's moments and step counts,
    the EMA, and the torch generators' states."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, p) in enumerate(trainable):
        tensors[f"model.{name}"] = p.detach()
        st = opt.state.get(p, {})
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{i}.{key}"] = st[key].detach().reshape(st[key].shape)
        if ema is not None:
            tensors[f"ema.{name}"] = ema[i]
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def _restore(tensors: dict[str, torch.Tensor], trainable, opt: torch.optim.Optimizer, ema) -> None:
    with torch.no_grad():
        for i, (name, p) in enumerate(trainable):
            p.copy_(tensors[f"model.{name}"])
            if f"opt.{i}.exp_avg" in tensors:
                opt.state[p] = {k: tensors[f"opt.{i}.{k}"].to(p.device if k != "step" else "cpu").clone()
                                for k in ("step", "exp_avg", "exp_avg_sq")}
            if ema is not None:
                ema[i].copy_(tensors[f"ema.{name}"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _final_weights(model, trainable, ema) -> dict[str, torch.Tensor]:
    """Every tensor of the model for the output file (the EMA's trainable weights when kept)."""
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()}
    if ema is not None:
        for i, (name, _) in enumerate(trainable):
            tensors[name] = ema[i].detach().contiguous().cpu()
    return tensors


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def val_sigmas(recipe) -> torch.Tensor:
    """Fixed sigmas: quantiles `VAL_QUANTILES` of the training distribution exp(N(p_mean, p_std^2))."""
    mean, std = recipe.p_mean, recipe.p_std
    q = torch.tensor(VAL_QUANTILES, dtype=torch.float64)
    return torch.exp(mean + std * math.sqrt(2) * torch.erfinv(2 * q - 1)).float()


@torch.no_grad()
def validate(model, items: list[Item], run: TrainRun, step: int, crop: int, cfg: TrainConfig, recipe, ema,
             params, say) -> float:
    """The loss on the fixed validation crops at the fixed sigmas (EMA weights when kept), and a sample
    grid (LR, bicubic, model, HR) of up to 4 crops in the run folder."""
    swap = ema is not None
    if swap:  # evaluate the EMA weights, then put the trained ones back
        kept = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, ema)
    try:
        vs = ValSet(items, crop=crop, scale=model.config.sr_scale, seed=cfg.seed, recipe=recipe)
        dev = model.device
        sigmas = val_sigmas(recipe)
        losses, rows = [], []
        for i in range(len(vs)):
            b = _to({k: v[None] for k, v in vs[i].items() if isinstance(v, torch.Tensor)}, dev)
            rep = {k: v.expand(len(sigmas), *v.shape[1:]) for k, v in b.items() if k != "sigma"}
            rep["sigma"] = sigmas.to(dev)
            loss, _ = R.batch_loss(model, model, rep)
            losses.append(float(loss))
            if len(rows) < 4:
                vec = model.encode_image(b["lr"])
                sig = edm_sigmas(cfg.sample_steps)
                x0 = b["lr_up"] + b["noise"] * sig[0]

                def den(x, s, b=b, vec=vec):
                    return denoise(model, x, s, lr_up=b["lr_up"], lr=b["lr"], vector=vec)

                out = sample_heun(den, x0, sig)
                s = model.config.sr_scale
                lr_big = b["lr"].repeat_interleave(s, -2).repeat_interleave(s, -1)
                rows.append(torch.cat([lr_big, b["lr_up"], out, b["hr"]], -1)[0].add(1).div(2))
        grid = run.write_png(f"val.s{step}.png", torch.cat(rows, -2)) if rows else None
    finally:
        if swap:
            torch._foreach_copy_(params, kept)
    val = sum(losses) / len(losses)
    say(TrainValidated(step, val, str(grid) if grid else None))
    return val


def provenance(path: str | Path) -> dict | None:
    """The `infdit_train` metadata of a trained file, or None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    text = meta.get("infdit_train")
    return json.loads(text) if text else None



def dry_run(cfg: TrainConfig, measure_steps: int = 2) -> dict:
    """The plan of `cfg` without training: parameters, memory per step within --mem-budget (`memory`), and
    time per step and in total, measured on this device over `measure_steps` steps of a synthetic batch at
    the planned micro-batch and crop (after one step not timed).

    Memory: on the CPU, the weights, gradients, AdamW moments (and EMA) in float32 plus the activation
    estimate (`memory.activation_bytes_per_pixel`); on CUDA, the peak the measured steps allocated.

    Raises:
        MemoryBudgetTooSmall: not even micro-batch 1 with activation checkpointing fits --mem-budget.
    """
    device = resolve_device(cfg.device)
    model, base, _ = build_model(cfg, device)
    o = _resolve(cfg, model.config, device, recipe_for(cfg))
    if cfg.batch % cfg.accum:
        raise BadRequest(f"--batch {cfg.batch} must be a multiple of --accum {cfg.accum}")
    mem = plan_memory(model, batch=cfg.batch, ranks=1, accum=cfg.accum, crop=o["crop"],
                      checkpointing=cfg.checkpointing, ema=cfg.ema, budget=cfg.mem_budget, amp=o["amp"],
                      estimate=True)
    model.grad_checkpointing = mem.checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    batch = synthetic_batch(model, mem.micro_batch, o["crop"], device)
    opt = torch.optim.AdamW(params, lr=o["lr"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(measure_steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=o["amp"]) if o["amp"] is not None else contextlib.nullcontext():
            loss, _ = R.batch_loss(model, model, batch)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    per_micro = sum(times) / len(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"base": base, "device": device.type, "parameters": n, "frozen_parameters": frozen,
            "micro_batch": mem.micro_batch, "accum": mem.accum, "checkpointing": mem.checkpointing,
            "crop": o["crop"], "state_bytes": mem.state_bytes, "activation_bytes": mem.activation_bytes,
            "step_bytes": peak if peak is not None else mem.step_bytes, "peak_bytes": peak,
            "mem_budget": mem.budget, "budget_changes": mem.changes,
            "seconds_per_step": per_micro * mem.accum, "total_seconds": per_micro * mem.accum * cfg.steps,
            "measured_steps": measure_steps, "lr": o["lr"], "warmup": o["warmup"]}
