"""Trust boundaries of run directories: config targets allow-listed on every entry point that reads a run
(main.py -r, scripts/sample.py -r, scripts/inspect_registers.py -r, scripts/mask_ae_dice.py -r), resume
checkpoints read with weights_only=True."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from ldm.trust import UntrustedTargetError, check_run_configs, check_trusted, under
from ldm.util import ConfigError, instantiate_from_config, run_script
from tiny_models import first_stage_config, ldm_config, unet_config

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
if str(ROOT / "tests") not in sys.path:  # toy.yaml names test_main_toy.*, the runs below test_trust.*
    sys.path.insert(0, str(ROOT / "tests"))
OPT_INS = ("--trust-config", "LDM_TRUSTED_TARGETS=")


class NoLoss(torch.nn.Module):
    """A harmless class outside the allow-list, named by the runs below as ``test_trust.NoLoss``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight


class _Unpickled:
    """Creates ``path`` when unpickled: proves whether a checkpoint was fully unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path, 0o777, True)


@pytest.fixture(autouse=True)
def _no_trusted_env(monkeypatch):
    monkeypatch.delenv("LDM_TRUSTED_TARGETS", raising=False)
    monkeypatch.delenv("LDM_UNSAFE_LOAD", raising=False)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_trust_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evil(marker: Path) -> dict:
    """A target that, if it were ever called, would leave ``marker`` behind."""
    return {"target": "os.makedirs", "params": {"name": str(marker)}}


def ldm_run(root: Path, loss: dict, name: str = "run") -> Path:
    """A main.py-style run of a tiny untrained LDM whose first stage names ``loss`` as its lossconfig."""
    first = first_stage_config(ch=8)
    first["params"]["lossconfig"] = loss
    safe = ldm_config(first_stage=first_stage_config(ch=8), unet=unet_config(two_level=True), timesteps=20)
    model = instantiate_from_config(safe)
    run = root / f"2026-01-01T00-00-00_{name}"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    config = {"model": ldm_config(first_stage=first, unet=unet_config(two_level=True), timesteps=20)}
    OmegaConf.save(OmegaConf.create(config), run / "configs" / "2026-01-01T00-00-00-project.yaml")
    return run


def _one_error_line(text: str, prog: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text
    return lines[0]


# ------------------------------------------------------------------------------------------------ the rule
def test_prefixes_match_on_module_boundaries():
    assert under("ldm.models.autoencoder.AutoencoderKL", "ldm") and under("ldm", "ldm")
    assert not under("ldmx.evil.Thing", "ldm") and not under("mainframe.X", "main")
    assert under("pkg2.mod.Cls", "pkg2.mod") and not under("pkg2.module.Cls", "pkg2.mod")


def test_every_shipped_config_passes_the_allow_list():
    files = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True))
    files = [f for f in files if not f.endswith("toy.yaml")]  # names the tests' own classes
    assert len(files) >= 15
    for path in files:
        check_trusted(OmegaConf.load(path), path)


@pytest.mark.parametrize("target, why", [
    ("os.system", "outside the allow-list"),
    ("ldmx.evil.Thing", "outside the allow-list"),
    ("ldm.util.instantiate_from_config", "a function, not a class"),  # would build an unchecked nested config
    ("main.main", "a function, not a class"),
    ("ldm.util.Any", "defined in typing"),  # a foreign class re-exported under an allowed module
])
def test_refusal_names_key_path_target_and_both_opt_ins(target, why):
    config = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                        "params": {"lossconfig": {"target": target}}}}
    with pytest.raises(UntrustedTargetError) as info:
        check_trusted(config, "run config x.yaml")
    msg = str(info.value)
    assert "\n" not in msg and "model.params.lossconfig.target" in msg and repr(target) in msg and why in msg
    assert all(o in msg for o in OPT_INS)


def test_targets_anywhere_in_the_tree_and_lists_are_checked():
    config = {"lightning": {"callbacks": {"ok": {"target": "main.ImageLogger"}}},
              "data": {"params": {"extra": [{"target": "main.SetupCallback"}, {"target": "subprocess.Popen"}]}}}
    with pytest.raises(UntrustedTargetError, match=r"data\.params\.extra\.1\.target .*'subprocess\.Popen'"):
        check_trusted(config, "x")
    # PL 1.x's TestTubeLogger no longer exists: nothing to run, left to main.py (which replaces it)
    check_trusted({"lightning": {"logger": {"target": "pytorch_lightning.loggers.TestTubeLogger"}}}, "x")
    # allowed classes of torch / Lightning, re-exports through main included
    check_trusted({"a": {"target": "torch.nn.Identity"}, "b": {"target": "main.LearningRateMonitor"},
                   "c": {"target": "pytorch_lightning.callbacks.ModelCheckpoint"},
                   "d": {"target": "pytorch_lightning.loggers.CSVLogger"}}, "x")
    # loggers that send the run to a server are not allow-listed
    with pytest.raises(UntrustedTargetError, match="'pytorch_lightning.loggers.WandbLogger'"):
        check_trusted({"lightning": {"logger": {"target": "pytorch_lightning.loggers.WandbLogger"}}}, "x")


def test_user_prefixes_from_the_environment(monkeypatch):
    config = {"model": {"target": "collections.OrderedDict"}}
    with pytest.raises(UntrustedTargetError):
        check_trusted(config, "x")
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "mypkg, collections")
    check_trusted(config, "x")
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "coll")  # not a module boundary
    with pytest.raises(UntrustedTargetError):
        check_trusted(config, "x")
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "ok,not a module")
    with pytest.raises(ValueError, match="not dotted module names"):
        check_trusted(config, "x")


def test_unresolved_interpolated_target_is_refused(tmp_path):
    path = tmp_path / "x-project.yaml"
    path.write_text("model:\n  target: ${other.name}\n")
    with pytest.raises(UntrustedTargetError, match="interpolation"):
        check_run_configs([str(path)])
    path.write_text("name: os.system\nmodel:\n  target: ${name}\n")  # resolved first, then judged
    with pytest.raises(UntrustedTargetError, match="'os.system'"):
        check_run_configs([str(path)])
    check_run_configs([str(path)], trust_all=True)


def test_run_yaml_syntax_error_is_one_line(tmp_path):
    path = tmp_path / "x-project.yaml"
    path.write_text("model:\n  target: ldm.models.autoencoder.AutoencoderKL\n  params: {embed_dim: 2\n")
    with pytest.raises(ConfigError, match=r"x-project\.yaml is not valid YAML \(line \d+, column \d+\)"):
        check_run_configs([str(path)])


# --------------------------------------------------------------------------- entry points: the attack cases
def test_sample_py_refuses_an_untrusted_run_and_accepts_the_opt_ins(tmp_path, monkeypatch, capsys):
    sample = load_script("sample")
    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path / "logs", _evil(marker), "evil")
    args = ["-r", str(run), "-n", "1", "--batch_size", "1", "-c", "2", "--device", "cpu", "--no-progress",
            "-l", str(tmp_path / "out")]
    assert run_script(sample.main, args) == 2
    line = _one_error_line(capsys.readouterr().err, os.path.basename(sys.argv[0]) or "script")
    assert "model.params.first_stage_config.params.lossconfig.target" in line and "'os.makedirs'" in line
    assert all(o in line for o in OPT_INS)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # A harmless class outside the allow-list: refused, then accepted with either opt-in.
    benign = ldm_run(tmp_path / "logs", {"target": "test_trust.NoLoss"}, "benign")
    args[1] = str(benign)
    with pytest.raises(UntrustedTargetError, match="test_trust.NoLoss"):
        sample.main(args)
    assert sample.main(args + ["--trust-config"]) == 0
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_trust")
    assert sample.main(args[:-1] + [str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "images" / "000000.png").is_file()


def test_sample_py_checks_the_run_of_a_checkpoint_file_too(tmp_path):
    sample = load_script("sample")
    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path / "logs", _evil(marker), "evil")
    with pytest.raises(UntrustedTargetError, match="lossconfig.target"):
        sample.main(["-r", str(run / "checkpoints" / "last.ckpt"), "-n", "1", "-c", "2", "--device", "cpu",
                     "-l", str(tmp_path / "o")])
    assert not marker.exists()


def test_sample_py_checks_a_compvis_or_export_folder_config(tmp_path):
    """A model folder (model.ckpt + config.yaml, the CompVis layout and what scripts/export.py writes)."""
    sample = load_script("sample")
    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path / "logs", _evil(marker), "evil")
    folder = tmp_path / "shared_model"
    folder.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", folder / "model.ckpt")
    (project,) = glob.glob(str(run / "configs" / "*-project.yaml"))
    shutil.copy(project, folder / "config.yaml")
    for resume in (folder, folder / "model.ckpt"):
        with pytest.raises(UntrustedTargetError, match=r"config\.yaml names 'os\.makedirs'"):
            sample.main(["-r", str(resume), "-n", "1", "-c", "2", "--device", "cpu", "-l", str(tmp_path / "o")])
    assert not marker.exists()


def test_python_api_refuses_an_untrusted_run_and_accepts_the_opt_in(tmp_path):
    from ldm.sampling import load_model_for_sampling

    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path, _evil(marker))
    with pytest.raises(UntrustedTargetError, match="os.makedirs"):
        load_model_for_sampling(str(run))
    assert not marker.exists()
    safe = ldm_run(tmp_path, {"target": "test_trust.NoLoss"}, name="foreign")
    with pytest.raises(UntrustedTargetError, match="test_trust.NoLoss"):
        load_model_for_sampling(str(safe))
    model, info = load_model_for_sampling(str(safe), trust_config=True)
    assert info["config"]["model"]["params"]["first_stage_config"]["params"]["lossconfig"]["target"] == \
        "test_trust.NoLoss"


def test_inspect_registers_refuses_an_untrusted_run(tmp_path):
    inspect_registers = load_script("inspect_registers")
    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path / "logs", _evil(marker), "evil")
    with pytest.raises(UntrustedTargetError, match=r"lossconfig\.target .*--trust-config"):
        inspect_registers.main(["-r", str(run), "-l", str(tmp_path / "o"), "--device", "cpu"])
    assert not marker.exists()


def test_mask_ae_dice_refuses_an_untrusted_run(tmp_path):
    mask_ae_dice = load_script("mask_ae_dice")
    marker = tmp_path / "pwned"
    run = ldm_run(tmp_path / "logs", _evil(marker), "evil")
    with pytest.raises(UntrustedTargetError, match=r"lossconfig\.target"):
        mask_ae_dice.main(["-r", str(run), "--device", "cpu"])
    assert not marker.exists()


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One trained toy run (6 steps); tests copy it."""
    logs = tmp_path_factory.mktemp("toy") / "logs"
    assert main.main(["--base", TOY, "-t", "-l", str(logs), "--no-test"]) == 0
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "logs" / run.name
    shutil.copytree(run, dest)
    return dest


