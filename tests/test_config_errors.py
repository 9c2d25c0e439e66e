"""Config mistakes end in one ``main.py: error:`` line naming the key path and the closest valid name, exit 2:
unknown targets and modules, misspelt parameters, YAML syntax errors, overrides of keys that exist nowhere, and a
resume checkpoint that is corrupt or of another model size."""
from __future__ import annotations

import glob
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import main
from ldm.training import cli
from ldm.training.config_check import check_overrides
from ldm.util import ConfigError, accepted_parameters, check_config, instantiate_from_config, resolve_target
from tiny_models import first_stage_config, ldm_config, unet_config

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _trust_toy(monkeypatch):
    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    monkeypatch.delenv("LDM_UNSAFE_LOAD", raising=False)


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("main.py: error: "), lines
    return lines[0]


def _tiny(tmp_path: Path, edit=None) -> str:
    """A -b file with the tiny LDM (no data: main.py stops at the check, nothing is trained)."""
    config = {"model": {"base_learning_rate": 1e-4,
                        **ldm_config(first_stage=first_stage_config(ch=8), unet=unet_config(), timesteps=20)}}
    if edit is not None:
        edit(config)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ------------------------------------------------------------------------------------------- the checker
def test_misspelt_parameter_names_key_valid_names_and_suggestion(tmp_path, capsys):
    def misspell(c):
        c["model"]["params"]["unet_config"]["params"]["num_res_block"] = 2

    assert main.main(["-b", _tiny(tmp_path, misspell), "-l", str(tmp_path / "logs")]) == 2
    line = _error_line(capsys)
    assert "config key model.params.unet_config.params.num_res_block" in line
    assert "did you mean 'num_res_blocks'?" in line
    assert "valid parameters: " in line and "attention_resolutions" in line and "model_channels" in line
    assert not (tmp_path / "logs").exists()  # stopped before the run directory was made


@pytest.mark.parametrize("target, expected", [
    ("ldm.models.diffusion.ddpm.LatentDifusion", "did you mean ldm.models.diffusion.ddpm.LatentDiffusion?"),
    ("ldm.models.difusion.ddpm.LatentDiffusion", "did you mean ldm.models.diffusion.ddpm.LatentDiffusion?"),
    ("nosuchpackage_xyz.Model", "module nosuchpackage_xyz, which does not exist"),
])
def test_unknown_target_or_module(tmp_path, capsys, target, expected):
    def retarget(c):
        c["model"]["target"] = target

    assert main.main(["-b", _tiny(tmp_path, retarget)]) == 2
    line = _error_line(capsys)
    assert "config key model.target" in line and expected in line


def test_nested_unknown_class_is_found_before_anything_is_built(monkeypatch):
    built = []

    def record(self, *args, **kwargs):
        built.append(type(self).__name__)
        raise AssertionError("built before the whole tree was checked")

    monkeypatch.setattr("ldm.models.autoencoder.AutoencoderKL.__init__", record)
    config = ldm_config(first_stage=first_stage_config(ch=8), unet=unet_config())
    config["params"]["unet_config"]["target"] = "ldm.modules.diffusionmodules.openaimodel.UNetModle"
    with pytest.raises(ConfigError, match=r"params\.unet_config\.target: .*did you mean .*\.UNetModel\?"):
        instantiate_from_config(config)
    assert built == []  # validate the whole tree, then build


def test_stray_key_beside_target_and_params():
    with pytest.raises(ConfigError, match=r"config key model\.ckpt_path: .*go under model\.params\.ckpt_path"):
        check_config({"target": "ldm.models.autoencoder.AutoencoderKL", "params": {}, "ckpt_path": "x"}, "model")
    with pytest.raises(ConfigError, match=r"model\.base_learnig_rate: .*did you mean 'base_learning_rate'"):
        check_config({"target": "ldm.models.autoencoder.AutoencoderKL", "base_learnig_rate": 1e-3}, "model")
    with pytest.raises(ConfigError, match=r"model\.params: expected a mapping"):
        check_config({"target": "ldm.models.autoencoder.AutoencoderKL", "params": [1, 2]}, "model")


def test_accepted_parameters_follow_kwargs_up_the_bases():
    ldm = resolve_target("ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion")
    names = accepted_parameters(ldm)
    # its own, LatentDiffusion's and DDPM's parameters
    assert {"anatomical_loss_weight", "first_stage_config", "timesteps", "linear_start"} <= set(names)
    assert "nan_at_step" not in names
    assert accepted_parameters(torch.nn.Identity) is None  # takes and ignores anything: not checkable
    assert accepted_parameters(resolve_target("ldm.models.autoencoder.IdentityFirstStage")) is None
    assert {"batch_size", "train", "validation", "num_workers"} <= set(accepted_parameters(main.DataModuleFromConfig))


