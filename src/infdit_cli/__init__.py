"""infdit: Inf-DiT image upscaling, exact to the published model and frugal with memory.

The names below are imported on first use (PEP 562), so `import infdit_cli` and its light modules (the
launcher, the CLI's --help) start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__ as __version__

_EXPORTS = {"InfDiTConfig": "model.config", "BlockEngine": "engine.blocks", "denoise": "engine.blocks",
            "InfDiT": "model.infdit",
            "UpscaleOptions": "jobs.pipeline", "upscale": "jobs.pipeline", "Upscaler": "jobs.upscaler",
            "UpscaleResult": "jobs.upscaler", "load_model": "weights.format"}
__all__ = ["BlockEngine", "InfDiT", "InfDiTConfig", "UpscaleOptions", "UpscaleResult", "Upscaler", "denoise",
           "load_model", "upscale"]  # = sorted(_EXPORTS), written out for readers and linters

if TYPE_CHECKING:
    from .engine.blocks import BlockEngine, denoise
    from .jobs.pipeline import UpscaleOptions, upscale
    from .jobs.upscaler import Upscaler, UpscaleResult
    from .model.config import InfDiTConfig
    from .model.infdit import InfDiT
    from .weights.format import load_model


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
