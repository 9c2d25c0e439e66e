"""A shared run cannot make main.py -r write outside its directory (issue 31): allow-listed callbacks and loggers
take any path, so every path-valued parameter of a run's saved lightning config must resolve inside the run;
paths given on the command line are the user's own."""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.trust import RunPathError, check_run, check_run_configs, check_run_paths
from test_trust import toy_run  # noqa: F401  (the module-scoped trained toy run, shared)

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
if str(ROOT / "tests") not in sys.path:  # toy.yaml names test_main_toy.*
    sys.path.insert(0, str(ROOT / "tests"))
CSV = "pytorch_lightning.loggers.CSVLogger"
CHECKPOINT = "pytorch_lightning.callbacks.ModelCheckpoint"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("LDM_UNSAFE_LOAD", raising=False)
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")  # the toy run's own classes, as a user's package


def _run(tmp_path: Path, lightning: dict) -> Path:
    """A run directory whose saved ``-lightning.yaml`` holds ``lightning``."""
    run = tmp_path / "logs" / "2026-01-01T00-00-00_shared"
    (run / "configs").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"lightning": lightning}), run / "configs" / "2026-01-01T00-00-00-lightning.yaml")
    return run


def _configs(run: Path) -> list[str]:
    return sorted(glob.glob(str(run / "configs" / "*.yaml")))


def _outside_cases(outside: Path, run: Path) -> dict[str, tuple[dict, str]]:
    """Saved ``lightning`` sections that write outside ``run``, and the key each is refused for."""
    image_logger = {"target": "main.ImageLogger",
                    "params": {"batch_frequency": 1, "max_images": 1, "save_dir": str(run / "link" / "images")}}
    return {
        "save_dir": ({"logger": {"target": CSV, "params": {"save_dir": str(outside), "name": "csv"}}},
                     "lightning.logger.params.save_dir"),
        "dirpath": ({"callbacks": {"ckpt": {"target": CHECKPOINT, "params": {"dirpath": str(outside / "ckpt")}}}},
                    "lightning.callbacks.ckpt.params.dirpath"),
        "filename": ({"callbacks": {"ckpt": {"target": CHECKPOINT, "params": {"filename": "../../../x/{epoch}"}}}},
                     "lightning.callbacks.ckpt.params.filename"),
        "relative": ({"modelcheckpoint": {"params": {"dirpath": "relative/ckpts"}}},
                     "lightning.modelcheckpoint.params.dirpath"),
        "symlink": ({"callbacks": {"image_logger": image_logger}}, "lightning.callbacks.image_logger.params.save_dir"),
        "dotdot": ({"trainer": {"default_root_dir": f"{run}/../elsewhere"}}, "lightning.trainer.default_root_dir"),
    }


@pytest.mark.parametrize("case", ["save_dir", "dirpath", "filename", "relative", "symlink", "dotdot"])
def test_a_path_outside_the_run_is_refused_naming_key_and_path(tmp_path, monkeypatch, case):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    lightning, key = _outside_cases(outside, tmp_path / "logs" / "2026-01-01T00-00-00_shared")[case]
    run = _run(tmp_path, lightning)
    os.symlink(outside, run / "link")  # a folder inside the run that leads out of it
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working directory, as Lightning does
    with pytest.raises(RunPathError) as err:
        check_run_configs(_configs(run))
    message = str(err.value)
    assert message.startswith(f"config key {key} in run config {_configs(run)[0]} is ")
    assert f"outside the run directory {run}: a config read back from a run may only write inside its run" in message
    assert f"give it on the command line ({key}=PATH" in message and "--trust-config" in message
    check_run_configs(_configs(run), trust_all=True)  # the opt-in trusts the run's paths too


@pytest.mark.parametrize("value, why", [("${oc.env:LDM_NO_SUCH_VARIABLE_31}", "an interpolation that does not resolve"),
                                        ("s3://bucket/logs", "a URL, outside the run directory")])
