"""Sizes and durations as people write and read them: '8GB' -> bytes, bytes -> '1.5 GiB', seconds -> '3 min'.

Standard library only: the command line parses its options with these before anything heavy is imported."""

from __future__ import annotations

import math

__all__ = ["parse_bytes", "format_bytes", "format_seconds", "row_chunks", "few"]

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'8GB', '512MiB', '1.5g', '1000000' -> bytes (binary units: 1 GB = 2^30, as GPU memory is sold)."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a memory size: {text!r} (try 8GB or 512MB)") from None
    if unit not in _UNITS or value <= 0 or not math.isfinite(value):
        raise ValueError(f"not a memory size: {text!r} (try 8GB or 512MB)")
    return int(value * _UNITS[unit])


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_seconds(s: float) -> str:
    """'0.4 s', '12 s', '3 min', '2.5 h', '3.1 days'."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def row_chunks(height: int, row_bytes: int, budget: int) -> list[slice]:
    """Slices of `height` rows, each about `budget` bytes of `row_bytes`-byte rows (at least one row)."""
    step = max(1, budget // max(1, row_bytes))
    return [slice(r, min(r + step, height)) for r in range(0, height, step)]


def few(items: list[str], n: int = 3) -> str:
    """The first `n` of `items`, and how many more: 'a, b, c and 4 more'."""
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
