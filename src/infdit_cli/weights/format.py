"""Converted Inf-DiT weights: the safetensors format, strict checking, loading.

A converted file holds every tensor of the model (the CLIP vision tower included) under our names, and its
metadata holds `infdit_config` (the `InfDiTConfig` JSON). Loading checks names, shapes and dtypes against
that config before anything is built, so a wrong file fails with the keys named, never half-loaded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import WeightsError, WeightsNotFound
from ..files import atomic_write
from ..model.clip import CLIP_MEAN, CLIP_STD, ClipImageEncoder
from ..model.config import ClipConfig, InfDiTConfig
from ..model.infdit import InfDiT
from ..units import few

__all__ = ["load_model", "save_model_file", "read_config", "check_state_dict",
           "expected_shapes"]

_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


def expected_shapes(cfg: InfDiTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a model with `cfg` has (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = InfDiT(cfg)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


def check_state_dict(tensors: dict[str, torch.Tensor], cfg: InfDiTConfig,
                     error: type[Exception] = WeightsError) -> None:
    """Every expected key present with its shape and a float dtype; no extra key."""
    check_shapes({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, cfg, error)


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def inspect_file(path: str | Path) -> tuple[InfDiTConfig, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Config and (shape, dtype) of every tensor, checked against each other, from the header alone."""
    path = Path(path)
    cfg = read_config(path)
    header = _read_header(path)
    info = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}")
        info[name] = (tuple(entry.get("shape", ())), dtype)
    check_shapes(info, cfg)
    return cfg, info


def check_shapes(info: dict[str, tuple[tuple[int, ...], torch.dtype]], cfg: InfDiTConfig,
                 error: type[Exception] = WeightsError) -> None:
    want = expected_shapes(cfg)
    tensors = {k: _Meta(*v) for k, v in info.items()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing:
        raise error(f"not an Inf-DiT model for its config: missing {few(missing)}")
    if extra:
        raise error(f"not an Inf-DiT model for its config: unexpected {few(extra)}")
    bad = [f"{k} {tuple(tensors[k].shape)} (expected {want[k]})" for k in want
           if tuple(tensors[k].shape) != want[k]]
    if bad:
        raise error(f"shapes contradict the config: {few(bad)}")
    wrong = [f"{k} ({tensors[k].dtype})" for k in want if tensors[k].dtype not in _FLOAT_DTYPES]
    if wrong:
        raise error(f"tensors must be float32/float16/bfloat16: {few(wrong)}")


class _Meta:
    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], cfg: InfDiTConfig,
                    extra_metadata: dict[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a converted file atomically (temporary file in the target directory, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise WeightsError(f"{path} exists; pass --overwrite to replace it")
    meta = {"format": "pt", "infdit_config": cfg.to_json(), **(extra_metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o600)


def _read_header(path: Path) -> dict:
    """The safetensors JSON header, validated against the file size before any tensor is touched."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise WeightsError(f"{path} is not a valid safetensors file (header length {n} exceeds the file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"{path} is not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a valid safetensors file (header is not a mapping)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise WeightsError(f"{path}: malformed entry for tensor {name}") from None
    if 8 + n + end > size:
        raise WeightsError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}")
    return header


def read_config(path: str | Path) -> InfDiTConfig:
    """The `InfDiTConfig` stored in a converted file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"no such weights file: {path}")
    try:
        header = _read_header(path)
    except WeightsError:
        if _looks_like_pickle(path):
            raise WeightsError(
                f"{path} is a PyTorch pickle, which infdit never loads at run time; "
                f"convert it first: infdit convert {path} -o model.safetensors"
            ) from None
        raise
    meta = header.get("__metadata__") or {}
    if "infdit_config" not in meta:
        raise WeightsError(f"{path} has no infdit_config metadata: not a file made by `infdit convert`")
    try:
        return InfDiTConfig.from_json(meta["infdit_config"])
    except (ValueError, TypeError, RecursionError) as e:  # json's errors are ValueErrors
        reason = " ".join(str(e).split())[:200]
        raise WeightsError(f"{path}: invalid infdit_config metadata: {reason}") from None


def _looks_like_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(2)
    return head == b"PK" or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")  # zip / raw pickle


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = torch.float32,
               clip_tower: Callable[[int], tuple[ClipConfig, dict[str, torch.Tensor]]] | None = None):
    """Load a converted `.safetensors` file into an `InfDiT` in eval mode.

    Args:
        path: a file written by `infdit convert` (or `save_model_file`).
        device: where the model runs.
        dtype: parameter dtype; None keeps the file's.
        clip_tower: for a file without the CLIP vision tower: called with the vector size, returns the
            tower's config and tensors (`hub.fetch_clip_tower` fetches open_clip's). The file format
            knows nothing of where weights come from: the caller that resolved the file decides.

    Raises:
        WeightsNotFound: no file at `path`.
        WeightsError: not a safetensors file, truncated, missing/extra keys, wrong shapes or dtypes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg, _ = inspect_file(path)  # names, shapes and dtypes checked before any data is read
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if cfg.clip is None:  # a file without the CLIP tower: the caller's (open_clip's weights from the Hub)
        if clip_tower is None:
            raise WeightsError(f"{path} has no CLIP vision tower, and no source for one was given")
        clip_cfg, clip_tensors = clip_tower(cfg.vector_dim)
        cfg = cfg.with_(clip=clip_cfg)
        tensors.update(clip_tensors)
    check_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = InfDiT(cfg)
    if dtype is not None:
        tensors = {k: t.to(dtype) for k, t in tensors.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers (CLIP mean/std) were created on meta; rebuild them before moving.
    for mod in model.modules():
        if isinstance(mod, ClipImageEncoder):
            mod.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
            mod.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    leftover = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not leftover, f"tensors left on meta: {leftover}"
    return model.to(device).eval().requires_grad_(False)
