"""bench/labelmap_v2.py --quick: a mask-conditioned benchmark-v2 arm sampled from test masks at every guidance scale,
judged for faithfulness, realism, diversity and partial masks, summarised per seed (untrained toy models: the
numbers are the plumbing's, not a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "bench/labelmap_v2.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quick_mode_measures_every_scale_per_seed(tmp_path):
    out = tmp_path / "lm"
    proc = _run("--quick", "--scales", "0,1", "--auto-weights", "2", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "labelmap.json").read_text())
    assert report["mode"] == "quick" and report["claim"] is False and report["scales"] == [0.0, 1.0]
    info = report["condition_information"]  # the condition at the image's own grid holds the whole mask
    assert info["detail 4"] == 1.0 and 0.3 < info["detail 1"] < 0.99
    arm = report["arms"]["plain_labelmap"]
    assert arm["seeds"] == [0, 1]
    rows = set(arm["rows"])
    assert {"scale 0: fg_mean", "scale 1: pass_rate", "scale 1: intensity_gap", "diversity: ms_ssim_within_mask",
            "partial liver: liver_dice"} <= rows
    assert {"scale 1: fid_segmenter", "scale 1: fid_pixel8", "scale 0: histogram_w1", "autoguided w 2: fg_mean",
            "autoguided w 2: pass_rate"} <= rows
    assert report["auto_weights"] == [2.0] and report["guide_step"] >= 1
    base = report["baseline"]
    assert base["arm"] == "plain" and base["seeds"] == [0, 1]
    assert all(0.0 <= v <= 1.0 for v in base["per_seed"]["unconditional: pass_rate"])
    assert all(v >= 0.0 for v in base["per_seed"]["unconditional: fid_segmenter"])
    # the autoguided samples are not the unguided ones (the guide is another toy model)
    assert report["raw"]["plain_labelmap"]["0"]["auto"]["2"]["fg_mean"] != \
        report["raw"]["plain_labelmap"]["0"]["scales"]["1"]["fg_mean"]
    for row in rows:
        values = arm["per_seed"][row]
        if "fid" in row:  # unbounded above
            assert len(values) == 2 and all(v >= 0.0 for v in values), row
            continue
        bound = 100.0 if "PSNR" in row else 2.0  # PSNR in dB, the rest shares, Dice, MS-SSIM or image units
        assert len(values) == 2 and all(v is None or -1.0 <= v <= bound for v in values), row
    raw = report["raw"]["plain_labelmap"]["0"]
    assert set(raw["scales"]["1"]["dice"]) == {str(c) for c in range(1, 10)}
    ref = report["reference"]
    assert 0.0 <= ref["fg_mean"] <= 1.0 and 0.0 <= ref["reconstruction"]["fg_mean"] <= 1.0
    assert ref["fid_segmenter"] >= 0 and ref["reconstruction"]["histogram_w1"] >= 0
    assert report["n_real"] >= report["n"]
    assert "| plain_labelmap | scale 1: fg_mean |" in (out / "labelmap.md").read_text()
    editing = raw["editing"]
    assert 1 <= editing["n"] <= 2 and 0 < editing["redrawn_pixel_share"] < 1  # the quick slices with a liver
    assert editing["kept_region"]["psnr"] > 0 and editing["reconstruction"]["psnr"] > 0
    assert (out / "editing_plain_labelmap.png").stat().st_size > 2000
    # a second run of the same settings keeps every seed's numbers (a study spans sessions); other settings redo them
    again = _run("--quick", "--scales", "0,1", "--auto-weights", "2", "-o", str(out))
    assert again.returncode == 0 and again.stdout.count("kept from") == 2, again.stdout[-2000:]
    assert json.loads((out / "labelmap.json").read_text())["arms"] == report["arms"]
    other = _run("--quick", "--scales", "0", "-o", str(out))
    assert other.returncode == 0 and "kept from" not in other.stdout
    assert set(json.loads((out / "labelmap.json").read_text())["arms"]["plain_labelmap"]["rows"]) < rows


def test_an_arm_without_the_condition_is_refused(tmp_path):
    proc = _run("--arms", "plain", "-o", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and "not mask-conditioned" in proc.stderr
