"""Mask-free anatomy guidance: energy terms on hand-made maps, scale 0 bit-identical, guidance lowers the energy of
a head we control, sample.py --anatomy_guidance end to end, and every ValueError."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

from ldm import sampling
from ldm.models.diffusion.guidance import AnatomicalEnergy, AnatomyGuidance, check_guidance_scale, ctorgan_terms
from ldm.models.diffusion.samplers import sample_model
from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomyOutput
from ldm.util import instantiate_from_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sample_run import load_script, runs  # noqa: E402,F401  (runs: module fixture of tiny trained runs)
from tiny_models import ldm_config  # noqa: E402

BG, LIVER, BLADDER, LUNGS, KIDNEYS, BONE = range(6)


def label_map(size: int = 32, **boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """One-hot CT-Organ probabilities [1, 6, size, size]: background with ``class=(row0, row1, col0, col1)`` boxes."""
    ids = torch.zeros(size, size, dtype=torch.long)
    for name, (r0, r1, c0, c1) in boxes.items():
        ids[r0:r1, c0:c1] = {"liver": LIVER, "bladder": BLADDER, "lungs": LUNGS, "kidneys": KIDNEYS,
                             "bone": BONE}[name]
    return torch.nn.functional.one_hot(ids, 6).permute(2, 0, 1)[None].float()


SPINE = (20, 26, 14, 18)  # midline, posterior: satisfies the spine rule


def test_co_occurrence_bladder_with_lungs_is_higher():
    alone = ctorgan_terms(label_map(bladder=(8, 14, 12, 20), bone=SPINE))
    both = ctorgan_terms(label_map(bladder=(8, 14, 12, 20), lungs=(4, 12, 4, 10), bone=SPINE))
    assert alone["co_occurrence"].item() == pytest.approx(0.0, abs=1e-6)
    assert both["co_occurrence"].item() > 0.9
    lungs_kidneys = ctorgan_terms(label_map(lungs=(4, 12, 4, 10), kidneys=(16, 22, 6, 11), bone=SPINE))
    assert lungs_kidneys["co_occurrence"].item() > 0.9


def test_liver_on_wrong_side_is_higher():
    right_side = ctorgan_terms(label_map(liver=(6, 16, 3, 13), bone=SPINE))   # image left = patient's right
    wrong_side = ctorgan_terms(label_map(liver=(6, 16, 19, 29), bone=SPINE))
    assert right_side["laterality"].item() == pytest.approx(0.0, abs=1e-6)
    assert wrong_side["laterality"].item() > 0.5


def test_border_spine_position_and_entropy_terms():
    inside = ctorgan_terms(label_map(liver=(6, 16, 3, 13), bone=SPINE))
    at_border = ctorgan_terms(label_map(liver=(0, 16, 0, 13), bone=SPINE))
    assert inside["border"].item() == 0.0 and at_border["border"].item() > 0.1
    assert inside["spine"].item() < 0.01
    assert ctorgan_terms(label_map(liver=(6, 16, 3, 13)))["spine"].item() == pytest.approx(1.0)
    beside = ctorgan_terms(label_map(kidneys=(16, 22, 6, 11), bone=SPINE))
    on_midline = ctorgan_terms(label_map(kidneys=(16, 22, 14, 18), bone=(24, 30, 14, 18)))
    assert beside["position"].item() == pytest.approx(0.0, abs=1e-6) and on_midline["position"].item() > 0.3
    uniform = torch.full((2, 6, 8, 8), 1.0 / 6)
    assert torch.allclose(ctorgan_terms(uniform)["entropy"], torch.ones(2))
    assert inside["entropy"].item() == pytest.approx(0.0, abs=1e-6)


def test_energy_works_at_latent_and_image_resolution():
    energy = AnatomicalEnergy("ctorgan")
    small = label_map(8, liver=(2, 4, 1, 3), bone=(5, 7, 3, 5))
    big = torch.nn.functional.interpolate(small, size=(32, 32), mode="nearest")
    assert energy(small).shape == energy(big).shape == (1,)
    assert torch.isfinite(energy(small)).all() and torch.isfinite(energy(big)).all()
    assert set(AnatomicalEnergy("breastmri").terms(torch.full((1, 4, 8, 8), 0.25))) == {"border", "entropy"}


def test_energy_and_scale_value_errors():
    with pytest.raises(ValueError, match="unknown anatomy energy terms"):
        AnatomicalEnergy("ctorgan", {"symmetry": 1.0})
    with pytest.raises(ValueError, match="finite and >= 0"):
        AnatomicalEnergy("ctorgan", {"border": -1.0})
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        AnatomicalEnergy("ctorgan")(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="6 class probabilities"):
        ctorgan_terms(torch.zeros(1, 4, 8, 8))
    for bad in (-0.5, float("nan"), float("inf"), "strong"):
        with pytest.raises(ValueError, match="anatomy_guidance"):
            check_guidance_scale(bad)
    plain = instantiate_from_config(ldm_config(False, timesteps=20))
    with pytest.raises(ValueError, match="needs an anatomical model"):
        check_guidance_scale(1.0, plain)
    assert check_guidance_scale(0.0, plain) == 0.0  # off: any model


@pytest.fixture(scope="module")
def tiny_anatomical():
    torch.manual_seed(0)
    return instantiate_from_config(ldm_config(True, timesteps=50, label_set="ctorgan")).eval()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_scale_zero_is_bit_identical(tiny_anatomical, sampler):
    x_T = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    plain, _ = sample_model(tiny_anatomical, sampler, x_T, 4)
    off = AnatomyGuidance(tiny_anatomical, 0.0)
    guided_off, _ = sample_model(tiny_anatomical, sampler, x_T, 4, make_denoiser=off.denoiser)
    assert torch.equal(plain, guided_off) and off.calls == 0
    on = AnatomyGuidance(tiny_anatomical, 50.0)
    guided, _ = sample_model(tiny_anatomical, sampler, x_T, 4, make_denoiser=on.denoiser)
    assert not torch.equal(plain, guided) and on.calls >= 4 and torch.isfinite(guided).all()


def test_generate_scale_zero_matches_plain(tiny_anatomical, tmp_path):
    kw = dict(num_samples=2, batch_size=2, ddim_steps=3, progress=False)
    a = sampling.generate(tiny_anatomical, str(tmp_path / "a"), **kw)
    b = sampling.generate(tiny_anatomical, str(tmp_path / "b"), anatomy_guidance=0.0, **kw)
    for name in ("000000.png", "000001.png"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    assert a["anatomy_guidance"] == b["anatomy_guidance"] == 0.0 and b["guidance"] is None
    assert b["timings"]["sampling_per_step_s"] > 0
    with pytest.raises(ValueError, match="anatomy_guidance"):
        sampling.generate(tiny_anatomical, str(tmp_path / "c"), anatomy_guidance=-1.0, **kw)


class LinearHead:
    """An analytic stand-in for the segmentation head: class logits = a fixed 1x1 map of the latents."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.weight = 4.0 * torch.randn(6, model.channels, 1, 1, generator=torch.Generator().manual_seed(3))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> AnatomyOutput:
        logits = torch.nn.functional.conv2d(x, self.weight)
        empty = torch.zeros(0)
        return AnatomyOutput(self.model.apply_model(x, t, cond), logits, empty, {}, empty)


