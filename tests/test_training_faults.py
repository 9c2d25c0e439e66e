"""Training faults, end to end through main.py on real Lightning trainers and real checkpoints (CPU, tiny models).

Image logging that cannot end a run, exit status and completion marker of interrupted runs (a real SIGTERM to a
real subprocess), the learning rate on resume, the checkpoint left after a NaN stop, EMA and logged step in
checkpoints written between steps, and a failing emergency save.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import main
from ldm.training.callbacks import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
TINY_LDM = ROOT / "configs" / "tests" / "tiny_ldm.yaml"
SCRIPT = str(ROOT / "train_anatomical_ldm.sh")
FAULTY = "model.target=test_training_faults.FaultyToy"
if str(TESTS) not in sys.path:  # the configs name test_main_toy.ToyModel / test_training_faults.FaultyToy
    sys.path.insert(0, str(TESTS))

from test_main_toy import ToyModel  # noqa: E402


class FaultyToy(ToyModel):
    """The toy model of test_main_toy with more faults to inject.

    Args:
        explode_at_step: scale the gradients of this step by ``explode_by`` (finite loss, huge weights after it).
        explode_by: the factor (1e30: finite weights whose next loss overflows; inf: non-finite weights).
        sigint_at_step: send SIGINT (Ctrl-C) to this process inside ``training_step`` at this global step.
        disk_full_at_step: raise at this step; the emergency checkpoint then finds the disk full.
        snapshot_at_step: copy the run's checkpoints/last.ckpt to snapshot.ckpt in ``training_step`` at this step.
        warmup_steps: with > 0, a LambdaLR scheduler ramping the rate linearly over this many steps.
        failing_log_images: ``log_images`` raises.
        step_sleep: seconds to sleep in each ``training_step`` (keeps a subprocess busy until it is signalled).
        kwargs: ``ToyModel`` arguments.
    """

    def __init__(self, explode_at_step: int = -1, explode_by: float = 1e30, sigint_at_step: int = -1,
                 disk_full_at_step: int = -1, snapshot_at_step: int = -1, warmup_steps: int = 0,
                 failing_log_images: bool = False, step_sleep: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.explode_at_step, self.explode_by = explode_at_step, float(explode_by)
        self.sigint_at_step, self.disk_full_at_step = sigint_at_step, disk_full_at_step
        self.snapshot_at_step, self.warmup_steps = snapshot_at_step, warmup_steps
        self.failing_log_images, self.step_sleep = failing_log_images, step_sleep

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.step_sleep:
            time.sleep(self.step_sleep)
        if self.global_step == self.snapshot_at_step:
            ckpts = os.path.join(self.trainer.default_root_dir, "checkpoints")
            shutil.copy(os.path.join(ckpts, "last.ckpt"), os.path.join(self.trainer.default_root_dir, "snapshot.ckpt"))
        if self.global_step == self.sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        if self.global_step == self.disk_full_at_step:
            self.disk_full = True
            raise RuntimeError("injected failure")
        return super().training_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The disk fills up while the checkpoint is written: writes past 1 KiB fail (EFBIG), and the signal that
        comes with the first failure frees the space again (the loggers write their last lines afterwards)."""
        if getattr(self, "disk_full", False):
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, lambda signum, frame: resource.setrlimit(resource.RLIMIT_FSIZE, limit))
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limit[1]))

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.global_step == self.explode_at_step:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.explode_by)

    def log_images(self, batch: dict, **kwargs) -> dict:
        if self.failing_log_images:
            raise RuntimeError("log_images broke")
        return super().log_images(batch, **kwargs)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.learning_rate)
        if not self.warmup_steps:
            return opt
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / self.warmup_steps))
        return [opt], [{"scheduler": ramp, "interval": "step"}]


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch):
    """main and Lightning install signal handlers, the disk-full fault lowers a limit: put them back. Each test
    starts with Python's Ctrl-C handler, whatever the shell that started pytest left."""
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy,test_training_faults")  # resumed toy configs
    signals = [s for s in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGXFSZ") if hasattr(signal, s)]
    handlers = {s: signal.getsignal(getattr(signal, s)) for s in signals}
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Ctrl-C as in an interactive shell: a shell without job control starts background jobs with SIGINT
    # ignored (`make test &` in a script), and the Ctrl-C test would then train to the end
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    for name, handler in handlers.items():
        signal.signal(getattr(signal, name), handler)


def _run_dir(logs: Path) -> Path:
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    return run


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _logged_step(ckpt: dict) -> int:
    return ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]


