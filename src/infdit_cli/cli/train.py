"""`infdit train`: fine-tune or train Inf-DiT on a folder of images."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..errors import BadRequest, Interrupted, OutputExists
from ..settings import override, settings
from ..units import format_bytes
from . import _options as O
from ._text import safe

EXAMPLES = """Examples:

  infdit train photos/ -o mine.safetensors --config tiny --steps 2000     # from scratch

  infdit train pairs/ -o tuned.safetensors --from infdit-4x --steps 500   # pairs/hr/*.png + pairs/lr/*.png

  infdit train photos/ -o mine.safetensors --config small --dry-run       # the plan, no training

  python -m infdit_cli.launch --standalone --nproc-per-node 4 -- \
      train photos/ -o mine.safetensors --from infdit-4x
"""


def train(
    data: Annotated[Path, typer.Argument(help="A folder of HR images (searched recursively), or a folder "
                                              "with hr/ and lr/ subfolders of matching names.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The trained .safetensors file.")],
    from_: Annotated[str | None, typer.Option("--from", help=(
        "Weights to fine-tune: a .safetensors file, Hub reference or registry name."),
        rich_help_panel="Model")] = None,
    config: Annotated[str | None, typer.Option(help="Train from scratch: a preset (tiny, micro, small, "
                                                       "official).", rich_help_panel="Model")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 1000,
    batch: Annotated[int, typer.Option(min=1, help="Images per optimizer step (all ranks and --accum).")] = 4,
    crop: Annotated[int | None, typer.Option(min=1, help="HR crop side in px (default 4 model blocks: 512 "
                                                            "officially).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default the recipe's, 1e-4).")] = None,
    warmup: Annotated[int | None, typer.Option(min=0, help="Linear warm-up steps (default min(1000, "
                                                               "steps/10)).")] = None,
    sigma_mean: Annotated[float | None, typer.Option(help=(
        "Mean of the training noise level's log: log sigma ~ N(MEAN, STD^2) (default the official -1.0)."))
                          ] = None,
    sigma_std: Annotated[float | None, typer.Option(help=(
        "Standard deviation of the training noise level's log (default the official 1.4)."))] = None,
    seed: O.Seed = 0,
    val: Annotated[Path | None, typer.Option(help="Held-out images for validation (default: a few of "
                                                     "DATA).")] = None,
    every: Annotated[int, typer.Option(min=1, help="Validate and save a checkpoint every N steps.")] = 500,
    dtype: O.Dtype = "auto",
    device: O.Device = "auto",
    mem_budget: Annotated[str | None, typer.Option(help=(
        "Memory one training step may use on each rank, e.g. 8GB; over it, activation checkpointing goes on, "
        "then smaller micro-batches are accumulated (the --batch kept) (default: no limit)."),
        rich_help_panel="Memory")] = None,
    workers: Annotated[int, typer.Option(min=0, help="Data loader processes (0: decode in this one).")] = 2,
    accum: Annotated[int, typer.Option(min=1, help="Gradient accumulation: micro-batches per step.")] = 1,
    ema: Annotated[bool, typer.Option("--ema", help="Keep an EMA of the weights and write it.")] = False,
    checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="Recompute activations in backward (less memory).")] = False,
    repo: O.Repo = None,
    offline: O.Offline = False,
    overwrite: O.Overwrite = False,
    resume: O.Resume = True,
    dry_run_: Annotated[bool, typer.Option("--dry-run", help="Print the plan (measured on a couple of steps) "
                                                             "and exit; no training.")] = False,
    quiet: O.Quiet = False,
    verbose: O.Verbose = False,
    json_: Annotated[bool, typer.Option("--json", help="One JSON line per event on stdout.")] = False,
) -> None:
    """Fine-tune (--from) or train (--config) Inf-DiT with the official recipe.

    Checkpoints go to .OUTPUT.infdit-train/ beside the output every --every steps, with a validation sample
    grid; Ctrl-C or SIGTERM saves and stops, and the same command resumes where it stopped.
    """
    if verbose:
        override(debug=True)
    if (from_ is None) == (config is None):
        raise BadRequest("give one of --from WEIGHTS (fine-tune) or --config NAME (train from scratch)")
    if output.suffix != ".safetensors":
        raise BadRequest(f"-o {output}: the output is a .safetensors weights file")
    if os.path.lexists(output) and not overwrite and not dry_run_:  # a dangling link is there too
        raise OutputExists(f"{output} exists; pass --overwrite to replace it")
    if not data.is_dir():
        raise BadRequest(f"training data {data} is not a folder")
    budget = O.parse_budget(mem_budget)
    if sigma_std is not None and not sigma_std > 0:
        raise BadRequest(f"--sigma-std must be a positive number, got {sigma_std}")
    from ..train.loop import TrainConfig  # torch: after the usage checks

    cfg = TrainConfig(data=data, output=output, base=from_, config=config, steps=steps, batch=batch,
                      crop=crop, lr=lr, warmup=warmup, seed=seed, val=val, every=every, dtype=dtype,
                      device=device,
                      mem_budget=budget, workers=workers, accum=accum, ema=ema, checkpointing=checkpointing,
                      overwrite=overwrite, resume=resume, repo=repo, offline=offline or None,
                      sigma_mean=sigma_mean, sigma_std=sigma_std)
    if dry_run_:
        return _dry_run(cfg, json_)
    from ..train.loop import run_folder_for
    from ..train.loop import train as run_training

    display = _Display(json_, quiet)
    try:
        with _keep_progress(run_folder_for(output)):
            result = run_training(cfg, on_event=display)
    finally:
        display.stop()
    if json_:
        typer.echo(json.dumps({"event": "done", **asdict(result)}))
    elif not quiet and display.main:
        val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        typer.echo(safe(f"wrote {result.output} after {result.steps} steps in {result.seconds:.1f} s{val}"),
                   err=True)


def _dry_run(cfg, json_: bool) -> None:
    from ..train.loop import dry_run  # torch: kept off start-up (--help, usage errors)

    plan = dry_run(cfg)
    if json_:
        typer.echo(json.dumps(plan))
        return
    if plan["peak_bytes"] is not None:
        mem = f"{format_bytes(plan['peak_bytes'])} peak on the device (measured)"
    else:
        mem = (f"{format_bytes(plan['step_bytes'])} (estimated: {format_bytes(plan['state_bytes'])} of "
               f"weights, gradients and optimizer state + {format_bytes(plan['activation_bytes'])} of "
               "activations)")
    if plan["mem_budget"] is not None:
        mem += f", within --mem-budget {format_bytes(plan['mem_budget'])}"
    typer.echo(safe(f"train {plan['base']}: {plan['parameters'] / 1e6:.2f} M trainable parameters "
                    f"({plan['frozen_parameters'] / 1e6:.2f} M frozen CLIP) on {plan['device']}"))
    ckpt = "on" if plan["checkpointing"] else "off"
    typer.echo(f"  batch {cfg.batch} = {plan['micro_batch']} x {plan['accum']} accumulated, "
               f"crop {plan['crop']} px, activation checkpointing {ckpt}, lr {plan['lr']:g}, "
               f"warm-up {plan['warmup']} steps")
    typer.echo(f"  memory per step: {mem}")
    if plan["budget_changes"]:
        typer.echo(f"  the budget set: {'; '.join(plan['budget_changes'])}")
    typer.echo(f"  time: {plan['seconds_per_step']:.3f} s per step (measured over {plan['measured_steps']} "
               f"steps), {_duration(plan['total_seconds'])} for {cfg.steps} steps")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@contextlib.contextmanager
def _keep_progress(folder: Path):
    """A stop ends with one line saying where the run was saved and how to resume (exit 130/143/129)."""
    try:
        yield
    except KeyboardInterrupt as e:
        what = getattr(e, "what", "interrupted")
        err = Interrupted(f"{what}; the training state is saved in {folder}: run the same command again "
                          "to resume")
        err.exit_code = getattr(e, "exit_code", 130)
        raise err from None


class _Display:
    """Events as JSON lines (--json), or a rich progress bar on a terminal; rank 0 only."""

    def __init__(self, json_: bool, quiet: bool) -> None:
        self.json, self.quiet = json_, quiet
        self.main = settings().rank in (None, "0")  # torchrun's RANK; one process when unset
        self.progress = self.task = None
        self.console = None

    def __call__(self, event) -> None:
        if not self.main:
            return
        name = type(event).__name__
        if self.json:
            typer.echo(json.dumps({"event": name, **asdict(event)}, default=str))
            sys.stdout.flush()
            return
        if self.quiet:
            return
        from rich.console import Console

        if self.console is None:
            self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        if name == "Notice":
            self._print(safe(event.text))
        elif name == "TrainStarted":
            where = f"resuming at step {event.step}" if event.resumed else "starting"
            self._print(safe(f"training {event.parameters / 1e6:.2f} M parameters on {event.images} images, "
                             f"{event.ranks} rank(s) on {event.device}; {where}; run folder {event.path}"))
            if self.console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                         console=self.console, transient=True)
                self.task = self.progress.add_task("train", total=event.steps, completed=event.step, info="")
                self.progress.start()
        elif name == "TrainStep":
            if self.progress is not None:
                self.progress.update(self.task, completed=event.step,
                                     info=f"loss {event.loss:.4f}  {event.steps_per_s:.2f} steps/s")
        elif name == "TrainValidated":
            self._print(f"step {event.step}: validation loss {event.loss:.4f}"
                        + (safe(f", samples {event.grid}") if event.grid else ""))
        elif name == "TrainSaved" and self.progress is None:
            self._print(f"step {event.step}/{event.steps} saved ({format_bytes(event.nbytes)})")

    def _print(self, text: str) -> None:
        from rich.text import Text

        (self.progress.console if self.progress is not None else self.console).print(Text(text))

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
