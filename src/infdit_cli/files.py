"""Files replaced whole or not at all.

`atomic_write` writes a temporary file beside the target (same folder, so the rename cannot cross a file
system), fsyncs it and renames it over the target with `os.replace`: a reader, or a crash, sees the old file
or the new one, never half of one. On any failure the temporary file is removed and the target is untouched.
`storage.SafeFolder.write` does the same relative to a directory descriptor (a job's state folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set back at once
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes | str | Callable[[str], None], *, mode: int | None = None
                 ) -> Path:
    """Replace `path` with `data`, whole or not at all; returns `path`.

    Args:
        path: the file to write; its folder must exist.
        data: bytes, text (UTF-8), or a function given the temporary file's name that writes it (for
            libraries that save to a name: safetensors, Pillow); it may raise to abandon the write.
        mode: the new file's permission bits; by default what `open()` gives (0o666 less the umask).

    Raises:
        Whatever writing or renaming raises; the temporary file is gone and `path` is as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~umask() if mode is None else mode)
            if callable(data):
                data(tmp)  # by name: the writer may truncate or replace the file, so sync what is there now
                os.close(fd)
                fd = -1
                fd = os.open(tmp, os.O_RDONLY)
            else:
                view = memoryview(data.encode() if isinstance(data, str) else data)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