def _toy(logs: Path, *extra: str) -> int:
    return main.main(["--base", TOY, "-t", "-l", str(logs), FAULTY, *extra])


# ----------------------------------------------------------------------------- image logging
def test_image_logging_clamps_ddim_steps_to_a_100_step_schedule_with_one_warning(tmp_path, caplog):
    """CompVis' log_images default of 200 DDIM steps on a ``timesteps: 100`` model ended the run at step 1."""
    config = yaml.safe_load(TINY_LDM.read_text())
    config["lightning"]["callbacks"]["image_logger"]["params"].update(
        batch_frequency=1, log_images_kwargs={"N": 1, "plot_progressive_rows": False, "plot_diffusion_rows": False})
    path = tmp_path / "ldm_100_steps.yaml"
    path.write_text(yaml.safe_dump(config))
    caplog.set_level(logging.WARNING, logger="ldm.training.callbacks")
    assert main.main(["--base", str(path), "-t", "-l", str(tmp_path / "logs"), "--accelerator", "cpu",
                      "--max_steps", "2", "--limit_val_batches", "0"]) == 0
    run = _run_dir(tmp_path / "logs")
    assert sorted(p.name.split("_e-")[0] for p in (run / "images" / "train").glob("samples_*.png")) == \
        ["samples_gs-000001", "samples_gs-000002"]
    clamps = [r.getMessage() for r in caplog.records if "ddim_steps" in r.getMessage()]
    assert clamps == ["image logging: ddim_steps=200 is more than the model's 100 timesteps; sampling with 100 DDIM "
                      "steps (set lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps to choose)"]
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_a_failing_image_logger_is_logged_and_training_goes_on(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="ldm.training.callbacks")
    assert _toy(tmp_path / "logs", "model.params.failing_log_images=true") == 0
    run = _run_dir(tmp_path / "logs")
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    failures = [r for r in caplog.records if "image logging failed" in r.getMessage()]
    # due at steps 2, 4, 6 (train) and after each validation that follows a due step (epoch end at step 4)
    assert len(failures) >= 3
    assert failures[0].exc_info and "log_images broke" in str(failures[0].exc_info[1])
    assert all(r.exc_info is None and "RuntimeError: log_images broke" in r.getMessage() for r in failures[1:])
    assert (run / main.COMPLETE_MARKER).is_file()


