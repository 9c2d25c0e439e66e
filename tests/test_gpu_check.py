"""bench/gpu_check.py: the one GPU command, kept from rotting by its CPU dry run (every section's code path at
toy sizes), plus its argument checks and helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import gpu_check  # noqa: E402


@pytest.mark.slow(150)
def test_cpu_dry_run_runs_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    # a budget far above the ~150 s the dry run takes alone: on a loaded machine (pytest-xdist workers, other
    # jobs) every section still gets its time, so the test checks the code paths, not the machine's speed
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work"), "--budget-s", "1500"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    assert list(res["sections"]) == ["env", "train", "registers", "sampling", "tests", "main", "anatomy"]
    assert {name: sec["status"] for name, sec in res["sections"].items()} == dict.fromkeys(res["sections"], "ok")
    env = res["sections"]["env"]["result"]
    assert env["torch"] == torch.__version__ and res["peak_tflops"] > 0

    train = res["sections"]["train"]["result"]
    assert [(r["kind"], r["mode"]) for r in train["rows"]] == [
        (k, m) for k in ("plain", "anatomical") for m in ("fp32", "bf16", "bf16+compile")]
    for row in train["rows"]:
        assert row["losses_finite"] and row["images_per_s"] > 0 and row["tflops"] > 0
        assert 0 < row["mfu_vs_bf16_peak"]
    # the anatomical model does strictly more work per sample than the plain one (registers, mask decoder)
    assert train["anatomical_model"]["train_gflop_per_sample"] > train["plain_model"]["train_gflop_per_sample"] > 0

    regs = {r["variant"]: r for r in res["sections"]["registers"]["result"]["rows"]}
    assert list(regs) == ["plain", "shipped", "lean", "lean_low"] and regs["plain"]["flops_x_plain"] == 1.0
    assert regs["lean_low"]["flops_x_plain"] < regs["shipped"]["flops_x_plain"]
    assert all(r["host_syncs"] == 0 and r["time_x_plain"] > 0 for r in regs.values())

    assert res["sections"]["sampling"]["result"]["precision"] == "fp32"  # the dry run's; bf16 autocast on a GPU
    rows = res["sections"]["sampling"]["result"]["rows"]
    assert {(r["sampler"], r["batch"]) for r in rows} == {(s, b) for s in ("ddim", "dpmpp2m") for b in (2, 4)}
    assert all(r["finite"] and r["images_per_s"] > 0 and r["steps_taken"] >= r["steps"] for r in rows)

    tests = res["sections"]["tests"]["result"]
    assert tests["counts"].get("failed", 0) == 0 and tests["counts"].get("skipped", 0) >= 1  # no GPU here

    main = res["sections"]["main"]["result"]
    assert (main["ldm_step_before_resume"], main["ldm_step_after_resume"]) == (3, 5)
    assert main["losses_finite"] and main["logged_loss_values"] > 0

    anatomy = res["sections"]["anatomy"]["result"]
    # benchmark v2: one worker per (arm, development seed), one record each, a report over the records
    assert anatomy["finished_tasks"] == ["plain_seed0", "matched_seed0", "anatomical_seed0"]
    assert not anatomy["stopped_at_budget"] and anatomy["workers"] == 3
    assert [r["contrast"] for r in anatomy["summary"]["primary"]] == ["anatomical - matched"] * 2 + \
        ["anatomical - plain"] * 2
    assert 0.0 <= anatomy["summary"]["pass_rates"]["steps/ddim"]["anatomical"]["mean"] <= 1.0
    with tarfile.open(tmp_path / anatomy["tarball"]) as tar:
        names = tar.getnames()
    assert "anatomy/anatomy_v2.json" in names and "anatomy/report.md" in names
    assert "anatomy/records/anatomical_seed0.json" in names and "anatomy/records/anatomical_seed0.npz" in names
    assert not [n for n in names if n.endswith((".ckpt", ".pt"))]  # results only, no weights
    with tarfile.open(tmp_path / "gpu_logs.tar.gz") as tar:
        assert {"main_ae.log", "main_ldm.log", "main_resume.log"} <= set(tar.getnames())

    md = (tmp_path / "gpu.md").read_text()
    assert "| lean_low |" in md and "| anatomical | bf16+compile |" in md and "| dpmpp2m |" in md and "CPU dry run" in md


def test_arguments_are_checked(capsys):
    with pytest.raises(SystemExit) as err:
        gpu_check.parse_args(["--cpu-dry-run", "--sections", "env,warp"])
    assert err.value.code == 2 and "warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--cpu-dry-run", "--budget-s", "0"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as err:
            gpu_check.parse_args([])
        assert "--cpu-dry-run" in capsys.readouterr().err


def test_anatomy_tasks_and_finished_records(tmp_path):
    """One worker per (arm, seed): the protocol's arms and development seeds by default (the dry run: the first
    seed); a task counts as finished when its record is on disk."""
    import records

    protocol = records.load_protocol()
    args = gpu_check.parse_args(["--cpu-dry-run"])
    ck = type("Ck", (), {"args": args, "dry": True})()
    assert gpu_check._anatomy_tasks(ck) == [(arm, protocol["dev_training_seeds"][0]) for arm in protocol["arms"]]
    ck.dry = False
    args.anatomy_arms, args.anatomy_seeds = "plain,anatomical", "4,5"
    tasks = gpu_check._anatomy_tasks(ck)
    assert tasks == [("plain", 4), ("anatomical", 4), ("plain", 5), ("anatomical", 5)]
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "plain_seed4.json").write_text("{}")
    (tmp_path / "records" / "anatomical_seed5.npz").write_text("")  # arrays without their record: not finished
    assert gpu_check._finished_tasks(str(tmp_path), tasks) == ["plain_seed4"]


def test_markdown_names_failures_and_units():
    res = {"dry_run": False, "command": "python bench/gpu_check.py", "budget_s": 480, "elapsed_s": 100,
           "peak_tflops": 790.0,
           "sections": {"env": {"status": "ok", "seconds": 3.0, "result": {"device": "NVIDIA H200", "torch": "2.11",
                                                                          "cuda": "13.0", "lightning": "2.6",
                                                                          "matmul": {"dtype": "bfloat16"}}},
                        "train": {"status": "ok", "seconds": 50.0, "result": {"batch": 16, "timed_steps": 8, "rows": [
                            {"kind": "plain", "mode": "bf16", "images_per_s": 300.0, "x_fp32": 2.5, "tflops": 316.0,
                             "mfu_vs_bf16_peak": 0.4, "peak_mem_gib": 12.5, "warmup_s": 1.0, "losses_finite": True}]}},
                        "tests": {"status": "failed", "seconds": 9.0, "error": "RuntimeError: pytest -m gpu exited 1"}}}
    md = gpu_check.markdown(res)
    assert "NVIDIA H200" in md and "790.0 TFLOP/s" in md
    assert "| plain | bf16 | 300.0 | 2.50 | - | 316.0 | 40.0% | 12.50 | 1.0 | yes |" in md
    assert "| tests | failed | 9.0 | RuntimeError: pytest -m gpu exited 1 |" in md
