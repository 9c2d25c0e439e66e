"""Adam/AdamW in the models' configure_optimizers: the fused kernel when every parameter is on CUDA, else the default."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ldm.models.optim as optim
from ldm.models.optim import fused_kwargs, make_adam
from ldm.util import instantiate_from_config
from tiny_models import first_stage_config, ldm_config

TINY_AE = Path(__file__).resolve().parents[1] / "configs" / "tests" / "tiny_autoencoder.yaml"


@dataclass
class _Param:
    """Stands in for a parameter on a device this machine may not have (only ``device`` and the dtype are read)."""

    device: torch.device
    floating: bool = True

    def is_floating_point(self) -> bool:
        return self.floating


def test_fused_only_when_every_parameter_is_a_floating_cuda_tensor():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert fused_kwargs([_Param(cuda), _Param(torch.device("cuda", 1))]) == {"fused": True}
    assert fused_kwargs([_Param(cuda), _Param(cpu)]) == {}  # split across devices: PyTorch's default
    assert fused_kwargs([_Param(cuda), _Param(cuda, floating=False)]) == {}
    assert fused_kwargs([torch.nn.Parameter(torch.zeros(2))]) == {}
    assert fused_kwargs([]) == {}
    assert fused_kwargs(iter([_Param(cuda)])) == {"fused": True}  # a generator is read once, completely


def _ldm():
    model = instantiate_from_config(ldm_config(first_stage=first_stage_config(ch=8)))
    model.learning_rate = 1e-4
    return model


def test_diffusion_model_optimiser_on_cpu_is_the_default_adamw():
    opt = _ldm().configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults["fused"] and opt.defaults["lr"] == 1e-4


def test_configure_optimizers_passes_fused_when_the_device_qualifies(monkeypatch):
    """CPU also has a fused Adam kernel: declaring 'cpu' a fused device exercises the real selection and wiring."""
    monkeypatch.setattr(optim, "FUSED_DEVICE_TYPES", ("cpu",))
    model = _ldm()
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.trainable_parameters()]
    for p in model.trainable_parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))

    ae = instantiate_from_config(OmegaConf.load(TINY_AE).model)  # with a discriminator: two optimisers
    ae.learning_rate = 1e-4
    opts, _ = ae.configure_optimizers()
    assert [type(o) for o in opts] == [torch.optim.Adam, torch.optim.Adam] and all(o.defaults["fused"] for o in opts)


def test_make_adam_keeps_the_given_settings():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_adam(torch.optim.Adam, params, lr=0.5, betas=(0.5, 0.9))
    assert opt.defaults["lr"] == 0.5 and opt.defaults["betas"] == (0.5, 0.9) and not opt.defaults["fused"]


@pytest.mark.gpu
def test_fused_adamw_on_a_cuda_model():
    model = _ldm().to(torch.device("cuda"))
    assert model.configure_optimizers().defaults["fused"] is True
