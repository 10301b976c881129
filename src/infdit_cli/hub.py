"""Weights from the Hugging Face Hub: the model registry (`weights/*.json`), download, offline use, sha256.

`--weights` accepts a local `.safetensors` path, a Hub reference `org/repo[/file][@revision]`, or a registry
name. Downloads go through `huggingface_hub.hf_hub_download` into the standard HF cache (HF_HOME,
HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT are honoured), and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumMismatch, HubError, WeightsError, WeightsNotFound

__all__ = ["ModelSpec", "registry", "resolve_weights", "parse_reference", "sha256_file", "DEFAULT_MODEL",
           "fetch_clip_tower"]

DEFAULT_MODEL = "infdit-4x"
CLIP_MODEL = "clip-vit-l-14-datacomp"  # open_clip ViT-L-14 `datacomp_xl_s13b_b90k`, the official encoder
REPO_ENV = "INFDIT_REPO"  # overrides the default model's Hub repo id
WEIGHTS_ENV = "INFDIT_WEIGHTS"  # a default for --weights


@dataclass(frozen=True)
class ModelSpec:
    """One `weights/*.json` manifest."""

    name: str
    repo_id: str | None  # None: not published on the Hub yet; set --repo or INFDIT_REPO
    filename: str
    revision: str | None
    sha256: str | None
    size: int | None
    license: str
    source: str
    conversion: str
    description: str = ""
    clip_config: dict | None = None  # for CLIP vision towers: the `ClipConfig` fields


def _registry_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("INFDIT_REGISTRY"):
        dirs.append(Path(os.environ["INFDIT_REGISTRY"]))
    dirs.append(Path(__file__).resolve().parents[2] / "weights")  # the source checkout (editable install)
    return dirs


def registry() -> dict[str, ModelSpec]:
    """Every known model by name."""
    out: dict[str, ModelSpec] = {}
    for d in _registry_dirs():
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                spec = ModelSpec(**json.loads(f.read_text()))
            except (TypeError, ValueError) as e:
                raise WeightsError(f"bad model manifest {f}: {e}") from None
            out.setdefault(spec.name, spec)
    return out


def parse_reference(text: str) -> tuple[str, str | None, str | None]:
    """`org/repo[/file][@revision]` -> (repo_id, filename or None, revision or None)."""
    ref, _, revision = text.partition("@")
    parts = ref.split("/")
    if len(parts) < 2 or not all(parts):
        raise WeightsNotFound(f"not a local file, a registry name or a Hub reference (org/repo[/file][@rev]): {text}")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def sha256_file(path: Path, chunk: int = 2**24) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def resolve_weights(weights: str | Path | None = None, *, repo: str | None = None, revision: str | None = None,
                    offline: bool | None = None, token: str | bool | None = None,
                    cache_dir: str | Path | None = None, tqdm_class=None) -> Path:
    """A local path to the weights `weights` names, downloading into the HF cache if needed.

    An existing path, or one written as a path (`/...`, `./...`, `~/...`), is a local file; a bare name is a
    registry entry (or a local file name with a weights suffix); `org/repo[/file][@rev]` is on the Hub.

    Raises:
        WeightsNotFound: a local path that does not exist, or an unknown name.
        HubError: the Hub could not be reached (and nothing is cached), or answered 401/404.
        ChecksumMismatch: the file's sha256 differs from the manifest's (the cached copy is removed).
    """
    weights = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or DEFAULT_MODEL
    text = str(weights)
    path = Path(text).expanduser()
    explicit_local = text.startswith(("/", "./", "../", "~")) or "\\" in text
    if path.exists() or explicit_local or ("/" not in text and path.suffix in _WEIGHT_SUFFIXES):
        if not path.is_file():
            raise WeightsNotFound(f"no such weights file: {path}")
        return path
    known = registry()
    if text in known:
        spec = known[text]
        repo_id = repo or (os.environ.get(REPO_ENV) if text == DEFAULT_MODEL else None) or spec.repo_id
        if not repo_id:
            raise WeightsNotFound(
                f"model {text!r} has no published Hub repo yet: convert the official checkpoint "
                f"(infdit convert) and pass --weights FILE, or publish it and set --repo or {REPO_ENV}"
            )
        return _download(repo_id, spec.filename, revision or spec.revision, spec.sha256, offline, token,
                         cache_dir, tqdm_class)
    repo_id, filename, rev = parse_reference(text)
    return _download(repo_id, filename or "model.safetensors", revision or rev, None, offline, token, cache_dir,
                     tqdm_class)


def _download(repo_id: str, filename: str, revision: str | None, sha256: str | None, offline: bool | None,
              token, cache_dir, tqdm_class) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    local_only = _offline(offline)
    try:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir,
                                    local_files_only=local_only, tqdm_class=tqdm_class))
    except LocalEntryNotFoundError:  # subclass order matters: these before the generic HTTP error
        if local_only:
            raise HubError(f"{what} is not in the HF cache and offline mode is on; run `infdit download` "
                           f"while online, or pass --weights FILE") from None
        raise HubError(f"could not reach the Hub at {constants.ENDPOINT} and {what} is not cached; "
                       f"pass a local file with --weights FILE, or download it first and use --offline") from None
    except GatedRepoError:
        raise HubError(f"{repo_id} is gated: accept its terms on the Hub and log in (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in {repo_id}") from None
    except (RepositoryNotFoundError, EntryNotFoundError, HfHubHTTPError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubError(f"401 unauthorized for {what}: the repo is private or missing; set HF_TOKEN") from None
        if isinstance(e, RepositoryNotFoundError):
            raise HubError(f"repository {repo_id} not found on the Hub (or private: set HF_TOKEN)") from None
        if isinstance(e, EntryNotFoundError) or status == 404:
            raise HubError(f"file {filename!r} not found in {repo_id}" + (f" at {revision}" if revision else ""))
        raise HubError(f"the Hub answered {status} for {what}") from None
    except OSError as e:  # the connection dropped mid-download, a full disk, ...
        raise HubError(f"download of {what} failed: {e}; run the command again to resume") from None
    if sha256 and sha256_file(path) != sha256:
        _quarantine(path)
        raise ChecksumMismatch(f"{what}: sha256 differs from the manifest's; the cached copy was removed, "
                               f"run the command again to re-download")
    return path


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

    from .config import ClipConfig

    spec = registry().get(CLIP_MODEL)
    if spec is None or not spec.repo_id:
        raise WeightsError(f"this weights file has no CLIP vision tower and no {CLIP_MODEL} manifest is known")
    cfg = ClipConfig(**(spec.clip_config or {}))
    if cfg.embed_dim != vector_dim:
        raise WeightsError(f"{CLIP_MODEL} gives {cfg.embed_dim}-d vectors; this model expects {vector_dim}")
    path = _download(spec.repo_id, spec.filename, spec.revision, spec.sha256, offline, token, None, None)
    tensors = load_file(str(path))
    visual = {f"clip.{k}": t for k, t in tensors.items() if k.startswith("visual.")}
    if not visual:
        raise WeightsError(f"{path} holds no visual.* tensors: not an open_clip model file")
    return cfg, visual
