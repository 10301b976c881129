"""EDM sampling: the Karras et al. (2022) noise schedule and Heun sampler, over any denoiser callable.

Equivalent to THUDM/Inf-DiT `dit/sampling/discretizers.py` `EDMDiscretization` and
`dit/sampling/samplers.py` `ConcatSRHeunEDMSampler` (s_churn = 0), in the same arithmetic. The sampler
works in four preallocated images (`HeunState`) updated in place, operation for operation as the
out-of-place formulas (so the numbers are identical), and in row chunks, so memory-mapped state stays
mostly on disk.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..events import StepDone
from ..units import row_chunks
from .storage import Scratch

__all__ = ["edm_sigmas", "sample_heun", "HeunState"]

CHUNK_BYTES = 64 * 2**20  # rows per in-place update: about this many bytes of each image


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


@dataclass
class HeunState:
    """The sampler's images: x (the state between steps), d, the Euler point x2, and den (each denoiser
    output, then the second derivative in place). Between steps only `x` matters."""

    x: torch.Tensor
    d: torch.Tensor
    x2: torch.Tensor
    den: torch.Tensor
    scratch: Scratch | None = None
    names: dict[str, str] | None = None  # the scratch name behind each image, when allocated there

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", scratch: Scratch | None = None, *, prefix: str = "heun",
                 reuse: tuple[str, ...] = ()) -> HeunState:
        """Four images of `shape`; on the host through `scratch` (memory-mapped under --low-memory).

        `reuse`: scratch names whose existing files are mapped as they are (a checkpoint's x), not cleared.
        """
        device = torch.device(device)
        if device.type == "cpu" and scratch is not None:
            names = {k: f"{prefix}_{k}" for k in ("x", "d", "x2", "den")}
            t = [scratch.empty(n, shape, dtype, reuse=n in reuse) for n in names.values()]
            return cls(*t, scratch=scratch, names=names)
        return cls(*(torch.empty(shape, dtype=dtype, device=device) for _ in range(4)))

    def swap_x(self) -> None:
        """x and x2 trade places: the new state was written into x2, so x (a checkpoint) stays intact."""
        self.x, self.x2 = self.x2, self.x
        if self.names is not None:
            self.names["x"], self.names["x2"] = self.names["x2"], self.names["x"]

    def to(self, device: torch.device | str, scratch: Scratch | None = None, *,
           prefix: str = "heun") -> HeunState:
        """The same state on another device (only x is copied: the rest is scratch between steps)."""
        new = HeunState.allocate(tuple(self.x.shape), self.x.dtype, device, scratch, prefix=prefix)
        new.x.copy_(self.x)
        return new

    def rows(self) -> list[slice]:
        """Row slices that split each image into ~CHUNK_BYTES pieces (one piece when in RAM)."""
        h = self.x.shape[-2]
        if self.scratch is None or not self.scratch.mapped:
            return [slice(0, h)]
        return row_chunks(h, self.x[..., :1, :].numel() * self.x.element_size(), CHUNK_BYTES)

    def trim(self) -> None:
        if self.scratch is not None:
            self.scratch.trim()


def _accepts_out(fn: Callable) -> bool:
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def sample_heun(denoise: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, *,
                callback: Callable[[StepDone], None] | None = None, state: HeunState | None = None,
                start: int = 0,
                on_denoised: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Implements Algorithm 2 (Heun steps, deterministic) from Karras et al. (2022).

    Args:
        denoise: D(x, sigma[, out]) with sigma a (B,) tensor; with an `out` parameter it writes into the
            given tensor instead of allocating one.
        x: the state at step `start` (at 0: x_0 = lr_up + noise * sigmas[0]); never modified, unless it
            is `state.x` itself.
        sigmas: (steps+1,) from `edm_sigmas`, ending in 0.
        callback: receives a `StepDone` after every step.
        state: the four images to work in (default: new ones like x). After a step, `state.x` is the
            state to resume from (x and x2 trade tensors every step: read them from `state`).
        start: the first step to run (a resumed run).
        on_denoised: called as (i, D(x_i; sigma_i)) after the first call of step i, with the denoiser's
            output image itself (valid only during the call: copy what you keep).

    Each step writes x_{i+1} into the Euler image and swaps it with x, so between two `callback`s the
    previous state is never overwritten in place: a memory-mapped `state.x` is a consistent checkpoint
    from one `callback` until the first call of the step after the next one.

    Returns:
        The final sample: `state.x`.
    """
    if state is None:
        state = HeunState.allocate(tuple(x.shape), x.dtype, x.device)
    if x is not state.x:
        state.x.copy_(x)
    with_out = _accepts_out(denoise)

    def call(inp: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if with_out:
            return denoise(inp, sigma, out=state.den)
        return state.den.copy_(denoise(inp, sigma))

    st = state
    s_in = st.x.new_ones(st.x.shape[0], dtype=torch.float32)
    # float32 also for a bf16 state: sigmas and steps unrounded
    sigmas = sigmas.to(st.x.device, torch.float32)
    steps = len(sigmas) - 1
    calls = 2 * start - (1 if start == steps else 0)
    for i in range(start, steps):
        sigma, next_sigma = sigmas[i] * s_in, sigmas[i + 1] * s_in
        s, ns = sigma.view(-1, 1, 1, 1), next_sigma.view(-1, 1, 1, 1)
        dt = (next_sigma - sigma).view(-1, 1, 1, 1)
        last = float(next_sigma.sum()) < 1e-14
        # Evaluate dx/dt at t_i; Euler step from t_i to t_{i+1}.
        den = call(st.x, sigma)
        if on_denoised is not None:
            on_denoised(i, den)  # D(x_i; sigma_i): the model's estimate of the final image at this step
        for r in st.rows():
            x, d, x2 = st.x[..., r, :], st.d[..., r, :], st.x2[..., r, :]
            torch.sub(x, den[..., r, :], out=d).div_(s)  # d = (x - D) / sigma
            torch.mul(d, dt, out=x2).add_(x)  # x_euler = x + dt * d (last step: the result, at sigma = 0)
            st.trim()
        calls += 1
        if not last:
            # Apply 2nd order correction.
            den = call(st.x2, next_sigma)
            for r in st.rows():
                x, d, x2, dn = st.x[..., r, :], st.d[..., r, :], st.x2[..., r, :], den[..., r, :]
                torch.sub(x2, dn, out=dn).div_(ns)  # d_new = (x_euler - D) / next_sigma
                torch.add(x, dn.add_(d).div_(2.0).mul_(dt), out=x2)  # x + (d + d_new) / 2 * dt, into x2
                st.trim()
            calls += 1
        st.swap_x()  # x_{i+1} is in the former x2; x_i was never overwritten during the step
        if callback is not None:
            callback(StepDone(i=i + 1, steps=steps, calls=calls, sigma=float(sigmas[i + 1])))
    return st.x
