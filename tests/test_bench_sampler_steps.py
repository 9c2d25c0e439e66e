"""bench/sampler_steps_v2.py --quick: every sampler of the comparison runs on benchmark-v2 models, is judged by the
benchmark's own judge and rules, and is compared with DDIM-200 at the seed level (untrained toy models: the numbers
are the plumbing's, not a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_mode_compares_every_sampler_with_ddim200_per_seed(tmp_path):
    out = tmp_path / "ss"
    proc = subprocess.run([sys.executable, "bench/sampler_steps_v2.py", "--quick", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "sampler_steps.json").read_text())
    assert report["mode"] == "quick" and report["claim"] is False
    assert report["samplers"] == ["ddim200", "ddim25", "dpmpp2m20", "dpmpp2m10"]
    assert report["sampler_specs"]["dpmpp2m20"] == {"sampler": "dpmpp2m", "steps": 20, "eta": 0.0}
    for arm in ("plain", "lean"):
        a = report["arms"][arm]
        assert a["seeds"] == [0, 1]
        for s in report["samplers"]:
            assert len(a["per_seed"][s]) == 2 and all(0.0 <= v <= 1.0 for v in a["per_seed"][s])
        tests = a["vs_ddim200"]
        assert set(tests) == {"ddim25", "dpmpp2m20", "dpmpp2m10"}
        assert all(t["n"] == 2 and 0.0 <= t["agreement_with_reference"] <= 1.0 for t in tests.values())
        assert all(report["raw"][arm]["0"][s]["seconds_per_sample"] > 0 for s in report["samplers"])
    assert "| lean | dpmpp2m20 |" in (out / "sampler_steps.md").read_text()
    bad = subprocess.run([sys.executable, "bench/sampler_steps_v2.py", "--samplers", "ddim25", "-o", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ddim200 missing" in bad.stderr
