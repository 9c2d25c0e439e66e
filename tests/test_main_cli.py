"""main.py's pure parts: flag parsing, --gpus mapping, trainer settings, config merge, run dirs, resume."""
from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from ldm.training import cli


def _opt(*argv: str):
    return cli.parse_args(list(argv))


def test_compvis_flags_and_overrides():
    opt, overrides = _opt("--base", "a.yaml", "b.yaml", "-t", "-n", "x", "-s", "7", "-f", "_p", "-l", "L",
                          "--scale_lr", "false", "--no-test", "model.params.x=3", "lightning.trainer.max_steps=5")
    assert opt.base == ["a.yaml", "b.yaml"] and opt.train is True and opt.name == "x" and opt.seed == 7
    assert opt.postfix == "_p" and opt.logdir == "L" and opt.scale_lr is False and opt.no_test is True
    assert overrides == ["model.params.x=3", "lightning.trainer.max_steps=5"]
    defaults, _ = _opt()
    assert defaults.scale_lr is True and defaults.train is False and defaults.seed == 23 and defaults.logdir == "logs"


def test_trainer_flags_are_typed():
    opt, _ = _opt("--max_steps", "10", "--limit-val-batches", "0.5", "--limit_train_batches", "3", "--precision",
                  "16-mixed", "--devices", "0,2", "--benchmark", "true", "--gradient_clip_val", "1")
    assert opt.max_steps == 10 and opt.limit_val_batches == 0.5 and opt.limit_train_batches == 3
    assert opt.precision == "16-mixed" and opt.devices == [0, 2] and opt.benchmark is True
    assert opt.gradient_clip_val == 1.0
    assert _opt("--precision", "32")[0].precision == 32


@pytest.mark.parametrize("argv", [["--unknown_flag", "3"], ["not_an_override"], ["-n", "a", "-r", "logs/x"]])
def test_bad_command_lines_exit(argv, capsys):
    with pytest.raises(SystemExit) as err:
        cli.parse_args(argv)
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("gpus, accelerator, devices, strategy, n", [
    ("0,1", "gpu", [0, 1], "ddp", 2),
    ("0,", "gpu", [0], None, 1),
    ("1,", "gpu", [1], None, 1),
    ("2", "gpu", 2, "ddp", 2),
    ("1", "gpu", 1, None, 1),
    ("-1", "gpu", 4, "ddp", 4),
    ("[0, 3]", "gpu", [0, 3], "ddp", 2),
    ("0", "cpu", 1, None, 1),
])
def test_parse_gpus_as_compvis_users_type_it(gpus, accelerator, devices, strategy, n):
    spec = cli.parse_gpus(gpus, cuda_count=4)
    assert (spec.accelerator, spec.devices, spec.strategy, spec.num_devices) == (accelerator, devices, strategy, n)


@pytest.mark.parametrize("gpus, match", [("0,1", "no CUDA device"), ("1", "no CUDA device"), ("-1", "no CUDA")])
def test_parse_gpus_without_cuda_says_how_to_use_the_cpu(gpus, match):
    with pytest.raises(cli.UsageError, match=match) as err:
        cli.parse_gpus(gpus, cuda_count=0)
    assert "--accelerator cpu" in str(err.value)


@pytest.mark.parametrize("gpus, match", [("0,5", "names GPU 5"), ("3", "asks for 3"), ("a,b", "not understood"),
                                         ("0,0", "distinct"), ("-2", ">= 1")])
def test_parse_gpus_rejects_impossible_requests(gpus, match):
    with pytest.raises(cli.UsageError, match=match):
        cli.parse_gpus(gpus, cuda_count=2)


