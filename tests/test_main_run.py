"""main.py end to end on a toy LightningModule (tests/test_main_toy.py): run dir, resume, checkpoints, faults."""
from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from ldm.training.callbacks import ImageLogger, NonFiniteLossError
from ldm.training.data import DataModuleFromConfig, WrappedDataset, worker_init_fn

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
if str(ROOT / "tests") not in sys.path:  # toy.yaml names test_main_toy.ToyModel (any pytest import mode)
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _trust_the_toy_classes(monkeypatch):
    """Runs saved here name test_main_toy.* targets; -r trusts them as a user trusts a package of their own."""
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")


@pytest.fixture(autouse=True)
def _keep_sigusr1():
    """main installs a SIGUSR1 handler; restore the previous one after each test."""
    previous = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    yield
    if previous is not None:
        signal.signal(signal.SIGUSR1, previous)


def _runs(logdir: Path) -> list[Path]:
    return sorted(p for p in logdir.iterdir() if p.is_dir())


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _train(tmp_path: Path, *extra: str) -> Path:
    assert main.main(["--base", TOY, "-t", "-l", str(tmp_path / "logs"), *extra]) == 0
    (run,) = _runs(tmp_path / "logs")
    return run


def test_fresh_run_writes_the_log_dir_contract(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="main")
    run = _train(tmp_path, "-n", "toyrun")
    assert run.name.endswith("_toyrun")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(glob.glob(str(run / "configs" / "*-project.yaml"))) == 1
    assert len(glob.glob(str(run / "configs" / "*-lightning.yaml"))) == 1
    assert glob.glob(str(run / "images" / "train" / "inputs_gs-000002_*.png"))
    assert glob.glob(str(run / "images" / "val" / "reconstructions_*.png"))
    assert (run / "csv" / "version_0" / "metrics.csv").is_file()
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and int(ckpt["state_dict"]["ema_updates"]) == 6
    # monitored top-k checkpoints exist because the toy model logs val/loss
    assert glob.glob(str(run / "checkpoints" / "epoch=*-step=*.ckpt"))
    # effective learning rate: 1 * 1 device * 1 node * batch 2 * 1e-4, with the formula logged
    assert "learning rate 2.00e-04 = 1 (accumulate_grad_batches) * 1 (devices)" in caplog.text


def test_resume_from_checkpoint_file_continues_in_the_same_dir(tmp_path):
    run = _train(tmp_path)
    first = _ckpt(run / "checkpoints" / "last.ckpt")
    assert main.main(["-r", str(run / "checkpoints" / "last.ckpt"), "-t", "--max_steps", "9"]) == 0
    assert _runs(tmp_path / "logs") == [run]
    second = _ckpt(run / "checkpoints" / "last.ckpt")
    assert (first["global_step"], second["global_step"]) == (6, 9)
    assert int(second["state_dict"]["ema_updates"]) == 9  # EMA-like state restored, then advanced
    assert second["epoch"] >= first["epoch"]
    assert len(glob.glob(str(run / "configs" / "*-project.yaml"))) >= 1
    assert (run / "csv" / "version_1").is_dir()


def test_scale_lr_false_and_overrides(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="main")
    run = _train(tmp_path, "--scale_lr", "false", "model.base_learning_rate=0.5", "lightning.trainer.max_steps=2")
    assert "learning rate 5.00e-01 = base_learning_rate (--scale_lr false)" in caplog.text
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_nan_loss_stops_with_message_and_keeps_the_last_good_checkpoint(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at global step 5.*last good "
                                                 r"checkpoint is .*last\.ckpt"):
        main.main(["--base", TOY, "-t", "-l", str(logs), "model.params.nan_at_step=5"])
    (run,) = _runs(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # saved at the end of epoch 0, untouched by the NaN step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_exception_saves_a_checkpoint_before_exiting(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(RuntimeError, match="injected failure"):
        main.main(["--base", TOY, "-t", "-l", str(logs), "model.params.fail_at_step=3",
                   "lightning.trainer.limit_val_batches=0"])
    (run,) = _runs(logs)
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 3
    # and the run continues from there
    assert main.main(["-r", str(run), "-t", "model.params.fail_at_step=-1"]) == 0
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 6 and int(ckpt["state_dict"]["ema_updates"]) == 6


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="platform without SIGUSR1")
def test_sigusr1_saves_and_stops(tmp_path):
    logs = tmp_path / "logs"
    assert main.main(["--base", TOY, "-t", "-l", str(logs), "model.params.signal_at_step=1",
                      "lightning.trainer.max_steps=50"]) == 128 + signal.SIGUSR1  # interrupted: not a finished run
    (run,) = _runs(logs)
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_monitor_key_not_logged_keeps_last_only_with_one_warning(tmp_path):
    with pytest.warns(UserWarning, match="checkpoint monitor 'val/loss' .* is not logged") as record:
        run = _train(tmp_path, "model.params.log_val=false")
    assert sum("is not logged" in str(w.message) for w in record) == 1
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]


