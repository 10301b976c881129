import math

import pytest
import torch

from infdit_cli.events import StepDone
from infdit_cli.sampling import edm_sigmas, sample_heun


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
