"""Upscaling a folder: find the images, mirror the tree, skip what is done, never stop on one bad file.

`plan_batch` decides everything up front from the listing alone (output names, collisions, what exists),
so a re-run makes the same decisions; `run_batch` then upscales the files left to do, and any exception
from one file (except Ctrl-C) is recorded against it while the rest go on.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..distributed.world import World, gather
from ..errors import BadImage, BadRequest, InfditError
from ..events import Notice
from ..images.load import SUFFIXES, probe_size
from ..images.save import is_infdit_output
from .pipeline import target_size

__all__ = ["BatchItem", "BatchReport", "find_images", "plan_batch", "preview_batch", "run_batch",
           "IMAGE_SUFFIXES", "Counter", "batch_costs", "run_batch_sharded", "shard"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class BatchItem:
    input: str
    output: str
    status: str  # todo (planned) | done | skipped | failed
    reason: str = ""  # why skipped or failed; for a preview, the planned size change
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)  # what was dropped or changed (Notice texts)
    rank: int | None = None  # under torchrun: the rank that upscaled it (None: one process)


@dataclass
class BatchReport:
    items: list[BatchItem] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(i.status == status for i in self.items)


def find_images(root: Path, *, recursive: bool = False, glob: str | None = None,
                exclude: Path | None = None) -> list[Path]:
    """Image files under `root` (by suffix, case-insensitive, or matching `glob`), sorted; nothing under
    `exclude` (an output folder inside the input is never read back) and no hidden files."""
    root = Path(root)
    if not root.is_dir():
        raise BadImage(f"no such folder: {root}")
    skip = Path(exclude).resolve() if exclude is not None else None
    files = root.rglob("*") if recursive else root.glob("*")
    out = []
    for f in files:
        if f.name.startswith(".") or not f.is_file():
            continue
        if skip is not None and skip in f.resolve().parents:
            continue
        name = f.name.lower()
        ok = fnmatch.fnmatch(name, glob.lower()) if glob else f.suffix.lower() in IMAGE_SUFFIXES
        if ok:
            out.append(f)
    return sorted(out)


def _error_text(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, InfditError) else f"{type(e).__name__}: {text}".rstrip(": ")


def plan_batch(root: Path, out_root: Path, *, recursive: bool = False, glob: str | None = None,
               overwrite: bool = False) -> list[BatchItem]:
    """Every input with its output path and status (`todo`, or `skipped` where the output exists, or
    `failed` where no unambiguous output name exists), decided from the listing alone.

    Formats infdit does not write (GIF, BMP, ...) become PNG. Where two inputs would map to one output
    (photo.gif and photo.png), the converted one keeps its source extension (photo.gif.png); a collision
    that remains is refused for both files, never resolved by skipping one silently.

    Raises:
        BadImage: `root` is not a folder.
        BadRequest: `out_root` is `root` itself, or an existing file.
    """
    root, out_root = Path(root), Path(out_root)
    if not root.is_dir():
        raise BadImage(f"no such folder: {root}")
    if out_root.resolve() == root.resolve():
        raise BadRequest(f"the output folder is the input folder {root}; choose another with -o")
    if out_root.exists() and not out_root.is_dir():
        raise BadRequest(f"output folder {out_root} is a file")
    files = find_images(root, recursive=recursive, glob=glob, exclude=out_root)
    natural = {}
    for src in files:
        dst = out_root / src.relative_to(root)
        natural[src] = dst if dst.suffix.lower() in SUFFIXES else dst.with_suffix(".png")
    claims: dict[str, list[Path]] = {}
    for src, dst in natural.items():
        # casefold: outputs may land on a FAT/APFS disk
        claims.setdefault(str(dst).casefold(), []).append(src)
    final = dict(natural)
    for srcs in claims.values():
        if len(srcs) > 1:
            for src in srcs:
                if natural[src].suffix != src.suffix:  # converted: keep the source extension in the name
                    final[src] = natural[src].with_name(src.name + ".png")
    owners: dict[str, list[Path]] = {}
    for src, dst in final.items():
        owners.setdefault(str(dst).casefold(), []).append(src)
    items = []
    for src in files:
        dst = final[src]
        item = BatchItem(str(src), str(dst), "todo")
        rivals = [s for s in owners[str(dst).casefold()] if s != src]
        if rivals:
            item.status = "failed"
            item.reason = f"output {dst} would also be written for {', '.join(map(str, rivals))}; rename one"
        elif dst.exists() and not overwrite:
            item.status, item.reason = "skipped", "output exists"
        elif is_infdit_output(src):  # an earlier run's output left among the inputs (another -o)
            item.status, item.reason = "skipped", "an infdit output (its Software tag), not an input"
        items.append(item)
    return items


def preview_batch(items: list[BatchItem], *, res: str | None, scale: float | None,
                  max_pixels: int | None) -> list[BatchItem]:
    """For `--dry-run`: each `todo` item gets its size change as `reason` (from the header alone), or
    becomes `failed` with the reason the real run would give for the input or the target."""
    for item in items:
        if item.status != "todo":
            continue
        try:
            h, w = probe_size(item.input, max_pixels=max_pixels)
            th, tw = target_size((h, w), res=res, scale=scale)
            item.reason = f"{w}x{h} -> {tw}x{th}"
        except InfditError as e:
            item.status, item.reason = "failed", _error_text(e)
    return items


def run_batch(upscaler, root: Path, out_root: Path, *, res: str | None, scale: float | None, recursive: bool,
              glob: str | None, overwrite: bool, quality: int, max_pixels: int | None,
              on_event: Callable[[object], None] | None = None,
              on_item: Callable[[BatchItem], None] | None = None,
              on_start: Callable[[Path], None] | None = None,
              items: list[BatchItem] | None = None, checkpoint: bool | None = None,
              resume: bool = True, depth: int | None = None) -> BatchReport:
    """Upscale every image under `root` into the mirrored tree `out_root`; failures are recorded, not raised.

    `items` is a `plan_batch` result to run (planned here when None). Only KeyboardInterrupt and
    SystemExit stop the batch; the file being written then leaves no output behind, only its run folder
    when checkpoints are on (`checkpoint`, `resume`, `depth`: as `Upscaler.upscale_file`), so a re-run skips
    the finished files and continues that one from its last step.
    """
    if items is None:
        items = plan_batch(root, out_root, recursive=recursive, glob=glob, overwrite=overwrite)
    report = BatchReport()
    for item in items:
        if item.status == "todo":
            _run_one(upscaler, item, res=res, scale=scale, quality=quality, overwrite=overwrite,
                     max_pixels=max_pixels, on_event=on_event, on_start=on_start, checkpoint=checkpoint,
                     resume=resume, depth=depth)
        report.items.append(item)
        if on_item is not None:
            on_item(item)
    return report


def _run_one(upscaler, item: BatchItem, *, res, scale, quality, overwrite, max_pixels, on_event,
             on_start, checkpoint=None, resume=True, depth=None) -> None:
    src, dst = Path(item.input), Path(item.output)

    def emit(event: object) -> None:
        if isinstance(event, Notice):
            item.warnings.append(event.text)
        if on_event is not None:
            on_event(event)

    if on_start is not None:
        on_start(src)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        result = upscaler.upscale_file(src, dst, res=res, scale=scale, quality=quality, overwrite=overwrite,
                                       max_pixels=max_pixels, on_event=emit, checkpoint=checkpoint,
                                       resume=resume, depth=depth)
        item.status, item.seconds = "done", result.seconds
    except Exception as e:  # noqa: BLE001 - one bad file never stops the rest, whatever it raises
        item.status, item.reason = "failed", _error_text(e)


# --------------------------------------------------------------------------------------------------------
# A batch across ranks: each file to one rank (`shard`), the report gathered on rank 0
# --------------------------------------------------------------------------------------------------------


def batch_costs(items, *, res: str | None, scale: float | None, max_pixels: int | None) -> list[float]:
    """Work of each item: its target's pixels (from the header alone); 0 for what is not to do or cannot
    be read (it fails in a moment on whichever rank gets it)."""
    out = []
    for item in items:
        cost = 0.0
        if item.status == "todo":
            try:
                th, tw = target_size(probe_size(item.input, max_pixels=max_pixels), res=res, scale=scale)
                cost = float(th * tw)
            except InfditError:
                pass
        out.append(cost)
    return out


def run_batch_sharded(upscaler, root, out_root, items, world: World, *, res: str | None, scale: float | None,
                      max_pixels: int | None, on_item: Callable | None = None,
                      on_idle: Callable[[], None] | None = None, **run_kw):
    """`batch.run_batch` over this rank's share of `items` (rank 0's plan, the same on every rank); the
    whole job's report on rank 0, None elsewhere.

    Files to do are dealt by `shard` on their target pixels; what is skipped or refused at planning is
    reported by rank 0 and costs nobody anything. Every file is thus written by exactly one rank.
    `on_item` is called on every rank for its own items; `on_idle` when this rank's share is done, before
    the reports are gathered (rank 0 follows the others' progress there through a `Counter`).
    """
    owner = shard(batch_costs(items, res=res, scale=scale, max_pixels=max_pixels), world.size)
    mine = []
    for k, item in enumerate(items):
        if item.status != "todo":
            owner[k] = 0
        if owner[k] == world.rank:
            if item.status == "todo":
                item.rank = world.rank
            mine.append(item)
    report = run_batch(upscaler, root, out_root, res=res, scale=scale, max_pixels=max_pixels, on_item=on_item,
                       items=mine, **run_kw)
    if on_idle is not None:
        on_idle()
    parts = gather(report.items, world)
    if parts is None:
        return None
    done = {it.input: it for part in parts for it in part}
    return BatchReport([done[it.input] for it in items])  # the plan's order, whatever rank did what


def shard(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank of each job: longest first, each to the least-loaded rank (LPT; ties to the lower index).

    Deterministic: the same costs give the same assignment on every rank and every run. The busiest rank
    ends at most 4/3 of the optimum (Graham 1969), where equal counts can be arbitrarily worse.
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner


class Counter:
    """A job-wide counter in the rendezvous store (files finished by any rank), for rank 0's display."""

    def __init__(self, world: World, key: str = "infdit/done") -> None:
        self.world, self.key, self.store = world, key, None
        if world.distributed:
            import torch.distributed as dist

            self.store = dist.distributed_c10d._get_default_store()

    def add(self, n: int = 1) -> int:
        return self.store.add(self.key, n) if self.store is not None else 0

    def value(self) -> int:
        return self.add(0)

    def wait(self, total: int, on_change: Callable[[int], None], poll: float = 0.2) -> None:
        """Until `total` is reached, report each new value (rank 0 waiting for the others' last files)."""
        seen = -1
        while self.store is not None:
            v = self.value()
            if v != seen:
                on_change(v)
                seen = v
            if v >= total:
                return
            time.sleep(poll)
