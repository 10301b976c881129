"""Run folders: the sampler state after each finished Heun step, so a long job continues where it stopped.

Between two steps the deterministic Heun sampler's whole state is one image, x at the current sigma, plus
the pass and step indices; with the input of the pass (the previous pass's output) and the random
generator's state (for the noise of later passes), a resumed run computes the very same pixels.

A run folder (`.<output name>.infdit-run/` beside the output) holds `meta.json` (what was saved and the
fingerprint of everything the result depends on) and the raw tensors it names. Every save is atomic: the
tensor files are complete and on disk before `meta.json` is replaced (temporary file, fsync, rename), and a
file a saved `meta.json` names is never written again, so a crash at any instant leaves the last
committed step. Under `--low-memory` the memory-mapped state file is the checkpoint's x (flushed, not copied).

Nothing read back is trusted: the folder must be infdit's own (`storage.SafeFolder`: no link, our owner and
marker; files opened with O_NOFOLLOW, temporaries unique per process, only recorded names deleted); every
`meta.json` field is type- and range-checked against this job's plan; each tensor file carries a sha256 of
its bytes (taken while writing) that also covers what it is (pass, step, shape, dtype), and its values must
be finite. Anything else is "damaged: <reason>" and the job starts over. `output_lock` keeps a second
process from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._version import __version__
from ..engine.storage import SafeFolder, allocate
from ..errors import Busy, DiskFull, NonFinite, UnsafePath, no_space
from ..units import row_chunks

__all__ = ["RunFolder", "Saved", "run_folder_for", "summary", "weights_identity", "model_identity",
           "fingerprint", "FORMAT", "output_lock"]

FORMAT = 2  # 2: sha256 per tensor file, SafeFolder marker
CHUNK_BYTES = 64 * 2**20  # rows per write/read: about this many bytes
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_folder_for(output: str | Path) -> Path:
    """`out/photo.png` -> `out/.photo.png.infdit-run` (hidden: batch never reads it back as an input)."""
    output = Path(output)
    return output.with_name(f".{output.name}.infdit-run")


def weights_identity(path: str | Path) -> str:
    """A cheap identity of a weights file: sha256 of its size, its safetensors header and three 1 MiB samples
    (start, middle, end) of its data. Independent of path and mtime (a moved or copied file resumes); any
    retrained or converted file differs in its header or samples. Hashing GBs per run would cost minutes."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        head = f.read(8)
        h.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        h.update(f.read(min(n, 100 * 2**20)))
        for at in (0, size // 2, max(0, size - 2**20)):
            f.seek(at)
            h.update(f.read(2**20))
    return h.hexdigest()


def model_identity(model) -> str:
    """sha256 of every parameter and buffer (for a model built in memory, without a file)."""
    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        t = t.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(*, input_sha256: str, weights: str, up_plan, options, dtype: torch.dtype) -> dict:
    """Everything the result depends on; not n or the cache placement (equal within the block tolerance)."""
    return {
        "input": input_sha256,
        "weights": weights,
        "target": list(up_plan.target_size),
        "passes": [[p.scale, *p.in_size, *p.out_size, *p.padded_out] for p in up_plan.passes],
        "steps": up_plan.steps,
        "seed": options.seed,
        "dtype": str(dtype).removeprefix("torch."),
        "color_fix": options.color_fix,
        "version": __version__,
    }


_WHAT = {"input": "the input file changed", "weights": "the weights changed",
         "version": "another infdit version"}
KIND = "run folder"
_FILE = re.compile(r"(x\.p\d+\.s\d+|input\.p\d+|p\d+_heun(_host)?_(x|x2|d|den))\.bin")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Damaged(Exception):
    pass


@dataclass(frozen=True)
class Saved:
    """A checkpoint read back: x of pass `pass_` (1-based) after `step` of `steps` steps."""

    pass_: int
    passes: int
    step: int
    steps: int
    saved_at: float  # seconds since the epoch
    x_file: Path
    x_shape: tuple[int, ...]
    x_dtype: torch.dtype
    input_file: Path | None  # the pass's input (the previous pass's output); None for pass 1
    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    rng: torch.Tensor  # the generator's state after this pass's noise was drawn
    folder: SafeFolder | None = None

    def read_x(self, into: torch.Tensor) -> None:
        read_tensor(self.folder, self.x_file.name, into)

    def read_input(self) -> torch.Tensor:
        assert self.input_file is not None and self.input_shape is not None and self.input_dtype is not None
        t = torch.empty(self.input_shape, dtype=self.input_dtype)
        read_tensor(self.folder, self.input_file.name, t)
        return t


class RunFolder:
    """The run folder of one output. `load` validates what is there; `save` commits one step.

    Args:
        path: the folder (see `run_folder_for`).
        fingerprint: the dict from `fingerprint` for this run.
    """

    def __init__(self, path: str | Path, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.saved: Saved | None = None  # the resume point `load` found
        self._meta: dict | None = None
        self.safe: SafeFolder | None = None
        self.last_write_seconds = 0.0

    def folder(self) -> SafeFolder:
        """The folder, made now if missing. Raises UnsafePath if what is at the path is not ours."""
        if self.safe is None or self.safe.fd < 0:
            self.safe = SafeFolder(self.path, KIND)
        return self.safe

    # -- reading ---------------------------------------------------------------------------------------
    def load(self) -> tuple[Saved | None, str | None]:
        """(the checkpoint to resume from, None) or (None, why an existing folder cannot be used); (None,
        None) when there is no run folder. An unusable folder of ours is removed (never trusted); anything
        at the path that is not ours raises UnsafePath and is left as it is."""
        if not os.path.lexists(self.path):
            return None, None
        self.folder()
        try:
            saved, why = self._read()
        except _Damaged as e:
            saved, why = None, f"damaged: {e}"
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, OverflowError) as e:
            saved, why = None, f"damaged: {type(e).__name__}: {' '.join(str(e).split())}"
        if saved is None:
            self.remove()
        self.saved = saved
        return saved, why

    def _read(self) -> tuple[Saved | None, str | None]:
        safe = self.folder()
        try:
            fd = safe.open("meta.json")
        except OSError:
            raise _Damaged("no meta.json") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read(1 << 20)
        try:
            meta = json.loads(raw)
        except ValueError:
            raise _Damaged("meta.json is not JSON") from None
        _need(isinstance(meta, dict) and meta.get("format") == FORMAT, "bad header (not this format)")
        old = meta.get("fingerprint")
        _need(isinstance(old, dict), "fingerprint is not a record")
        if old != self.fingerprint:
            for k, v in self.fingerprint.items():
                if old.get(k) != v:
                    return None, _WHAT.get(k) or (f"made with other options "
                                                  f"({k} {_show(old.get(k))} -> {_show(v)})")
            return None, "made with other options"
        fp = self.fingerprint
        passes, steps = len(fp["passes"]), fp["steps"]
        p = _int(meta, "pass", 1, passes)
        _int(meta, "passes", passes, passes)
        step = _int(meta, "step", 1, steps)
        _int(meta, "steps", steps, steps)
        at = meta.get("saved_at")
        _need(type(at) in (int, float) and math.isfinite(at) and 0 < at < time.time() + 86400,
              f"saved_at {_short(at)} is not a time")
        canvas = fp["passes"][p - 1]
        x = meta.get("x")
        x_shape = (1, 3, canvas[5], canvas[6])
        x_file, x_dtype = self._check(x, "x", x_shape, _header("x", p, step))
        inp = meta.get("input")
        in_file = in_shape = in_dtype = None
        if p > 1:
            _need(inp is not None, f"no input for pass {p}")
            in_shape = (1, 3, canvas[1], canvas[2])
            in_file, in_dtype = self._check(inp, "input", in_shape, _header("input", p, 0))
        else:
            _need(inp is None, "an input for pass 1")
        rng_hex = meta.get("rng")
        want = torch.Generator().get_state().numel() * 2
        _need(isinstance(rng_hex, str) and len(rng_hex) == want and re.fullmatch(r"[0-9a-f]*", rng_hex),
              "bad generator state")
        rng = torch.tensor(list(bytes.fromhex(rng_hex)), dtype=torch.uint8)
        try:
            torch.Generator().set_state(rng)
        except RuntimeError:
            raise _Damaged("bad generator state") from None
        self._meta = meta
        return Saved(p, passes, step, steps, float(at), x_file, x_shape, x_dtype, in_file, in_shape, in_dtype,
                     rng, safe), None

    def _check(self, entry, what: str, shape: tuple[int, ...], header: bytes) -> tuple[Path, torch.dtype]:
        """The file of a meta.json entry, after checking the entry, the file's size, sha256 and values."""
        _need(isinstance(entry, dict), f"{what} entry is not a record")
        name = entry.get("file")
        _need(isinstance(name, str) and _FILE.fullmatch(name) is not None, f"{what} file name {_short(name)}")
        _need(entry.get("shape") == list(shape), f"{what} shape {_short(entry.get('shape'))}, this job needs "
              f"{list(shape)}")
        dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
        _need(dtype is not None, f"{what} dtype {_short(entry.get('dtype'))}")
        want = math.prod(shape) * dtype.itemsize
        _need(entry.get("nbytes") == want, f"{what} nbytes {_short(entry.get('nbytes'))}, expected {want}")
        digest = entry.get("sha256")
        _need(isinstance(digest, str) and _HEX64.fullmatch(digest) is not None, f"{what} has no checksum")
        have = self.safe.size(name)
        _need(have == want, f"{name} is {'missing' if have is None else f'{have} bytes'}, expected {want}")
        fd = self.safe.open(name)
        h = hashlib.sha256(header)
        buf = bytearray(CHUNK_BYTES)
        finite = True
        with os.fdopen(fd, "rb") as f:
            while n := f.readinto(buf):
                part = memoryview(buf)[:n]
                h.update(part)
                if finite and n % dtype.itemsize == 0:
                    t = torch.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize)
                    finite = bool(torch.isfinite(t).all())
        _need(h.hexdigest() == digest, f"{name} does not match its checksum")
        _need(finite, f"{name} holds NaN or Inf")
        return self.path / name, dtype

    # -- writing ---------------------------------------------------------------------------------------
    def save_input(self, pass_: int, x: torch.Tensor) -> dict:
        """Write pass `pass_`'s input once (before its first step is saved); returns its entry."""
        name = f"input.p{pass_}.bin"
        digest = write_tensor(self.folder(), name, x, _header("input", pass_, 0))
        return _entry(name, x, digest)

    def save(self, pass_: int, passes: int, step: int, steps: int, x: torch.Tensor, *, rng: torch.Tensor,
             input_entry: dict | None, mapped_file: Path | None = None) -> int:
        """Commit x after `step` of pass `pass_`; returns the bytes written. `mapped_file`: x is this
        memory-mapped file of the run folder, already flushed (nothing to copy; its bytes are hashed).

        Raises:
            NonFinite: x holds NaN or Inf (nothing is committed; the last checkpoint stays).
            DiskFull: the disk filled up while writing.
        """
        t0 = time.perf_counter()
        safe = self.folder()
        header = _header("x", pass_, step)
        if mapped_file is not None:
            name, written = mapped_file.name, 0
            h = hashlib.sha256(header)
            for r in _rows(x):
                part = x[..., r, :].contiguous().cpu()
                _finite(part, pass_, step)
                h.update(_bytes_view(part))
            digest = h.hexdigest()
        else:
            name = f"x.p{pass_}.s{step}.bin"
            digest = write_tensor(safe, name, x, header, where=(pass_, step))
            written = x.numel() * x.element_size()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "pass": pass_, "passes": passes,
                "step": step,
                "steps": steps, "saved_at": time.time(), "x": _entry(name, x, digest), "input": input_entry,
                "rng": bytes(rng.tolist()).hex()}
        safe.write("meta.json", json.dumps(meta).encode(), "a checkpoint")
        old, self._meta = self._meta, meta
        if old is not None:  # files of the previous commit that this one no longer names
            keep = {meta["x"]["file"], (input_entry or {}).get("file")}
            for e in (old["x"], old.get("input")):
                if e and e["file"] not in keep and e["file"].startswith(("x.", "input.")):
                    safe.unlink(e["file"])
        self.last_write_seconds = time.perf_counter() - t0
        return written

    def entry(self, key: str) -> dict | None:
        """The last commit's (or the loaded checkpoint's) entry for "x" or "input"."""
        return None if self._meta is None else self._meta.get(key)

    def committed_files(self) -> tuple[str, ...]:
        """Files the last commit on disk names (to keep when the rest of the folder is cleaned). Read from
        meta.json: a Ctrl-C can land after its rename and before this object learns of it."""
        if self.safe is None or self.safe.fd < 0:
            return ()
        try:
            fd = self.safe.open("meta.json")
            with os.fdopen(fd, "rb") as f:
                m = json.loads(f.read(1 << 20))
            self._meta = m if m.get("fingerprint") == self.fingerprint else self._meta
        except (OSError, ValueError, AttributeError):
            pass
        if self._meta is None:
            return ()
        return tuple(e["file"] for e in (self._meta["x"], self._meta.get("input")) if e)

    def tidy(self) -> None:
        """Remove every file infdit recorded here that the last commit does not name (scratch files,
        temporaries); the folder itself if nothing is committed. Never touches anything else."""
        if self.safe is None or self.safe.fd < 0:
            return
        keep = {"meta.json", *self.committed_files()}
        for name in self.safe.records():
            if name not in keep:
                self.safe.unlink(name)
        if self._meta is None:
            self.remove()

    def disk_bytes(self) -> int:
        return 0 if self.safe is None or self.safe.fd < 0 else self.safe.disk_bytes()

    def remove(self, strict: bool = True) -> bool:
        """Delete the files infdit recorded here and the folder (refused, UnsafePath, if it is not ours).
        False if files infdit did not make keep the folder (they stay); `strict` raises UnsafePath then."""
        self._meta = None
        if self.safe is None or self.safe.fd < 0:
            if not os.path.lexists(self.path):
                return True
            self.safe = SafeFolder(self.path, KIND, create=False)
        safe, self.safe = self.safe, None
        if not safe.remove():
            if strict:
                raise UnsafePath(f"{KIND} {self.path} holds files infdit did not make; they were left there: "
                                 "move them away")
            return False
        return True

    def where(self) -> str:
        """`pass 1/2, step 3/20` of the last commit (or of the checkpoint loaded)."""
        m = self._meta
        return "" if m is None else f"pass {m['pass']}/{m['passes']}, step {m['step']}/{m['steps']}"


