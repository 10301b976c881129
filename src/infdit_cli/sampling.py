"""EDM sampling: the Karras et al. (2022) noise schedule and Heun sampler, over any denoiser callable.

Equivalent to THUDM/Inf-DiT `dit/sampling/discretizers.py` `EDMDiscretization` and
`dit/sampling/samplers.py` `ConcatSRHeunEDMSampler` (s_churn = 0), in the same float32 arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .events import StepDone

__all__ = ["edm_sigmas", "sample_heun"]


def edm_sigmas(steps: int = 20, sigma_min: float = 0.002, sigma_max: float = 40.0, rho: float = 7.0,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Karras et al. (2022) eq. 5: `steps` sigmas from sigma_max down to sigma_min, then 0. (steps+1,)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ramp = torch.linspace(0, 1, steps, device=device)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_heun(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                sigmas: torch.Tensor, *, callback: Callable[[StepDone], None] | None = None) -> torch.Tensor:
    """Implements Algorithm 2 (Heun steps, deterministic) from Karras et al. (2022).

    Args:
        denoise: D(x, sigma) with sigma a (B,) tensor.
        x: the initial state x_0 = lr_up + noise * sigmas[0] (never modified).
        sigmas: (steps+1,) from `edm_sigmas`, ending in 0.
        callback: receives a `StepDone` after every step.

    Returns:
        The final sample, same shape and device as x.
    """
    s_in = x.new_ones(x.shape[0])
    sigmas = sigmas.to(x.device, x.dtype)
    steps, calls = len(sigmas) - 1, 0
    for i in range(steps):
        sigma, next_sigma = sigmas[i] * s_in, sigmas[i + 1] * s_in
        # Evaluate dx/dt at t_i.
        d = (x - denoise(x, sigma)) / sigma.view(-1, 1, 1, 1)
        dt = (next_sigma - sigma).view(-1, 1, 1, 1)
        # Euler step from t_i to t_{i+1}.
        x_euler = x + dt * d
        calls += 1
        if float(next_sigma.sum()) < 1e-14:
            x = x_euler  # last step: no correction at sigma = 0
        else:
            # Apply 2nd order correction.
            d_new = (x_euler - denoise(x_euler, next_sigma)) / next_sigma.view(-1, 1, 1, 1)
            x = x + (d + d_new) / 2.0 * dt
            calls += 1
        if callback is not None:
            callback(StepDone(i=i + 1, steps=steps, calls=calls, sigma=float(sigmas[i + 1])))
    return x