def test_paths_that_cannot_be_checked_are_refused(tmp_path, value, why):
    run = _run(tmp_path, {"logger": {"target": CSV, "params": {"save_dir": value}}})
    with pytest.raises(RunPathError) as err:
        check_run_configs(_configs(run))
    assert f"config key lightning.logger.params.save_dir in run config {_configs(run)[0]} is '{value}', {why}" \
        in str(err.value)


def test_paths_inside_the_run_pass(tmp_path, monkeypatch):
    run = tmp_path / "logs" / "2026-01-01T00-00-00_shared"
    lightning = {
        "logger": {"target": CSV, "params": {"save_dir": str(run), "name": "csv"}},
        "callbacks": {"ckpt": {"target": CHECKPOINT, "params": {"dirpath": str(run / "checkpoints" / "k"),
                                                                "filename": "sub/{epoch}"}},
                      "other": {"target": CHECKPOINT, "params": {"filename": "{epoch}-{step}"}}},
        "modelcheckpoint": {"params": {"dirpath": f"logs/{run.name}/checkpoints", "filename": "../{epoch}"}},
        "trainer": {"max_steps": 3, "log_every_n_steps": 1}}
    run = _run(tmp_path, lightning)
    monkeypatch.chdir(tmp_path)  # logs/<run>/checkpoints is inside the run from here
    check_run_configs(_configs(run))
    monkeypatch.chdir(run.parent.parent.parent)  # ... and outside it from elsewhere
    with pytest.raises(RunPathError, match="lightning.modelcheckpoint.params.dirpath"):
        check_run_configs(_configs(run))


def test_the_scripts_build_no_callbacks_so_their_paths_are_not_checked(tmp_path):
    run = _run(tmp_path, {"logger": {"target": CSV, "params": {"save_dir": "/"}}})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    check_run(str(run))  # scripts/sample.py -r: the model only
    with pytest.raises(RunPathError):
        check_run_configs(_configs(run))  # main.py -r
    with pytest.raises(RunPathError, match="'/'"):
        check_run_paths({"lightning": {"logger": {"params": {"save_dir": "/"}}}}, str(run), "x.yaml")


# ---------------------------------------------------------------------------------------- main.py -r
def _edit_lightning(run: Path, edit) -> None:
    (path,) = glob.glob(str(run / "configs" / "*-lightning.yaml"))
    config = OmegaConf.to_container(OmegaConf.load(path))
    edit(config["lightning"])
    OmegaConf.save(OmegaConf.create(config), path)


def test_main_resume_of_a_shared_run_writes_nothing_outside_it(toy_run, tmp_path, capsys):
    run = tmp_path / "logs" / toy_run.name
    shutil.copytree(toy_run, run)
    victim = tmp_path / "theirs"
    victim.mkdir()
    (victim / "results.ckpt").write_bytes(b"somebody's results")

    def plant(lightning: dict) -> None:  # what the shared run's author added to its saved config
        lightning["callbacks"]["ckpt"] = {"target": CHECKPOINT, "params": {
            "dirpath": str(victim), "filename": "results", "every_n_train_steps": 1, "save_top_k": -1}}
        lightning["logger"] = {"target": CSV, "params": {"save_dir": str(victim), "name": "csv"}}

    _edit_lightning(run, plant)
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("main.py: error: config key lightning.callbacks.ckpt.params."
                                                   f"dirpath in run config {run / 'configs'}")
    assert f"is '{victim}', which resolves to {os.path.realpath(victim)}, outside the run directory {run}" in lines[0]
    assert sorted(os.listdir(victim)) == ["results.ckpt"] and (victim / "results.ckpt").read_bytes() == \
        b"somebody's results"
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before  # nothing was trained

    # The way out the message gives: the key out of the saved config, the path on the command line.
    _edit_lightning(run, lambda lightning: (lightning["callbacks"].pop("ckpt"),
                                            lightning["logger"]["params"].pop("save_dir")))
    mine = tmp_path / "my_logs"
    assert main.main(["-r", str(run), "-t", "--max_steps", "7", f"lightning.logger.params.save_dir={mine}"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert glob.glob(str(mine / "csv" / "version_*" / "metrics.csv"))  # written where the command line said
    assert sorted(os.listdir(victim)) == ["results.ckpt"]
