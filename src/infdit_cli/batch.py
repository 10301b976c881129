"""Upscaling a folder: find the images, mirror the tree, skip what is done, never stop on one bad file."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadRequest, InfditError

__all__ = ["BatchItem", "BatchReport", "find_images", "run_batch", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass
class BatchItem:
    input: str
    output: str
    status: str  # done | skipped | failed
    reason: str = ""
    seconds: float = 0.0


@dataclass
class BatchReport:
    items: list[BatchItem] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(i.status == status for i in self.items)


def find_images(root: Path, *, recursive: bool = False, glob: str | None = None,
                exclude: Path | None = None) -> list[Path]:
    """Image files under `root` (by suffix, case-insensitive, or matching `glob`), sorted."""
    if not root.is_dir():
        raise BadRequest(f"not a directory: {root}")
    files = root.rglob("*") if recursive else root.glob("*")
    out = []
    for f in files:
        if not f.is_file() or f.name.startswith("."):
            continue
        if exclude is not None and exclude in f.parents:
            continue
        name = f.name.lower()
        ok = fnmatch.fnmatch(name, glob.lower()) if glob else f.suffix.lower() in IMAGE_SUFFIXES
        if ok:
            out.append(f)
    return sorted(out)


def run_batch(upscaler, root: Path, out_root: Path, *, res: str | None, scale: float | None, recursive: bool,
              glob: str | None, overwrite: bool, quality: int, max_pixels: int | None,
              on_event: Callable[[object], None] | None = None,
              on_item: Callable[[BatchItem], None] | None = None,
              on_start: Callable[[Path], None] | None = None) -> BatchReport:
    """Upscale every image under `root` into the mirrored tree `out_root`; failures are recorded, not raised."""
    report = BatchReport()
    files = find_images(root, recursive=recursive, glob=glob, exclude=out_root)
    for src in files:
        dst = out_root / src.relative_to(root)
        if dst.suffix.lower() in (".bmp", ".gif"):
            dst = dst.with_suffix(".png")  # formats we do not write: PNG keeps every pixel
        item = BatchItem(str(src), str(dst), "done")
        if dst.exists() and not overwrite:
            item.status, item.reason = "skipped", "output exists"
        else:
            if on_start is not None:
                on_start(src)
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                result = upscaler.upscale_file(src, dst, res=res, scale=scale, quality=quality,
                                               overwrite=overwrite, max_pixels=max_pixels, on_event=on_event)
                item.seconds = result.seconds
            except InfditError as e:
                item.status, item.reason = "failed", str(e)
            except (OSError, ValueError, RuntimeError) as e:  # one bad file never stops the rest
                item.status, item.reason = "failed", f"{type(e).__name__}: {e}"
        report.items.append(item)
        if on_item is not None:
            on_item(item)
    return report
