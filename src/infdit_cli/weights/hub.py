"""Where weights come from: the model registry, Hub references, URLs, and the cache they land in.

`--weights` accepts a local `.safetensors` path, a registry name (manifests shipped in
`infdit_cli/weights/registry/*.json`, the repository's `weights/`), a Hub reference
`org/repo[/file][@revision]`, or the http(s) URL of an
official checkpoint that `infdit download` has converted into the cache. Hub downloads go through
`huggingface_hub.hf_hub_download` into the standard HF cache (HF_HOME, HF_HUB_OFFLINE, HF_TOKEN and
HF_ENDPOINT are honoured); URL downloads through `download.py` into `cache.py`'s. Nothing is ever unpickled
here: the one pickle infdit opens is read by `convert.py`, with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import ChecksumMismatch, HubError, InvalidReference, WeightsError, WeightsNotFound
from ..events import Notice
from ..model.config import ClipConfig
from ..settings import settings
from . import cache
from .download import Downloaded, cached_checkpoint, check_sha256, check_url, download_checkpoint

__all__ = ["ModelSpec", "registry", "resolve_weights", "download", "parse_reference", "sha256_file",
           "packaged_file", "DEFAULT_MODEL", "fetch_clip_tower", "Downloaded", "is_url", "download_command"]

DEFAULT_MODEL = "infdit-4x"
CLIP_MODEL = "clip-vit-l-14-datacomp"  # open_clip ViT-L-14 `datacomp_xl_s13b_b90k`, the official encoder
REPO_ENV = "INFDIT_REPO"  # overrides the default model's Hub repo id
WEIGHTS_ENV = "INFDIT_WEIGHTS"  # a default for --weights
REGISTRY_ENV = "INFDIT_REGISTRY"  # an extra folder of manifests, read before the packaged ones
PACKAGED_SOURCE = "shipped with infdit"  # `Downloaded.source` of a model in the package (nothing downloaded)
ETAG_TIMEOUT_S = 10  # one metadata request, no retries: an unreachable Hub fails within this
sha256_file = cache.sha256_file


@dataclass(frozen=True)
class ModelSpec:
    """One registry manifest (`infdit_cli/weights/registry/<name>.json`)."""

    name: str
    repo_id: str | None  # a Hub repo of converted safetensors; None: none published (--repo, INFDIT_REPO)
    filename: str
    revision: str | None  # pinned Hub revision (a commit) where one is known
    sha256: str | None  # of `filename` on the Hub, where known
    size: int | None
    license: str
    source: str
    conversion: str
    description: str = ""
    clip_config: dict | None = None  # for CLIP vision towers: the `ClipConfig` fields
    release_url: str | None = None  # the authors' own release file (official format), tried after the Hub
    release_sha256: str | None = None  # its sha256; None: not known, verified only when --sha256 is given
    release_size: int | None = None
    clip_head_width: int = 64  # for converting the release (not recoverable from shapes)
    # `filename` ships inside infdit_cli/weights/registry/ with the package: nothing to download
    packaged: bool = False

    def __post_init__(self) -> None:
        """A manifest names a file inside a repo: no path tricks, no other types (it may come from
        $INFDIT_REGISTRY, a folder anyone could have written)."""
        for name in ("name", "filename", "license", "source", "conversion", "description"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        parts = self.filename.split("/")
        if any(p in ("", ".", "..") or not _FILE_PART.fullmatch(p) for p in parts):
            raise ValueError(f"filename {self.filename[:80]!r} is not a file name inside a repo")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"name {self.name[:80]!r} is not a model name")
        if self.repo_id is not None and (not isinstance(self.repo_id, str) or self.repo_id.count("/") != 1
                                         or not all(_NAME.fullmatch(p) for p in self.repo_id.split("/"))):
            raise ValueError(f"repo_id {str(self.repo_id)[:80]!r} is not a Hub repo id")
        url = self.release_url
        if url is not None and not (isinstance(url, str) and is_url(url)):
            raise ValueError("release_url must be an http(s) URL")
        if not isinstance(self.clip_head_width, int) or not 1 <= self.clip_head_width <= 16384:
            raise ValueError("clip_head_width must be an integer from 1 to 16384")
        if not isinstance(self.packaged, bool):
            raise ValueError("packaged must be true or false")


def _manifest_files() -> list[tuple[str, str]]:
    """(where, JSON text) of every manifest: $INFDIT_REGISTRY first, then the packaged ones."""
    out = []
    if settings().registry:
        d = Path(settings().registry)
        out += [(str(f), f.read_text()) for f in sorted(d.glob("*.json"))] if d.is_dir() else []
    pkg = resources.files("infdit_cli.weights.registry")
    out += [(f"infdit_cli/weights/registry/{f.name}", f.read_text())
            for f in sorted(pkg.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".json")]
    return out


def registry() -> dict[str, ModelSpec]:
    """Every known model by name."""
    out: dict[str, ModelSpec] = {}
    for where, text in _manifest_files():
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            spec = ModelSpec(**data)
        except (TypeError, ValueError) as e:
            raise WeightsError(f"bad model manifest {where}: {' '.join(str(e).split())[:200]}") from None
        out.setdefault(spec.name, spec)
    return out


def packaged_file(spec: ModelSpec) -> Path:
    """The weights file of a model that ships with the package (`"packaged": true`), checked against its
    manifest's size and sha256 (a few MB: hashed on every use).

    Raises:
        WeightsNotFound: the file is missing from this install.
        ChecksumMismatch: it is not the file the manifest names.
    """
    path = Path(str(resources.files("infdit_cli.weights.registry") / spec.filename))
    if not path.is_file():
        raise WeightsNotFound(f"{spec.name} should ship with infdit but {path} is missing; reinstall infdit")
    if (spec.size is not None and path.stat().st_size != spec.size) or (
            spec.sha256 and not cache.same_digest(sha256_file(path), spec.sha256)):
        raise ChecksumMismatch(f"{path} differs from the {spec.name} manifest's size or sha256; "
                               "reinstall infdit")
    return path


def download_command(name: str) -> str:
    """The one command that puts registry model `name` (or a URL) into the cache."""
    return "infdit download" if name == DEFAULT_MODEL else f"infdit download {name}"


def is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


# Hub naming rules (huggingface_hub's validate_repo_id, plus no path tricks in file names or revisions).
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_FILE_PART = re.compile(r"[A-Za-z0-9._+=,@ -]+")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,200}")


def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """`org/repo[/file][@revision]` -> (repo_id, filename or None, revision or None).

    Raises:
        InvalidReference: anything else (`..`, stray characters, empty parts); checked before any request.
    """
    ref, _, revision = text.partition("@")
    parts = ref.split("/")
    bad = InvalidReference(f"not a local file, a registry name, a URL or a Hub reference "
                           f"(org/repo[/file][@revision]): {text!r}")
    if len(parts) < 2 or not all(_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts[:2]):
        raise bad
    if any(not _FILE_PART.fullmatch(p) or p.strip(".") == "" or p != p.strip() for p in parts[2:]):
        raise bad
    if "@" in text and not (_REVISION.fullmatch(revision) and ".." not in revision
                            and not revision.startswith("/") and not revision.endswith("/")):
        raise bad
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return settings().hub_offline


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _repo_for(name: str, spec: ModelSpec, repo: str | None) -> str | None:
    return repo or (settings().repo if name == DEFAULT_MODEL else None) or spec.repo_id


def resolve_weights(weights: str | Path | None = None, *, repo: str | None = None,
                    revision: str | None = None, offline: bool | None = None, token: str | bool | None = None,
                    cache_dir: str | Path | None = None, tqdm_class=None) -> Path:
    """A local path to the weights `weights` names, downloading Hub files into the HF cache if needed.

    An existing path, or one written as a path (`/...`, `./...`, `~/...`), is a local file; a bare name is a
    registry entry (or a local file name with a weights suffix); `org/repo[/file][@rev]` is on the Hub; an
    http(s) URL is a file `infdit download URL` has put in the cache (never fetched from here). A registry
    model without a Hub repo resolves to its converted release in the cache; one that ships with the package
    (`demo`) to its packaged file.

    Raises:
        WeightsNotFound: a local path that does not exist, or a model/URL not downloaded yet (the message
            names the `infdit download` command that fixes it).
        InvalidReference: not a path, registry name, URL or well-formed Hub reference (exit 2).
        HubError: the Hub could not be reached (and nothing is cached), or answered 401/404.
        ChecksumMismatch: the file's sha256 differs from the manifest's (the cached copy is removed).
    """
    weights = weights if weights is not None else settings().weights or DEFAULT_MODEL
    text = str(weights)
    if is_url(text):
        hit = cached_checkpoint(check_url(text))
        if hit is None:
            raise WeightsNotFound(f"{text} is not downloaded yet: run `{download_command(text)}`")
        return hit.path
    path = Path(text).expanduser()
    explicit_local = text.startswith(("/", "./", "../", "~")) or "\\" in text
    if path.is_file() or explicit_local or ("/" not in text and path.suffix in _WEIGHT_SUFFIXES):
        if not path.is_file():
            raise WeightsNotFound(f"no such weights file: {path}")
        return path
    known = registry()  # a folder that happens to have a model's name does not shadow the model
    if text in known:
        spec = known[text]
        if spec.packaged:
            return packaged_file(spec)
        repo_id = _repo_for(text, spec, repo)
        hit = cached_checkpoint(spec.release_url) if spec.release_url else None
        if repo_id:
            try:
                return _download(repo_id, spec.filename, revision or spec.revision, spec.sha256, offline,
                                 token, cache_dir, tqdm_class)
            except HubError:
                if hit is None:
                    raise
        if hit is not None:
            return hit.path
        raise WeightsNotFound(f"no weights for {text} yet: run `{download_command(text)}`")
    if path.is_dir():
        raise WeightsNotFound(f"{path} is a folder, not a weights file")
    if "/" not in text:
        raise InvalidReference(f"unknown model {text!r} (known: {', '.join(sorted(known))}) and no such file")
    repo_id, filename, rev = parse_reference(text)
    return _download(repo_id, filename or "model.safetensors", revision or rev, None, offline, token,
                     cache_dir, tqdm_class)


def download(source: str | None = None, *, repo: str | None = None, revision: str | None = None,
             sha256: str | None = None, clip_head_width: int | None = None, keep: bool = False,
             offline: bool | None = None, token: str | bool | None = None,
             on_event: Callable[[object], None] | None = None, tqdm_class=None) -> Downloaded:
    """Put a model into the cache and return where it is (`infdit download`).

    `source` is a registry name (default `infdit-4x`), a Hub reference, or the http(s) URL of an
    official-format checkpoint. A model that ships with the package (`demo`) is answered with its packaged
    file, untouched by the network. A registry model's sources are tried in order: its Hub repo when one is
    configured (`repo`, $INFDIT_REPO, the manifest), then the authors' release file, which is streamed,
    resumed, verified (`sha256`, else the manifest's), converted once and cached. A second call answers from
    the cache without touching the network.

    Raises:
        InvalidReference: a malformed source or sha256 (nothing requested).
        WeightsNotFound: a registry model with no source configured.
        HubError, DownloadError: unreachable, 401/404, connection lost, disk full.
        ChecksumMismatch: the download's sha256 differs (nothing is left in the cache).
        ConvertError: the file is not an official Inf-DiT checkpoint.
    """
    text = source or DEFAULT_MODEL
    sha256 = check_sha256(sha256)
    if is_url(text):
        return _from_release(text, sha256, clip_head_width or 64, keep, offline, on_event)
    known = registry()
    if text not in known:
        if "/" not in text:
            raise InvalidReference(f"unknown model {text!r} (known: {', '.join(sorted(known))})")
        repo_id, filename, rev = parse_reference(text)
        return _from_hub(repo_id, filename or "model.safetensors", revision or rev, sha256, offline, token,
                         tqdm_class, text)
    spec = known[text]
    if spec.packaged:
        path = packaged_file(spec)
        return Downloaded(path, sha256_file(path), f"{PACKAGED_SOURCE} ({spec.filename})", cached=True)
    repo_id = _repo_for(text, spec, repo)
    if repo_id:
        try:
            return _from_hub(repo_id, spec.filename, revision or spec.revision, sha256 or spec.sha256,
                             offline, token, tqdm_class, f"{repo_id}/{spec.filename}")
        except HubError as e:
            if not spec.release_url:
                raise
            if on_event:
                on_event(Notice(f"{e}; trying the official release instead"))
    if spec.release_url:
        return _from_release(spec.release_url, sha256 or spec.release_sha256,
                             clip_head_width or spec.clip_head_width, keep, offline, on_event)
    raise WeightsNotFound(f"model {text!r} has no download source: set --repo or {REPO_ENV}")


def _from_release(url, sha256, clip_head_width, keep, offline, on_event) -> Downloaded:
    check_url(url)
    if _offline(offline):
        hit = cached_checkpoint(url)
        if hit is None:
            raise HubError(f"{url} is not in the cache and offline mode is on; run the command while online")
        return hit
    return download_checkpoint(url, sha256=sha256, clip_head_width=clip_head_width, keep=keep,
                               on_event=on_event)


def _from_hub(repo_id, filename, revision, sha256, offline, token, tqdm_class, what) -> Downloaded:
    path = _download(repo_id, filename, revision, sha256, offline, token, None, tqdm_class)
    return Downloaded(path, cache.verified_sha256(path), what)


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub logs every retry as a warning; infdit reports one line instead."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _download(repo_id: str, filename: str, revision: str | None, sha256: str | None, offline: bool | None,
              token, cache_dir, tqdm_class) -> Path:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    what = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    local_only = _offline(offline)
    unreachable = False
    kw = dict(revision=revision, token=token, cache_dir=cache_dir)
    try:
        with _quiet_hub():
            if not local_only:
                # One metadata request without retries: hf_hub_download retries an unreachable Hub five
                # times with backoff (~30 s of warnings). Unreachable: fall back to the cache, as it would.
                try:
                    get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token,
                                         timeout=ETAG_TIMEOUT_S)
                except (HfHubHTTPError, HFValidationError):
                    raise
                except Exception:  # noqa: BLE001 - any transport error (connection, DNS, timeout, TLS)
                    unreachable = True
            path = Path(hf_hub_download(repo_id, filename, local_files_only=local_only or unreachable,
                                        tqdm_class=tqdm_class, **kw))
    except LocalEntryNotFoundError:
        if local_only:
            raise HubError(f"{what} is not in the HF cache and offline mode is on; run `infdit download` "
                           f"while online, or pass --weights FILE") from None
        raise HubError(f"could not reach the Hub at {_endpoint()} and {what} is not cached; "
                       f"pass a local file with --weights FILE, "
                       f"or download it first and use --offline") from None
    except HFValidationError as e:
        raise InvalidReference(f"not a valid Hub reference {what!r}: {str(e).splitlines()[0]}") from None
    except HfHubHTTPError as e:
        raise _hub_http_error(e, repo_id, filename, revision, what) from None
    except OSError as e:  # the connection dropped mid-download, a full disk, ...
        raise HubError(f"download of {what} failed: {e}; run the command again to resume") from None
    if sha256 and not cache.same_digest(cache.verified_sha256(path), sha256):
        _quarantine(path)
        raise ChecksumMismatch(f"{what}: sha256 differs from the manifest's; the cached copy was removed, "
                               f"run the command again to re-download")
    return path


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_http_error(e, repo_id: str, filename: str, revision: str | None, what: str) -> HubError:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = getattr(getattr(e, "response", None), "status_code", None)
    # Subclass order matters: gated and revision errors are repository errors too.
    if isinstance(e, GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its terms on the Hub and log in (HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return HubError(f"revision {revision!r} not found in {repo_id}")
    if status == 401:
        return HubError(f"401 unauthorized for {what}: the repo is private or missing; set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return HubError(f"repository {repo_id} not found on the Hub (or private: set HF_TOKEN)")
    if isinstance(e, EntryNotFoundError) or status == 404:
        return HubError(f"file {filename!r} not found in {repo_id}" + (f" at {revision}" if revision else ""))
    return HubError(f"the Hub answered {status} for {what}")


def _quarantine(path: Path) -> None:
    """Remove a bad cached file: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    if blob != path:
        blob.unlink(missing_ok=True)


def fetch_clip_tower(vector_dim: int, *, offline: bool | None = None, token: str | bool | None = None):
    """The CLIP vision tower for a converted file that lacks one: open_clip's ViT-L-14
    `datacomp_xl_s13b_b90k` weights from the Hub (safetensors), cached like any other download.

    Returns:
        (ClipConfig, {"clip.visual.<name>": tensor}).
    """
    from safetensors.torch import load_file

    spec = registry().get(CLIP_MODEL)
    if spec is None or not spec.repo_id:
        raise WeightsError(f"this weights file has no CLIP vision tower "
                           f"and no {CLIP_MODEL} manifest is known")
    cfg = ClipConfig(**(spec.clip_config or {}))
    if cfg.embed_dim != vector_dim:
        raise WeightsError(f"{CLIP_MODEL} gives {cfg.embed_dim}-d vectors; this model expects {vector_dim}")
    path = _download(spec.repo_id, spec.filename, spec.revision, spec.sha256, offline, token, None, None)
    tensors = load_file(str(path))
    visual = {f"clip.{k}": t for k, t in tensors.items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(f"{path} holds no visual.* tensors: not an open_clip model file")
    return cfg, visual
