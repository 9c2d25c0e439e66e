"""Anatomical plausibility on phantom masks: the rule checker through evaluate.py, real data from a config."""
from __future__ import annotations

import json
import os
import sys

import pytest

from ldm import sampling
from ldm.evaluation import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_sample_run import load_script  # noqa: E402



def test_phantom_rules_separate_plausible_from_mirrored(tmp_path):
    cfg = tmp_path / "phantom.yaml"
    cfg.write_text("target: ldm.data.phantom.PhantomDataset\nparams: {size: 32, num_samples: 12, seed: 0, "
                   "split: validation}\n")
    real = compare.load_real(str(cfg))
    assert real["images"].shape == (12, 1, 32, 32) and real["masks"].shape == (12, 32, 32)
    # "good": the real slices with their masks; "mirrored": left-right flipped (liver on the wrong side).
    sampling.save_samples(str(tmp_path / "good"), 0, real["images"], real["masks"])
    sampling.save_samples(str(tmp_path / "mirrored"), 0, real["images"].flip(-1), real["masks"].flip(-1))
    evaluate = load_script("evaluate")

    out = tmp_path / "rep"
    assert evaluate.main(["--samples", f"good={tmp_path / 'good'}", f"mirrored={tmp_path / 'mirrored'}",
                          "--real", str(cfg), "--rules", "phantom", "--kid_subset_size", "6", "-o", str(out)]) == 0
    res = json.load(open(out / "report.json"))["results"]
    assert res["real"]["model_rule_pass_rate"] == 1.0
    assert res["good"]["model_rule_pass_rate"] == 1.0 and res["good"]["model_area_w1_mean"] == 0.0
    has_liver = float((real["masks"] == 1).flatten(1).any(1).float().mean())
    assert has_liver > 0
    # Every slice with a liver breaks liver_on_right once mirrored.
    assert res["mirrored"]["model_rule_liver_on_right"] == pytest.approx(1.0 - has_liver)
    assert res["mirrored"]["model_rule_pass_rate"] <= 1.0 - has_liver
    # Mirroring keeps areas and intensities: the distribution numbers stay ~0.
    assert res["mirrored"]["model_area_w1_mean"] == 0.0 and res["mirrored"]["histogram_w1"] < 0.01
    assert res["good"]["model_presence_liver"] == pytest.approx(has_liver)


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no PNG images"):
        compare.load_sample_set(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data config not found"):
        compare.load_real(str(tmp_path / "missing.yaml"))
    cfg = tmp_path / "main.yaml"
    cfg.write_text("data:\n  params:\n    train: {target: ldm.data.phantom.PhantomDataset}\n")
    with pytest.raises(ValueError, match="data.params.validation"):
        compare.load_real(str(cfg))
    evaluate = load_script("evaluate")

    with pytest.raises(ValueError, match="named 'x'"):
        evaluate._named(["x=a", "x=b"])
    assert evaluate._named(["some/dir/anat"]) == {"anat": "some/dir/anat"}
