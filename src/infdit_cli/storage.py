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
import weakref
from pathlib import Path

import torch

__all__ = ["Scratch"]


def _pin(t: torch.Tensor) -> bool:
    """Page-lock `t`'s memory where it is (cudaHostRegister): exactly its bytes, where `pin_memory=True`
    would round the block up to a power of two (a 22 GiB K/V slab would pin 32 GiB) and keep it cached
    after it is freed. False when CUDA refuses."""
    try:
        rt = torch.cuda.cudart()
        return rt.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0) == rt.cudaError.success
    except (RuntimeError, AssertionError, AttributeError):
        return False


def _unpin(t: torch.Tensor) -> None:
    torch.cuda.synchronize()  # no copy from these pages may still be in flight
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class Scratch:
    """Allocates named CPU tensors, in RAM (`folder=None`) or as memory-mapped files in a new folder.

    Args:
        folder: parent directory for a new private scratch folder (`.infdit-<random>`), or None for RAM.
        pin: pin RAM tensors (page-locked, for fast asynchronous copies to CUDA) for as long as this
            scratch lives; ignored for files. Set to False when CUDA refuses to pin.
        path: use this folder itself instead (a checkpoint's run folder): `close` then removes only the
            files this scratch made, and keeps those it is told to.
    """

    def __init__(self, folder: str | Path | None = None, *, pin: bool = False, path: str | Path | None = None
                 ) -> None:
        self.pin = pin
        self.owned = path is None
        if path is not None:
            Path(path).mkdir(parents=True, exist_ok=True)
            self.path: Path | None = Path(path)
        else:
            self.path = Path(tempfile.mkdtemp(prefix=".infdit-", dir=folder)) if folder is not None else None
        self._maps: dict[str, mmap.mmap] = {}
        self._made: set[str] = set()

    @property
    def mapped(self) -> bool:
        return self.path is not None

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *, reuse: bool = False) -> torch.Tensor:
        """A new uninitialised tensor called `name` (a file `name.bin` when mapped). With `reuse`, an
        existing file of exactly the right size is mapped as it is (its contents are the tensor's)."""
        if self.path is None:
            t = torch.empty(shape, dtype=dtype)
            if self.pin:
                if _pin(t):
                    weakref.finalize(self, _unpin, t)  # holds t: unpinned first, freed after
                else:  # refused (page-locked memory is limited): unpinned works, its copies just wait
                    self.pin = False
            return t
        numel = 1
        for s in shape:
            numel *= s
        nbytes = max(1, numel * torch.empty(0, dtype=dtype).element_size())
        file = self.file(name)
        keep = reuse and file.is_file() and file.stat().st_size == nbytes
        if not keep:
            self.release(name)
        with open(file, "r+b" if keep else "w+b") as f:
            if not keep:
                f.truncate(nbytes)  # sparse: no disk is used until pages are written
            mm = mmap.mmap(f.fileno(), nbytes)
        self._maps[name] = mm
        self._made.add(name)
        return torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)

    def file(self, name: str) -> Path:
        """The file behind `name` (mapped scratch only)."""
        assert self.path is not None
        return self.path / f"{name}.bin"

    def flush(self, name: str) -> None:
        """Write `name`'s dirty pages to its file and wait for the disk (msync)."""
        mm = self._maps.get(name)
        if mm is not None:
            mm.flush()

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

    def close(self, keep: tuple[str, ...] = ()) -> None:
        """Remove the folder and everything in it; for a folder given as `path`, only the files this
        scratch made, except the names in `keep` (flushed first)."""
        for name in keep:
            self.flush(name)
        self._maps.clear()
        if self.path is not None:
            if self.owned:
                shutil.rmtree(self.path, ignore_errors=True)
            else:
                for name in self._made - set(keep):
                    self.file(name).unlink(missing_ok=True)
            self.path = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
