"""Autoguidance (Karras et al. 2024): a model guided by a weaker model of itself, through the registry samplers,
``ldm.sampling`` and ``scripts/sample.py``: weight 1 is the model alone bit for bit, weight 0 the guide alone, the
guided prediction is the extrapolation, mismatched guides and bad settings are refused before sampling."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from ldm.models.diffusion.autoguidance import Autoguidance, check_autoguidance_weight
from ldm.models.diffusion.samplers import sample_model
from ldm.sampling import draw_batch
from ldm.sampling.session import resumable_session
from ldm.util import instantiate_from_config
from test_sample_run import _digest, load_script, make_run, tiny_config


def _pair(anatomical: bool = False):
    """A model and a guide of the same config with different weights (the guide: another initialisation)."""
    config = tiny_config(anatomical)["model"]
    torch.manual_seed(0)
    model = instantiate_from_config(copy.deepcopy(config)).eval()
    torch.manual_seed(1)
    guide = instantiate_from_config(copy.deepcopy(config)).eval()
    with torch.no_grad():  # a fresh UNet predicts 0 (zero-initialised output): give both non-zero predictions
        for seed, net in ((0, model), (1, guide)):
            g = torch.Generator().manual_seed(seed)
            for p in net.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, guide


def _noise():
    return torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m", "ancestral"])
def test_weight_one_is_the_model_alone_and_never_calls_the_guide(sampler):
    model, guide = _pair()
    guide.apply_model = lambda *a, **k: pytest.fail("the guide was called at weight 1")
    steer = Autoguidance(model, guide, 1.0)
    steps = None if sampler == "ancestral" else 4
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    from ldm.models.diffusion.samplers import generator_noise

    plain, _ = sample_model(model, sampler, _noise(), steps, noise_fn=generator_noise(g()))
    guided, _ = sample_model(model, sampler, _noise(), steps, noise_fn=generator_noise(g()),
                             make_denoiser=steer.denoiser)
    assert torch.equal(plain, guided) and steer.calls == 0


def test_the_guided_prediction_extrapolates_from_the_guide():
    model, guide = _pair()
    x, t = _noise(), torch.tensor([70, 3])
    eps_m, _ = model.denoiser()(x, t)
    eps_g, _ = guide.denoiser()(x, t)
    assert (eps_m - eps_g).abs().max() > 1e-3  # the two models differ
    eps, x0 = Autoguidance(model, guide, 2.5, guide_ema=False).denoiser()(x, t)
    assert torch.allclose(eps, eps_g + 2.5 * (eps_m - eps_g), atol=1e-6)
    assert torch.allclose(x0, model.predict_start_from_noise(x, t, eps), atol=1e-6)
    _, clipped = Autoguidance(model, guide, 2.5, guide_ema=False).denoiser(clip_denoised=True)(x, t)
    assert float(clipped.detach().abs().max()) <= 1.0 and torch.allclose(clipped, x0.clamp(-1, 1))


def test_weight_zero_samples_the_guide():
    model, guide = _pair()
    alone, _ = sample_model(guide, "ddim", _noise(), 5)
    steer = Autoguidance(model, guide, 0.0, guide_ema=False)
    guided, _ = sample_model(model, "ddim", _noise(), 5, make_denoiser=steer.denoiser)
    assert torch.allclose(alone, guided, atol=1e-5) and steer.calls == 5
    assert steer.summary()["calls"] == 5 and steer.summary()["weight"] == 0.0


def test_the_guide_uses_its_ema_weights_and_anatomical_models_keep_their_masks():
    model, guide = _pair(anatomical=True)
    with torch.no_grad():
        for p in guide.model.parameters():
            p.add_(1.0)  # live weights far from the EMA copy
    shadows = {name: buf.clone() for name, buf in guide.model_ema.named_buffers() if buf.dim() > 0}
    steer = Autoguidance(model, guide, 2.0)
    assert steer.guide_ema
    live = dict(guide.model.named_parameters())
    for name, shadow_name in guide.model_ema.m_name2s_name.items():
        if shadow_name in shadows:
            assert torch.equal(live[name], shadows[shadow_name]), name
    drawn = draw_batch(model, [0, 1], seed=0, ddim_steps=4, guidance=steer, masks=True)
    assert drawn["masks"].shape == (2, 16, 16) and steer.calls == 4
    plain = draw_batch(model, [0, 1], seed=0, ddim_steps=4, masks=True)
    assert not torch.equal(plain["latents"], drawn["latents"])


def test_mismatched_guides_and_weights_are_refused():
    model, guide = _pair()
    with pytest.raises(ValueError, match="another model than the one sampled"):
        Autoguidance(model, model, 2.0)
    other = copy.deepcopy(guide)
    other.scale_factor = 0.5
    with pytest.raises(ValueError, match="scale_factor: model 1.0, guide 0.5"):
        Autoguidance(model, other, 2.0)
    config = tiny_config(False)["model"]
    config["params"]["timesteps"] = 50
    with pytest.raises(ValueError, match="timesteps: model 100, guide 50"):
        Autoguidance(model, instantiate_from_config(config), 2.0)
    config = tiny_config(False)["model"]
    config["params"]["linear_end"] = 0.03
    with pytest.raises(ValueError, match=r"noise schedule \(alphas_cumprod\)"):
        Autoguidance(model, instantiate_from_config(config), 2.0)
    for bad in ("x", float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="autoguidance weight must be"):
            check_autoguidance_weight(bad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run trained 3 steps and an earlier checkpoint of the same config (1 step) as its guide."""
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("logs"))
    return {"model": make_run(root, True, steps=3, name="model"), "guide": make_run(root, True, steps=1, name="guide")}


