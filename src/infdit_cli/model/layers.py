"""Stateless maths shared by the Inf-DiT model: time embedding, 2-D RoPE, EDM scalings.

Each function reproduces the matching piece of THUDM/Inf-DiT (`dit/model.py`, `dit/embeddings.py`,
`dit/precond.py`) operation for operation, so float32 results agree to rounding.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "timestep_embedding",
    "rope_frequencies",
    "rope_cos_sin",
    "apply_rope",
    "signed_sin",
    "edm_scalings",
]


def timestep_embedding(c_noise: torch.Tensor, channels: int = 192,
                       max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of EDM's c_noise, [cos, sin] halves (`dit/embeddings.py` `TimeEmbedding`)."""
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=c_noise.device) / half
    freqs = (1 / max_positions) ** freqs
    args = c_noise.reshape(-1).ger(freqs.to(c_noise.dtype))  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=1)  # (B, channels)


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The head_dim/4 RoPE frequencies of one axis, each repeated for an interleaved pair: (head_dim/2,)."""
    dim = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    return freqs.repeat_interleave(2)


@functools.cache
def _frequencies_on(head_dim: int, device: torch.device) -> torch.Tensor:
    """`rope_frequencies` on `device`, made once per process: a copy from pageable host memory to a GPU
    waits for the stream's queued work, and the engine asks for RoPE angles once per rectangle."""
    return rope_frequencies(head_dim).to(device)


def rope_cos_sin(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, table_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 2-D RoPE angles for token positions (any shape), positions taken mod `table_size`.

    The official model looks the angles up in a (R, R, head_dim) table built as `pos * freq` in float32;
    computing `pos * freq` here gives the same float32 numbers without holding the table. The first half of
    the head dim rotates by row, the second by column.
    """
    freqs = _frequencies_on(head_dim, rows.device)  # (hd/2,)
    r = (rows % table_size).float()[..., None] * freqs
    c = (cols % table_size).float()[..., None] * freqs
    angles = torch.cat([r, c], dim=-1)  # (..., hd)
    return angles.cos(), angles.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with `rotate_half`'s sign folded in: (-sin, +sin) on each interleaved pair."""
    pairs = sin.unflatten(-1, (-1, 2))  # negation is exact; no constant travels to the device
    return torch.stack((-pairs[..., 0], pairs[..., 1]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, ssin: torch.Tensor, out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Rotate `x` (..., T, heads, hd) by angles given as cos and `signed_sin` (..., T, hd).

    The official `x * cos + rotate_half(x) * sin`, where rotate_half maps each pair (x0, x1) to (-x1, x0):
    that is the pair-swapped x times the signed sin (the sign flip is exact). Into `out` when given.
    """
    cos, ssin = cos.unsqueeze(-2).to(x.dtype), ssin.unsqueeze(-2).to(x.dtype)
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = torch.mul(x, cos, out=out) if out is not None else x * cos
    return out.addcmul_(swapped, ssin)


def edm_scalings(
    sigma: torch.Tensor, sigma_data: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise (`dit/precond.py`)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    c_noise = 0.25 * sigma.log()
    return c_skip, c_out, c_in, c_noise