def test_yaml_syntax_error_in_base(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  target: ldm.models.autoencoder.AutoencoderKL\n  params: {embed_dim: 2\n")
    assert main.main(["-b", str(bad)]) == 2
    line = _error_line(capsys)
    assert "bad.yaml is not valid YAML (line 4, column 1)" in line


def test_sample_py_names_a_misspelt_parameter_of_the_run_config(tmp_path, capsys):
    import importlib.util

    from ldm.util import run_script

    good = ldm_config(first_stage=first_stage_config(ch=8), unet=unet_config(), timesteps=20)
    run = tmp_path / "2026-01-01T00-00-00_typo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    torch.save({"state_dict": instantiate_from_config(good).state_dict()}, run / "checkpoints" / "last.ckpt")
    good["params"]["unet_config"]["params"]["num_res_block"] = 1
    OmegaConf.save(OmegaConf.create({"model": good}), run / "configs" / "x-project.yaml")
    spec = importlib.util.spec_from_file_location("_cfg_err_sample", ROOT / "scripts" / "sample.py")
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    assert run_script(sample.main, ["-r", str(run), "-n", "1", "-c", "2", "--device", "cpu",
                                    "-l", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error: config key params.unet_config.params.num_res_block" in err[0]
    assert "did you mean 'num_res_blocks'?" in err[0]


# ------------------------------------------------------------------------------------------------ overrides
def test_override_of_a_key_that_exists_nowhere_is_refused_with_a_suggestion(tmp_path, capsys):
    assert main.main(["-b", TOY, "-t", "-l", str(tmp_path), "model.base_learnig_rate=1e-3"]) == 2
    line = _error_line(capsys)
    assert "model.base_learnig_rate exists in no config (did you mean model.base_learning_rate?)" in line
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("override, refusal", [
    ("model.base_learning_rate=0.001", None),           # exists
    ("model.params.nan_at_step=3", None),               # new parameter of a target: checked against its signature
    ("model.params.nan_at_stepp=3", r"has no parameter 'nan_at_stepp' \(did you mean 'nan_at_step'\?\)"),
    ("lightning.trainer.gradient_clip_val=1.0", None),  # new trainer key: Lightning's Trainer signature decides
    ("lightning.callbacks.extra.target=main.CUDACallback", None),
    ("lightning.modelcheckpoint.params.every_n_train_steps=5", None),
    ("data.params.test.target=test_main_toy.ToyDataset", None),
    ("lightning.trainr.max_steps=3", r"did you mean lightning\.trainer\?"),
    ("modle.params.size=3", r"did you mean model\?"),
    ("data.batch_size=3", r"data\.batch_size exists in no config; data has \['params', 'target'\]"),
    ("lightning.callbacks.image_logger.target=main.ImageLoger",  # an existing key, a class that does not exist
     r"lightning\.callbacks\.image_logger\.target: .*did you mean main\.ImageLogger\?"),
])
def test_which_new_keys_overrides_may_add(override, refusal):
    if refusal is None:
        key, value = override.split("=")
        assert str(OmegaConf.select(cli.load_configs([TOY], [override]), key)) == value
    else:
        with pytest.raises(cli.UsageError, match=refusal):
            cli.load_configs([TOY], [override])


def test_pl1_testtube_logger_still_accepted():
    """CompVis configs name PL 1.x's TestTubeLogger; main.py replaces it with CSVLogger, so it is not an error."""
    cfg = cli.load_configs([TOY], ["lightning.logger.target=pytorch_lightning.loggers.TestTubeLogger"])
    assert cfg.lightning.logger.target.endswith("TestTubeLogger")
    with pytest.raises(cli.UsageError, match=r"lightning\.logger\.target: .*did you mean .*CSVLogger"):
        cli.load_configs([TOY], ["lightning.logger.target=pytorch_lightning.loggers.CSVLoger"])


def test_check_overrides_names_the_closest_key():
    base = OmegaConf.create({"model": {"base_learning_rate": 1.0, "target": "a.B", "params": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"model\.base_learnig_rate exists in no config \(did you mean "
                                          r"model\.base_learning_rate\?\); model has \['base_learning_rate', "
                                          r"'params', 'target'\]"):
        check_overrides(base, ["model.base_learnig_rate=1e-3"])
    check_overrides(base, ["model.params.y=2", "lightning.trainer.max_steps=3", "data.target=a.B"])


def test_unknown_trainer_setting_suggests_the_name(tmp_path, capsys):
    assert main.main(["-b", TOY, "-t", "-l", str(tmp_path), "lightning.trainer.max_stepz=3"]) == 2
    assert "did you mean lightning.trainer.max_steps?" in _error_line(capsys)


# ------------------------------------------------------------------------------------------- resume checks
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    logs = tmp_path_factory.mktemp("toyerr") / "logs"
    mp = pytest.MonkeyPatch()
    mp.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    try:
        assert main.main(["--base", TOY, "-t", "-l", str(logs), "--no-test"]) == 0
    finally:
        mp.undo()
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / run.name
    shutil.copytree(run, dest)
    return dest


def test_resume_with_a_changed_model_size_is_one_line(toy_run, tmp_path, capsys):
    run = _copy(toy_run, tmp_path)
    assert main.main(["-r", str(run), "-t", "--max_steps", "7", "model.params.size=5"]) == 2
    line = _error_line(capsys)
    assert "cannot resume: checkpoint" in line and "does not fit this model" in line
    assert "net.weight: checkpoint (16, 16) vs model (25, 25)" in line


def test_resume_from_a_corrupt_last_ckpt_is_one_line(toy_run, tmp_path, capsys):
    run = _copy(toy_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[: 200])  # truncated
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2
    line = _error_line(capsys)
    assert "could not read checkpoint" in line and str(ckpt) in line


def test_resume_from_a_weights_only_file_needs_training_state(toy_run, tmp_path, capsys):
    run = _copy(toy_run, tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": torch.load(ckpt, weights_only=True)["state_dict"]}, ckpt)
    assert main.main(["-r", str(run), "-t", "--max_steps", "7"]) == 2
    assert "no training state (optimizer_states)" in _error_line(capsys)


def test_resume_with_a_yaml_error_in_the_saved_config(toy_run, tmp_path, capsys):
    run = _copy(toy_run, tmp_path)
    (project,) = glob.glob(str(run / "configs" / "*-project.yaml"))
    Path(project).write_text(Path(project).read_text() + "  broken: [1, 2\n")
    assert main.main(["-r", str(run), "-t"]) == 2
    assert "-project.yaml is not valid YAML" in _error_line(capsys)
