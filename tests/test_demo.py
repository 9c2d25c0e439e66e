"""The README's first command: scripts/demo.sh (what `make demo` runs), end to end at toy sizes, both modes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_demo(logdir: str, compare: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "LOGDIR": logdir, "DEMO_STEPS": "12", "DEMO_SAMPLES": "4",
           "DEMO_SEG_STEPS": "10", "DEMO_COMPARE": "1" if compare else "0",
           "AE_ARGS": "lightning.trainer.max_steps=12"}
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "demo.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)


def _figure_path(stdout: str) -> str:
    lines = [line.split(maxsplit=1)[1] for line in stdout.splitlines() if line.startswith("figure: ")]
    assert len(lines) == 1, stdout[-2000:]
    return lines[0].strip()


def _coloured_pixels(path: str) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())  # grey images and white canvas have none


@pytest.mark.slow(150)
def test_demo_script_end_to_end(tmp_path):
    logdir = str(tmp_path / "logs")
    plain = _run_demo(logdir, compare=False)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    figure = _figure_path(plain.stdout)
    run = os.path.dirname(os.path.dirname(figure))
    assert os.path.isfile(figure) and _coloured_pixels(figure) > 500  # masks in colour over the slices
    results = json.load(open(os.path.join(run, "report", "report.json")))["results"]
    assert set(results) == {"real", "anatomical"}
    assert results["real"]["model_rule_pass_rate"] == 1.0  # the phantom's own masks pass its rules
    assert 0.0 <= results["anatomical"]["model_rule_pass_rate"] <= 1.0
    assert len(os.listdir(os.path.join(run, "samples", "masks"))) == 4
    registers = json.load(open(os.path.join(run, "report", "registers", "registers.json")))
    accuracy = registers["trajectory"]["final_accuracy_per_level"]
    assert accuracy and all(0.0 <= a <= 1.0 for a in accuracy.values())

    # the comparison mode reuses the autoencoder the first run trained and adds the baseline and the segmenter
    compared = _run_demo(logdir, compare=True)
    assert compared.returncode == 0, compared.stdout[-3000:] + compared.stderr[-3000:]
    assert "training configs/autoencoder/demo_phantom_kl.yaml first" not in compared.stderr
    figure2 = _figure_path(compared.stdout)
    assert figure2 != figure and os.path.isfile(figure2) and _coloured_pixels(figure2) > 500
    report = json.load(open(os.path.join(os.path.dirname(figure2), "report.json")))
    assert set(report["results"]) == {"real", "anatomical", "baseline"}
    assert 0.0 <= report["results"]["baseline"]["seg_rule_pass_rate"] <= 1.0
    assert report["meta"]["segmenter"].endswith("segmenter_demo.pt")
