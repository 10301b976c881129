"""infdit's own cache: converted downloads, and files whose sha256 was verified once.

The root is `$INFDIT_CACHE`, else `infdit/` under the Hugging Face cache root (`$HF_HOME`, via
`huggingface_hub.constants`). A converted download lives in `url/<key>/` (key: the URL's sha256, 16 hex):
`model.safetensors` plus `model.json`, its record (source URL, sizes, digests, converter). The record is
written last, so a directory without one (a crash, a kill) is never taken for a finished download.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..files import atomic_write
from ..settings import cache_root

__all__ = ["url_dir", "Record", "read_record", "write_record", "file_lock", "verified_sha256",
           "sha256_file", "same_digest"]

MODEL_FILE = "model.safetensors"
RECORD_FILE = "model.json"


def url_dir(url: str) -> Path:
    """Where the download of `url` lives (whether or not it is there yet)."""
    return cache_root() / "url" / hashlib.sha256(url.encode()).hexdigest()[:16]


def same_digest(a: str | None, b: str | None) -> bool:
    """Hex digests compare case-insensitively (manifests and users write either case)."""
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


def sha256_file(path: Path, chunk: int = 2**24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Record:
    """What is known about a cached file; trusted while its size and mtime are unchanged."""

    sha256: str
    size: int
    mtime_ns: int
    source: str | None = None  # the URL or Hub reference it came from
    source_sha256: str | None = None  # the downloaded original's digest (before conversion)
    converter: str | None = None

    def matches(self, path: Path) -> bool:
        try:
            st = path.stat()
        except OSError:
            return False
        return st.st_size == self.size and st.st_mtime_ns == self.mtime_ns


def read_record(path: Path) -> Record | None:
    try:
        return Record(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # missing, half-written by a crash, or from another version
        return None


def write_record(path: Path, record: Record) -> None:
    """Atomically (`files.atomic_write`), so a reader sees the old record or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(asdict(record), indent=1), mode=0o600)


def verified_sha256(path: Path) -> str:
    """The sha256 of `path`, hashed once: later calls answer from a record while size and mtime hold.

    Records live in `<root>/verified/`, keyed by the file's resolved path (Hub cache blobs included).
    """
    real = path.resolve()
    rec_path = cache_root() / "verified" / (hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json")
    rec = read_record(rec_path)
    if rec is not None and rec.matches(real):
        return rec.sha256
    st = real.stat()
    digest = sha256_file(real)
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_record(rec_path,
                     Record(sha256=digest, size=st.st_size, mtime_ns=st.st_mtime_ns, source=str(real)))
    return digest


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) while the block runs.

    POSIX `fcntl.flock`: a second process downloading the same file waits here, then finds it cached; the
    kernel drops the lock if the holder dies. Where `fcntl` is missing (Windows) no lock is taken, so two
    concurrent downloads of one file may clash there; the sha256 check still refuses a corrupt result.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