def test_guidance_lowers_energy_of_a_controlled_head(tiny_anatomical, monkeypatch):
    head = LinearHead(tiny_anatomical)
    monkeypatch.setattr(tiny_anatomical, "apply_model_with_anatomy", head, raising=False)
    energy = AnatomicalEnergy("ctorgan")
    x_T = torch.randn(8, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    results = {}
    for scale in (0.0, 2.0):
        z, _ = sample_model(tiny_anatomical, "ddim", x_T, 10, make_denoiser=AnatomyGuidance(tiny_anatomical,
                                                                                              scale).denoiser)
        zero = torch.zeros(z.shape[0], dtype=torch.long)
        results[scale] = energy(torch.softmax(head(z, zero).seg_logits, 1))
    assert results[2.0].mean() < results[0.0].mean()


def test_sample_script_with_anatomy_guidance(runs, tmp_path):  # noqa: F811
    sample = load_script("sample")
    out = tmp_path / "guided"
    args = ["-r", runs["anatomical"], "-n", "2", "--batch_size", "2", "-c", "3", "-l", str(out),
            "--no-progress", "--device", "cpu", "--save_masks"]
    assert sample.main([*args, "--anatomy_guidance", "1.5"]) == 0
    manifest = json.load(open(out / "samples.json"))
    assert manifest["anatomy_guidance"] == 1.5
    session = manifest["sessions"][-1]
    assert session["guidance"]["calls"] >= 3 and math.isfinite(session["guidance"]["energy_last"])
    assert session["timings"]["sampling_per_step_s"] > 0
    assert len(os.listdir(out / "images")) == 2 and len(os.listdir(out / "masks")) == 2
    with pytest.raises(ValueError, match="needs an anatomical model"):
        sample.main(["-r", runs["baseline"], "-n", "1", "-c", "2", "-l", str(tmp_path / "b"), "--no-progress",
                     "--device", "cpu", "--anatomy_guidance", "1"])
    with pytest.raises(ValueError, match="finite and >= 0"):
        sample.main([*args[:-1], "--anatomy_guidance", "nan"])
