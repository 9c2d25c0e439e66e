"""DiagonalGaussianDistribution: closed-form KL, clamping, deterministic mode, seeded sampling."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


def _params(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.cat([mean, logvar], dim=1)


def test_kl_to_standard_normal_closed_form():
    mean = torch.ones(1, 1, 2, 2)
    logvar = torch.full((1, 1, 2, 2), math.log(4.0))
    dist = DiagonalGaussianDistribution(_params(mean, logvar))
    # per element 0.5 * (mu^2 + var - 1 - log var) = 0.5 * (1 + 4 - 1 - log 4)
    expected = 4 * 0.5 * (4.0 - math.log(4.0))
    assert dist.kl().shape == (1,)
    assert dist.kl().item() == pytest.approx(expected, rel=1e-6)
    assert dist.kl().item() == pytest.approx(5.2274113, rel=1e-6)


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    p = DiagonalGaussianDistribution(torch.randn(3, 4, 5, 5, generator=gen))
    q = DiagonalGaussianDistribution(torch.randn(3, 4, 5, 5, generator=gen))
    ref_p = torch.distributions.Normal(p.mean, p.std)
    ref_q = torch.distributions.Normal(q.mean, q.std)
    ref_std = torch.distributions.Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    torch.testing.assert_close(p.kl(q), torch.distributions.kl_divergence(ref_p, ref_q).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(p.kl(), torch.distributions.kl_divergence(ref_p, ref_std).sum(dim=(1, 2, 3)))


def test_nll_matches_log_prob():
    gen = torch.Generator().manual_seed(2)
    p = DiagonalGaussianDistribution(torch.randn(2, 6, 3, 3, generator=gen))
    x = torch.randn(2, 3, 3, 3, generator=gen)
    ref = -torch.distributions.Normal(p.mean, p.std).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.nll(x), ref)


def test_logvar_is_clamped_and_std_var_follow():
    mean = torch.zeros(1, 2, 1, 1)
    logvar = torch.tensor([100.0, -100.0]).reshape(1, 2, 1, 1)
    dist = DiagonalGaussianDistribution(_params(mean, logvar))
    assert dist.logvar.flatten().tolist() == [20.0, -30.0]
    torch.testing.assert_close(dist.var, torch.exp(dist.logvar))
    torch.testing.assert_close(dist.std, torch.exp(0.5 * dist.logvar))


def test_deterministic_mode():
    params = torch.randn(2, 4, 3, 3)
    dist = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(dist.sample(), dist.mean)
    assert torch.equal(dist.mode(), params[:, :2])
    assert torch.count_nonzero(dist.std) == 0 and torch.count_nonzero(dist.var) == 0
    assert dist.kl().tolist() == [0.0, 0.0]
    assert dist.nll(torch.randn(2, 2, 3, 3)).tolist() == [0.0, 0.0]


def test_sample_with_generator_is_reproducible_and_has_the_right_moments():
    mean = torch.full((1, 1, 64, 64), 2.0)
    logvar = torch.full((1, 1, 64, 64), math.log(0.25))
    dist = DiagonalGaussianDistribution(_params(mean, logvar))
    a = dist.sample(generator=torch.Generator().manual_seed(7))
    b = dist.sample(generator=torch.Generator().manual_seed(7))
    c = dist.sample(generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.mean().item() == pytest.approx(2.0, abs=0.03)
    assert a.std().item() == pytest.approx(0.5, abs=0.03)


def test_odd_channel_count_is_rejected():
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))
