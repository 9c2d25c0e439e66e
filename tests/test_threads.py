"""CPU threads: --threads auto (the governor that follows the other processes' load), N, OMP_NUM_THREADS, on main.py
and the scripts, and the load benchmark's harness (bench/cpu_load.py --quick)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.threads import ThreadGovernor, configure_threads, num_cores, other_runnable_threads

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import cpu_load  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_fixed_auto_and_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert configure_threads(3, on_cpu=True) is None and torch.get_num_threads() == 3
    assert configure_threads("2") is None and torch.get_num_threads() == 2
    governor = configure_threads("auto", on_cpu=True)
    assert isinstance(governor, ThreadGovernor) and torch.get_num_threads() == governor.threads
    assert 1 <= governor.threads <= num_cores()
    assert configure_threads("auto", on_cpu=False) is None  # an accelerator's run keeps torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads(None, on_cpu=True) is None  # the user's setting wins over auto
    for bad in (0, "0", "-1", "two", "2.5"):
        with pytest.raises(ValueError, match="--threads must be 'auto' or an integer >= 1"):
            configure_threads(bad)


def test_governor_follows_the_other_processes_load():
    """On 2 cores: alone -> 2 threads; one busy process appears -> 1 at the next decision (the median of the samples
    since the last one, so a stray sample does not move it); it leaves -> 2 again."""
    now = [0.0]
    load = iter([0,            # at construction: alone
                 1, 1, 0,      # first interval: median 1 -> 1 thread
                 0, 1, 0,      # second: median 0 -> 2 threads
                 None, None])  # /proc unreadable: nothing sampled -> 1 thread
    applied = []
    gov = ThreadGovernor(max_threads=2, interval_s=3.0, probe=lambda: next(load), clock=lambda: now[0],
                         set_threads=applied.append, cores=2)
    assert gov.threads == 2 and applied == [2]
    seen = []
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.5):
        now[0] = t
        seen.append(gov.step())
    assert seen == [2, 2, 1, 1, 1, 2, 2, 1]
    assert gov.changes == 3 and applied == [2, 1, 2, 1]


def test_other_runnable_threads_reads_the_run_queue(tmp_path):
    (tmp_path / "stat").write_text("cpu  1 2 3\nctxt 5\nprocs_running 5\nprocs_blocked 0\n")
    for tid, state in ((10, "R"), (11, "S"), (12, "R")):
        task = tmp_path / "self" / "task" / str(tid)
        task.mkdir(parents=True)
        task.joinpath("stat").write_text(f"{tid} (python (x) y) {state} 1 2 3\n")  # a ')' in the name
    assert other_runnable_threads(str(tmp_path)) == 3  # 5 running, 2 of them ours
    assert other_runnable_threads(str(tmp_path / "missing")) is None
    assert other_runnable_threads() is None or other_runnable_threads() >= 0


def test_main_threads_flag_sets_and_checks(tmp_path, monkeypatch):
    import main

    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    toy = str(ROOT / "configs" / "tests" / "toy.yaml")
    assert main.main(["--base", toy, "-t", "-l", str(tmp_path / "a"), "--accelerator", "cpu", "--threads", "2",
                      "lightning.trainer.max_steps=1"]) == 0
    assert torch.get_num_threads() == 2
    assert main.main(["--base", toy, "-t", "-l", str(tmp_path / "b"), "--accelerator", "cpu",
                      "lightning.trainer.max_steps=2"]) == 0  # auto: the governor steps with the batches
    assert 1 <= torch.get_num_threads() <= num_cores()
    assert main.main(["--base", toy, "-t", "-l", str(tmp_path / "c"), "--threads", "0"]) == 2


def test_scripts_take_threads():
    from test_sample_run import load_script

    for name in ("sample", "evaluate", "train_segmenter", "inspect_registers", "mask_ae_dice"):
        parser = load_script(name).get_parser()
        assert any("--threads" in action.option_strings for action in parser._actions), name


def test_fair_share_known_answers():
    assert cpu_load.fair_share_ratio(1, 0, 2) == 1.0
    assert cpu_load.fair_share_ratio(1, 1, 2) == 1.0     # one thread beside one busy loop still has a core
    assert cpu_load.fair_share_ratio(1, 2, 2) == 1.5
    assert cpu_load.fair_share_ratio(2, 1, 2) == 1.5     # issue 32: 1.25 x 1.5 = the 1.9x target
    assert cpu_load.fair_share_ratio(2, 2, 2) == 2.0     # 1.25 x 2 = the 2.5x target
    assert cpu_load.fair_share_ratio(8, 1, 2) == 1.5     # threads beyond the cores add nothing
    with pytest.raises(ValueError):
        cpu_load.fair_share_ratio(0, 1, 2)
    assert cpu_load.parse_variant("default") == {}
    assert cpu_load.parse_variant("OMP_NUM_THREADS=2+OMP_WAIT_POLICY=PASSIVE") == {
        "OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        cpu_load.parse_variant("threads2")


def _busy_loops() -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                count += cpu_load.BUSY_LOOP.encode() in open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts the busy loops through /proc")
def test_cpu_load_quick_measures_and_cleans_up(tmp_path):
    before = _busy_loops()
    out = tmp_path / "load.json"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default variant: --threads auto
    proc = subprocess.run([sys.executable, "bench/cpu_load.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [(r["competitors"], r["variant"]) for r in res["rows"]] == [(0, "default"), (1, "default")]
    assert all(r["wall_s"] > 0 for r in res["rows"])
    idle, loaded = res["summary"]
    assert idle["ratio_to_idle"] == 1.0 and loaded["fair_share_ratio"] == cpu_load.fair_share_ratio(
        res["cores"], 1, res["cores"])  # the default variant is --threads auto: up to every core
    assert loaded["ratio_to_idle"] == pytest.approx(loaded["wall_s_median"] / idle["wall_s_median"])
    assert f"| default | {res['cores']} | 1 |" in (tmp_path / "load.md").read_text()
    assert _busy_loops() == before  # every competitor was stopped
