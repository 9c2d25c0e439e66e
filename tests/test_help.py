"""Command lines: main.py --help parses without importing torch, every script's --help shows its defaults, and
long options are accepted with '_' or '-'."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from ldm import cli_flags

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py"))


def test_main_help_imports_neither_torch_nor_lightning():
    code = ("import runpy, sys\n"
            "sys.argv = ['main.py', '--help']\n"
            "try:\n    runpy.run_path('main.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'pytorch_lightning', 'lightning', 'torchvision') if m in sys.modules)\n"
            "print('HEAVY=' + ','.join(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY=\n" in proc.stdout  # nothing heavy was imported to print the help
    text = " ".join(proc.stdout.split())
    for shown in ("-s SEED, --seed SEED seed for seed_everything (default: 23)", "(default: logs)",
                  "--max_steps MAX_STEPS, --max-steps MAX_STEPS", "written with '_' or '-'"):
        assert shown in text, shown


def test_main_targets_still_resolve_lazily():
    import main
    from ldm.training.callbacks import ImageLogger
    from ldm.training.data import DataModuleFromConfig
    from ldm.util import get_obj_from_str

    assert get_obj_from_str("main.ImageLogger") is ImageLogger
    assert main.DataModuleFromConfig is DataModuleFromConfig
    assert get_obj_from_str("main.LearningRateMonitor").__module__.startswith("pytorch_lightning")
    with pytest.raises(AttributeError, match="no attribute 'NoSuchCallback'"):
        main.NoSuchCallback


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _help_of(name: str, monkeypatch, capsys) -> tuple[argparse.ArgumentParser, str]:
    seen = []
    original = cli_flags.ArgumentParser.format_help

    def record(self):
        seen.append(self)
        return original(self)

    monkeypatch.setattr(cli_flags.ArgumentParser, "format_help", record)
    with pytest.raises(SystemExit) as info:
        _load_script(name).main(["--help"])
    assert info.value.code == 0
    assert seen, f"scripts/{name}.py does not build its parser with ldm.cli_flags.ArgumentParser"
    return seen[-1], capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help_shows_every_default(name, monkeypatch, capsys):
    parser, text = _help_of(name, monkeypatch, capsys)
    flat = " ".join(text.split())
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default in ("", [], ()) \
                or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
            continue
        assert "%(default)" in (action.help or ""), f"{name}: {action.option_strings} hides its default"
        assert f"(default: {default})" in flat, f"{name}: {action.option_strings}"


def test_dash_and_underscore_spellings_are_the_same_option():
    parser = cli_flags.ArgumentParser()
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    for argv in (["--max-samples", "3", "--val_fraction", "0.5"], ["--max_samples=3", "--val-fraction=0.5"]):
        args = parser.parse_args(argv)
        assert (args.max_samples, args.val_fraction) == (3, 0.5)
    assert parser.normalize_flags(["--unknown-flag", "--", "--max-samples"]) == ["--unknown-flag", "--",
                                                                                 "--max-samples"]


def test_main_accepts_both_spellings():
    from ldm.training.cli import parse_args

    opt, overrides = parse_args(["--base", "a.yaml", "--no_test", "--scale-lr", "false", "--max-steps", "5",
                                 "--resume-from-checkpoint", "x.ckpt", "model.p=1"])
    assert opt.no_test is True and opt.scale_lr is False and opt.max_steps == 5
    assert opt.resume_from_checkpoint == "x.ckpt" and overrides == ["model.p=1"]
    opt, overrides = parse_args(["--scale-lr", "a.b=2"])  # a bare boolean flag before an override
    assert opt.scale_lr is True and overrides == ["a.b=2"]


def test_an_off_switch_does_not_show_its_default():
    parser = cli_flags.ArgumentParser()
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="sample with the live weights")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    text = " ".join(parser.format_help().split())
    assert "--no-ema sample with the live weights" in text and "(default: True)" not in text
    assert "sampler steps (default: 50)" in text
    assert parser.parse_args(["--no-ema"]).ema is False and parser.parse_args([]).ema is True