def test_no_validation_means_last_checkpoint_only(tmp_path, caplog):
    run = _train(tmp_path, "--limit_val_batches", "0")
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]


def test_debug_run_is_moved_to_debug_runs(tmp_path):
    logs = tmp_path / "logs"
    assert main.main(["--base", TOY, "-t", "-d", "-l", str(logs), "lightning.trainer.max_steps=1"]) == 0
    (moved,) = list((logs / "debug_runs").iterdir())
    assert (moved / "checkpoints" / "last.ckpt").is_file()


def test_user_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main.main(["--base", str(tmp_path / "missing.yaml"), "-t"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main.main(["-r", str(tmp_path / "no_run"), "-t"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main.main(["--base", TOY, "-t", "-l", str(tmp_path), "lightning.trainer.max_stepz=1"]) == 2
    assert "max_stepz" in capsys.readouterr().err
    demo_ldm = str(ROOT / "configs" / "latent-diffusion" / "demo_phantom_ldm.yaml")
    assert main.main(["--base", demo_ldm, "-t", "-l", str(tmp_path)]) == 2
    assert "model.params.first_stage_config.params.ckpt_path=" in capsys.readouterr().err
    assert main.main(["--base", TOY, "-t", "-l", str(tmp_path), "data.params.train.params.num=${oc.env:NO_SUCH_VAR_X}"]) == 2
    assert "NO_SUCH_VAR_X" in capsys.readouterr().err
    assert not list(tmp_path.glob("*/checkpoints"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpus_without_cuda_fails_clearly_in_a_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--base", TOY, "-t", "--gpus", "0,1",
                           "-l", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--accelerator cpu" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written


# ----------------------------------------------------------------------------- pieces, no Trainer
def test_image_logger_frequency_and_grid():
    logger = ImageLogger(batch_frequency=8, max_images=2)
    assert [i for i in range(0, 20) if logger.check_frequency(i)] == [1, 2, 4, 8, 16]
    logger = ImageLogger(batch_frequency=3, max_images=2, increase_log_steps=False, log_first_step=True)
    assert [i for i in range(0, 10) if logger.check_frequency(i)] == [0, 3, 6, 9]
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    grid = logger.to_grid(images)
    assert grid.dtype == np.uint8 and grid.shape == (2, 2, 3)  # one image: no padding, grey to RGB
    assert grid[..., 0].tolist() == [[0, 0], [128, 255]]  # clamped, [-1, 1] -> [0, 255]
    assert logger.to_grid(torch.zeros(3, 1, 2, 2)).shape == (6, 14, 3)  # 3 images in a row, 2 px padding around each
    with pytest.raises(ValueError, match="batch_frequency"):
        ImageLogger(batch_frequency=0, max_images=1)


def test_data_module_from_config():
    toy = {"target": "test_main_toy.ToyDataset", "params": {"num": 5, "size": 2}}
    dm = DataModuleFromConfig(batch_size=2, train=toy, validation=toy, wrap=True, num_workers=0)
    assert dm.has_split("train") and not dm.has_split("test")
    dm.setup("fit")
    assert isinstance(dm.datasets["train"], WrappedDataset)
    batches = list(dm.train_dataloader())
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    assert DataModuleFromConfig(batch_size=4).num_workers == 8  # CompVis default 2 * batch size
    with pytest.raises(ValueError, match="batch_size"):
        DataModuleFromConfig(batch_size=0)


def test_worker_init_fn_seeds_numpy_per_worker():
    torch.manual_seed(11)
    worker_init_fn(0)
    a = np.random.rand()
    torch.manual_seed(12)
    worker_init_fn(1)
    b = np.random.rand()
    torch.manual_seed(11)
    worker_init_fn(0)
    assert np.random.rand() == a and a != b


def test_manual_optimisation_gets_find_unused_ddp_and_no_accumulation():
    class Manual:
        automatic_optimization = False

    class Automatic:
        automatic_optimization = True

    kwargs = {"strategy": "ddp", "accumulate_grad_batches": 2, "devices": 2}
    main._adapt_to_manual_optimisation(Manual(), kwargs)
    assert kwargs == {"strategy": "ddp_find_unused_parameters_true", "devices": 2}
    kwargs = {"strategy": "ddp", "accumulate_grad_batches": 2}
    main._adapt_to_manual_optimisation(Automatic(), kwargs)
    assert kwargs == {"strategy": "ddp", "accumulate_grad_batches": 2}