def test_sample_script_autoguides_and_records_it(runs, tmp_path):
    sample = load_script("sample")
    common = ["-r", runs["model"], "-n", "2", "--batch_size", "2", "-c", "4", "--save_masks", "--no-progress",
              "--device", "cpu"]
    assert sample.main([*common, "-l", str(tmp_path / "plain")]) == 0
    assert sample.main([*common, "-l", str(tmp_path / "w1"), "--autoguide", runs["guide"],
                        "--autoguide_weight", "1"]) == 0
    assert sample.main([*common, "-l", str(tmp_path / "w3"), "--autoguide", runs["guide"],
                        "--autoguide_weight", "3"]) == 0
    assert _digest(tmp_path / "plain" / "images") == _digest(tmp_path / "w1" / "images")
    assert _digest(tmp_path / "plain" / "images") != _digest(tmp_path / "w3" / "images")
    session = json.load(open(tmp_path / "w3" / "samples.json"))["sessions"][-1]
    assert session["autoguidance"]["weight"] == 3.0 and session["autoguidance"]["guide_ema"] is True
    assert os.path.join("guide", "checkpoints", "last.ckpt") in session["autoguidance"]["guide"]
    assert session["guidance"]["calls"] == 4 and session["status"] == "complete"
    plain = json.load(open(tmp_path / "plain" / "samples.json"))["sessions"][-1]
    assert plain["autoguidance"] is None
    # an interrupted autoguided session is resumed by the same command only, not by another weight or guide
    interrupted = {**session, "status": "interrupted"}
    assert resumable_session([interrupted], {**session, "status": "started"}) is interrupted
    for change in ({"weight": 2.0}, {"guide": "another.ckpt"}):
        other = {**session, "autoguidance": {**session["autoguidance"], **change}}
        assert resumable_session([interrupted], other) is None
    assert resumable_session([interrupted], {**session, "autoguidance": None}) is None


@pytest.mark.parametrize("flags, error, match", [
    (["--autoguide_weight", "-1"], ValueError, "autoguidance weight must be finite and >= 0"),
    (["--anatomy_guidance", "1"], ValueError, "use one of them"),
    (["--autoguide", "no/such/run"], FileNotFoundError, "no such run folder or checkpoint"),
])
def test_bad_autoguide_settings_refused_before_loading(runs, tmp_path, monkeypatch, flags, error, match):
    sample = load_script("sample")
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("a model was loaded before the settings were checked"))
    flags = flags if "--autoguide" in flags else ["--autoguide", runs["guide"], *flags]
    with pytest.raises(error, match=match):
        sample.main(["-r", runs["model"], "-n", "1", "-l", str(tmp_path / "o"), "--no-progress", *flags])
    assert not (tmp_path / "o").exists()
