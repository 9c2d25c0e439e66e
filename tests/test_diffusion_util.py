"""Schedules, DDIM helpers, timestep embedding and layer helpers of ldm.modules.diffusionmodules.util."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.modules.diffusionmodules import util as U


# ---------------------------------------------------------------------------------------------- schedules
def test_linear_schedule_is_squared_sqrt_spacing():
    betas = U.make_beta_schedule("linear", 1000, linear_start=0.0015, linear_end=0.0205)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1] == pytest.approx(0.0205, rel=1e-12)
    # middle value: (sqrt(a) + (sqrt(b) - sqrt(a)) * i / (n - 1)) ** 2, not the arithmetic mean
    expected = (math.sqrt(0.0015) + (math.sqrt(0.0205) - math.sqrt(0.0015)) * 500 / 999) ** 2
    assert betas[500] == pytest.approx(expected, rel=1e-12)
    assert abs(betas[500] - (0.0015 + 0.0205) / 2) > 1e-4


def test_sqrt_linear_and_sqrt_schedules():
    lin = U.make_beta_schedule("sqrt_linear", 11, linear_start=0.01, linear_end=0.11)
    np.testing.assert_allclose(lin, np.arange(11) * 0.01 + 0.01, rtol=1e-12)
    sq = U.make_beta_schedule("sqrt", 11, linear_start=0.01, linear_end=0.11)
    np.testing.assert_allclose(sq, np.sqrt(lin), rtol=1e-12)
    assert sq[0] == pytest.approx(0.1)


def test_cosine_schedule_values_and_range():
    T, s = 1000, 8e-3
    betas = U.make_beta_schedule("cosine", T, cosine_s=s)
    assert betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.all(np.diff(betas) >= 0)
    assert betas[-1] == pytest.approx(0.999)

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    assert betas[0] == pytest.approx(1 - f(1) / f(0), rel=1e-10)
    assert betas[500] == pytest.approx(1 - f(501) / f(500), rel=1e-10)
    # alpha-bar of the discretised schedule follows the continuous one
    ac = np.cumprod(1 - betas)
    assert ac[499] == pytest.approx(f(500) / f(0), rel=1e-9)
    np.testing.assert_allclose(U.betas_for_alpha_bar(T, lambda t: f(t * T)), betas, rtol=1e-9)


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="beta_schedule"):
        U.make_beta_schedule("quadratic", 10)
    with pytest.raises(ValueError, match="n_timestep"):
        U.make_beta_schedule("linear", 0)


# ---------------------------------------------------------------------------------------------- DDIM
def test_ddim_uniform_timesteps_compvis_and_edges():
    np.testing.assert_array_equal(U.make_ddim_timesteps("uniform", 10, 1000), np.arange(1, 1000, 100))
    np.testing.assert_array_equal(U.make_ddim_timesteps("uniform", 1, 1000), [1])
    full = U.make_ddim_timesteps("uniform", 1000, 1000)
    np.testing.assert_array_equal(full, np.arange(1, 1000))  # 1000 clipped to 999, duplicate merged
    # non-divisor: CompVis count (T // (T // S) rounded up) kept, the last index clipped into range
    np.testing.assert_array_equal(U.make_ddim_timesteps("uniform", 3, 1000), [1, 334, 667, 999])
    assert U.make_ddim_timesteps("uniform", 500, 1000)[-1] == 999


def test_ddim_quad_timesteps_sorted_unique_in_range():
    steps = U.make_ddim_timesteps("quad", 50, 1000)
    assert steps[0] == 1 and steps[-1] == 801  # int(sqrt(800) ** 2) + 1
    assert steps[:6].tolist() == [1, 2, 3, 6, 9, 12]  # CompVis gives 1, 1, 2, 3, 6, ...: the duplicate 1 is merged
    assert np.all(np.diff(steps) > 0)
    assert len(steps) == 49
    assert np.all(U.make_ddim_timesteps("quad", 1000, 1000) <= 999)


def test_ddim_timesteps_errors():
    with pytest.raises(ValueError, match="1..1000"):
        U.make_ddim_timesteps("uniform", 0, 1000)
    with pytest.raises(ValueError, match="1..1000"):
        U.make_ddim_timesteps("uniform", 1001, 1000)
    with pytest.raises(ValueError, match="ddim_discretize"):
        U.make_ddim_timesteps("cubic", 10, 1000)


def test_ddim_sampling_parameters():
    ac = np.cumprod(1 - U.make_beta_schedule("linear", 1000, 0.0015, 0.0205))
    steps = U.make_ddim_timesteps("uniform", 10, 1000)
    sig0, alphas, prev = U.make_ddim_sampling_parameters(ac, steps, eta=0.0)
    np.testing.assert_allclose(alphas, ac[[1, 101, 201, 301, 401, 501, 601, 701, 801, 901]])
    assert prev[0] == ac[0]
    np.testing.assert_allclose(prev[1:], ac[steps[:-1]])
    assert np.all(sig0 == 0)
    sig1, _, _ = U.make_ddim_sampling_parameters(torch.tensor(ac, dtype=torch.float64), steps, eta=1.0)
    a, ap = ac[901], ac[801]
    assert sig1[-1] == pytest.approx(math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), rel=1e-12)
    assert sig1[-1] > 0.1


# ---------------------------------------------------------------------------------------------- embedding
def test_timestep_embedding_values():
    emb = U.timestep_embedding(torch.tensor([0, 1]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0, :4], torch.ones(4))
    torch.testing.assert_close(emb[0, 4:], torch.zeros(4))
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])  # 1, 0.1, 0.01, 0.001
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))
    odd = U.timestep_embedding(torch.tensor([3.0]), 5)
    assert odd.shape == (1, 5) and odd[0, -1] == 0
    assert odd[0, 0] == pytest.approx(math.cos(3.0), abs=1e-6) and odd[0, 2] == pytest.approx(math.sin(3.0), abs=1e-6)
    rep = U.timestep_embedding(torch.tensor([7, 9]), 3, repeat_only=True)
    torch.testing.assert_close(rep, torch.tensor([[7.0] * 3, [9.0] * 3]))


def test_extract_into_tensor_and_noise_like():
    a = torch.arange(10.0) * 2
    out = U.extract_into_tensor(a, torch.tensor([3, 7]), (2, 4, 5, 5))
    assert out.shape == (2, 1, 1, 1)
    assert out.flatten().tolist() == [6.0, 14.0]
    n = U.noise_like((3, 2, 4), torch.device("cpu"), repeat=True)
    assert n.shape == (3, 2, 4) and torch.equal(n[0], n[2]) and n.std() > 0.3
    m = U.noise_like((3, 2, 4), torch.device("cpu"))
    assert not torch.equal(m[0], m[1])


# ---------------------------------------------------------------------------------------------- layers
def test_zero_and_scale_module():
    lin = torch.nn.Linear(3, 4)
    w = lin.weight.detach().clone()
    U.scale_module(lin, 0.5)
    torch.testing.assert_close(lin.weight, w * 0.5)
    assert U.zero_module(lin) is lin and lin.weight.abs().sum() == 0 and lin.bias.abs().sum() == 0


def test_normalization_float32_compute_and_errors():
    norm = U.normalization(64)
    assert isinstance(norm, U.GroupNorm32) and norm.num_groups == 32
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 64, 4, 4) * 3 + 1
    out = norm(x)
    ref = torch.nn.functional.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out_half = norm(x.half())
    assert out_half.dtype == torch.float16
    torch.testing.assert_close(out_half.float(), out, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="divisible by 32"):
        U.normalization(48)


def test_layer_factories():
    assert isinstance(U.conv_nd(1, 2, 3, 1), torch.nn.Conv1d)
    assert isinstance(U.conv_nd(3, 2, 3, 1), torch.nn.Conv3d)
    assert U.conv_nd(2, 2, 3, 3, padding=1)(torch.randn(1, 2, 5, 5)).shape == (1, 3, 5, 5)
    assert U.avg_pool_nd(2, kernel_size=2, stride=2)(torch.ones(1, 1, 4, 4)).shape == (1, 1, 2, 2)
    assert isinstance(U.linear(2, 3), torch.nn.Linear)
    with pytest.raises(ValueError, match="dims"):
        U.conv_nd(4, 1, 1, 1)


def test_checkpoint_recomputes_and_matches_gradients():
    lin = torch.nn.Linear(4, 4)
    calls = []

    def func(x):
        calls.append(1)
        return torch.tanh(lin(x)) * x

    x = torch.randn(3, 4, requires_grad=True)
    grads = {}
    for flag in (False, True):
        calls.clear()
        lin.zero_grad()
        x.grad = None
        out = U.checkpoint(func, (x,), lin.parameters(), flag)
        out.sum().backward()
        grads[flag] = (out.detach(), x.grad.clone(), lin.weight.grad.clone())
        assert len(calls) == (2 if flag else 1)  # checkpointing re-runs func in backward
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)
    calls.clear()
    with torch.no_grad():
        U.checkpoint(func, (x,), lin.parameters(), True)
    assert len(calls) == 1


def test_resolve_device_defaults_and_refuses_missing_accelerator():
    import torch

    from ldm.util import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device(None).type == "cpu"
        with pytest.raises(ValueError, match="no cuda device"):
            resolve_device("cuda")


def test_scripts_report_user_errors_in_one_line(tmp_path):
    """A script given bad input ends with one '<script>: error: ...' line and exit code 2, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = tmp_path / "no_such_run"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "sample.py"), "-r", str(missing)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"sample.py: error: -r {missing}: neither a run directory nor a checkpoint file")


def test_run_script_passes_results_through():
    from ldm.util import run_script

    assert run_script(lambda argv: 0) == 0 and run_script(lambda argv: 3) == 3
    assert run_script(lambda argv: {"written": []}) == 0
    with pytest.raises(RuntimeError):  # not a user error: the traceback stays
        run_script(lambda argv: (_ for _ in ()).throw(RuntimeError("bug")))
