"""The shipped training configs: CompVis schema, importable targets, reference model sections (no training)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.util import get_obj_from_str

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "autoencoder").glob("*.yaml")) + \
    sorted((ROOT / "configs" / "latent-diffusion").glob("*_unconditional_kl.yaml")) + \
    sorted((ROOT / "configs" / "latent-diffusion").glob("demo_phantom_ldm.yaml"))
EXPECTED = {"autoencoder_kl_32x32x4.yaml", "autoencoder_kl_64x64x3.yaml", "autoencoder_kl_64x64x3_ctorgan.yaml",
            "autoencoder_kl_64x64x3_breastmri.yaml", "demo_phantom_kl.yaml", "ctorgan_unconditional_kl.yaml",
            "breastmri_unconditional_kl.yaml", "demo_phantom_ldm.yaml"}


def _targets(node):
    if isinstance(node, dict):
        if "target" in node:
            yield node["target"]
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def test_all_expected_configs_exist():
    assert EXPECTED <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_schema_and_targets(path):
    cfg = OmegaConf.load(path)
    assert set(cfg) == {"model", "data", "lightning"}
    assert float(cfg.model.base_learning_rate) > 0
    assert cfg.data.target == "main.DataModuleFromConfig" and int(cfg.data.params.batch_size) >= 1
    raw = OmegaConf.to_container(cfg, resolve=False)
    for target in _targets(raw):
        assert callable(get_obj_from_str(target)), target


def _without_paths(model: dict) -> dict:
    model = json.loads(json.dumps(model))
    params = model["params"]
    params.pop("lossconfig", None)
    params.pop("scale_by_std", None)  # on in the shipped baselines (the project's autoencoders), off in CompVis'
    fs = params.get("first_stage_config")
    if fs:
        fs["params"].pop("ckpt_path", None)
        fs["params"].pop("ignore_keys", None)
    return model


@pytest.mark.parametrize("name, entry", [
    ("autoencoder/autoencoder_kl_64x64x3_ctorgan.yaml", "ae_ctorgan"),
    ("autoencoder/autoencoder_kl_64x64x3_breastmri.yaml", "ae_breastmri"),
    ("latent-diffusion/ctorgan_unconditional_kl.yaml", "ldm_ctorgan_uncond"),
    ("latent-diffusion/breastmri_unconditional_kl.yaml", "ldm_ctorgan_uncond"),
])
def test_medical_configs_equal_the_reference_model_sections(compat_dir, name, entry):
    reference = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())[entry]["config"]
    ours = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / name).model)
    assert _without_paths(ours) == _without_paths(reference)


def test_compvis_f8_f4_architectures(compat_dir):
    keys = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())
    for name, entry in (("autoencoder_kl_32x32x4.yaml", "kl-f8"), ("autoencoder_kl_64x64x3.yaml", "kl-f4")):
        ours = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "autoencoder" / name).model)
        ref = keys[entry]["config"]
        dd_ours, dd_ref = dict(ours["params"]["ddconfig"]), dict(ref["params"]["ddconfig"])
        # grey-scale by default; everything else as CompVis
        assert (dd_ours.pop("in_channels"), dd_ours.pop("out_ch")) == (1, 1)
        dd_ref.pop("in_channels"), dd_ref.pop("out_ch")
        assert dd_ours == dd_ref and ours["params"]["embed_dim"] == ref["params"]["embed_dim"]


def test_demo_ldm_first_stage_is_the_demo_autoencoder():
    ae = OmegaConf.load(ROOT / "configs" / "autoencoder" / "demo_phantom_kl.yaml").model.params
    for name in ("demo_phantom_ldm.yaml", "demo_phantom_anatomical.yaml"):
        path = ROOT / "configs" / "latent-diffusion" / name
        if not path.is_file():
            continue
        fs = OmegaConf.load(path).model.params.first_stage_config.params
        assert fs.ddconfig == ae.ddconfig and fs.embed_dim == ae.embed_dim, name
        assert OmegaConf.is_missing(fs, "ckpt_path")  # given on the command line (see the config's header)
