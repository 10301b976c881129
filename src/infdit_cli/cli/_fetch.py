"""Weights on first use: a registry model not in the cache is fetched once, through `infdit download`'s path.

The CLI calls `ensure_weights` after every check that needs no weights (usage, input, output, plan) and before
loading: one line says what is fetched, how big it is and where it goes, then the download's progress bar.
`before` (the command's plan line, the CPU-fallback line) is called first, so the job is known before the
wait. Offline (`--offline`, HF_HUB_OFFLINE=1, INFDIT_OFFLINE=1) keeps the one-line "no weights yet" error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..errors import HubError, WeightsNotFound
from ..settings import cache_root, settings
from ..units import format_bytes
from ..weights.hub import DEFAULT_MODEL, download, registry, resolve_weights
from ._text import safe

__all__ = ["ensure_weights", "offline_mode"]


def offline_mode(flag: bool) -> bool:
    """--offline, HF_HUB_OFFLINE or INFDIT_OFFLINE."""
    return bool(flag) or settings().offline


def _size_text(spec) -> str:

    size = spec.release_size if spec.release_url and not spec.repo_id else spec.size
    return f" ({format_bytes(size)})" if isinstance(size, int) and size > 0 else ""


def ensure_weights(weights, repo, offline: bool, quiet: bool,
                   before: Callable[[], None] | None = None) -> None:
    """Download the registry model `weights` (default: $INFDIT_WEIGHTS, else infdit-4x) if it is not cached.

    Does nothing for files, URLs, Hub references or a model already in the cache, and nothing offline (the
    loader then gives its one-line error). Errors are `infdit download`'s (one line; a `.part` is kept and
    resumed by the next run).

    `before` is called just before a download starts: here for a registry model, or before the loader
    fetches a Hub reference that is not in the HF cache yet.
    """
    name = str(weights if weights is not None else settings().weights or DEFAULT_MODEL)
    if offline_mode(offline):
        return
    try:
        known = registry()
    except Exception:  # noqa: BLE001 - a bad manifest is reported by the loader, in its words
        return
    if name not in known:
        if before is not None and "/" in name:
            _before_hub_fetch(name, repo, before)
        return
    try:
        resolve_weights(name, repo=repo, offline=True)
        return
    except WeightsNotFound:
        pass
    except Exception:  # noqa: BLE001 - anything else: the loader says it
        return
    if before is not None:
        before()
    from rich.console import Console
    from rich.text import Text

    from .hub_cmds import _DownloadDisplay, _silent_tqdm

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    console.print(Text(safe(f"downloading {name}{_size_text(known[name])} once into {cache_root()}; "
                            "later runs use it offline")))
    show = not quiet and sys.stderr.isatty()
    display = _DownloadDisplay() if show else None
    try:
        download(name, repo=repo, offline=False, on_event=display,
                 tqdm_class=None if show else _silent_tqdm())
    finally:
        if display is not None:
            display.stop()


def _before_hub_fetch(name: str, repo, before: Callable[[], None]) -> None:
    """`before()` where `name` is a Hub reference the loader will download (not in the HF cache)."""
    try:
        resolve_weights(name, repo=repo, offline=True)  # a cache look-up only
    except HubError:  # "not in the HF cache": the loader fetches it
        before()
    except Exception:  # noqa: BLE001 - a missing file, an URL not downloaded: the loader's one line
        pass