def test_resolve_devices_defaults_and_conflicts():
    spec = cli.resolve_devices({}, cuda_count=0)
    assert (spec.accelerator, spec.devices, spec.strategy, spec.num_devices) == ("auto", 1, None, 1)
    spec = cli.resolve_devices({"accelerator": "cpu", "devices": 2}, cuda_count=0)
    assert (spec.strategy, spec.num_devices) == ("ddp", 2)
    spec = cli.resolve_devices({"accelerator": "cpu", "devices": 1, "num_nodes": 2}, cuda_count=0)
    assert spec.strategy == "ddp"
    spec = cli.resolve_devices({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, cuda_count=0)
    assert spec.strategy == "ddp_spawn"
    with pytest.raises(cli.UsageError, match="either"):
        cli.resolve_devices({"gpus": "0,", "devices": 2}, cuda_count=2)
    with pytest.raises(cli.UsageError, match="no CUDA device"):
        cli.resolve_devices({"accelerator": "gpu", "devices": 1}, cuda_count=0)


def test_cli_trainer_flags_override_yaml_and_device_keys_go_as_a_group():
    yaml_trainer = OmegaConf.create({"gpus": "0,1", "max_steps": 100, "benchmark": True})
    opt, _ = _opt("--accelerator", "cpu", "--max_steps", "5")
    settings = cli.trainer_settings(yaml_trainer, opt)
    assert settings == {"accelerator": "cpu", "max_steps": 5, "benchmark": True}
    opt, _ = _opt()
    assert cli.trainer_settings(yaml_trainer, opt)["gpus"] == "0,1"


def test_lightning_trainer_kwargs_maps_pl1_names_and_rejects_unknown():
    kwargs, spec, notes = cli.lightning_trainer_kwargs(
        {"gpus": "0", "replace_sampler_ddp": False, "terminate_on_nan": True, "max_steps": 3}, cuda_count=0)
    assert kwargs == {"accelerator": "cpu", "devices": 1, "use_distributed_sampler": False, "max_steps": 3}
    assert any("use_distributed_sampler" in n for n in notes) and any("terminate_on_nan" in n for n in notes)
    # a CompVis run's saved lightning config: PL 1.x gpus + accelerator: ddp
    kwargs, spec, notes = cli.lightning_trainer_kwargs({"gpus": "0,1", "accelerator": "ddp"}, cuda_count=2)
    assert kwargs == {"accelerator": "gpu", "devices": [0, 1], "strategy": "ddp"}
    assert any("strategy='ddp'" in n for n in notes)
    with pytest.raises(cli.UsageError, match="unknown Lightning Trainer setting.*max_stepz"):
        cli.lightning_trainer_kwargs({"max_stepz": 3}, cuda_count=0)
    with pytest.raises(cli.UsageError, match="-r logs/RUN"):
        cli.lightning_trainer_kwargs({"resume_from_checkpoint": "x.ckpt"}, cuda_count=0)


def test_effective_learning_rate_compvis_rule_with_nodes():
    lr, how = cli.effective_learning_rate(1e-6, batch_size=4, num_devices=2, num_nodes=3, accumulate_grad_batches=5,
                                          scale_lr=True)
    assert lr == pytest.approx(5 * 2 * 3 * 4 * 1e-6)
    assert "5 (accumulate_grad_batches) * 2 (devices) * 3 (num_nodes) * 4 (batch size)" in how
    lr, how = cli.effective_learning_rate(1e-6, 4, 2, 3, 5, scale_lr=False)
    assert lr == 1e-6 and "--scale_lr false" in how


def test_load_configs_merges_left_to_right_and_overrides_devices(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model: {params: {x: 1, y: 2}}\nlightning: {trainer: {gpus: '0,1', max_steps: 3}}\n")
    b.write_text("model: {params: {y: 5}}\n")
    cfg = cli.load_configs([str(a), str(b)], ["model.params.z=[1,2]", "lightning.trainer.accelerator=cpu"])
    assert OmegaConf.to_container(cfg.model.params) == {"x": 1, "y": 5, "z": [1, 2]}
    assert OmegaConf.to_container(cfg.lightning.trainer) == {"max_steps": 3, "accelerator": "cpu"}
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        cli.load_configs([str(tmp_path / "missing.yaml")])


def test_run_name_follows_compvis():
    assert cli.run_name("T", "", ["configs/x/my_cfg.yaml"], "") == "T_my_cfg"
    assert cli.run_name("T", "exp", ["configs/x/my_cfg.yaml"], "_v2") == "T_exp_v2"
    assert cli.run_name("T", "", [], "") == "T"


def test_resolve_run_paths_fresh_project_and_collision(tmp_path):
    opt, _ = _opt("--base", "cfg/foo.yaml", "-l", str(tmp_path), "-p", "proj")
    paths = cli.resolve_run_paths(opt, now="2020-01-01T00-00-00")
    assert paths.logdir == os.path.join(str(tmp_path), "proj", "2020-01-01T00-00-00_foo")
    assert paths.ckptdir == os.path.join(paths.logdir, "checkpoints") and paths.ckpt is None
    os.makedirs(paths.logdir)
    again = cli.resolve_run_paths(opt, now="2020-01-01T00-00-00")
    assert again.logdir == paths.logdir + "-1"


def test_resolve_resume_dir_and_file(tmp_path):
    run = tmp_path / "logs" / "2020_run"
    (run / "checkpoints" / "trainstep_checkpoints").mkdir(parents=True)
    (run / "configs").mkdir()
    (run / "configs" / "t-project.yaml").write_text("model: {}\n")
    (run / "configs" / "t-lightning.yaml").write_text("lightning: {}\n")
    with pytest.raises(FileNotFoundError, match="last.ckpt does not exist"):
        cli.resolve_resume(str(run))
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "checkpoints" / "trainstep_checkpoints" / "s.ckpt").write_bytes(b"x")
    assert cli.resolve_resume(str(run) + "/") == (str(run), str(run / "checkpoints" / "last.ckpt"))
    nested = run / "checkpoints" / "trainstep_checkpoints" / "s.ckpt"
    assert cli.resolve_resume(str(nested)) == (str(run), str(nested))
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    with pytest.raises(cli.UsageError, match="--resume_from_checkpoint"):
        cli.resolve_resume(str(loose))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.resolve_resume(str(tmp_path / "nope"))
    opt, _ = _opt("-r", str(run))
    paths = cli.resolve_run_paths(opt)
    assert paths.logdir == str(run) and paths.nowname == "2020_run"
    assert [os.path.basename(p) for p in paths.resumed_configs] == ["t-lightning.yaml", "t-project.yaml"]


def test_ddp_child_reuses_the_parent_run_dir(tmp_path, monkeypatch):
    opt, _ = _opt("--base", "cfg/foo.yaml", "-l", str(tmp_path))
    monkeypatch.setenv(cli.LOGDIR_ENV, str(tmp_path / "parent_run"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.resolve_run_paths(opt, now="N").logdir == os.path.join(str(tmp_path), "N_foo")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.resolve_run_paths(opt, now="N").logdir == str(tmp_path / "parent_run")


@pytest.mark.parametrize("value, expected", [("0,1", [0, 1]), ("0,", [0]), ("[0, 3]", [0, 3]), (",", []),
                                             ("2", 2), (2, 2), ("-1", -1), ("", 0), ("auto", "auto"), ([1, 2], [1, 2])])
def test_parse_devices_is_the_one_device_reader(value, expected):
    assert cli.parse_devices(value) == expected


def test_parse_devices_errors_name_the_flag():
    with pytest.raises(cli.UsageError, match="--devices 'x' is not understood"):
        cli.parse_devices("x")
    with pytest.raises(cli.UsageError, match="--gpus 'a,b' is not understood"):
        cli.parse_devices("a,b", "--gpus")
    assert cli.parse_args(["--devices", "0,2"])[0].devices == [0, 2]


def test_boolean_words_are_one_list():
    assert all(cli._str2bool(w) for w in cli.TRUE_WORDS) and not any(cli._str2bool(w) for w in cli.FALSE_WORDS)
    opt, rest = cli.parse_args(["-t", "no", "a.b=1"])
    assert opt.train is False and rest == ["a.b=1"]
