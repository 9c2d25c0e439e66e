"""CompVis compatibility of the full LatentDiffusion: state-dict keys/shapes of the reference configs and
the golden outputs (encode, decode, UNet, q_sample, p_losses, 10-step DDIM) to 1e-4 relative."""
from __future__ import annotations

import json

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config

LDM_ENTRIES = ("lsun_churches_ldm_kl8", "ldm_ctorgan_uncond")
RTOL = 1e-4


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.parametrize("name", LDM_ENTRIES)
def test_state_dict_keys_and_shapes(compat_dir, name):
    entry = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())[name]
    assert entry["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    with torch.device("meta"):  # shapes only: no memory for the 300M-parameter reference UNet
        model = instantiate_from_config(entry["config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = entry["keys"]
    assert sorted(set(ours) - set(ref)) == []
    assert sorted(set(ref) - set(ours)) == []
    assert {k: v for k, v in ours.items() if v != ref[k]} == {}
    assert any(k.startswith("model_ema.diffusion_model") for k in ours)


@pytest.fixture(scope="module")
def golden(compat_dir):
    data = torch.load(compat_dir / "compvis_golden_visible.pt", weights_only=True)
    model = instantiate_from_config(data["config"])
    model.load_state_dict(data["state_dict"], strict=True)
    return model.eval(), data["inputs"], data["outputs"]


def test_golden_encode_decode(golden):
    model, inputs, outputs = golden
    with torch.no_grad():
        posterior = model.encode_first_stage(inputs["image"])
        assert _rel(posterior.mean, outputs["posterior_mean"]) < RTOL
        assert _rel(posterior.logvar, outputs["posterior_logvar"]) < RTOL
        assert model.scale_factor == 0.5
        decoded = model.decode_first_stage(outputs["posterior_mean"] * model.scale_factor)
        assert _rel(decoded, outputs["decoded"]) < RTOL


def test_golden_unet_and_q_sample(golden):
    model, inputs, outputs = golden
    with torch.no_grad():
        eps = model.model.diffusion_model(inputs["x"], inputs["t"])
        assert _rel(eps, outputs["unet_eps"]) < RTOL
        assert _rel(model.apply_model(inputs["x"], inputs["t"], None), outputs["unet_eps"]) < RTOL
        assert _rel(model.q_sample(x_start=inputs["x"], t=inputs["t"], noise=inputs["noise"]), outputs["q_sample"]) < RTOL


def test_golden_p_losses(golden):
    model, inputs, outputs = golden
    with torch.no_grad():
        loss, loss_dict = model.p_losses(inputs["x"], None, inputs["t"], noise=inputs["noise"])
    assert _rel(loss, outputs["p_losses_loss"]) < RTOL
    assert _rel(loss_dict["val/loss"], outputs["p_losses_loss"]) < RTOL
    assert _rel(loss_dict["val/loss_simple"], outputs["loss_simple"]) < RTOL
    assert _rel(loss_dict["val/loss_vlb"], outputs["loss_vlb"]) < RTOL


def test_golden_ddim(golden):
    model, inputs, outputs = golden
    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(int(inputs["ddim_steps"]), inputs["x_T"].shape[0], tuple(inputs["x_T"].shape[1:]),
                                conditioning=None, eta=float(inputs["ddim_eta"]), x_T=inputs["x_T"], verbose=False)
    assert sampler.ddim_timesteps.tolist() == list(range(1, 1000, 100))
    assert _rel(samples, outputs["ddim_sample"]) < RTOL
