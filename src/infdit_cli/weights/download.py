"""Official-format checkpoints from a URL: stream, resume, verify, convert once, cache.

`fetch_url` streams to `<dest>.part` with the stdlib (`urllib.request`), hashing while it writes; a dropped
connection is resumed with an HTTP Range request (the bytes already on disk are hashed first), in this run
or the next. Only a complete, verified file is renamed to `dest`. `download_checkpoint` then converts it
(`convert.convert_checkpoint`) into the cache as safetensors with its provenance in the metadata.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..errors import ChecksumMismatch, ConvertError, DownloadError, InvalidReference, WeightsError
from ..events import BytesDone, Notice
from ..settings import settings
from ..units import format_bytes
from . import cache

__all__ = ["fetch_url", "download_checkpoint", "cached_checkpoint", "Downloaded", "check_url", "check_sha256"]

# Connect and per-read, seconds; an unreachable host fails within this, once. INFDIT_DOWNLOAD_TIMEOUT for a
# slow link (or a test of a stalled one).
TIMEOUT_S = float(settings().download_timeout or 10.0)
ATTEMPTS = 4  # a connection lost mid-transfer is resumed this many times before giving up
CHUNK = 1 << 20
OnEvent = Callable[[object], None] | None


@dataclass(frozen=True)
class Downloaded:
    """A model file ready to load, and where it came from."""

    path: Path
    sha256: str  # of the file at `path`
    source: str  # URL or Hub reference
    source_sha256: str | None = None  # of the downloaded original, when it was converted
    cached: bool = False  # answered from the cache, no network


def check_url(url: str) -> str:
    """An http(s) URL with a host, else `InvalidReference` (before any request)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
        raise InvalidReference(f"not a valid http(s) URL: {url}")
    return url


def check_sha256(digest: str | None) -> str | None:
    """64 hex digits in either case, returned lower-case; None passes."""
    if digest is None:
        return None
    d = digest.strip().lower()
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise InvalidReference(f"--sha256 must be 64 hex digits, got {digest!r}")
    return d


