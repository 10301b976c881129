"""Events the core emits through `on_event` callbacks. Frozen dataclasses; only the CLI renders them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchDone", "PlanChanged", "StepDone", "PassStarted", "PassDone", "Notice", "BytesDone",
           "SelftestStarted", "CheckStarted", "CheckDone", "MeasureDone",
           "CheckpointWritten", "Resumed", "CheckpointDiscarded", "JobStarted",
           "TrainStarted", "TrainStep", "TrainValidated", "TrainSaved"]


@dataclass(frozen=True)
class BatchDone:
    """`index` of `total` rectangles of one denoiser call are done."""

    index: int
    total: int
    n: int
    cached_blocks: int


@dataclass(frozen=True)
class PlanChanged:
    """The device ran out of memory under the plan `old`; `new` is used from now on (this pass and later)."""

    old: str
    new: str
    reason: str = "out of memory"


@dataclass(frozen=True)
class StepDone:
    """Heun step `i` of `steps` is done; `calls` denoiser calls so far."""

    i: int
    steps: int
    calls: int
    sigma: float


@dataclass(frozen=True)
class PassStarted:
    index: int
    total: int
    pass_: Any  # pipeline.Pass
    n: int | None


@dataclass(frozen=True)
class PassDone:
    index: int
    total: int


@dataclass(frozen=True)
class Notice:
    """Something the user should know that does not stop the work (dropped metadata, first frame only)."""

    text: str


@dataclass(frozen=True)
class BytesDone:
    """`done` of `total` bytes (None: unknown) of the download `what` have arrived."""

    what: str
    done: int
    total: int | None


@dataclass(frozen=True)
class SelftestStarted:
    """`selftest` is about to run `planned` checks, each (label, predicted seconds), within `time_budget`
    seconds (None: no limit); `rate` is the FLOP/s the predictions assume."""

    device: str
    profile: str
    environment: dict
    time_budget: float | None
    rate: float
    planned: list


@dataclass(frozen=True)
class CheckStarted:
    """`selftest` began check `index` of `total`."""

    index: int
    total: int
    name: str


@dataclass(frozen=True)
class CheckDone:
    """`selftest` finished a check; `check` is its `selftest.Check` row."""

    index: int
    total: int
    check: Any


@dataclass(frozen=True)
class MeasureDone:
    """`bench` finished measurement `index` of `total` (`label`: what was measured). `work` of
    `work_total` done, in FLOPs x calls: proportional to time, for an ETA."""

    index: int
    total: int
    label: str
    work: float
    work_total: float


@dataclass(frozen=True)
class CheckpointWritten:
    """Step `step` of pass `pass_` is saved in the run folder `path` (`nbytes` copied, in `seconds`)."""

    pass_: int
    passes: int
    step: int
    steps: int
    nbytes: int
    seconds: float
    path: str


@dataclass(frozen=True)
class Resumed:
    """Continuing from the checkpoint in `path`: pass `pass_` of `passes`, after step `step` of `steps`."""

    pass_: int
    passes: int
    step: int
    steps: int
    saved_at: float  # seconds since the epoch
    path: str


@dataclass(frozen=True)
class CheckpointDiscarded:
    """The run folder `path` was not used (`reason`: other input, weights or options, or damaged) and
    removed."""

    path: str
    reason: str


@dataclass(frozen=True)
class JobStarted:
    """The whole job: `work[i]` is pass i's share of the compute (sums to 1), `calls` per pass, `seconds[i]`
    pass i's predicted wall time (the cost model's) on `device`; `gpu_seconds`: on a CPU, when the job is
    predicted to take over an hour, what a CUDA GPU would take (`pipeline.gpu_seconds`)."""

    work: list[float]
    calls: int
    seconds: list[float] = field(default_factory=list)
    device: str = ""
    gpu_seconds: float | None = None


@dataclass(frozen=True)
class TrainStarted:
    """`infdit train` begins at `step` (0, or where a run folder `path` left off) of `steps`, training
    `parameters` weights on `images` images with `ranks` processes on `device`."""

    step: int
    steps: int
    parameters: int
    images: int
    ranks: int
    device: str
    path: str
    resumed: bool


@dataclass(frozen=True)
class TrainStep:
    """Optimizer step `step` of `steps` is done: its loss (mean over the global batch), learning rate, and
    the recent pace."""

    step: int
    steps: int
    loss: float
    lr: float
    steps_per_s: float


@dataclass(frozen=True)
class TrainValidated:
    """Validation after `step`: the loss on the fixed crops, sigmas and noise, and the sample grid `grid`
    (LR, bicubic, model, HR; None when not drawn)."""

    step: int
    loss: float
    grid: str | None


@dataclass(frozen=True)
class TrainSaved:
    """The training state after `step` is committed in the run folder `path` (`nbytes`, in `seconds`)."""

    step: int
    steps: int
    nbytes: int
    seconds: float
    path: str