def _edit_saved(run: Path, kind: str, edit) -> None:
    (path,) = glob.glob(str(run / "configs" / f"*-{kind}.yaml"))
    config = OmegaConf.to_container(OmegaConf.load(path))
    edit(config)
    OmegaConf.save(OmegaConf.create(config), path)


def test_main_resume_refuses_an_untrusted_run_before_building_anything(toy_run, tmp_path, capsys, monkeypatch):
    run = _copy(toy_run, tmp_path)
    marker = tmp_path / "pwned"
    _edit_saved(run, "lightning", lambda c: c["lightning"]["callbacks"].update(evil=_evil(marker)))
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2
    line = _one_error_line(capsys.readouterr().err, "main.py")
    assert "lightning.callbacks.evil.target" in line and "-lightning.yaml" in line and "'os.makedirs'" in line
    assert all(o in line for o in OPT_INS)
    assert not marker.exists() and (run / "checkpoints" / "last.ckpt").read_bytes() == before
    # The project's own toy classes are outside the allow-list too: trusting them is not enough for os.
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2
    assert "'os.makedirs'" in capsys.readouterr().err and not marker.exists()


def test_main_resume_checks_the_saved_configs_even_with_a_base_over_them(toy_run, tmp_path, capsys, monkeypatch):
    run = _copy(toy_run, tmp_path)
    marker = tmp_path / "pwned"
    _edit_saved(run, "project", lambda c: c["data"]["params"].update(train=_evil(marker)))
    user = tmp_path / "mine.yaml"  # the user's -b replaces the target, yet the run's saved config is refused
    user.write_text("data:\n  params:\n    train:\n      target: test_main_toy.ToyDataset\n      params: {num: 8}\n")
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    assert main.main(["-r", str(run), "-b", str(user), "-t", "--max_steps", "7"]) == 2
    line = _one_error_line(capsys.readouterr().err, "main.py")
    assert "data.params.train.target" in line and "-project.yaml" in line
    assert not marker.exists()


