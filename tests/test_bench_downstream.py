"""The downstream test (``bench/downstream.py --quick``): pair sets exported as nnU-Net datasets, nnU-Net trained
and run on the real test slices, Dice per condition; the outputs are checked for being real, not for their values
(the quick mode's models are untrained)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

pytest.importorskip("nnunetv2")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import torch

    import downstream

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("downstream")
    out, work = str(base / "out"), str(base / "work")
    assert downstream.main(["-o", out, "--quick", "--no-progress", "--work", work, "--device", "cpu"]) == 0
    with open(os.path.join(out, "downstream.json")) as f:
        return out, work, json.load(f)


def _unit(value):
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


def test_quick_run_reports_every_condition_and_seed(quick_run):
    import downstream

    out, work, report = quick_run
    assert {"mode", "config", "arms", "datasets", "results", "summary", "class_names", "benchmark", "seconds",
            "segmenter_test_dice", "label_agreement"} <= set(report)
    assert report["mode"] == "quick" and report["claim"] is False
    cfg = report["config"]
    assert cfg["sampler"]["eta"] == 0.0 and cfg["segmenter"]["seed"] not in (0, 1)  # not a judge's seed
    assert len(report["class_names"]) == 10
    n, test_n, seeds = cfg["n"], cfg["test_n"], cfg["seeds"]
    assert len(seeds) == 2
    assert set(report["results"]) == set(downstream.CONDITIONS) == set(report["summary"]["conditions"])
    for condition, per_seed in report["results"].items():
        expected = 2 * n if condition.startswith("real+") else n
        data = report["datasets"][condition]
        assert data["num_cases"] == expected
        assert data["num_synthetic"] == (0 if condition == "real" else n)
        assert sorted(per_seed) == sorted(str(s) for s in seeds)
        for result in per_seed.values():
            assert result["num_training_cases"] == expected  # what nnU-Net's preprocessed dataset holds
            assert result["num_predictions"] == test_n
            assert len(result["dice"]["per_class"]) == 10
            assert all(_unit(v) for v in result["dice"]["per_class"])
            assert 0.0 <= result["dice"]["foreground_mean"] <= 1.0
        summary = report["summary"]["conditions"][condition]
        fg = summary["foreground_mean"]
        assert fg["n"] == 2 and 0.0 <= fg["mean"] <= 1.0 and fg["lo"] <= fg["mean"] <= fg["hi"]
    assert [r["contrast"] for r in report["summary"]["contrasts_vs_real"]] == [
        f"{c} - real" for c in downstream.CONDITIONS[1:]]


def test_quick_run_left_nnunet_files_and_the_outputs(quick_run):
    out, work, report = quick_run
    for name in ("downstream.json", "downstream.md", "pairs.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "pairs.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = open(os.path.join(out, "downstream.md")).read()
    assert "Quick mode" in md and "synthetic_plain_seg" in md
    import downstream

    again = os.path.join(work, "rendered")
    assert downstream.main(["--render", os.path.join(out, "downstream.json"), "-o", again]) == 0
    assert open(os.path.join(again, "downstream.md")).read() == md
    test_n = report["config"]["test_n"]
    for condition, per_seed in report["results"].items():
        for seed in per_seed:
            folder = os.path.join(work, "predictions", f"{condition.replace('+', '-')}_seed{seed}")
            predicted = [f for f in os.listdir(folder) if f.endswith(".nii.gz")]
            assert len(predicted) == test_n  # nnU-Net's predictor wrote one label volume per test case
        raw = os.path.join(work, "raw", report["datasets"][condition]["dataset"])
        with open(os.path.join(raw, "dataset.json")) as f:
            dataset = json.load(f)
        assert dataset["numTraining"] == report["datasets"][condition]["num_cases"]
        assert len(os.listdir(os.path.join(raw, "labelsTr"))) == dataset["numTraining"]
        assert not math.isnan(report["summary"]["conditions"][condition]["foreground_mean"]["mean"])


def test_bad_flags_are_refused(capsys):
    import downstream

    assert downstream.main(["-o", "/nonexistent/x", "--seeds", "1,1"]) == 2
    assert downstream.main(["-o", "/nonexistent/x", "--conditions", "real,nope"]) == 2
    assert "unknown condition" in capsys.readouterr().err