def summary(path: str | Path) -> tuple[str, int] | None:
    """(`pass 1/2, step 3/20`, bytes on disk) of the run folder at `path`, or None if it holds no checkpoint
    (or is not infdit's own folder: nothing is read through a link)."""
    try:
        safe = SafeFolder(path, KIND, create=False)
    except (UnsafePath, OSError):
        return None
    try:
        fd = safe.open("meta.json")
        with os.fdopen(fd, "rb") as f:
            m = json.loads(f.read(1 << 20))
        where = f"pass {int(m['pass'])}/{int(m['passes'])}, step {int(m['step'])}/{int(m['steps'])}"
        return where, safe.disk_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        safe.close()


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold the one-writer lock of `output` (flock on `.<name>.infdit-lock` beside it, holding
    `LOCK_TEXT`); nested use in one process is free.

    The lock file is created with O_CREAT | O_EXCL | O_NOFOLLOW. A file already there is taken only if it
    is an earlier infdit's lock (`_ours`: a regular file of this user's, with one link, whose content says
    so) that no process holds; anything else is refused, untouched. On release the file is removed only
    if it is still the one this process created or took (same inode): a file put there meanwhile stays.

    Raises:
        Busy: another process holds it (`another infdit is writing <output> (pid N)`), at once.
        UnsafePath: the lock path is a link, or a file that is not an infdit lock.
        DiskFull: no space for the lock file (nothing is left behind).
    """
    output = Path(output)
    path = output.with_name(f".{output.name}.infdit-lock")
    key = os.path.abspath(path)
    if key in _LOCKS:
        _LOCKS[key][1] += 1
        try:
            yield
        finally:
            _LOCKS[key][1] -= 1
        return
    fd = _take_lock(path, output)
    _LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        del _LOCKS[key]
        _drop_lock(path, fd)


_LOCKS: dict[str, list] = {}
LOCK_TEXT = "infdit output lock\npid {pid}\n"  # what says a lock file is infdit's (with `_LOCK_RE`)
_LOCK_RE = re.compile(rb"(?:infdit output lock\n)?pid (\d{1,10})\n|(\d{1,10})\n")  # the 2nd: before 0.2


def _ours(content: bytes) -> bool:
    return _LOCK_RE.fullmatch(content) is not None


def _lock_pid(content: bytes) -> str:
    m = _LOCK_RE.fullmatch(content)
    return (m.group(1) or m.group(2)).decode() if m else "?"


def _take_lock(path: Path, output: Path) -> int:
    for _ in range(10):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # a symbolic link too (O_EXCL never follows one)
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:  # its holder removed it meanwhile: create it
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UnsafePath(f"lock file {path} is a symbolic link; move it away") from None
                if e.errno in (errno.EISDIR, errno.ENXIO, errno.EACCES, errno.EPERM):
                    raise UnsafePath(f"lock file {path} is not infdit's (not a file of yours); move it away"
                                     ) from None
                raise
        except FileNotFoundError:  # the output's folder is missing: check_output reports it
            raise
        except OSError as e:
            if no_space(e):
                raise DiskFull(f"no space left in {path.parent} for the lock file {path.name}") from None
            raise
        mine = [created]  # a file this run may remove: made by it, or an earlier infdit's lock it now holds
        try:
            if _claim(path, output, fd, created, mine):
                return fd
        except BaseException as e:  # a refusal, a full disk, a stop: nothing new left behind
            if mine[0]:
                _drop_lock(path, fd)
            else:
                os.close(fd)
            if no_space(e):
                raise DiskFull(f"no space left in {path.parent} for the lock file {path.name}") from None
            raise
        os.close(fd)  # the holder removed it as we locked: take the new one
    raise Busy(f"another infdit is writing {output}")


def _claim(path: Path, output: Path, fd: int, created: bool, mine: list) -> bool:
    """Lock `fd` (the file at `path`) and write our `LOCK_TEXT` into it; False if the file at `path` is no
    longer the one open (take the new one). `mine[0]` becomes True once a file found there is known to be an
    earlier infdit's lock, held by this run. Raises Busy, UnsafePath, OSError; the caller closes `fd`."""
    st = os.fstat(fd)
    if not created:
        why = _not_ours(fd, st)
        if why:
            raise UnsafePath(f"lock file {path} is not infdit's ({why}); move it away, or remove it")
    for wait in range(200 if created else 1):  # our new file: another run only checks it for a moment
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if wait + 1 < (200 if created else 1):
                time.sleep(0.01)
                continue
            raise Busy(f"another infdit is writing {output} (pid {_lock_pid(os.pread(fd, 64, 0))})") from None
    if not _same(path, st):
        return False
    if not created:
        content = os.pread(fd, 64, 0)  # read under the lock: a holder writes it while holding it
        if not content:  # made by another run that has not locked it yet (or one killed at that moment)
            raise Busy(f"another infdit is starting to write {output} (its lock file {path} is still empty; "
                       "if no infdit runs, remove it)")
        if not _ours(content):
            raise UnsafePath(f"lock file {path} is not infdit's (its content is not an infdit lock); move it "
                             "away, or remove it")
        mine[0] = True
    os.ftruncate(fd, 0)
    data = LOCK_TEXT.format(pid=os.getpid()).encode()
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, "short write")
    return True


