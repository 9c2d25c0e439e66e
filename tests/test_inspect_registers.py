"""Register inspection: similarity numbers with known answers, and the script on a tiny trained run."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from ldm.evaluation.registers import (attention_entropy, register_diagnostics, register_similarity, state_similarity,
                                     zero_register_outputs)
from ldm.util import instantiate_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_sample_run import load_script, make_run  # noqa: E402
from tiny_models import anatomical_params, ldm_config, unet_config  # noqa: E402


def test_register_similarity_known_answer():
    regs = torch.zeros(3, 2, 4)
    regs[0, :, 0] = 1.0            # class 0: both registers along e0
    regs[1, :, 1] = 2.0            # class 1: both along e1 (scale does not matter)
    regs[2, 0, 2], regs[2, 1, 2] = 1.0, -1.0  # class 2: opposite registers
    sim = register_similarity(regs)
    assert sim["matrix"].shape == (6, 6)
    np.testing.assert_allclose(np.diag(sim["matrix"]), 1.0, atol=1e-6)
    assert sim["within_class_per_class"] == pytest.approx([1.0, 1.0, -1.0])
    assert sim["within_class_mean"] == pytest.approx(1.0 / 3.0)
    assert sim["across_class_mean"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"\[C, K, D\]"):
        register_similarity(torch.zeros(3, 4))


def test_inspect_script_on_trained_run(tmp_path):
    inspect_registers = load_script("inspect_registers")

    run = make_run(str(tmp_path), anatomical=True, name="anat")
    out = tmp_path / "insp"
    assert inspect_registers.main(["-r", run, "-l", str(out), "-n", "2", "-c", "4", "--device", "cpu"]) == 0
    for name in ("register_similarity.png", "attention_maps.png", "attention_vs_timestep.png", "registers.json"):
        assert (out / name).stat().st_size > 0
    summary = json.load(open(out / "registers.json"))
    # The numbers are those of the checkpoint's (EMA) registers.
    sd = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    key = next(k for k in sd if k.startswith("model_ema.") and k.endswith("registers"))
    expected = register_similarity(sd[key])
    assert summary["similarity"]["within_class_mean"] == pytest.approx(expected["within_class_mean"], abs=1e-6)
    assert summary["similarity"]["across_class_mean"] == pytest.approx(expected["across_class_mean"], abs=1e-6)
    traj = summary["trajectory"]
    assert len(traj["timesteps"]) == 4 and traj["timesteps"] == sorted(traj["timesteps"], reverse=True)
    mass = np.asarray(traj["mean_mass_per_level"])  # [steps, levels, classes]
    assert mass.shape == (4, len(traj["levels"]), 6)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-4)  # attention mass is a distribution over classes
    acc = np.asarray(traj["accuracy_per_level"])
    assert ((acc >= 0) & (acc <= 1)).all()
    assert summary["num_classes"] == 6 and summary["registers_per_class"] == 2
    within, across = np.asarray(traj["token_similarity_within"]), np.asarray(traj["token_similarity_across"])
    assert within.shape == across.shape == (4,) and (np.abs(within) <= 1 + 1e-6).all()
    assert np.asarray(traj["attention_entropy_per_level"]).shape == (4, len(traj["levels"]))
    assert (out / "register_diagnostics.png").stat().st_size > 0
    diag = summary["diagnostics"]
    n_t, layers = len(diag["timesteps"]), [lv["key"] for lv in traj["levels"]]
    assert n_t == 5 and diag["num_latents"] == 8 and len(diag["heights"]) == 8
    for key in ("output_ratio", "attention_entropy"):
        assert sorted(diag[key]) == sorted(layers)
        values = np.asarray([diag[key][k] for k in layers], dtype=float)
        assert values.shape == (len(layers), n_t) and np.isfinite(values).all() and (values >= 0).all()
    for key in ("eps_mse", "eps_mse_zeroed", "eps_mse_change"):
        assert len(diag[key]) == n_t and np.isfinite(diag[key]).all()
    np.testing.assert_allclose(np.asarray(diag["eps_mse_zeroed"]) - diag["eps_mse"], diag["eps_mse_change"], atol=1e-6)
    for sim in diag["register_similarity"]:
        assert all(np.isfinite(sim[k]) for k in ("mean_pairwise", "relative_spread", "far_pairs_mean",
                                                 "near_pairs_mean"))
    assert np.asarray(diag["register_similarity_matrix"]).shape == (8, 8)


def test_inspect_refuses_baseline(tmp_path):
    inspect_registers = load_script("inspect_registers")

    run = make_run(str(tmp_path), anatomical=False, steps=1, name="base")
    with pytest.raises(ValueError, match="no anatomical registers"):
        inspect_registers.main(["-r", run, "-l", str(tmp_path / "o"), "--device", "cpu"])


def test_state_similarity_and_entropy_known_answers():
    states = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    sim = state_similarity(states, heights=[0.1, 0.2, 0.9])
    assert sim["matrix"].shape == (3, 3)
    assert sim["near_pairs_mean"] == pytest.approx(1.0) and sim["far_pairs_mean"] == pytest.approx(0.0, abs=1e-6)
    assert sim["mean_pairwise"] == pytest.approx(1.0 / 3.0)
    same = state_similarity(torch.ones(4, 3, 2))
    assert same["mean_pairwise"] == pytest.approx(1.0) and same["relative_spread"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        state_similarity(torch.ones(1, 3))
    with pytest.raises(ValueError, match="heights"):
        state_similarity(torch.ones(3, 2), heights=[0.0, 1.0])
    uniform = torch.full((2, 4, 3, 3), 0.25)
    one_hot = torch.zeros(2, 4, 3, 3)
    one_hot[:, 1] = 1.0
    assert torch.allclose(attention_entropy(uniform), torch.ones(2))
    assert torch.allclose(attention_entropy(one_hot), torch.zeros(2), atol=1e-6)


def test_zero_register_outputs_gives_the_base_unet():
    torch.manual_seed(0)
    anat = instantiate_from_config(unet_config(anatomy=anatomical_params(), two_level=True)).eval()
    with torch.no_grad():
        for p in anat.parameters():
            p.normal_(0.0, 0.2)  # trained-like weights: the zero-initialised output layers no longer zero
    base = instantiate_from_config(unet_config(two_level=True)).eval()
    base.load_state_dict(anat.state_dict(), strict=False)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert not torch.allclose(anat(x, t), base(x, t), atol=1e-4)
        with zero_register_outputs(anat):
            torch.testing.assert_close(anat(x, t), base(x, t))
            torch.testing.assert_close(anat.forward_with_anatomy(x, t).prediction, base(x, t))
        assert not torch.allclose(anat(x, t), base(x, t), atol=1e-4)  # hooks removed on exit


def test_diagnostics_value_errors(tmp_path):
    from ldm.evaluation.registers import inspect_registers

    model = instantiate_from_config(ldm_config(True, timesteps=20)).eval()
    with pytest.raises(ValueError, match="outside 0..19"):
        register_diagnostics(model, torch.randn(2, 2, 8, 8), timesteps=[5, 20])
    with pytest.raises(ValueError, match="diagnostic_latents"):
        inspect_registers(model, str(tmp_path), diagnostic_latents=1)
    plain = instantiate_from_config(ldm_config(False, timesteps=20))
    with pytest.raises(ValueError, match="no anatomical registers"):
        with zero_register_outputs(plain):
            pass


@pytest.mark.parametrize("mask_upsample_factor", [1, 2])
def test_attention_trajectory_at_every_mask_resolution(mask_upsample_factor):
    """The class-attention maps live on the latent grid; the mask head predicts on it (factor 1) or at image size
    (factor 2 = the tiny first stage's downsampling): the agreement is counted on the latent grid either way."""
    from ldm.evaluation.registers import attention_trajectory
    from ldm.modules.anatomical_losses import mode_downsample

    torch.manual_seed(0)
    unet = unet_config(anatomy=anatomical_params(mask_upsample_factor=mask_upsample_factor))
    model = instantiate_from_config(ldm_config(True, unet=unet, timesteps=20)).eval()
    with torch.no_grad():
        for p in model.model.parameters():
            p.normal_(0.0, 0.2)  # trained-like weights: attention and masks that are not uniform
    traj = attention_trajectory(model, num_samples=2, ddim_steps=3, seed=0)
    assert traj["masks"].shape == (2, 8 * mask_upsample_factor, 8 * mask_upsample_factor)
    assert traj["latent_masks"].shape == (2, 8, 8)
    expected_latent = mode_downsample(torch.from_numpy(traj["masks"]), (8, 8), 6, ignore_index=-1).numpy()
    np.testing.assert_array_equal(traj["latent_masks"], expected_latent)
    maps = traj["maps"]  # [S, L, N, C, 8, 8]
    expected = (maps.argmax(3) == traj["latent_masks"][None, None]).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(traj["accuracy"], expected)
    assert traj["accuracy"].shape == (len(traj["timesteps"]), len(traj["levels"]))
    # own-class mass: latent cells weighted by each class's share of them in the final mask
    masks = traj["masks"]
    f = mask_upsample_factor
    share = np.stack([(masks == c).reshape(2, 8, f, 8, f).mean(axis=(2, 4)) for c in range(6)], axis=1)
    mean_maps = maps.mean(1)  # [S, N, C, 8, 8]
    for c in range(6):
        if share[:, c].sum() > 0:
            want = (mean_maps[:, :, c] * share[None, :, c]).sum(axis=(1, 2, 3)) / share[:, c].sum()
            np.testing.assert_allclose(traj["own_class_mass"][:, c], want, rtol=1e-5)
        else:
            assert np.isnan(traj["own_class_mass"][:, c]).all()
