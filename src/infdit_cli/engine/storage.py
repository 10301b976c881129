"""Where image-sized state lives: ordinary memory, or memory-mapped files in a scratch folder.

`--low-memory` puts the sampler state and the host side of the K/V cache in files next to the output, so
the process keeps only what it is working on resident: after each piece of work the engine calls `trim`,
which drops the mapped pages from this process (`madvise(MADV_DONTNEED)`; the data stays in the file and
the page cache, which the kernel writes back and reclaims as it needs). The folder is removed by `close`,
which the pipeline calls on success, on error and on Ctrl-C.

Every folder infdit leaves state in (scratch and run folders) is a `SafeFolder`: a real directory (never a
link), owned by this user, not writable by group or others, holding infdit's marker file `.infdit`, which
records the name of every file infdit creates there before it is created. Files inside are opened relative
to the folder's descriptor with O_NOFOLLOW (and O_EXCL when new); removal deletes only the names the marker
records, then the marker, then the (then empty) folder: a folder is never emptied by listing it. A scratch
folder's marker also records its owner's pid and stays flock-ed while the owner lives, so any later run can
tell an abandoned scratch folder (SIGKILL, power cut) from a live one and reclaim it (`reclaim_stale`).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import re
import secrets
import stat
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from ..errors import DiskFull, UnsafePath, no_space
from ..units import format_bytes

__all__ = ["Scratch", "SafeFolder", "reclaim_stale", "allocate", "MARKER"]

MARKER = ".infdit"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
COMPACT_AT = 4096  # a marker over this (and over twice its size after the last rewrite) is rewritten
# Markers are appended to and rewritten under one lock per process (a folder is written by one process:
# the jobs folder's flock, the output's lock); `_GONE`: per folder (st_dev, st_ino), the recorded names
# this process itself removed or renamed away, which a rewrite may drop; `_COMPACTED`: the size after it.
_MARKER_LOCK = threading.Lock()
_GONE: dict[tuple[int, int], set[str]] = {}
_COMPACTED: dict[tuple[int, int], int] = {}


def allocate(fd: int, nbytes: int, where: Path) -> None:
    """Give the file `fd` `nbytes` of real disk blocks (posix_fallocate), so a full disk is an error now and
    never a SIGBUS when a mapped page is written later. DiskFull names `where`."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
        else:  # pragma: no cover - macOS: no posix_fallocate; a plain (possibly sparse) size
            os.ftruncate(fd, nbytes)
    except OSError as e:
        if no_space(e):
            raise DiskFull(f"no space left in {where} for {_size(nbytes)} of state files") from None
        raise


def _size(n: int) -> str:

    return format_bytes(n)


