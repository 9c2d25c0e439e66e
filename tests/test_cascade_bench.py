"""bench/cascade_v2.py --quick: masks drawn by an anatomical arm, images drawn from them by a mask-conditioned arm,
judged beside the plain arm per seed (untrained toy models: the numbers are the plumbing's, not a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "bench/cascade_v2.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quick_mode_judges_every_row_per_seed_and_pairs_the_cascade(tmp_path):
    out = tmp_path / "cascade"
    proc = _run("--quick", "--scales", "1,2", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "cascade.json").read_text())
    assert report["mode"] == "quick" and report["claim"] is False
    assert (report["prior"], report["image_arm"], report["baseline"]) == ("lean", "plain_labelmap", "plain")
    s = report["summary"]
    assert s["seeds"] == [0, 1]
    rows = {f"{k}:{r}" for k in ("ddim", "ddim_eta1") for r in ("plain", "prior", "prior_masks", "cascade:s1",
                                                                "cascade:s2", "cascade_half:s1", "real_masks:s1",
                                                                "unconditional")}
    assert rows <= set(s["rows"])
    for row in rows:
        assert all(0.0 <= v <= 1.0 for v in s["per_seed"][row]["pass_rate"]), row
    for row in ("ddim:cascade:s1", "ddim_eta1:real_masks:s2"):
        assert all(0.0 <= v <= 1.0 for v in s["per_seed"][row]["faithfulness"]), row
    steps = report["sampler_steps"]
    # the prior's evaluations plus one per step at scale 1, two at scale 2
    assert (s["evals_per_sample"]["ddim:cascade:s1"], s["evals_per_sample"]["ddim:cascade:s2"]) == (2 * steps,
                                                                                                  3 * steps)
    assert s["evals_per_sample"]["ddim:cascade_half:s1"] == 2 * (steps // 2) <= s["evals_per_sample"]["ddim:plain"]
    assert set(s["contrasts"]) == {f"{k}:{c} - {k}:{r}" for k in ("ddim", "ddim_eta1")
                                   for c in ("cascade:s1", "cascade:s2", "cascade_half:s1") for r in ("plain", "prior")}
    assert all(t["p_holm"] is None or t["p_holm"] >= t["p"] for t in s["contrasts"].values())
    assert "| ddim:cascade:s1 |" in (out / "cascade.md").read_text()


def test_a_prior_without_a_trained_head_or_an_unconditioned_image_arm_is_refused(tmp_path):
    proc = _run("--prior", "lean_no_loss", "-o", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and "trained mask head" in proc.stderr
    proc = _run("--image-arm", "plain", "-o", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and "not mask-conditioned" in proc.stderr