def test_main_resume_trust_config_flag_and_env(toy_run, tmp_path, monkeypatch):
    run = _copy(toy_run, tmp_path)
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2  # test_main_toy.* is not allow-listed
    assert main.main(["-r", str(run), "-t", "--max_steps", "7", "--trust-config"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    assert main.main(["-r", str(run), "-t", "--max_steps", "8"]) == 0


# ------------------------------------------------------------------------------- resume: weights_only=True
def _plant_pickle(run: Path, marker: Path) -> None:
    path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["extra"] = _Unpickled(str(marker))
    torch.save(ckpt, path)
    # torch's full unpickling would run it: that is what the resume must not do.
    probe = marker.parent / "probe"
    torch.save({"x": _Unpickled(str(probe))}, marker.parent / "probe.pt")
    torch.load(marker.parent / "probe.pt", weights_only=False)
    assert probe.is_dir()


@pytest.mark.parametrize("how", ["-r", "--resume_from_checkpoint"])
def test_resume_refuses_a_pickled_checkpoint_unless_opted_in(toy_run, tmp_path, capsys, monkeypatch, how):
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    run = _copy(toy_run, tmp_path)
    marker = tmp_path / "unpickled"
    _plant_pickle(run, marker)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    args = ["-r", str(run)] if how == "-r" else ["--base", TOY, "-l", str(tmp_path / "new"), "-n", "x",
                                                  "--resume_from_checkpoint", ckpt]
    assert main.main([*args, "-t", "--max_steps", "7"]) == 2
    line = _one_error_line(capsys.readouterr().err, "main.py")
    assert "need full unpickling" in line and "LDM_UNSAFE_LOAD=1" in line and ckpt in line
    assert not marker.exists()
    monkeypatch.setenv("LDM_UNSAFE_LOAD", "1")
    assert main.main([*args, "-t", "--max_steps", "7"]) == 0
    assert marker.is_dir()  # the opt-in unpickles (only for files you trust)
