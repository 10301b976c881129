"""Run folders: the sampler state after each finished Heun step, so a long job continues where it stopped.

Between two steps the deterministic Heun sampler's whole state is one image, x at the current sigma, plus
the pass and step indices; with the input of the pass (the previous pass's output) and the random
generator's state (for the noise of later passes), a resumed run computes the very same pixels.

A run folder (`.<output name>.infdit-run/` beside the output) holds `meta.json` (what was saved and the
fingerprint of everything the result depends on) and the raw tensors it names. Every save is atomic: the
tensor files are complete and on disk before `meta.json` is replaced (temporary file, fsync, rename), and a
file a saved `meta.json` names is never written again, so a crash at any instant leaves the last
committed step. Under `--low-memory` the memory-mapped state file is the checkpoint's x (flushed, not copied).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RunFolder", "Saved", "run_folder_for", "describe", "weights_identity", "model_identity", "fingerprint",
           "FORMAT"]

FORMAT = 1
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
    from . import __version__

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


_WHAT = {"input": "the input file changed", "weights": "the weights changed", "version": "another infdit version"}


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

    def read_x(self, into: torch.Tensor) -> None:
        read_tensor(self.x_file, into)

    def read_input(self) -> torch.Tensor:
        assert self.input_file is not None and self.input_shape is not None and self.input_dtype is not None
        t = torch.empty(self.input_shape, dtype=self.input_dtype)
        read_tensor(self.input_file, t)
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
        self.last_write_seconds = 0.0

    # -- reading ---------------------------------------------------------------------------------------
    def load(self) -> tuple[Saved | None, str | None]:
        """(the checkpoint to resume from, None) or (None, why an existing folder cannot be used); (None,
        None) when there is no run folder. An unusable folder is removed (never trusted)."""
        if not self.path.exists():
            return None, None
        try:
            saved, why = self._read()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            saved, why = None, f"damaged ({type(e).__name__}: {' '.join(str(e).split())})"
        if saved is None:
            self.remove()
        self.saved = saved
        return saved, why

    def _read(self) -> tuple[Saved | None, str | None]:
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            return None, "damaged (no meta.json)"
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            return None, "damaged (bad header)"
        old = meta["fingerprint"]
        if old != self.fingerprint:
            for k, v in self.fingerprint.items():
                if old.get(k) != v:
                    return None, _WHAT.get(k) or f"made with other options ({k} {_show(old.get(k))} -> {_show(v)})"
            return None, "made with other options"
        x = meta["x"]
        x_file = self._check(x)
        inp = meta.get("input")
        in_file = self._check(inp) if inp else None
        if meta["pass"] > 1 and in_file is None:
            return None, "damaged (no input for pass 2)"
        rng = torch.tensor(list(bytes.fromhex(meta["rng"])), dtype=torch.uint8)
        self._meta = meta
        return Saved(meta["pass"], meta["passes"], meta["step"], meta["steps"], meta["saved_at"], x_file,
                     tuple(x["shape"]), DTYPES[x["dtype"]], in_file, tuple(inp["shape"]) if inp else None,
                     DTYPES[inp["dtype"]] if inp else None, rng), None

    def _check(self, entry: dict) -> Path:
        name = entry["file"]
        if "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        f = self.path / name
        numel = 1
        for s in entry["shape"]:
            numel *= int(s)
        want = numel * torch.empty(0, dtype=DTYPES[entry["dtype"]]).element_size()
        have = f.stat().st_size if f.is_file() else None
        if have != want or entry["nbytes"] != want:
            raise ValueError(f"{name} is {'missing' if have is None else f'{have} bytes'}, expected {want}")
        return f

    # -- writing ---------------------------------------------------------------------------------------
    def save_input(self, pass_: int, x: torch.Tensor) -> dict:
        """Write pass `pass_`'s input once (before its first step is saved); returns its entry."""
        self.path.mkdir(parents=True, exist_ok=True)
        name = f"input.p{pass_}.bin"
        write_tensor(self.path / name, x)
        return _entry(name, x)

    def save(self, pass_: int, passes: int, step: int, steps: int, x: torch.Tensor, *, rng: torch.Tensor,
             input_entry: dict | None, mapped_file: Path | None = None) -> int:
        """Commit x after `step` of pass `pass_`; returns the bytes written. `mapped_file`: x is this
        memory-mapped file of the run folder, already flushed (nothing to copy)."""
        t0 = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        if mapped_file is not None:
            name, written = mapped_file.name, 0
        else:
            name = f"x.p{pass_}.s{step}.bin"
            write_tensor(self.path / name, x)
            written = x.numel() * x.element_size()
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "pass": pass_, "passes": passes, "step": step,
                "steps": steps, "saved_at": time.time(), "x": _entry(name, x), "input": input_entry,
                "rng": bytes(rng.tolist()).hex()}
        _write_atomic(self.path / "meta.json", json.dumps(meta).encode())
        old, self._meta = self._meta, meta
        if old is not None:  # files of the previous commit that this one no longer names
            keep = {meta["x"]["file"], (input_entry or {}).get("file")}
            for e in (old["x"], old.get("input")):
                if e and e["file"] not in keep and e["file"].startswith(("x.", "input.")):
                    (self.path / e["file"]).unlink(missing_ok=True)
        self.last_write_seconds = time.perf_counter() - t0
        return written

    def entry(self, key: str) -> dict | None:
        """The last commit's (or the loaded checkpoint's) entry for "x" or "input"."""
        return None if self._meta is None else self._meta.get(key)

    def committed_files(self) -> tuple[str, ...]:
        """Files the last commit on disk names (to keep when the rest of the folder is cleaned). Read from
        meta.json: a Ctrl-C can land after its rename and before this object learns of it."""
        try:
            m = json.loads((self.path / "meta.json").read_text())
            self._meta = m if m.get("fingerprint") == self.fingerprint else self._meta
        except (OSError, ValueError, AttributeError):
            pass
        if self._meta is None:
            return ()
        return tuple(e["file"] for e in (self._meta["x"], self._meta.get("input")) if e)

    def tidy(self) -> None:
        """Remove everything the last commit does not name (scratch files, temporaries)."""
        if not self.path.is_dir():
            return
        keep = {"meta.json", *self.committed_files()}
        for f in self.path.iterdir():
            if f.name not in keep:
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
        if self._meta is None:
            self.remove()

    def disk_bytes(self) -> int:
        if not self.path.is_dir():
            return 0
        return sum(f.stat().st_blocks * 512 for f in self.path.iterdir() if f.is_file())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._meta = None

    def where(self) -> str:
        """`pass 1/2, step 3/20` of the last commit (or of the checkpoint loaded)."""
        m = self._meta
        return "" if m is None else f"pass {m['pass']}/{m['passes']}, step {m['step']}/{m['steps']}"


