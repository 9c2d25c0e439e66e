"""DDIMSampler: step counts 1..T, the analytic single-point model, x0 parameterisation, guidance, seeds."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from tiny_models import ldm_params


def tiny_ldm(timesteps: int = 1000, **kw) -> LatentDiffusion:
    return LatentDiffusion(**ldm_params(timesteps=timesteps, use_ema=False, **kw)).eval()


@pytest.mark.parametrize("steps,expected_timesteps", [(1, [1]), (10, list(range(1, 1000, 100)))])
def test_ddim_timesteps_follow_reference(steps, expected_timesteps):
    sampler = DDIMSampler(tiny_ldm())
    sampler.make_schedule(steps, verbose=False)
    assert sampler.ddim_timesteps.tolist() == expected_timesteps
    ac = sampler.model.alphas_cumprod
    assert torch.allclose(sampler.ddim_alphas, ac[expected_timesteps])
    assert sampler.ddim_alphas_prev[0].item() == pytest.approx(ac[0].item())  # not 1
    assert torch.all(sampler.ddim_sigmas == 0)


@pytest.mark.parametrize("steps", [1, 25])
def test_tiny_model_runs_any_step_count(steps):
    model = tiny_ldm(timesteps=25)
    samples, inter = DDIMSampler(model).sample(steps, 2, (2, 8, 8), verbose=False, log_every_t=5)
    assert samples.shape == (2, 2, 8, 8) and torch.isfinite(samples).all()
    assert set(inter) == {"x_inter", "pred_x0"} and len(inter["x_inter"]) == len(inter["pred_x0"]) >= 2
    assert samples.device == model.alphas_cumprod.device


def test_bad_step_count_raises():
    with pytest.raises(ValueError, match="DDIM steps"):
        DDIMSampler(tiny_ldm(timesteps=25)).sample(26, 1, (2, 8, 8), verbose=False)
    with pytest.raises(ValueError, match="DDIM steps"):
        DDIMSampler(tiny_ldm(timesteps=25)).sample(0, 1, (2, 8, 8), verbose=False)


def _analytic(model: LatentDiffusion, point: torch.Tensor, monkeypatch, param: str = "eps") -> None:
    """Replace the UNet by the exact denoiser of data concentrated at ``point``."""
    def apply_model(x, t, cond, **kw):
        if param == "x0":
            return point.expand_as(x)
        a = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * point) / (1 - a).sqrt()
    monkeypatch.setattr(model, "apply_model", apply_model)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 1000])
@pytest.mark.parametrize("param", ["eps", "x0"])
def test_eta0_lands_on_the_data_point(monkeypatch, steps, param):
    model = tiny_ldm(parameterization=param)
    point = torch.linspace(-1, 1, 2 * 8 * 8).reshape(1, 2, 8, 8)
    _analytic(model, point, monkeypatch, param)
    x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    sampler = DDIMSampler(model)
    samples, inter = sampler.sample(steps, 2, (2, 8, 8), eta=0.0, x_T=x_T, verbose=False)
    ac = model.alphas_cumprod.double()
    t_first = int(sampler.ddim_timesteps[-1])
    eps = (x_T.double() - ac[t_first].sqrt() * point) / (1 - ac[t_first]).sqrt()
    # eta=0 with the exact eps keeps eps fixed; the last step ends at alphas_cumprod[0] (CompVis), not at 1
    expected = ac[0].sqrt() * point + (1 - ac[0]).sqrt() * eps
    assert torch.allclose(samples.double(), expected, atol=2e-4, rtol=1e-4)
    assert torch.allclose(inter["pred_x0"][-1], point.expand_as(samples), atol=2e-4)
    assert (samples - point).abs().max().item() < 0.05 * eps.abs().max().item()  # sqrt(1 - a_0) ~ 0.039


def test_eta_and_generator(monkeypatch):
    model = tiny_ldm(timesteps=50)
    x_T = torch.randn(1, 2, 8, 8)
    a, _ = DDIMSampler(model).sample(5, 1, (2, 8, 8), eta=1.0, x_T=x_T, verbose=False,
                                     generator=torch.Generator().manual_seed(4))
    b, _ = DDIMSampler(model).sample(5, 1, (2, 8, 8), eta=1.0, x_T=x_T, verbose=False,
                                     generator=torch.Generator().manual_seed(4))
    c, _ = DDIMSampler(model).sample(5, 1, (2, 8, 8), eta=0.0, x_T=x_T, verbose=False)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    sampler = DDIMSampler(model)
    sampler.make_schedule(5, ddim_eta=1.0, verbose=False)
    ap, at = sampler.ddim_alphas_prev[2].item(), sampler.ddim_alphas[2].item()
    assert sampler.ddim_sigmas[2].item() == pytest.approx(math.sqrt((1 - ap) / (1 - at) * (1 - at / ap)), rel=1e-5)


def test_step_callback_sees_inputs_and_predictions(monkeypatch):
    model = tiny_ldm(timesteps=100)
    point = torch.linspace(-1, 1, 2 * 8 * 8).reshape(1, 2, 8, 8)
    _analytic(model, point, monkeypatch)
    x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    steps, old_style, seen = [], [], []
    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(4, 2, (2, 8, 8), x_T=x_T, verbose=False, callback=steps.append,
                                img_callback=lambda x0, i: old_style.append((i, x0)),
                                step_callback=lambda i, t, x_t, x0: seen.append((i, t, x_t, x0)))
    assert sampler.ddim_timesteps.tolist() == [1, 26, 51, 76]
    assert steps == [0, 1, 2, 3] and [i for i, _ in old_style] == [0, 1, 2, 3]  # CompVis hooks unchanged
    assert [(i, t) for i, t, _, _ in seen] == [(0, 76), (1, 51), (2, 26), (3, 1)]
    assert torch.equal(seen[0][2], x_T)
    ac = model.alphas_cumprod.double()
    eps = (x_T.double() - ac[76].sqrt() * point) / (1 - ac[76]).sqrt()  # eta=0, exact eps: eps stays fixed
    for (i, t, x_t, x0), (_, x0_old) in zip(seen, old_style):
        assert torch.allclose(x_t.double(), ac[t].sqrt() * point + (1 - ac[t]).sqrt() * eps, atol=1e-5)
        assert torch.allclose(x0, point.expand_as(x0), atol=1e-4) and x0 is x0_old
    assert torch.allclose(samples.double(), ac[0].sqrt() * point + (1 - ac[0]).sqrt() * eps, atol=1e-5)


def test_noise_fn_replaces_generator(monkeypatch):
    model = tiny_ldm(timesteps=100)
    point = torch.full((1, 2, 8, 8), 0.3)
    _analytic(model, point, monkeypatch)
    x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    # noise_fn drawing from a generator gives the same bytes as passing that generator
    gen_a, gen_b, calls = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9), []

    def from_generator(like, i):
        calls.append(i)
        return torch.randn(like.shape, generator=gen_b, dtype=like.dtype)

    a, _ = DDIMSampler(model).sample(4, 2, (2, 8, 8), eta=0.5, x_T=x_T, verbose=False, generator=gen_a)
    b, _ = DDIMSampler(model).sample(4, 2, (2, 8, 8), eta=0.5, x_T=x_T, verbose=False, noise_fn=from_generator)
    assert torch.equal(a, b) and calls == [0, 1, 2, 3]
    # a constant noise: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma n (eq. 12), in float64
    sampler = DDIMSampler(model)
    n = torch.linspace(-2, 2, 2 * 2 * 8 * 8).reshape(2, 2, 8, 8)
    out, _ = sampler.sample(4, 2, (2, 8, 8), eta=0.5, x_T=x_T, verbose=False, noise_fn=lambda like, i: n,
                            temperature=0.5)
    ac, x = model.alphas_cumprod.double(), x_T.double()
    for index in reversed(range(4)):
        t = int(sampler.ddim_timesteps[index])
        a_prev, sigma = sampler.ddim_alphas_prev[index].double(), sampler.ddim_sigmas[index].double()
        assert sigma > 0.01
        eps = (x - ac[t].sqrt() * point) / (1 - ac[t]).sqrt()
        x = a_prev.sqrt() * point + (1 - a_prev - sigma ** 2).sqrt() * eps + sigma * 0.5 * n
    assert torch.allclose(out.double(), x, atol=1e-5)
    assert (out - a).abs().max() > 0.1
    # eta = 0 never asks for noise
    DDIMSampler(model).sample(3, 2, (2, 8, 8), x_T=x_T, verbose=False, noise_fn=lambda like, i: 1 / 0)
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        DDIMSampler(model).sample(3, 2, (2, 8, 8), eta=1.0, x_T=x_T, verbose=False,
                                  noise_fn=lambda like, i: torch.zeros(1, 2, 8, 8))


def test_classifier_free_guidance_combines_outputs(monkeypatch):
    model = tiny_ldm(timesteps=50)
    # a "model" that returns the conditioning value, so guided eps = u + s (c - u)
    monkeypatch.setattr(model, "apply_model", lambda x, t, c, **kw: c.reshape(-1, 1, 1, 1).expand_as(x))
    x = torch.zeros(2, 2, 8, 8)
    t = torch.tensor([10, 10])
    eps, x0 = model.model_predictions(x, t, torch.tensor([2.0, 2.0]), unconditional_guidance_scale=3.0,
                                      unconditional_conditioning=torch.tensor([0.5, 0.5]))
    assert torch.allclose(eps, torch.full_like(x, 0.5 + 3.0 * 1.5))
    assert torch.allclose(x0, model.predict_start_from_noise(x, t, eps))


def test_inpainting_mask_keeps_known_region():
    model = tiny_ldm(timesteps=50)
    x0 = torch.full((1, 2, 8, 8), 0.7)
    mask = torch.zeros(1, 2, 8, 8)
    mask[..., :4] = 1.0
    g = torch.Generator().manual_seed(0)
    samples, _ = DDIMSampler(model).sample(10, 1, (2, 8, 8), mask=mask, x0=x0, verbose=False, generator=g)
    # the last step re-noises the known part to t=1 and then takes a deterministic step: close to x0
    assert (samples[..., :4] - 0.7).abs().mean() < 0.2
    assert (samples[..., 4:] - 0.7).abs().mean() > 0.5  # the unknown region is sampled, not copied
    with pytest.raises(ValueError, match="mask"):
        DDIMSampler(model).sample(2, 1, (2, 8, 8), mask=mask, verbose=False)


@pytest.mark.gpu
def test_runs_on_cuda():
    model = tiny_ldm(timesteps=50).to(torch.device("cuda", 0))
    samples, _ = DDIMSampler(model).sample(5, 2, (2, 8, 8), verbose=False,
                                           generator=torch.Generator().manual_seed(0))
    assert samples.is_cuda and torch.isfinite(samples).all()
