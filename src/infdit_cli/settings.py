"""Every environment variable infdit reads, read here and nowhere else.

User settings:
    INFDIT_CACHE             the cache folder (downloads, converted weights, verified digests, calibration);
                             default `$HF_HOME/infdit`.
    HF_HOME                  read by huggingface_hub (its `constants.HF_HOME`), which `cache_root`
                             follows when INFDIT_CACHE is not set.
    HF_HUB_OFFLINE           1/true/yes/on: never reach the Hub (huggingface_hub reads it too).
    INFDIT_OFFLINE           the same, for infdit's own downloads only.
    INFDIT_WEIGHTS           a default for --weights.
    INFDIT_REPO              the Hub repo id of the default model, instead of its manifest's.
    INFDIT_REGISTRY          a folder of extra model manifests, read before the packaged ones.
    INFDIT_DEBUG             non-empty: tracebacks with the one-line errors, torchrun's own log (as -v).
    INFDIT_DOWNLOAD_TIMEOUT  seconds to connect and per read (default 10).
    INFDIT_RANK_TIMEOUT      seconds a rank waits for the others (`distributed.timeout_seconds`).
    INFDIT_HOST_MEMORY       host memory to plan for (e.g. 96GB), where the kernel's figures do not tell.
    INFDIT_CALIBRATION       the file of this machine's measured rates (default calibration.json in the
                             cache): one shared by machines of one kind, or by jobs with caches of their own;
                             never written over a file that is not such a table.
    XDG_DATA_HOME            where `infdit serve` keeps its jobs (default ~/.local/share).
    PYTORCH_CUDA_ALLOC_CONF  only whether it is set: then infdit leaves the CUDA allocator as the user asked.

Set by infdit or torchrun for the processes they start:
    RANK, WORLD_SIZE, LOCAL_RANK   torchrun: this process's place in the job.
    INFDIT_EXIT_FILE         `infdit_cli.launch`: where each rank records how it ended.
    INFDIT_BENCH_PARENT      `infdit bench`: the pid its measuring child dies with.

`settings()` parses them once, and again only when one of them has changed in this process's environment
(`launch` sets INFDIT_EXIT_FILE for its ranks; tests set variables), so every reader sees one consistent
answer. `override` changes a setting for this process without touching the environment (-v sets `debug`);
`Settings.read(env)` reads a given mapping instead (tests of torchrun's variables).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Settings", "settings", "override", "clear_overrides", "cache_root"]

_TRUE = ("1", "true", "yes", "on")
NAMES = ("INFDIT_CACHE", "HF_HUB_OFFLINE", "INFDIT_OFFLINE", "INFDIT_WEIGHTS", "INFDIT_REPO",
         "INFDIT_REGISTRY", "INFDIT_DEBUG", "INFDIT_DOWNLOAD_TIMEOUT", "INFDIT_RANK_TIMEOUT",
         "INFDIT_HOST_MEMORY", "INFDIT_CALIBRATION",
         "XDG_DATA_HOME", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "RANK", "WORLD_SIZE", "LOCAL_RANK",
         "INFDIT_EXIT_FILE", "INFDIT_BENCH_PARENT")


def _flag(text: str | None) -> bool:
    return (text or "").strip().lower() in _TRUE


@dataclass(frozen=True)
class Settings:
    """The environment as infdit understands it (see the module's docstring). Empty values count as unset;
    numbers are checked where they are used (a bad one is an error of the command that needs it)."""

    cache: str | None = None
    hub_offline: bool = False  # HF_HUB_OFFLINE
    offline: bool = False  # HF_HUB_OFFLINE or INFDIT_OFFLINE
    weights: str | None = None
    repo: str | None = None
    registry: str | None = None
    debug: bool = False
    download_timeout: str | None = None
    rank_timeout: str = ""
    host_memory: str | None = None
    calibration: str | None = None
    data_home: str | None = None
    alloc_conf_set: bool = False
    rank: str | None = None
    world_size: str | None = None
    local_rank: str | None = None
    exit_file: str | None = None
    bench_parent: str | None = None

    @classmethod
    def read(cls, env: Mapping[str, str]) -> Settings:
        def get(name: str) -> str | None:
            return env.get(name) or None

        return cls(
            cache=get("INFDIT_CACHE"),
            hub_offline=_flag(get("HF_HUB_OFFLINE")),
            offline=_flag(get("HF_HUB_OFFLINE")) or _flag(get("INFDIT_OFFLINE")),
            weights=get("INFDIT_WEIGHTS"),
            repo=get("INFDIT_REPO"),
            registry=get("INFDIT_REGISTRY"),
            debug=bool(get("INFDIT_DEBUG")),
            download_timeout=get("INFDIT_DOWNLOAD_TIMEOUT"),
            rank_timeout=get("INFDIT_RANK_TIMEOUT") or "",
            host_memory=get("INFDIT_HOST_MEMORY"),
            calibration=get("INFDIT_CALIBRATION"),
            data_home=get("XDG_DATA_HOME"),
            alloc_conf_set="PYTORCH_CUDA_ALLOC_CONF" in env or "PYTORCH_ALLOC_CONF" in env,
            # torchrun's: an empty value is kept (WORLD_SIZE="" is one process, as "1")
            rank=env.get("RANK"),
            world_size=env.get("WORLD_SIZE"),
            local_rank=env.get("LOCAL_RANK"),
            exit_file=get("INFDIT_EXIT_FILE"),
            bench_parent=get("INFDIT_BENCH_PARENT"),
        )


_read: tuple[tuple[str | None, ...], Settings] | None = None
_overrides: dict[str, object] = {}


def settings() -> Settings:
    """This process's settings: the environment's (parsed again only when one of `NAMES` changed), with
    `override`'s changes."""
    global _read
    key = tuple(os.environ.get(name) for name in NAMES)
    if _read is None or _read[0] != key:
        _read = key, Settings.read(os.environ)
    return dataclasses.replace(_read[1], **_overrides) if _overrides else _read[1]


def override(**changes: object) -> None:
    """Change settings for this process (e.g. `override(debug=True)` for -v); the environment is untouched,
    so processes started from here do not inherit the change."""
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(changes) - names
    if unknown:
        raise TypeError(f"no such setting: {', '.join(sorted(unknown))}")
    _overrides.update(changes)


def clear_overrides() -> None:
    """Back to the environment's settings (each CLI run in a process starts here)."""
    _overrides.clear()


def cache_root() -> Path:
    """`$INFDIT_CACHE`, else `$HF_HOME/infdit` (HF_HOME as huggingface_hub resolves it)."""
    if settings().cache:
        return Path(settings().cache).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME).expanduser() / "infdit"