def describe(path: str | Path) -> tuple[str, int] | None:
    """(`pass 1/2, step 3/20`, bytes on disk) of the run folder at `path`, or None if it holds no checkpoint."""
    path = Path(path)
    try:
        m = json.loads((path / "meta.json").read_text())
        where = f"pass {m['pass']}/{m['passes']}, step {m['step']}/{m['steps']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return where, sum(f.stat().st_blocks * 512 for f in path.iterdir() if f.is_file())


def _show(v) -> str:
    return "x".join(map(str, v)) if isinstance(v, list) and all(isinstance(i, int) for i in v) else str(v)


def _entry(name: str, x: torch.Tensor) -> dict:
    return {"file": name, "shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."),
            "nbytes": x.numel() * x.element_size()}


def _rows(x: torch.Tensor) -> list[slice]:
    h = x.shape[-2] if x.dim() >= 2 else 1
    row = max(1, x.numel() // max(1, h) * x.element_size())
    step = max(1, CHUNK_BYTES // row)
    return [slice(r, min(r + step, h)) for r in range(0, h, step)]


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().cpu().view(torch.uint8).numpy()).cast("B")


def write_tensor(path: Path, x: torch.Tensor) -> None:
    """x's raw bytes (C order) to `path` atomically: a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for r in _rows(x):
            f.write(_bytes_view(x[..., r, :]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_tensor(path: Path, into: torch.Tensor) -> None:
    """Fill `into` (any device) from `path`, written by `write_tensor` for the same shape and dtype."""
    with open(path, "rb") as f:
        for r in _rows(into):
            part = into[..., r, :]
            host = part if part.device.type == "cpu" and part.is_contiguous() else torch.empty(
                part.shape, dtype=part.dtype)
            buf = memoryview(host.view(torch.uint8).numpy()).cast("B")
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path.name} is shorter than its header says")
            if host is not part:
                part.copy_(host)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
