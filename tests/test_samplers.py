"""The sampler registry against an analytic model: Gaussian data N(mu, s^2), whose exact eps / x0 predictions
and probability-flow ODE solution are known in closed form (the model of test_dpm_solver.py, without a network)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from ldm.models.diffusion.samplers import (SAMPLER_SPECS, SAMPLERS, SamplerSpec, Trajectory, check_sampler,
                                           sampler_spec, sampler_timesteps)
from ldm.modules.diffusionmodules.util import make_beta_schedule

SHAPE = (2, 3, 3)
ABAR = torch.tensor(np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.0015, 0.0205)))  # float64


def _gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 0.5
    s = 0.2 + 0.6 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
    return mu, s


MU, S = _gaussian()


def exact_denoiser(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E[eps | x_t] and E[x0 | x_t] for x0 ~ N(MU, S^2)."""
    a = ABAR[t].sqrt().view(-1, 1, 1, 1)
    sig = (1.0 - ABAR[t]).sqrt().view(-1, 1, 1, 1)
    resid = (x - a * MU) / (a ** 2 * S ** 2 + sig ** 2)
    return sig * resid, MU + a * S ** 2 * resid


def exact_flow(x_T: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
    """Probability-flow ODE solution for Gaussian data: the standardised x_t is invariant along the flow."""
    a0 = ABAR[t_from].sqrt()
    a1 = ABAR[t_to].sqrt() if t_to >= 0 else torch.tensor(1.0, dtype=torch.float64)
    z = (x_T - a0 * MU) / (a0 ** 2 * S ** 2 + 1.0 - a0 ** 2).sqrt()
    return a1 * MU + (a1 ** 2 * S ** 2 + 1.0 - a1 ** 2).sqrt() * z


def _x_T(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("name,steps,tol", [("ddim", 200, 0.012), ("ddim", 500, 0.006), ("dpmpp2m", 50, 1e-3)])
def test_deterministic_samplers_solve_the_probability_flow_ode(name, steps, tol):
    grid = sampler_timesteps(name, steps, ABAR)
    x_T = _x_T(64)
    out = SAMPLERS[name](exact_denoiser, x_T, grid, ABAR)
    assert _rms(out, exact_flow(x_T, int(grid[0]), int(grid[-1]))) < tol
    # more steps, closer (DDIM is first order, DPM-Solver++(2M) second order)
    coarse = SAMPLERS[name](exact_denoiser, x_T, sampler_timesteps(name, steps // 5, ABAR), ABAR)
    coarse_grid = sampler_timesteps(name, steps // 5, ABAR)
    assert _rms(coarse, exact_flow(x_T, int(coarse_grid[0]), int(coarse_grid[-1]))) > 2 * _rms(
        out, exact_flow(x_T, int(grid[0]), int(grid[-1])))


def test_ancestral_sample_statistics_match_the_data():
    n = 4000
    grid = sampler_timesteps("ancestral", None, ABAR)
    assert grid[0] == 999 and grid[-1] == -1 and len(grid) == 1001
    gen = torch.Generator().manual_seed(11)
    out = SAMPLERS["ancestral"](exact_denoiser, _x_T(n, seed=6), grid, ABAR,
                                noise_fn=lambda like, step: torch.randn(like.shape, generator=gen, dtype=like.dtype))
    assert out.shape == (n, *SHAPE)
    se = S / n ** 0.5
    assert torch.all((out.mean(0) - MU).abs() < 4 * se + 0.01)
    assert torch.all((out.std(0) / S - 1.0).abs() < 0.08)
    # eta = 0: the posterior mean, deterministic, and its spread collapses below the data's
    mean_only = SAMPLERS["ancestral"](exact_denoiser, _x_T(n, seed=6)[:500], grid, ABAR, eta=0.0,
                                      noise_fn=lambda like, step: 1 / 0)
    assert torch.all(mean_only.std(0) < S)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step_with_the_step_inputs(name):
    grid = sampler_timesteps(name, 6 if name != "ancestral" else 8, ABAR)
    x_T = _x_T(3)
    seen = []

    def callback(step, x, x0_pred):
        seen.append((step, x.clone(), x0_pred.clone()))

    out = SAMPLERS[name](exact_denoiser, x_T, grid, ABAR, callback=callback,
                         noise_fn=lambda like, step: torch.zeros_like(like))
    n = len(grid) - 1
    assert [step for step, _, _ in seen] == list(range(n))
    assert all(x.shape == x0.shape == x_T.shape for _, x, x0 in seen)
    assert torch.equal(seen[0][1], x_T)  # the first step's input is the start
    for step, x, x0 in seen:  # x0_pred is the denoiser's prediction from that step's input
        torch.testing.assert_close(x0, exact_denoiser(x, torch.full((3,), int(grid[step])))[1])
    assert not torch.equal(seen[-1][1], out)


@pytest.mark.parametrize("name,eta", [("ddim", 1.0), ("ancestral", None)])
def test_noise_fn_is_asked_per_step_and_makes_samples_batch_independent(name, eta):
    grid = sampler_timesteps(name, 10, ABAR)

    def per_sample(indices):
        gens = [torch.Generator().manual_seed(1000 + i) for i in indices]
        asked = []

        def noise_fn(like, step):
            asked.append(step)
            return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=like.dtype) for g in gens])
        return noise_fn, asked

    x_T = _x_T(4)
    fn, asked = per_sample([0, 1, 2, 3])
    batch = SAMPLERS[name](exact_denoiser, x_T, grid, ABAR, eta=eta, noise_fn=fn)
    fn_alone, _ = per_sample([2])
    alone = SAMPLERS[name](exact_denoiser, x_T[2:3], grid, ABAR, eta=eta, noise_fn=fn_alone)
    torch.testing.assert_close(alone, batch[2:3])
    n = len(grid) - 1
    assert asked == (list(range(n)) if name == "ddim" else list(range(n - 1)))  # ancestral's last step: no noise
    with pytest.raises(ValueError, match="noise_fn returned shape"):
        SAMPLERS[name](exact_denoiser, x_T, grid, ABAR, eta=eta, noise_fn=lambda like, step: torch.zeros(1))


def test_dpmpp2m_never_asks_for_noise_and_refuses_eta():
    grid = sampler_timesteps("dpmpp2m", 5, ABAR)
    SAMPLERS["dpmpp2m"](exact_denoiser, _x_T(2), grid, ABAR, noise_fn=lambda like, step: 1 / 0)
    with pytest.raises(ValueError, match="deterministic"):
        SAMPLERS["dpmpp2m"](exact_denoiser, _x_T(2), grid, ABAR, eta=0.5)


def test_one_signature_and_one_intermediates_shape():
    signatures = {name: inspect.signature(fn) for name, fn in SAMPLERS.items()}
    assert len({str(sig) for sig in signatures.values()}) == 1
    assert list(signatures["ddim"].parameters) == ["denoise", "x", "timesteps", "alphas_cumprod", "eta", "noise_fn",
                                                   "callback"]
    for name in SAMPLERS:
        grid = sampler_timesteps(name, 7, ABAR)  # DDIM's uniform grid gives 8 steps here, as CompVis
        x_T = _x_T(2)
        trajectory = Trajectory(x_T, len(grid) - 1, log_every_t=3)
        out = SAMPLERS[name](exact_denoiser, x_T, grid, ABAR, callback=trajectory)
        inter = trajectory.finish(out)
        assert set(inter) == {"x_inter", "pred_x0"}
        n = len(grid) - 1  # x_T, then the first step and every 3rd counted from the last (CompVis)
        expected = 1 + len([i for i in range(n) if i == 0 or (n - 1 - i) % 3 == 0])  # 7 steps: 4, 8 steps: 5
        assert len(inter["x_inter"]) == len(inter["pred_x0"]) == expected
        assert inter["x_inter"][0] is x_T and inter["x_inter"][-1] is out


def test_registry_lookup_and_grid_errors():
    assert check_sampler("DDIM") == "ddim" and set(SAMPLERS) == {"ddim", "dpmpp2m", "ancestral"}
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddim, dpmpp2m, ancestral"):
        check_sampler("euler")
    with pytest.raises(ValueError, match="timesteps must descend"):
        SAMPLERS["ddim"](exact_denoiser, _x_T(1), [1, 5, 0], ABAR)
    with pytest.raises(ValueError, match="at least 2"):
        SAMPLERS["ddim"](exact_denoiser, _x_T(1), [5], ABAR)
    with pytest.raises(ValueError, match="lambda is infinite"):
        SAMPLERS["dpmpp2m"](exact_denoiser, _x_T(1), [5, 0, -1], ABAR)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        SAMPLERS["ddim"](exact_denoiser, _x_T(1), [5, 0], ABAR, eta=-1.0)
    with pytest.raises(ValueError, match="ancestral steps must lie"):
        sampler_timesteps("ancestral", 1001, ABAR)
    with pytest.raises(ValueError, match="no timestep grid"):
        sampler_timesteps("euler", 10, ABAR)


def test_one_spec_per_sampler_holds_its_function_grid_and_eta_rule():
    assert list(SAMPLER_SPECS) == list(SAMPLERS) and all(SAMPLERS[n] is s.fn for n, s in SAMPLER_SPECS.items())
    assert all(isinstance(s, SamplerSpec) and s.name == n for n, s in SAMPLER_SPECS.items())
    assert sampler_spec("DDIM") is SAMPLER_SPECS["ddim"]
    assert [n for n, s in SAMPLER_SPECS.items() if s.takes_eta] == ["ddim"]  # -e applies to DDIM only
    assert [n for n, s in SAMPLER_SPECS.items() if s.ddpm_loop] == ["ancestral"]
    ddim = SAMPLER_SPECS["ddim"].timesteps(10, ABAR)  # CompVis: 1, 101, ..., 901, ending at alphas_cumprod[0]
    assert ddim.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]
    assert np.array_equal(sampler_timesteps("ddim", 10, ABAR), ddim)
    assert SAMPLER_SPECS["ddim"].timesteps(4, ABAR, ddim_discretize="quad").tolist()[-1] == 0
    ancestral = SAMPLER_SPECS["ancestral"].timesteps(None, ABAR)
    assert len(ancestral) == 1001 and ancestral[0] == 999 and ancestral[-2:].tolist() == [0, -1]
    assert SAMPLER_SPECS["ancestral"].timesteps(3, ABAR).tolist() == [2, 1, 0, -1]
    dpm = SAMPLER_SPECS["dpmpp2m"].timesteps(8, ABAR)
    assert len(dpm) == 9 and dpm.min() >= 0 and np.all(np.diff(dpm) < 0)
    assert not np.array_equal(SAMPLER_SPECS["dpmpp2m"].timesteps(8, ABAR, skip_type="time_uniform"), dpm)
    assert SAMPLER_SPECS["dpmpp2m"].label == "DPM-Solver++(2M)"