# ----------------------------------------------------------------------------- interruptions and completion
def test_a_finished_run_is_marked_complete_and_a_resumed_one_again_only_at_its_end(tmp_path):
    logs = tmp_path / "logs"
    assert _toy(logs) == 0
    run = _run_dir(logs)
    marker = json.loads((run / main.COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 6 and marker["checkpoint"] == os.path.join("checkpoints", "last.ckpt")
    with pytest.raises(RuntimeError, match="injected failure"):
        main.main(["-r", str(run), "-t", "--max_steps", "12", "model.params.fail_at_step=8"])
    assert not (run / main.COMPLETE_MARKER).exists()  # the continued run did not reach its end
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 8


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="platform without SIGUSR1")
def test_sigusr1_saves_the_whole_step_and_exits_non_zero(tmp_path):
    logs = tmp_path / "logs"
    assert _toy(logs, "model.params.signal_at_step=1", "lightning.trainer.max_steps=50") == 128 + signal.SIGUSR1
    run = _run_dir(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert int(ckpt["state_dict"]["ema_updates"]) == 2  # the model's on_train_batch_end of step 2 is in it
    assert _logged_step(ckpt) == 2
    assert not (run / main.COMPLETE_MARKER).exists()


def test_sigterm_to_a_training_subprocess_saves_and_exits_non_zero(tmp_path):
    logs = tmp_path / "logs"
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--base", TOY, "-t", "-l", str(logs), FAULTY,
                             "model.params.step_sleep=0.05", "lightning.trainer.max_steps=100000",
                             "lightning.modelcheckpoint.params.every_n_train_steps=2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list(logs.glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "training interrupted by SIGTERM" in err and "-r " in err
    run = _run_dir(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] >= 2
    assert int(ckpt["state_dict"]["ema_updates"]) == ckpt["global_step"]  # whole steps only
    assert not (run / main.COMPLETE_MARKER).exists()
    assert not list(run.glob("checkpoints/*.tmp"))


def test_ctrl_c_mid_step_saves_and_a_resume_keeps_the_logged_step(tmp_path):
    """SIGINT inside training_step: exit status 130; the resumed run logs step N at global step N (not N + 1)."""
    logs = tmp_path / "logs"
    assert _toy(logs, "model.params.sigint_at_step=3", "lightning.trainer.limit_val_batches=0") == 128 + signal.SIGINT
    run = _run_dir(logs)
    first = _ckpt(run / "checkpoints" / "last.ckpt")
    assert (first["global_step"], _logged_step(first), int(first["state_dict"]["ema_updates"])) == (3, 3, 3)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after the first
    assert main.main(["-r", str(run), "-t", "--max_steps", "6", "model.params.sigint_at_step=-1"]) == 0
    second = _ckpt(run / "checkpoints" / "last.ckpt")
    assert (second["global_step"], _logged_step(second)) == (6, 6)
    with open(run / "csv" / "version_1" / "metrics.csv") as fh:
        steps = sorted({int(row["step"]) for row in csv.DictReader(fh) if row.get("train/loss")})
    assert steps == [3, 4, 5]  # the logged step of global steps 4, 5, 6 (Lightning logs step - 1)


def test_checkpoint_every_n_steps_holds_the_ema_update_of_its_step(tmp_path):
    logs = tmp_path / "logs"
    assert _toy(logs, "lightning.modelcheckpoint.params.every_n_train_steps=3", "model.params.snapshot_at_step=3",
                "lightning.trainer.limit_val_batches=0") == 0
    snapshot = _ckpt(_run_dir(logs) / "snapshot.ckpt")  # last.ckpt as it was on disk during step 4
    assert snapshot["global_step"] == 3 and int(snapshot["state_dict"]["ema_updates"]) == 3
    assert _logged_step(snapshot) == 3


# ----------------------------------------------------------------------------- failures while saving
def test_a_failed_emergency_save_keeps_the_original_exception_and_leaves_no_tmp(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="ldm.training.faults")
    logs = tmp_path / "logs"
    with pytest.raises(RuntimeError, match="injected failure"):
        # CSV logging only: TensorBoard's writer thread could otherwise be the first to meet the full disk
        _toy(logs, "model.params.disk_full_at_step=5", "lightning.trainer.limit_val_batches=0",
             "lightning.logger.target=pytorch_lightning.loggers.CSVLogger")
    run = _run_dir(logs)
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]
    assert _ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 4  # the epoch-end save, untouched
    (record,) = [r for r in caplog.records if "saving" in r.getMessage() and "failed as well" in r.getMessage()]
    assert "global step 5" in record.getMessage() and "global step 4 is unchanged" in record.getMessage()
    assert isinstance(record.exc_info[1], OSError)


# ----------------------------------------------------------------------------- learning rate on resume
def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, caplog):
    logs = tmp_path / "logs"
    assert _toy(logs, "--max_steps", "4") == 0  # SGD at 2 * 1e-4 (batch 2)
    run = _run_dir(logs)
    assert _ckpt(run / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"] == \
        pytest.approx(2e-4)
    caplog.set_level(logging.INFO)
    assert main.main(["-r", str(run), "-t", "--max_steps", "5", "model.base_learning_rate=5e-5"]) == 0
    before = _ckpt(run / "checkpoints" / "last.ckpt")
    assert before["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert "resuming with the configured learning rate instead of the checkpoint's (optimiser 0 group 0: " \
           "0.0002 -> 0.0001)" in caplog.text
    caplog.clear()
    assert main.main(["-r", str(run), "-t", "--max_steps", "6"]) == 0
    assert "resuming with the configured learning rate" not in caplog.text  # unchanged: nothing to say
    assert _ckpt(run / "checkpoints" / "last.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"] == \
        pytest.approx(1e-4)


def test_resume_with_a_warmup_schedule_scales_it_to_the_new_rate(tmp_path):
    logs = tmp_path / "logs"
    assert _toy(logs, "--max_steps", "2", "model.params.warmup_steps=10") == 0
    run = _run_dir(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 3 / 10)
    assert main.main(["-r", str(run), "-t", "--max_steps", "4", "model.base_learning_rate=1e-3"]) == 0
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(2e-3)
    assert group["lr"] == pytest.approx(2e-3 * 5 / 10)  # warm-up continues at step 4 of 10, on the new rate
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [pytest.approx(2e-3)]


def test_readme_nan_recovery_lower_the_rate_and_resume_runs_to_the_end(tmp_path, caplog):
    """SGD at 100 diverges until the loss overflows; resuming with a 1e6 times lower rate finishes the run (with the
    old rate restored from the optimiser state it overflowed again at once)."""
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError, match="non-finite training loss"):
        _toy(logs, "model.base_learning_rate=50", "lightning.trainer.max_steps=40",
             "lightning.trainer.limit_val_batches=0")
    run = _run_dir(logs)
    stopped_at = _ckpt(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 0 < stopped_at < 40
    caplog.set_level(logging.INFO)
    assert main.main(["-r", str(run), "-t", "model.base_learning_rate=5e-5"]) == 0
    assert "(optimiser 0 group 0: 100 -> 0.0001)" in caplog.text
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 40
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert (run / main.COMPLETE_MARKER).is_file()


# ----------------------------------------------------------------------------- NaN stop
def test_nan_stop_keeps_the_checkpoint_before_the_weights_that_gave_the_nan(tmp_path):
    """Step 4's gradients are scaled by 1e30: finite loss, weights ~1e25 saved as step 4, inf loss at the next step.
    last.ckpt must be the step-3 state, not the exploded one."""
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(inf\) at global step 4") as stop:
        _toy(logs, "model.params.explode_at_step=3", "lightning.modelcheckpoint.params.every_n_train_steps=1",
             "lightning.trainer.limit_val_batches=0")
    run = _run_dir(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert float(ckpt["state_dict"]["net.weight"].abs().max()) < 10.0
    assert sorted(os.listdir(run / "checkpoints")) == ["last.ckpt"]
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.ckpt'} (global step 3; the one of step 4, " \
           f"whose weights gave this loss, was discarded)" in str(stop.value)
    assert not (run / main.COMPLETE_MARKER).exists()


def test_weights_holding_inf_are_never_saved(tmp_path, caplog):
    """Infinite gradients at step 3 make the weights inf; no save writes them (nor the NaN stop keeps them)."""
    caplog.set_level(logging.WARNING, logger="ldm.training.faults")
    logs = tmp_path / "logs"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at global step 3") as stop:
        _toy(logs, "model.params.explode_at_step=2", "model.params.explode_by=inf",
             "lightning.modelcheckpoint.params.every_n_train_steps=1", "lightning.trainer.limit_val_batches=0")
    run = _run_dir(logs)
    ckpt = _ckpt(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert "not saving last.ckpt at global step 3: the weights or buffers hold NaN/inf" in caplog.text
    assert f"the last good checkpoint is {run / 'checkpoints' / 'last.ckpt'} (global step 2)." in str(stop.value)


# ----------------------------------------------------------------------------- train_anatomical_ldm.sh
STUB_PYTHON = """#!/usr/bin/env bash
# stands in for python main.py: records its arguments; a training run (-n NAME -l LOGDIR) writes last.ckpt, the
# completion marker unless STUB_UNFINISHED is set, and exits with STUB_STATUS (default 0)
echo "$*" >> "$CALLS"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ "${args[i]}" == -n ]] && name="${args[i+1]}"
  [[ "${args[i]}" == -l ]] && logdir="${args[i+1]}"
done
run="$logdir/2026-01-01T00-00-00_$name"
mkdir -p "$run/checkpoints" && touch "$run/checkpoints/last.ckpt"
[[ -n "${STUB_UNFINISHED:-}" ]] || echo '{}' > "$run/training_complete.json"
exit "${STUB_STATUS:-0}"
"""


def _script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "python"
    if not stub.exists():
        stub.write_text(STUB_PYTHON)
        stub.chmod(0o755)
    full = {**os.environ, "PYTHON": str(stub), "LOGDIR": str(tmp_path / "logs"), "CALLS": str(tmp_path / "calls"),
            **env}
    return subprocess.run([SCRIPT, "demo"], env=full, capture_output=True, text=True, timeout=60)


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls").read_text().splitlines()


def test_train_script_stops_on_an_interrupted_autoencoder_run(tmp_path):
    proc = _script(tmp_path, STUB_STATUS="143", STUB_UNFINISHED="1")
    assert proc.returncode == 1
    run = tmp_path / "logs" / "2026-01-01T00-00-00_demo_phantom_kl"
    assert f"error: the autoencoder run stopped (exit status 143); continue it with: {tmp_path / 'python'} main.py " \
           f"-r {run} -t, then run this script again" in proc.stderr
    assert len(_calls(tmp_path)) == 1  # no LDM run
    assert not os.path.lexists(tmp_path / "logs" / "demo_phantom_kl")


def test_train_script_does_not_link_a_run_that_exited_0_without_finishing(tmp_path):
    """What main.py did on SIGTERM before: exit 0 with a 2-step autoencoder."""
    proc = _script(tmp_path, STUB_UNFINISHED="1")
    assert proc.returncode == 1
    assert "error: the autoencoder run did not reach its end (no " in proc.stderr
    assert len(_calls(tmp_path)) == 1 and not os.path.lexists(tmp_path / "logs" / "demo_phantom_kl")


def test_train_script_reuses_a_first_stage_only_when_marked_complete(tmp_path):
    logs = tmp_path / "logs"
    run = logs / "2026-01-01T00-00-00_demo_phantom_kl"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").touch()
    (logs / "demo_phantom_kl").symlink_to(run.name)
    proc = _script(tmp_path)
    assert proc.returncode == 1
    assert f"error: the autoencoder run {logs / 'demo_phantom_kl'} did not reach its end (no " \
           f"training_complete.json): continue it with" in proc.stderr and "or set AE_CKPT=" in proc.stderr
    assert not (tmp_path / "calls").exists()  # nothing trained
    (run / main.COMPLETE_MARKER).write_text("{}")
    assert _script(tmp_path).returncode == 0
    (ldm_call,) = _calls(tmp_path)
    assert "demo_phantom_anatomical.yaml" in ldm_call and \
        f"first_stage_config.params.ckpt_path={logs / 'demo_phantom_kl' / 'checkpoints' / 'last.ckpt'}" in ldm_call