class SafeFolder:
    """A folder infdit made and owns (see the module doc). `create`: make it (mode 0700) if nothing is at
    `path`; else whatever is there must pass `check`.

    Raises:
        UnsafePath: `path` is a link, a file, another user's folder, writable by others, or has no marker.
    """

    def __init__(self, path: str | Path, kind: str, *, create: bool = True, pid: bool = False,
                 fresh: bool = False) -> None:
        self.path = Path(path)
        self.kind = kind
        self.lock_fd = None
        made = fresh  # `path` was just made by this process (mkdtemp)
        if create and not os.path.lexists(self.path):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # a --checkpoint-dir's parents
                os.mkdir(self.path, 0o700)
                made = True
            except FileExistsError:
                pass
        self.fd = self._open_dir()
        st = os.fstat(self.fd)
        self._key = (st.st_dev, st.st_ino)
        try:
            if made:
                self._write_marker(pid)
            else:
                self._check_marker()
        except BaseException:
            os.close(self.fd)
            raise

    # -- checks -------------------------------------------------------------------------------------------
    def _refuse(self, why: str) -> UnsafePath:
        return UnsafePath(f"{self.kind} {self.path} {why}; infdit never writes into or deletes what it did "
                          "not make: move it away or remove it")

    def _open_dir(self) -> int:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise self._refuse("does not exist") from None
        if stat.S_ISLNK(st.st_mode):
            raise self._refuse("is a symbolic link")
        if not stat.S_ISDIR(st.st_mode):
            raise self._refuse("is not a folder")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
        except OSError as e:
            raise self._refuse(f"cannot be opened ({e.strerror})") from None
        st = os.fstat(fd)
        why = None
        if not stat.S_ISDIR(st.st_mode):
            why = "is not a folder"
        elif hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            why = f"belongs to another user (uid {st.st_uid})"
        elif st.st_mode & 0o022:
            why = f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        if why:
            os.close(fd)
            raise self._refuse(why)
        return fd

    def _check_marker(self) -> None:
        try:
            fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        except OSError:
            raise self._refuse(f"has no {MARKER} marker (not made by infdit)") from None
        try:
            st = os.fstat(fd)
            head = os.read(fd, 64).split(b"\n", 1)[0] if stat.S_ISREG(st.st_mode) else b""
        finally:
            os.close(fd)
        if head != f"infdit {self.kind}".encode():
            raise self._refuse(f"has a foreign {MARKER} marker (not made by infdit as a {self.kind})")

    def _write_marker(self, pid: bool) -> None:
        # Written under a temporary name, locked (scratch), then renamed: a marker is never seen unlocked
        # while its owner lives.
        tmp = f"{MARKER}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=self.fd)
        if pid:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.lock_fd = fd
        os.write(fd, f"infdit {self.kind}\n{'pid ' + str(os.getpid()) if pid else ''}\n".encode())
        os.replace(tmp, MARKER, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if not pid:
            os.close(fd)

    # -- records ------------------------------------------------------------------------------------------
    def record(self, name: str) -> None:
        """Record `name` as infdit's before something else writes it here (a file made by another library,
        which `remove` should then delete)."""
        self._record(name)

    def _record(self, name: str) -> None:
        if not _NAME.fullmatch(name) or name == MARKER:
            raise ValueError(f"bad file name {name!r}")
        with _MARKER_LOCK:
            _GONE.get(self._key, set()).discard(name)  # recorded again: kept by a rewrite until it goes again
            fd = os.open(MARKER, os.O_WRONLY | os.O_APPEND | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
            try:
                os.write(fd, f"+{name}\n".encode())
            finally:
                os.close(fd)

    def _gone(self, name: str) -> None:
        """`name` was removed or renamed away by this process: a rewrite of the marker may drop it."""
        with _MARKER_LOCK:
            _GONE.setdefault(self._key, set()).add(name)
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        try:
            size = os.stat(MARKER, dir_fd=self.fd, follow_symlinks=False).st_size
        except OSError:
            return
        if size > max(COMPACT_AT, 2 * _COMPACTED.get(self._key, 0)):
            self.compact()

    def compact(self) -> bool:
        """Rewrite the marker with its header and, once each, the recorded names that still exist or that this
        process did not remove itself (a name recorded and not yet created stays). Atomic (a new file under a
        temporary name, O_EXCL|O_NOFOLLOW, fsync, rename over the marker), so a crash leaves the old marker or
        the new one. Not for a scratch folder's marker, which its owner holds locked: False then, or when the
        marker cannot be read or rewritten (it stays as it was)."""
        with _MARKER_LOCK:
            try:
                fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
            except OSError:
                return False
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return False
                data = b""
                while chunk := os.read(fd, 1 << 16):
                    data += chunk
            finally:
                os.close(fd)
            lines = data.decode("utf-8", "replace").split("\n")
            head = [ln for ln in lines[:2] if not ln.startswith("+")]
            if len(head) != 2 or head[0] != f"infdit {self.kind}" or head[1].startswith("pid "):
                return False
            gone = _GONE.get(self._key, set())
            keep = []
            for n in dict.fromkeys(ln[1:] for ln in lines[2:] if ln.startswith("+")):
                if not _NAME.fullmatch(n):
                    continue
                if n in gone:
                    try:
                        os.stat(n, dir_fd=self.fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    except OSError:
                        pass
                keep.append(n)
            text = "\n".join(head) + "\n" + "".join(f"+{n}\n" for n in keep)
            tmp = f"{MARKER}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600,
                             dir_fd=self.fd)
            except OSError:
                return False
            try:
                try:
                    os.write(fd, text.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, MARKER, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            except OSError:  # a full disk: the old marker stays, whole
                try:
                    os.unlink(tmp, dir_fd=self.fd)
                except OSError:
                    pass
                return False
            _GONE[self._key] = gone & set(keep)  # a dropped name is no longer in the marker to drop
            _COMPACTED[self._key] = len(text)
            return True

    def records(self) -> list[str]:
        """The names of every file infdit made here (in the order made, without repeats)."""
        try:
            fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        except OSError:
            return []
        try:
            data = b""
            while chunk := os.read(fd, 1 << 16):
                data += chunk
        finally:
            os.close(fd)
        names = [ln[1:] for ln in data.decode("utf-8", "replace").splitlines() if ln.startswith("+")]
        return list(dict.fromkeys(n for n in names if _NAME.fullmatch(n)))

    def owner_pid(self) -> int | None:
        try:
            fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
            try:
                lines = os.read(fd, 256).decode("utf-8", "replace").splitlines()
            finally:
                os.close(fd)
            has_pid = len(lines) > 1 and lines[1].startswith("pid ")
            return int(lines[1].removeprefix("pid ")) if has_pid else None
        except (OSError, ValueError):
            return None

    # -- files --------------------------------------------------------------------------------------------
    def create(self, name: str) -> int:
        """A new file `name` (recorded first, then O_CREAT|O_EXCL|O_NOFOLLOW, 0600); an old one is
        replaced."""
        self._record(name)
        self._unlink(name)  # not `unlink`: the name stays recorded, it is made again at once
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=self.fd)

    def temp(self, name: str) -> tuple[str, int]:
        """A new temporary file for `name`, named uniquely for this process: (its name, its fd)."""
        tmp = f"{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        return tmp, self.create(tmp)

    def open(self, name: str, *, write: bool = False) -> int:
        """An existing regular file `name` (never through a link)."""
        fd = os.open(name, (os.O_RDWR if write else os.O_RDONLY) | _NOFOLLOW | _CLOEXEC, dir_fd=self.fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{name} is not a regular file")
        return fd

    def size(self, name: str) -> int | None:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def replace(self, src: str, dst: str) -> None:
        """Rename `src` to `dst` (recorded) and make it durable (fsync of the folder)."""
        self._record(dst)
        os.replace(src, dst, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        self._gone(src)

    def write(self, name: str, data: bytes, what: str = "a file") -> None:
        """Replace `name` with `data` atomically and durably (a temporary file, fsync, rename).

        Raises:
            DiskFull: no space (or quota) left here for `what`; the temporary file is removed.
        """
        tmp, fd = self.temp(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.replace(tmp, name)
        except BaseException as e:
            self.unlink(tmp)
            if no_space(e):
                raise DiskFull(f"no space left in {self.path} for {what}") from None
            raise

    def unlink(self, name: str) -> None:
        """Remove `name` (a link itself, never its target); the marker may then be rewritten compactly."""
        self._unlink(name)
        if name != MARKER:
            self._gone(name)

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)  # never follows: a link is removed, not its target
        except FileNotFoundError:
            pass

    def disk_bytes(self, names=None) -> int:
        total = 0
        for n in self.records() if names is None else names:
            try:
                st = os.stat(n, dir_fd=self.fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
        return total

    def remove(self) -> bool:
        """Delete every file the marker records, the marker, and the folder if it is then empty (False if
        something infdit did not make stays in it: the folder is then kept)."""
        for n in self.records():
            self._unlink(n)
        self._unlink(MARKER)
        with _MARKER_LOCK:
            _GONE.pop(self._key, None)
            _COMPACTED.pop(self._key, None)
        self.close()
        try:
            os.rmdir(self.path)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if getattr(self, "lock_fd", None) is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def reclaim_stale(parent: str | Path) -> list[tuple[Path, int | None, int]]:
    """Remove the scratch folders in `parent` whose owner is gone (their marker is not locked); returns
    (folder, owner pid, bytes freed) for each. Folders without our marker are left alone."""
    out = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(".infdit-")]
    except OSError:
        return out
    for e in entries:
        try:
            sf = SafeFolder(e.path, "scratch folder", create=False)
        except (UnsafePath, OSError):
            continue
        try:
            fd = os.open(MARKER, os.O_RDONLY | _NOFOLLOW | _CLOEXEC, dir_fd=sf.fd)
        except OSError:
            sf.close()
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner lives
            os.close(fd)
            sf.close()
            continue
        pid, freed = sf.owner_pid(), sf.disk_bytes()
        sf.remove()
        os.close(fd)
        out.append((Path(e.path), pid, freed))
    return out


def _pin(t: torch.Tensor):
    """Page-lock `t`'s memory where it is: exactly its bytes, where `pin_memory=True` would round the block
    up to a power of two (a 22 GiB K/V slab would pin 32 GiB) and keep it cached after it is freed.

    Returns the function that unpins it (call it with `t` before the memory is freed), or None when CUDA
    refuses (some sandboxed runtimes do; page-locked memory is limited). A refusal must leave CUDA's error
    state clean: the runtime's `cudaHostRegister` records its failure as the thread's last error, which the
    next kernel launch's check would report as its own ("CUDA error: ..."), losing the job. So the driver
    API's `cuMemHostRegister` is used where it can be (it has no such state), and where the runtime's is
    used, its last error is read (and so cleared) after a refusal.
    """
    ptr, size = t.data_ptr(), t.numel() * t.element_size()
    drv = _cuda_driver()
    if drv is not None:
        done = drv.register(ptr, size)
        if done is not None:  # answered: pinned, or refused with nothing left behind
            return (lambda t: drv.unregister(t.data_ptr())) if done else None
    try:
        rt = torch.cuda.cudart()
    except (RuntimeError, AssertionError, AttributeError):
        return None
    try:
        ok = rt.cudaHostRegister(ptr, size, 0) == rt.cudaError.success
    except (RuntimeError, AttributeError):
        ok = False
    if not ok:
        _clear_runtime_error()
        return None
    return _unpin_runtime


def _unpin_runtime(t: torch.Tensor) -> None:
    torch.cuda.synchronize()  # no copy from these pages may still be in flight
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


CU_MEMHOSTREGISTER_PORTABLE = 0x01  # pinned for every CUDA context, not only the current one
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02  # mapped into the device's address space (what cudaHostRegister(.., 0)
# gives on UVA systems, which the runtime's path asks for)
HOST_REGISTER_FLAGS = CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP


class _Driver:
    """`cuMemHostRegister`/`cuMemHostUnregister` of the CUDA driver (libcuda), through ctypes, in the
    context the runtime (torch) made current on this thread: the caller picks the device (the engine
    makes its slab under `torch.cuda.device(model's device)`); the pages are registered portable and
    mapped, so any context may copy from them."""

    def __init__(self, lib) -> None:
        self.lib = lib

    def _current(self) -> bool:
        ctx = ctypes.c_void_p()
        if self.lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and ctx.value:
            return True
        torch.cuda.synchronize()  # a runtime call binds the device's primary context to this thread
        return self.lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and bool(ctx.value)

    def register(self, ptr: int, size: int) -> bool | None:
        """True: pinned; False: refused; None: the driver cannot be asked here (no context)."""
        try:
            if not self._current():
                return None
            return self.lib.cuMemHostRegister_v2(ctypes.c_void_p(ptr), ctypes.c_size_t(size),
                                                 ctypes.c_uint(HOST_REGISTER_FLAGS)) == 0
        except (OSError, AttributeError, RuntimeError):
            return None

    def unregister(self, ptr: int) -> None:
        torch.cuda.synchronize()  # no copy from these pages may still be in flight
        if self._current():
            self.lib.cuMemHostUnregister(ctypes.c_void_p(ptr))


_DRIVER: list = []


def _cuda_driver() -> _Driver | None:
    """The CUDA driver's library, once per process; None without one (a CPU-only machine or build)."""
    if not _DRIVER:
        drv = None
        if torch.cuda.is_available():
            try:
                lib = ctypes.CDLL("libcuda.so.1")
                for name in ("cuCtxGetCurrent", "cuMemHostRegister_v2", "cuMemHostUnregister"):
                    getattr(lib, name).restype = ctypes.c_int
                drv = _Driver(lib)
            except (OSError, AttributeError):
                drv = None
        _DRIVER.append(drv)
    return _DRIVER[0]


def _clear_runtime_error() -> None:
    """Read (and so reset) the CUDA runtime's last error on this thread, from the libcudart this process
    has loaded (torch has no binding for `cudaGetLastError`); nothing where none is found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
        for path in sorted(paths):
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError, IndexError):
        pass


class Scratch:
    """Allocates named CPU tensors, in RAM (`folder=None`) or as memory-mapped files in a new folder.

    Args:
        folder: parent directory for a new private scratch folder (`.infdit-<random>`, its marker holding
            this process's pid, locked while it lives), or None for RAM.
        pin: pin RAM tensors (page-locked, for fast asynchronous copies to CUDA) for as long as this
            scratch lives; ignored for files. Set to False when CUDA refuses to pin.
        safe: use this `SafeFolder` instead (a checkpoint's run folder): `close` then removes only the
            files this scratch made, and keeps those it is told to.
    """

    def __init__(self, folder: str | Path | None = None, *, pin: bool = False, safe: SafeFolder | None = None
                 ) -> None:
        self.pin = pin
        self.owned = safe is None
        self.safe: SafeFolder | None = safe
        if safe is None and folder is not None:
            path = tempfile.mkdtemp(prefix=".infdit-", dir=folder)  # 0700, a fresh name: nobody else's
            self.safe = SafeFolder(path, "scratch folder", create=False, pid=True, fresh=True)
        self.path: Path | None = self.safe.path if self.safe is not None else None
        self._maps: dict[str, mmap.mmap] = {}
        self._made: set[str] = set()

    @property
    def mapped(self) -> bool:
        return self.path is not None

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, *,
              reuse: bool = False) -> torch.Tensor:
        """A new uninitialised tensor called `name` (a file `name.bin` when mapped, its disk allocated now).
        With `reuse`, an existing file of exactly the right size is mapped as it is (its contents are the
        tensor's)."""
        if self.path is None:
            t = torch.empty(shape, dtype=dtype)
            if self.pin:
                unpin = _pin(t)
                if unpin is not None:
                    weakref.finalize(self, unpin, t)  # holds t: unpinned first, freed after
                else:  # refused (page-locked memory is limited): unpinned works, its copies just wait
                    self.pin = False
            return t
        numel = 1
        for s in shape:
            numel *= s
        nbytes = max(1, numel * torch.empty(0, dtype=dtype).element_size())
        fname = f"{name}.bin"
        keep = reuse and self.safe.size(fname) == nbytes
        if not keep:
            self.release(name)
        self._made.add(name)
        fd = self.safe.open(fname, write=True) if keep else self.safe.create(fname)
        try:
            if not keep:
                allocate(fd, nbytes, self.path)
            mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self._maps[name] = mm
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
        if self.safe is not None:
            self.safe.unlink(f"{name}.bin")

    def trim(self) -> None:
        """Drop every mapped page from this process's resident memory (no-op in RAM)."""
        for mm in self._maps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # platform without madvise: the kernel decides
                pass

    def disk_bytes(self) -> int:
        """Bytes the scratch files hold on disk now."""
        if self.safe is None:
            return 0
        return self.safe.disk_bytes([f"{n}.bin" for n in self._made])

    def close(self, keep: tuple[str, ...] = ()) -> None:
        """Remove the folder and the files this scratch made; for a folder given as `safe`, only the files
        this scratch made, except the names in `keep` (flushed first)."""
        for name in keep:
            self.flush(name)
        self._maps.clear()
        if self.safe is not None:
            if self.owned:
                self.safe.remove()
            else:
                for name in self._made - set(keep):
                    self.safe.unlink(f"{name}.bin")
            self.safe = None
            self.path = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
