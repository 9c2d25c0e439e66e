"""Register inspection: similarity numbers with known answers, and the script on a tiny trained run."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from ldm.evaluation.registers import register_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_sample_run import load_script, make_run  # noqa: E402


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


def test_inspect_refuses_baseline(tmp_path):
    inspect_registers = load_script("inspect_registers")

    run = make_run(str(tmp_path), anatomical=False, steps=1, name="base")
    with pytest.raises(ValueError, match="no anatomical registers"):
        inspect_registers.main(["-r", run, "-l", str(tmp_path / "o"), "--device", "cpu"])