def _not_ours(fd: int, st: os.stat_result) -> str | None:
    """Why the file already at the lock path (open as `fd`) is not one infdit may take, or None."""
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return "not a regular file of yours"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} links: another file's content"
    if st.st_size > 64:
        return "its content is not an infdit lock"
    return None  # the content is read under the flock (a holder writes it while holding it)


def _same(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def _drop_lock(path: Path, fd: int) -> None:
    """Remove the lock file if it is still the one open as `fd` (not a file put there since); close `fd`."""
    try:
        if _same(path, os.fstat(fd)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _need(ok, why: str) -> None:
    if not ok:
        raise _Damaged(why)


def _int(meta: dict, key: str, lo: int, hi: int) -> int:
    v = meta.get(key)
    _need(type(v) is int and lo <= v <= hi, f"{key} {_short(v)} is not in {lo}..{hi}")
    return v


def _short(v) -> str:
    t = json.dumps(v) if not isinstance(v, str) else repr(v)
    return t if len(t) <= 40 else t[:37] + "..."


def _header(kind: str, pass_: int, step: int) -> bytes:
    """What the checksum of a tensor file covers besides its bytes: a file of another step or pass, or a
    meta.json edited to claim one, does not verify."""
    return f"infdit {kind} pass {pass_} step {step}\n".encode()


def _show(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) and all(isinstance(i, int) for i in v) else str(v)


def _entry(name: str, x: torch.Tensor, digest: str) -> dict:
    return {"file": name, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
            "nbytes": x.numel() * x.element_size(), "sha256": digest}


def _rows(x: torch.Tensor) -> list[slice]:
    h = x.shape[-2] if x.dim() >= 2 else 1
    return row_chunks(h, x.numel() // max(1, h) * x.element_size(), CHUNK_BYTES)


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().cpu().view(torch.uint8).numpy()).cast("B")


def _finite(part: torch.Tensor, pass_: int, step: int) -> None:
    if not bool(torch.isfinite(part).all()):
        raise NonFinite(f"the sampler state holds NaN or Inf after pass {pass_} step {step} "
                        f"(broken weights or "
                        "an unstable dtype); nothing was written")


def write_tensor(safe: SafeFolder, name: str, x: torch.Tensor, header: bytes, where=None) -> str:
    """x's raw bytes (C order) to `name` in `safe` atomically (a temporary file of this process, its disk
    allocated first, fsync, rename); returns the sha256 of `header` + the bytes, taken while writing.
    `where` (pass, step): check every value is finite on the way (NonFinite)."""
    nbytes = x.numel() * x.element_size()
    tmp, fd = safe.temp(name)
    try:
        allocate(fd, max(1, nbytes), safe.path)
        h = hashlib.sha256(header)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            for r in _rows(x):
                part = x[..., r, :].contiguous().cpu()
                if where is not None:
                    _finite(part, *where)
                b = _bytes_view(part)
                h.update(b)
                f.write(b)
            f.flush()
            os.fsync(f.fileno())
        safe.replace(tmp, name)
        return h.hexdigest()
    except OSError as e:
        safe.unlink(tmp)
        if no_space(e):
            raise DiskFull(f"no space left in {safe.path} for a checkpoint") from None
        raise
    except BaseException:
        if fd >= 0:
            os.close(fd)
        safe.unlink(tmp)
        raise


def read_tensor(safe: SafeFolder, name: str, into: torch.Tensor) -> None:
    """Fill `into` (any device) from `name`, written by `write_tensor` for the same shape and dtype."""
    with os.fdopen(safe.open(name), "rb") as f:
        for r in _rows(into):
            part = into[..., r, :]
            host = part if part.device.type == "cpu" and part.is_contiguous() else torch.empty(
                part.shape, dtype=part.dtype)
            buf = memoryview(host.view(torch.uint8).numpy()).cast("B")
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{name} is shorter than its header says")
            if host is not part:
                part.copy_(host)
