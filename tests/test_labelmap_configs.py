"""The mask-conditioned configs (issue 28): each is its anatomical config plus the mask condition and nothing else;
the demo one trains through main.py (a real Lightning trainer) and its run samples from mask files through
sample.py; train_anatomical_ldm.sh picks them."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from test_sample_run import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "latent-diffusion")
PAIRS = [("anatomical_labelmap_ctorgan_kl.yaml", "anatomical_ctorgan_kl.yaml", 6),
         ("anatomical_labelmap_breastmri_kl.yaml", "anatomical_breastmri_kl.yaml", 4),
         ("demo_phantom_labelmap.yaml", "demo_phantom_anatomical.yaml", 6)]


@pytest.mark.parametrize("labelmap, anatomical, classes", PAIRS)
def test_labelmap_configs_are_the_anatomical_ones_plus_the_condition(labelmap, anatomical, classes):
    load = lambda name: OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIGS, name)))  # noqa: E731
    cfg, base = load(labelmap), load(anatomical)
    assert {k: v for k, v in cfg.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}
    params, base_params = cfg["model"]["params"], base["model"]["params"]
    condition = params.pop("mask_condition")
    assert condition == {"key": base_params["anatomical_mask_key"], "num_classes": classes,
                         "ignore_index": base_params["anatomical_ignore_index"], "dropout": 0.1, "partial": 0.3}
    unet = params["unet_config"]["params"]
    assert unet.pop("mask_condition_classes") == classes == unet["num_anatomical_classes"]
    assert params == base_params


def test_the_demo_labelmap_config_trains_through_main_and_samples_from_masks(tmp_path):
    import main

    logs = tmp_path / "logs"
    small = ["lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=1",
             "lightning.trainer.log_every_n_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=1",
             "lightning.callbacks.image_logger.params.max_images=2", "data.params.batch_size=4",
             "data.params.train.params.num_samples=8", "data.params.validation.params.num_samples=4",
             "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
             "model.params.first_stage_config.params.ckpt_path=null"]
    assert main.main(["--base", os.path.join(CONFIGS, "demo_phantom_labelmap.yaml"), "-t", "--accelerator", "cpu",
                      "-l", str(logs), "-n", "labelmap", *small]) == 0
    (run,) = list(logs.iterdir())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.diffusion_model.mask_condition.") for k in state)
    (tmp_path / "masks").mkdir()
    from ldm.data.phantom import PhantomDataset

    mask = np.asarray(PhantomDataset(size=32, num_samples=1, seed=3)[0]["segmentation"]).astype(np.uint8)
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    out = tmp_path / "out"
    assert load_script("sample").main(["-r", str(run), "--masks", str(tmp_path / "masks"), "--per_mask", "2",
                                       "-c", "2", "--save_masks", "--no-progress", "--device", "cpu",
                                       "-l", str(out)]) == 0
    assert sorted(os.listdir(out / "images")) == ["m_0.png", "m_1.png"]
    record = json.loads((out / "from_masks.json").read_text())
    assert record["checkpoint"].endswith("last.ckpt") and record["own_masks"] is True


def test_train_script_picks_the_labelmap_configs(tmp_path):
    from test_training_faults import STUB_PYTHON

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "LOGDIR": str(tmp_path / "logs"), "CALLS": str(tmp_path / "calls")}
    for dataset, config in (("demo_labelmap", "demo_phantom_labelmap.yaml"),
                            ("ctorgan_labelmap", "anatomical_labelmap_ctorgan_kl.yaml"),
                            ("breastmri_labelmap", "anatomical_labelmap_breastmri_kl.yaml")):
        subprocess.run([os.path.join(ROOT, "train_anatomical_ldm.sh"), dataset], env=env, check=True,
                       capture_output=True, timeout=60)
        assert f"configs/latent-diffusion/{config}" in (tmp_path / "calls").read_text().splitlines()[-1]
    bad = subprocess.run([os.path.join(ROOT, "train_anatomical_ldm.sh"), "nosuch"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "_labelmap" in bad.stderr
