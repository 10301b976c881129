import math

import pytest
import torch

from infdit_cli.engine.sampling import edm_sigmas, sample_heun
from infdit_cli.events import StepDone


def test_sigmas_closed_form():
    s = edm_sigmas(10, sigma_min=0.002, sigma_max=40.0, rho=7.0).double()
    for i in range(10):
        expect = (40 ** (1 / 7) + i / 9 * (0.002 ** (1 / 7) - 40 ** (1 / 7))) ** 7
        assert math.isclose(s[i].item(), expect, rel_tol=1e-5)
    assert s[-1] == 0 and len(s) == 11


def test_sigmas_reject_zero_steps():
    with pytest.raises(ValueError):
        edm_sigmas(0)


def test_heun_on_gaussian_data_matches_ode_solution():
    """Data ~ N(0, s^2): D(x; sigma) = x s^2/(sigma^2+s^2); the probability-flow ODE solution is
    x(sigma) = x0 sqrt(sigma^2+s^2)/sqrt(sigma0^2+s^2)."""
    s = 0.5
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 40
    sigmas = edm_sigmas(200, sigma_max=40.0)
    out = sample_heun(lambda x, sig: x * s**2 / (sig.view(-1, 1, 1, 1) ** 2 + s**2), x0, sigmas)
    exact = x0 * s / math.sqrt(40.0**2 + s**2)
    torch.testing.assert_close(out, exact, atol=2e-3, rtol=0)


def test_heun_counts_calls_and_does_not_mutate_input():
    calls = []
    events: list[StepDone] = []
    x0 = torch.ones(1, 3, 2, 2)
    keep = x0.clone()

    def den(x, sig):
        calls.append(float(sig[0]))
        return x * 0.5

    sample_heun(den, x0, edm_sigmas(20), callback=events.append)
    assert len(calls) == 39 and events[-1].calls == 39 and events[-1].steps == 20
    assert torch.equal(x0, keep)


def _reference_heun(denoise, x, sigmas):
    """The out-of-place formulas, as the official sampler writes them."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, next_sigma = sigmas[i] * s_in, sigmas[i + 1] * s_in
        d = (x - denoise(x, sigma)) / sigma.view(-1, 1, 1, 1)
        dt = (next_sigma - sigma).view(-1, 1, 1, 1)
        x_euler = x + dt * d
        if float(next_sigma.sum()) < 1e-14:
            x = x_euler
        else:
            d_new = (x_euler - denoise(x_euler, next_sigma)) / next_sigma.view(-1, 1, 1, 1)
            x = x + (d + d_new) / 2.0 * dt
    return x


def _nonlinear(x, sig):
    return torch.tanh(x * 0.7) * 0.9 + 0.01 * sig.view(-1, 1, 1, 1)


@pytest.mark.parametrize("mapped", [False, True])
def test_in_place_heun_is_bit_identical_to_the_formulas(tmp_path, mapped, monkeypatch):
    """Four preallocated images updated in place (in row chunks when memory-mapped) give the very same
    bits as the out-of-place formulas."""
    from infdit_cli.engine import sampling
    from infdit_cli.engine.sampling import HeunState
    from infdit_cli.engine.storage import Scratch

    monkeypatch.setattr(sampling, "CHUNK_BYTES", 3 * 4 * 37 * 5)  # 5-row chunks: many, ragged
    x0 = torch.randn(1, 3, 23, 37, generator=torch.Generator().manual_seed(1)) * 10
    sigmas = edm_sigmas(6)
    ref = _reference_heun(_nonlinear, x0, sigmas)
    with Scratch(tmp_path if mapped else None) as scratch:
        st = HeunState.allocate(tuple(x0.shape), scratch=scratch)
        assert len(st.rows()) == (5 if mapped else 1)
        out = sample_heun(_nonlinear, x0, sigmas, state=st)
        assert torch.equal(out, ref)


def test_resume_from_a_step_is_bit_identical():
    """Between steps the whole state is x: running steps [0, k) then [k, N) equals one run."""
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 10
    sigmas = edm_sigmas(5)
    ref = _reference_heun(_nonlinear, x0, sigmas)
    events = []
    from infdit_cli.engine.sampling import HeunState

    st = HeunState.allocate(tuple(x0.shape))
    calls = []

    def counting(x, sig):
        calls.append(1)
        if len(calls) == 5:  # interrupt in the middle of step 3 (calls 5 and 6)
            raise KeyboardInterrupt
        return _nonlinear(x, sig)

    with pytest.raises(KeyboardInterrupt):
        sample_heun(counting, x0, sigmas, state=st, callback=events.append)
    assert events[-1].i == 2  # two steps finished; x holds the state at step 2, untouched by step 3
    out = sample_heun(_nonlinear, st.x, sigmas, state=st, start=events[-1].i, callback=events.append)
    assert torch.equal(out, ref) and events[-1].calls == 2 * 5 - 1
