"""main.py refuses what used to train silently (issue 31): a last.ckpt of another run, a checkpoints/ symlink out of
the run, data whose size does not fit the latents, an anatomical model without masks, and mask values outside the
model's label set (an error naming the file, at data loading)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import main
from ldm.training.run_identity import CHECKPOINT_KEY, RUN_FILE

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
TINY_LDM = str(ROOT / "configs" / "tests" / "tiny_ldm.yaml")
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config  # noqa: E402

QUIET = ["lightning.logger.target=pytorch_lightning.loggers.CSVLogger"]


pytestmark = pytest.mark.usefixtures("main_process_state")  # tests/conftest.py


def _toy_run(logs: Path, steps: int = 2) -> Path:
    assert main.main(["--base", TOY, "-t", "-l", str(logs), "--max_steps", str(steps), *QUIET]) == 0
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    return run


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- a checkpoint of another run
def test_a_last_ckpt_of_another_run_is_refused_unless_allowed(tmp_path, capsys, caplog):
    a, b = _toy_run(tmp_path / "a"), _toy_run(tmp_path / "b", steps=4)
    run_id = json.loads((a / RUN_FILE).read_text())["run_id"]
    own = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert own[CHECKPOINT_KEY] == run_id
    shutil.copy(b / "checkpoints" / "last.ckpt", a / "checkpoints" / "last.ckpt")  # same architecture, other run
    capsys.readouterr()
    assert main.main(["-r", str(a), "-t", "--max_steps", "6", *QUIET]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"main.py: error: cannot resume: {a / 'checkpoints' / 'last.ckpt'} was written by another "
                           f"run (run id ") and f"than {a} (run id {run_id}" in line and "--allow-other-run" in line
    caplog.set_level(logging.WARNING, logger="ldm.training.run_identity")
    assert main.main(["-r", str(a), "-t", "--max_steps", "6", "--allow-other-run", *QUIET]) == 0
    assert "a checkpoint of ANOTHER run" in caplog.text
    after = torch.load(a / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 6 and after[CHECKPOINT_KEY] == run_id  # it is this run's from now on


def test_the_run_own_checkpoint_resumes_and_an_old_run_gets_a_run_id(tmp_path):
    a = _toy_run(tmp_path / "a")
    assert main.main(["-r", str(a), "-t", "--max_steps", "3", *QUIET]) == 0
    os.remove(a / RUN_FILE)  # a run from before run ids: its first resume records one
    assert main.main(["-r", str(a), "-t", "--max_steps", "4", *QUIET]) == 0
    assert (a / RUN_FILE).is_file()


# ----------------------------------------------------------------------------- a symlinked checkpoints folder
def test_a_checkpoints_symlink_out_of_the_run_is_refused_naming_its_target(tmp_path, capsys, caplog):
    a = _toy_run(tmp_path / "a")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(a / "checkpoints"), str(elsewhere))
    os.symlink(elsewhere, a / "checkpoints")
    capsys.readouterr()
    assert main.main(["-r", str(a), "-t", "--max_steps", "3", *QUIET]) == 2
    (line,) = _error_lines(capsys)
    assert f"{a / 'checkpoints'} is a symbolic link to {elsewhere}, outside the run directory" in line
    assert "--trust-config" in line
    caplog.set_level(logging.WARNING, logger="ldm.trust")
    assert main.main(["-r", str(a), "-t", "--max_steps", "3", "--trust-config", *QUIET]) == 0
    assert f"is a symbolic link to {elsewhere}" in caplog.text
    assert torch.load(elsewhere / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3


# ----------------------------------------------------------------------------- data that does not fit the model
def test_data_whose_size_does_not_fit_the_latents_is_refused(tmp_path, capsys):
    """tiny_ldm: an f4 first stage and 4 px latents, so 16 px data; 32 px data gives 8 px latents."""
    argv = ["--base", TINY_LDM, "-t", "-l", str(tmp_path / "logs"), "--accelerator", "cpu",
            "data.params.train.params.size=32", "data.params.validation.params.size=32"]
    assert main.main(argv) == 2
    (line,) = _error_lines(capsys)
    assert line == ("main.py: error: the data does not fit the model: the train data (PhantomDataset) gives 32 px "
                    "images, which the first stage (downsampling factor 4) turns into 8 px latents, but the model is "
                    "built for 4 px latents (model.params.image_size: 4, unet_config image_size: 4): it would train "
                    "on latents of another size than it samples. Set the data's size to 16 or model.params.image_size "
                    "(and the UNet's) to 8")
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*.ckpt"))


def _images(folder: Path, n: int = 2, masks: Path | None = None, label: int = 1) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"s{i}.png")
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = label
            Image.fromarray(mask).save(masks / f"s{i}.png")


def _anatomical_config(tmp_path: Path, images: Path, masks: Path | None) -> str:
    unet = unet_config(anatomy=anatomical_params(use_anatomical_registers=True))
    model = ldm_config(True, first_stage=first_stage_config(ch=8), unet=unet, timesteps=20, label_set="ctorgan",
                       first_stage_key="image", cond_stage_key="image", scale_factor=1.0, use_ema=False)
    dataset = {"target": "ldm.data.medical_images.MedicalImagesBase",
               "params": {"data_root": str(images), "segmentation_root": None if masks is None else str(masks),
                          "size": 16}}
    config = {"model": {"base_learning_rate": 1e-4, **model},
              "data": {"target": "main.DataModuleFromConfig",
                       "params": {"batch_size": 2, "num_workers": 0, "train": dataset}},
              "lightning": {"trainer": {"max_steps": 1, "accelerator": "cpu", "enable_progress_bar": False,
                                        "enable_model_summary": False, "num_sanity_val_steps": 0}}}
    path = tmp_path / "anatomical.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_an_anatomical_model_whose_data_has_no_masks_is_refused(tmp_path, capsys):
    config = _anatomical_config(tmp_path, tmp_path / "images", None)
    _images(tmp_path / "images")
    assert main.main(["--base", config, "-t", "-l", str(tmp_path / "logs"), "--no-test", *QUIET]) == 2
    (line,) = _error_lines(capsys)
    assert line.startswith("main.py: error: the data does not fit the model: the anatomical model "
                           "(AnatomicalLatentDiffusion) learns from masks, but the training data (MedicalImagesBase) "
                           "loads none: it has no segmentation_root")


def test_some_unlabelled_examples_are_fine(tmp_path):
    from ldm.data.medical_images import MedicalImagesBase
    from ldm.training.fit_checks import check_mask_source

    _images(tmp_path / "images", n=3, masks=tmp_path / "masks")
    os.remove(tmp_path / "masks" / "s2.png")

    class Model:
        use_anatomy, anatomical_mask_key = True, "segmentation"

    class Data:
        datasets = {"train": MedicalImagesBase(tmp_path / "images", tmp_path / "masks", size=16)}

    check_mask_source(Model(), Data())  # two of three labelled: trains, with the dataset's one warning


def test_a_mask_value_outside_the_label_set_fails_at_data_loading_naming_the_file(tmp_path):
    _images(tmp_path / "images", masks=tmp_path / "masks", label=7)  # ctorgan has 6 classes, 0..5
    config = _anatomical_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match=r"mask .*masks/s[01]\.png holds label values \[7\] outside label set "
                                         r"'ctorgan' \(0\.\.5: 0 background, 1 liver, .*5 bone; ignore_index=255\)"):
        main.main(["--base", config, "-t", "-l", str(tmp_path / "logs"), "--no-test", *QUIET])
