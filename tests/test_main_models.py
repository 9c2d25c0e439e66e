"""``python main.py`` as a subprocess on the real tiny LatentDiffusion and AutoencoderKL configs (CPU)."""
from __future__ import annotations

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main

ROOT = Path(__file__).resolve().parents[1]
TINY_LDM = str(ROOT / "configs" / "tests" / "tiny_ldm.yaml")
TINY_AE = str(ROOT / "configs" / "tests" / "tiny_autoencoder.yaml")


def _main(tmp_path: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _only_run(logs: Path) -> Path:
    runs = [p for p in logs.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow(35)
def test_ldm_trains_then_resumes_with_step_and_ema(tmp_path):
    _main(tmp_path, "--base", TINY_LDM, "-t", "--accelerator", "cpu")
    run = _only_run(tmp_path / "logs")
    assert glob.glob(str(run / "configs" / "*-project.yaml")) and glob.glob(str(run / "configs" / "*-lightning.yaml"))
    assert glob.glob(str(run / "images" / "train" / "samples_gs-000002_*.png"))
    first = _ckpt(run / "checkpoints" / "last.ckpt")
    assert first["global_step"] == 3 and int(first["state_dict"]["model_ema.num_updates"]) == 3

    proc = _main(tmp_path, "-r", str(run), "-t", "--max_steps", "5")
    assert _only_run(tmp_path / "logs") == run  # same log dir
    assert "resuming from" in proc.stderr
    second = _ckpt(run / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 5
    sd1, sd2 = first["state_dict"], second["state_dict"]
    assert int(sd2["model_ema.num_updates"]) == 5  # EMA restored from the checkpoint, then updated twice
    ema_keys = [k for k in sd2 if k.startswith("model_ema.") and sd2[k].is_floating_point() and k != "model_ema.decay"]
    assert ema_keys and any(not torch.equal(sd1[k], sd2[k]) for k in ema_keys)
    assert len(second["optimizer_states"]) == 1 and second["optimizer_states"][0]["state"]


@pytest.mark.slow(20)
def test_ldm_ddp_two_cpu_processes(tmp_path):
    proc = _main(tmp_path, "--base", TINY_LDM, "-t", "lightning.trainer.accelerator=cpu",
                 "lightning.trainer.devices=2", "lightning.trainer.strategy=ddp",
                 "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=100")
    run = _only_run(tmp_path / "logs")  # both processes log into one run directory
    # one last.ckpt and one monitored checkpoint (val/loss_simple_ema at the end of epoch 0), not one per rank
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch=000000-step=000000002.ckpt", "last.ckpt"]
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert "2 (devices)" in proc.stderr  # learning rate scaled by the process count


def test_autoencoder_trains_through_both_optimisers(tmp_path):
    # CompVis autoencoder configs ask for accumulate_grad_batches 2, which manual optimisation cannot do
    proc = _main(tmp_path, "--base", TINY_AE, "-t", "--accelerator", "cpu", "--accumulate_grad_batches", "2")
    assert "accumulate_grad_batches=2 ignored" in proc.stderr and "1 (accumulate_grad_batches)" in proc.stderr
    run = _only_run(tmp_path / "logs")
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert len(ckpt["optimizer_states"]) == 2 and all(s["state"] for s in ckpt["optimizer_states"])
    with open(glob.glob(str(run / "csv" / "version_0" / "metrics.csv"))[0]) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/disc_factor")]
    factors = [float(r["train/disc_factor"]) for r in rows]
    assert factors[0] == 0.0 and factors[-1] == 1.0  # discriminator phase reached after disc_start
    assert float(rows[-1]["train/disc_loss"]) > 0.0


def test_autoencoder_needing_lpips_without_weights_fails_with_the_documented_message(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LDM_LPIPS_DIR", str(empty))
    monkeypatch.setenv("HOME", str(empty))
    monkeypatch.setenv("TORCH_HOME", str(empty))
    code = main.main(["--base", TINY_AE, "-t", "-l", str(tmp_path / "logs"), "--accelerator", "cpu",
                      "model.params.lossconfig.params.perceptual_weight=1.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "LPIPS perceptual loss needs pretrained weights" in err and "perceptual_weight: 0" in err


def test_dataset_root_unset_stops_before_training_with_one_message(tmp_path, monkeypatch, capsys):
    """A CT-Organ data section without CTORG_ROOT: exit code 2, one line naming the variable, no run started."""
    monkeypatch.delenv("CTORG_ROOT", raising=False)
    from omegaconf import OmegaConf

    config = OmegaConf.load(TINY_AE)  # the phantom's params (num_samples, ...) are no CTOrganTrain parameters
    config.data.params.train = {"target": "ldm.data.medical_images.CTOrganTrain", "params": {"size": 32}}
    OmegaConf.save(config, tmp_path / "ctorg.yaml")
    code = main.main(["--base", str(tmp_path / "ctorg.yaml"), "-t", "-l", str(tmp_path / "logs"),
                      "--accelerator", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: could not build the model or the data from the config: CTOrganTrain")
    assert "CTORG_ROOT" in err and "Traceback" not in err
    assert not list((tmp_path / "logs").glob("*/checkpoints/*.ckpt"))
