"""Where image-sized state lives: ordinary memory, or memory-mapped files in a scratch folder.

`--low-memory` puts the sampler state and the host side of the K/V cache in files next to the output, so
the process keeps only what it is working on resident: after each piece of work the engine calls `trim`,
which drops the mapped pages from this process (`madvise(MADV_DONTNEED)`; the data stays in the file and
the page cache, which the kernel writes back and reclaims as it needs). The folder is removed by `close`,
which the pipeline calls on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["Scratch"]


class Scratch:
    """Allocates named CPU tensors, in RAM (`folder=None`) or as memory-mapped files in a new folder.

    Args:
        folder: parent directory for a new private scratch folder (`.infdit-<random>`), or None for RAM.
        pin: pin RAM tensors (page-locked, for fast asynchronous copies to CUDA); ignored for files.
    """

    def __init__(self, folder: str | Path | None = None, *, pin: bool = False) -> None:
        self.pin = pin
        self.path = Path(tempfile.mkdtemp(prefix=".infdit-", dir=folder)) if folder is not None else None
        self._maps: dict[str, mmap.mmap] = {}

    @property
    def mapped(self) -> bool:
        return self.path is not None

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new uninitialised tensor called `name` (a file `name.bin` when mapped)."""
        self.release(name)
        if self.path is None:
            return torch.empty(shape, dtype=dtype, pin_memory=self.pin)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = max(1, numel * torch.empty(0, dtype=dtype).element_size())
        file = self.path / f"{name}.bin"
        with open(file, "w+b") as f:
            f.truncate(nbytes)  # sparse: no disk is used until pages are written
            mm = mmap.mmap(f.fileno(), nbytes)
        self._maps[name] = mm
        return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)

    def release(self, name: str) -> None:
        """Forget `name`; its file is removed (the mapping lives on while a tensor still views it)."""
        self._maps.pop(name, None)
        if self.path is not None:
            (self.path / f"{name}.bin").unlink(missing_ok=True)

    def trim(self) -> None:
        """Drop every mapped page from this process's resident memory (no-op in RAM)."""
        for mm in self._maps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # platform without madvise: the kernel decides
                pass

    def disk_bytes(self) -> int:
        """Bytes the scratch files hold on disk now."""
        if self.path is None:
            return 0
        return sum(os.stat(f).st_blocks * 512 for f in self.path.glob("*.bin"))

    def close(self) -> None:
        """Remove the folder and everything in it."""
        self._maps.clear()
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
