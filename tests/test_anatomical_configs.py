"""The anatomical configs: they instantiate, equal their baselines except for the anatomical parts, and train
through main.py (the demo config, a few steps on the CPU)."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.anatomical_ddpm import AnatomicalLatentDiffusion
from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomicalUNetModel
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
LDM_DIR = ROOT / "configs" / "latent-diffusion"
ANATOMICAL_LDM = {"anatomical_mask_key", "anatomical_loss_weight", "progressive_anatomical_training",
                  "anatomical_schedule", "anatomical_warmup_steps", "attention_alignment_weight",
                  "anatomical_ignore_index", "anatomical_class_weights", "use_anatomical_inference",
                  "label_set", "alignment_target", "segmentation_loss", "anatomical_timestep_weighting",
                  "anatomical_logit_adjustment", "mask_from"}
ANATOMICAL_UNET = {"use_anatomical_registers", "num_anatomical_classes", "anatomical_register_dim",
                   "num_registers_per_class", "anatomical_attention_heads", "anatomical_attention_dim",
                   "use_timestep_aware_registers", "anatomical_attention_resolutions", "use_spatial_encoding",
                   "register_update", "register_read_pool", "mask_upsample_factor"}


def _load(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(LDM_DIR / name), resolve=True)


def _strip_anatomy(cfg: dict, also: tuple = ("monitor", "scale_by_std")) -> dict:
    """The config with its anatomical parts (and ``also``) removed, for comparison with the baseline."""
    p = cfg["model"]["params"]
    for key in ANATOMICAL_LDM | set(also):
        p.pop(key, None)
    cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentDiffusion"
    u = p["unet_config"]["params"]
    for key in ANATOMICAL_UNET:
        u.pop(key, None)
    p["unet_config"]["target"] = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    for split in ("train", "validation"):
        cfg["data"]["params"][split]["params"].pop("load_segmentations", None)
    return cfg


@pytest.mark.parametrize("dataset, classes", [("ctorgan", 6), ("breastmri", 4)])
def test_dataset_configs_equal_their_baselines_except_anatomy(dataset, classes):
    anat = _load(f"anatomical_{dataset}_kl.yaml")
    base = _load(f"{dataset}_unconditional_kl.yaml")
    assert anat["model"]["params"]["unet_config"]["params"]["num_anatomical_classes"] == classes
    assert anat["model"]["params"]["scale_by_std"] is True
    assert all(anat["data"]["params"][s]["params"]["load_segmentations"] for s in ("train", "validation"))
    for key in ("monitor", "scale_by_std"):
        base["model"]["params"].pop(key, None)
    for split in ("train", "validation"):
        base["data"]["params"][split]["params"].pop("load_segmentations", None)
    assert _strip_anatomy(anat) == base


def test_ctorgan_config_instantiates_with_compvis_keys_plus_anatomical_ones(compat_dir):
    cfg = OmegaConf.load(LDM_DIR / "anatomical_ctorgan_kl.yaml")
    cfg.model.params.first_stage_config.params.ckpt_path = None
    with torch.device("meta"):  # structure only: no memory, no initialisation cost
        model = instantiate_from_config(cfg.model)
    assert isinstance(model, AnatomicalLatentDiffusion)
    unet = model.model.diffusion_model
    assert isinstance(unet, AnatomicalUNetModel) and unet.num_anatomical_classes == 6
    # registers after the 6 encoder res blocks, the middle block and the 9 decoder blocks
    assert len(unet.anatomical_attention_keys) == 16 and "middle_0" in unet.anatomical_attention_keys
    reference = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())["ldm_ctorgan_uncond"]["keys"]
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert {k: own[k] for k in reference} == reference  # every reference key, same shape
    extra = set(own) - set(reference) - {"scale_factor"}  # scale_by_std keeps scale_factor in checkpoints
    modules = ("register_bank", "anatomical_attention", "register_read", "mask_decoder")
    prefixes = tuple(f"model.diffusion_model.{m}." for m in modules) + tuple(f"model_ema.diffusion_model{m}"
                                                                          for m in modules)
    assert extra and all(k.startswith(prefixes) for k in extra)
    assert any(".register_read." in k for k in extra) and any(".mask_decoder." in k for k in extra)
    assert unet.mask_upsample_factor == model.first_stage_downsampling_factor() == 4


def test_breastmri_unet_instantiates_with_four_classes():
    cfg = OmegaConf.load(LDM_DIR / "anatomical_breastmri_kl.yaml")
    with torch.device("meta"):
        unet = instantiate_from_config(cfg.model.params.unet_config)
    assert unet.mask_head.out.out_channels == 4 and unet.mask_upsample_factor == 4
    assert unet.register_bank.registers.shape == (4, 4, 256)


def test_demo_config_matches_the_demo_baseline_except_anatomy():
    baseline = LDM_DIR / "demo_phantom_ldm.yaml"
    if not baseline.is_file():
        pytest.skip("configs/latent-diffusion/demo_phantom_ldm.yaml is not there yet")
    # everything but the anatomical parts is the same, monitor and scale_by_std included
    assert _strip_anatomy(_load("demo_phantom_anatomical.yaml"), also=()) == _load("demo_phantom_ldm.yaml")


@pytest.fixture
def _keep_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    yield
    if previous is not None:
        signal.signal(signal.SIGUSR1, previous)


def test_demo_config_trains_through_main(tmp_path, _keep_sigusr1):
    """Three steps of the demo config through main.py on the CPU (untrained first stage, no checkpoint)."""
    import main

    argv = ["--base", str(LDM_DIR / "demo_phantom_anatomical.yaml"), "-t", "--accelerator", "cpu",
            "-l", str(tmp_path / "logs"), "-n", "demo_anat",
            "model.params.first_stage_config.params.ckpt_path=null",
            "lightning.trainer.max_steps=3", "lightning.trainer.limit_val_batches=1",
            "lightning.trainer.log_every_n_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.max_images=2",
            "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
            "data.params.batch_size=4", "data.params.train.params.num_samples=12",
            "data.params.validation.params.num_samples=4"]
    assert main.main(argv) == 0
    (run,) = [p for p in (tmp_path / "logs").iterdir() if p.is_dir()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert "model.diffusion_model.register_bank.registers" in ckpt["state_dict"]
    metrics = (next(run.glob("csv/version_*/metrics.csv"))).read_text().splitlines()[0].split(",")
    for key in ("train/anatomical_loss_step", "train/anatomical_weight_step", "train/anatomical_dice_step",
                "val/anatomical_loss", "val/diffusion_loss"):
        assert key in metrics, key
    images = {p.name.split("_gs-")[0] for p in run.glob("images/train/*.png")}
    assert {"samples", "samples_mask", "inputs_mask", "samples_class_attention"} <= images, images
