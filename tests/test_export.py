"""scripts/export.py round-trips a run to identical samples (script, bare state dict, three lines of Python);
scripts/sample.py reads the CompVis model folder layout (model.ckpt + config.yaml)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm import sampling
from test_sample_run import _digest, load_script, make_run

COMMON = ["-n", "3", "--batch_size", "2", "-c", "3", "-e", "0.5", "--seed", "11", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return make_run(str(tmp_path_factory.mktemp("logs")), False, steps=3, name="exp")


@pytest.fixture(scope="module")
def run_samples(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "run"
    assert load_script("sample").main(["-r", run, "-l", str(out), *COMMON]) == 0
    return _digest(out / "images")


def test_export_round_trips_to_identical_samples(run, run_samples, tmp_path):
    export = load_script("export")
    out = tmp_path / "exported"
    assert export.main(["-r", run, "-o", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.yaml", "model.safetensors", "state_dict.pt"]
    modes = {name: os.stat(out / name).st_mode & 0o777 for name in os.listdir(out)}
    assert len(set(modes.values())) == 1, modes  # safetensors' own writer made model.safetensors 0600
    weights = load_file(str(out / "model.safetensors"))
    bare = torch.load(out / "state_dict.pt", weights_only=True)
    assert not [k for k in weights if k.startswith("model_ema.")] and weights.keys() == bare.keys()
    assert all(torch.equal(weights[k], bare[k]) for k in weights)
    # The EMA weights are the ones exported: they differ from the live weights after 3 steps.
    live = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    key = "model.diffusion_model.out.2.weight"
    assert not torch.equal(weights[key], live[key])
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "config.yaml")
    assert cfg.model.params.use_ema is False and cfg.export.weights == "ema"
    assert cfg.export.checkpoint_sha256 == sampling.sha256_file(os.path.join(run, "checkpoints", "last.ckpt"))

    # scripts/sample.py on the export folder, and on the bare state dict beside its config.yaml: same bytes.
    for source in (out, out / "state_dict.pt"):
        folder = tmp_path / f"from_{os.path.basename(source)}"
        assert load_script("sample").main(["-r", str(source), "-l", str(folder), *COMMON]) == 0
        assert _digest(folder / "images") == run_samples

    # Three lines of Python (README): the same pixels.
    model, _ = sampling.load_model_for_sampling(str(out))
    images = sampling.sample_images(model, 3, ddim_steps=3, eta=0.5, seed=11)
    pixels = sampling.to_uint8(images)
    for i in range(3):
        assert np.array_equal(pixels[i], np.asarray(Image.open(tmp_path / "from_exported" / "images" /
                                                               f"{i:06d}.png")))

    # Live weights exported with --no-ema sample differently; an existing export is not overwritten silently.
    assert export.main(["-r", run, "-o", str(tmp_path / "live"), "--no-ema"]) == 0
    assert OmegaConf.load(tmp_path / "live" / "config.yaml").export.weights == "live"
    load_script("sample").main(["-r", str(tmp_path / "live"), "-l", str(tmp_path / "s_live"), *COMMON])
    assert _digest(tmp_path / "s_live" / "images") != run_samples
    with pytest.raises(ValueError, match="already holds an export"):
        export.main(["-r", run, "-o", str(out)])
    assert export.main(["-r", run, "-o", str(out), "--overwrite"]) == 0


def test_compvis_model_folder_layout(run, run_samples, tmp_path):
    """A CompVis model folder: model.ckpt (a Lightning checkpoint with EMA) beside config.yaml."""
    folder = tmp_path / "ldm_model"
    folder.mkdir()
    shutil.copy(os.path.join(run, "checkpoints", "last.ckpt"), folder / "model.ckpt")
    shutil.copy(os.path.join(run, "configs", "2026-01-01T00-00-00-project.yaml"), folder / "config.yaml")
    for source in (folder, folder / "model.ckpt"):
        out = tmp_path / f"s_{os.path.basename(source)}"
        assert load_script("sample").main(["-r", str(source), "-l", str(out), *COMMON]) == 0
        assert _digest(out / "images") == run_samples
    # Without config.yaml the folder is not a model folder and the error says what to pass.
    (folder / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="-b CONFIG.yaml"):
        load_script("sample").main(["-r", str(folder / "model.ckpt"), "-l", str(tmp_path / "x"), *COMMON])


def test_export_refuses_an_untrusted_run(run, tmp_path):
    """A shared run whose config names a callable outside the allow-list is refused before anything is built."""
    from omegaconf import OmegaConf

    from ldm.trust import UntrustedTargetError

    evil = tmp_path / "2026-01-01T00-00-00_evil"
    shutil.copytree(run, evil)
    (project,) = [evil / "configs" / n for n in os.listdir(evil / "configs")]
    cfg = OmegaConf.load(project)
    marker = tmp_path / "pwned"
    cfg.model.params.first_stage_config.params.lossconfig = {"target": "os.makedirs", "params": {"name": str(marker)}}
    OmegaConf.save(cfg, project)
    with pytest.raises(UntrustedTargetError, match="lossconfig.target.*'os.makedirs'"):
        load_script("export").main(["-r", str(evil), "-o", str(tmp_path / "out")])
    assert not marker.exists() and not (tmp_path / "out").exists()
