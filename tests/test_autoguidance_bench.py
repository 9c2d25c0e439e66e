"""bench/autoguidance_v2.py --quick: the weight is tuned on its own noise seed, every setting (unguided, autoguided at
equal steps and at equal evaluations, under both protocol samplers) is judged by the benchmark's judge and compared
with unguided DDIM at the seed level (untrained toy models: the numbers are the plumbing's, not a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "bench/autoguidance_v2.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quick_mode_tunes_then_compares_with_unguided_per_seed(tmp_path):
    out = tmp_path / "ag"
    proc = _run("--quick", "--weights", "2,3", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "autoguidance.json").read_text())
    assert report["mode"] == "quick" and report["claim"] is False
    assert report["tune_noise_seed"] == report["noise_seed"] + 1 and report["weights"] == [2.0, 3.0]
    settings = [f"{s}:{k}" for s in ("ddim", "ddim_eta1") for k in ("unguided", "auto_equal_steps", "auto_equal_evals")]
    assert report["settings"] == settings
    for arm in ("plain", "lean"):
        for sampler in ("ddim", "ddim_eta1"):
            tuned = report["tuning"][arm][sampler]
            assert tuned["chosen"] in (2.0, 3.0) and set(tuned["mean_pass_rate"]) == {"2", "3"}
        a = report["arms"][arm]
        assert a["seeds"] == [0, 1]
        assert set(a["vs_reference"]) == set(settings) - {"ddim:unguided", "ddim_eta1:unguided"}
        assert a["vs_reference"]["ddim_eta1:auto_equal_evals"]["reference"] == "ddim_eta1:unguided"
        raw = report["raw"][arm]["0"]
        steps = report["sampler_steps"]
        assert raw["ddim:unguided"]["weight"] == 1.0 and raw["ddim:unguided"]["sampler_steps"] == steps
        # guided: two evaluations per step; equal evaluations: half the steps
        assert raw["ddim:auto_equal_steps"]["evals_per_sample"] == 2 * raw["ddim:unguided"]["evals_per_sample"]
        assert raw["ddim:auto_equal_evals"]["sampler_steps"] == steps // 2
        assert raw["ddim:auto_equal_evals"]["evals_per_sample"] <= raw["ddim:unguided"]["evals_per_sample"] + 2
        assert all(0.0 <= v <= 1.0 for s in settings for v in a["per_seed"][s])
    for arm in ("plain", "lean"):
        measures = report["arms"][arm]["measures"]["ddim:auto_equal_steps"]
        assert set(measures) == {"recall", "coverage", "presence_tv", "ms_ssim"}
        assert 0.0 <= measures["ms_ssim"]["mean"] <= 1.0 and 0.0 <= measures["presence_tv"]["mean"] <= 1.0
    assert "| lean | ddim_eta1:auto_equal_evals |" in (out / "autoguidance.md").read_text()


def test_bad_settings_are_refused(tmp_path):
    for args, match in ((["--weights", "1"], "a weight not > 1"), (["--tune-noise-seed", "1234"], "evaluation noise"),
                        (["--run", str(tmp_path)], "no run.json")):
        proc = _run(*args, "-o", str(tmp_path / "x"), timeout=120)
        assert proc.returncode == 2 and match in proc.stderr, proc.stderr[-1000:]