def _hash_existing(part: Path) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    done = 0
    if part.exists():
        with part.open("rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
                done += len(block)
    return h, done


def _open(url: str, start: int, timeout: float):
    headers = {"User-Agent": f"infdit/{__version__}", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    host = urllib.parse.urlsplit(url).netloc
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:
            return None  # the partial file is not a prefix of this one: start again
        what = {404: "not found (404)", 401: "unauthorized (401)", 403: "forbidden (403)"}.get(
            e.code, f"answered {e.code} {e.reason}")
        raise DownloadError(f"{url}: {what}") from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise DownloadError(f"cannot reach {host}: {reason}; check the connection, or pass a local file "
                            f"with --weights FILE") from None
    except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
        raise DownloadError(f"cannot reach {host}: {e or type(e).__name__}") from None


def _range_start(resp) -> int | None:
    """Where a 206 answer's bytes start (`Content-Range: bytes START-END/TOTAL`), or None if it does not
    say."""
    import re

    m = re.match(r"\s*bytes\s+(\d+)-", resp.headers.get("Content-Range") or "")
    return int(m.group(1)) if m else None


def _check_free(folder: Path, need: int, url: str) -> None:
    """Refuse a transfer the disk cannot hold, before its first byte."""
    import shutil


    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(f"{url} needs {format_bytes(need)} more, {folder} has {format_bytes(free)} free; "
                            f"free space or set INFDIT_CACHE to a bigger disk")


def fetch_url(url: str, dest: Path, *, sha256: str | None = None, on_event: OnEvent = None,
              timeout: float = TIMEOUT_S) -> str:
    """Download `url` to `dest` (resuming `<dest>.part`), verify `sha256` if given; return the digest.

    Raises:
        DownloadError: unreachable, HTTP error, a web page instead of a file, connection lost too often,
            disk full (the partial file is kept for the next run, except when it is wrong).
        ChecksumMismatch: the digest differs from `sha256` (the partial file is removed).
    """
    part = dest.with_name(dest.name + ".part")
    h, done = _hash_existing(part)
    total = None
    for _ in range(ATTEMPTS):
        resp = _open(url, done, timeout)
        if resp is not None and done and resp.status == 206 and _range_start(resp) != done:
            resp.close()  # a 206 from another offset than asked: appending it would corrupt the file
            resp = _open(url, 0, timeout)
            h, done = hashlib.sha256(), 0
            part.unlink(missing_ok=True)
        if resp is None or (done and resp.status != 206):  # 416, or a server that ignores Range
            h, done = hashlib.sha256(), 0
            part.unlink(missing_ok=True)
            if resp is None:
                continue
        with resp:
            if "text/html" in (resp.headers.get("Content-Type") or ""):
                raise DownloadError(f"{url} answered with a web page, not a checkpoint file "
                                    f"(the link may have "
                                    f"expired or need a browser)")
            length = resp.headers.get("Content-Length")
            total = done + int(length) if length and length.isdigit() else None
            if total is not None:
                _check_free(part.parent, total - done, url)
            try:
                with part.open("ab" if done else "wb") as f:
                    # read1: what has arrived, up to CHUNK; a stalled read then loses nothing it received
                    while chunk := resp.read1(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if on_event:
                            on_event(BytesDone(url, done, total))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DownloadError(f"no space left on device in {part.parent} after {done} bytes; free "
                                        f"space and run the command again to resume") from None
                if not isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
                    raise DownloadError(f"cannot write {part}: {e.strerror or e}") from None
                continue  # connection lost: resume with a Range request
            except http.client.HTTPException:  # IncompleteRead: the server closed early
                continue
        if total is None or done >= total:
            break
    else:
        of = f" of {total}" if total else ""
        raise DownloadError(f"download of {url} kept breaking off ({done}{of} bytes kept); run the command "
                            f"again to resume")
    digest = h.hexdigest()
    if sha256 and not cache.same_digest(digest, sha256):
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{url}: sha256 is {digest}, expected {sha256.lower()}; the download was "
                               f"removed, nothing was cached")
    os.replace(part, dest)
    return digest


def cached_checkpoint(url: str) -> Downloaded | None:
    """The converted download of `url` if the cache has a complete one (no network, no hashing)."""
    d = cache.url_dir(url)
    rec = cache.read_record(d / cache.RECORD_FILE)
    path = d / cache.MODEL_FILE
    if rec is None or rec.source != url or not rec.matches(path):
        return None
    return Downloaded(path, rec.sha256, url, rec.source_sha256, cached=True)


def download_checkpoint(url: str, *, sha256: str | None = None, clip_head_width: int = 64, keep: bool = False,
                        on_event: OnEvent = None) -> Downloaded:
    """The official checkpoint at `url`, downloaded, verified and converted into the cache (once).

    A second call (or a second process, which waits on the lock) answers from the cache. A safetensors
    file made by `infdit convert` is cached as it is.

    Raises:
        InvalidReference: `url` or `sha256` is malformed (nothing is requested).
        DownloadError, ChecksumMismatch: see `fetch_url`.
        ConvertError: the file is not an Inf-DiT checkpoint (nothing is cached).
    """
    # torch: kept off the CLI's start-up (`infdit --help` imports this module through weights.hub)
    from .convert import CONVERTER, convert_checkpoint
    from .format import inspect_file, save_model_file

    check_url(url)
    sha256 = check_sha256(sha256)
    d = cache.url_dir(url)
    with cache.file_lock(d / ".lock"):
        hit = cached_checkpoint(url)
        if hit is not None:
            if sha256 and hit.source_sha256 and not cache.same_digest(hit.source_sha256, sha256):
                raise ChecksumMismatch(f"{url} was cached with sha256 {hit.source_sha256}, not {sha256}")
            return hit
        ckpt = d / "checkpoint.pt"
        src_digest = cache.sha256_file(ckpt) if ckpt.exists() else None  # kept by an earlier --keep
        if src_digest is None or (sha256 and not cache.same_digest(src_digest, sha256)):
            ckpt.unlink(missing_ok=True)
            src_digest = fetch_url(url, ckpt, sha256=sha256, on_event=on_event)
        out = d / cache.MODEL_FILE
        meta = {"infdit_source": url, "infdit_source_sha256": src_digest, "infdit_converter": CONVERTER}
        try:
            try:
                inspect_file(ckpt)  # already a converted safetensors file: cache it as it is
                os.replace(ckpt, out)
            except WeightsError:
                if on_event:
                    on_event(Notice(f"converting {ckpt} (clip head width {clip_head_width})"))
                result = convert_checkpoint(ckpt, clip_head_width=clip_head_width)
                meta["infdit_dropped"] = ",".join(result.dropped)
                save_model_file(out, result.tensors, result.config, meta, overwrite=True)
                del result
        except ConvertError as e:
            if not keep:
                ckpt.unlink(missing_ok=True)
            raise ConvertError(f"{url} is not an official Inf-DiT checkpoint: {e}") from None
        digest = cache.sha256_file(out)
        st = out.stat()
        cache.write_record(d / cache.RECORD_FILE, cache.Record(
            sha256=digest, size=st.st_size, mtime_ns=st.st_mtime_ns, source=url, source_sha256=src_digest,
            converter=CONVERTER))
        if not keep:
            ckpt.unlink(missing_ok=True)
        return Downloaded(out, digest, url, src_digest)
