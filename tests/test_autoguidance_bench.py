"""bench/autoguidance_v2.py --quick: the weight is tuned on its own noise seed, every setting (unguided, autoguided at
equal steps and at equal evaluations, under both protocol samplers) is judged by the benchmark's judge and compared
with unguided DDIM at the seed level (untrained toy models: the numbers are the plumbing's, not a result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow(70)
def test_claim_mode_records_each_model_once_and_reports_the_preregistered_tests(tmp_path):
    out = tmp_path / "claim"
    proc = _run("--quick", "--claim", "-o", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = sorted(os.listdir(out / "records"))
    assert records == [f"{arm}_seed{s}.json" for arm in ("anatomical", "matched", "plain") for s in (7301, 7302)]
    record = json.loads((out / "records" / "plain_seed7301.json").read_text())
    settings = [f"{s}:{k}" for s in ("ddim", "ddim_eta1") for k in ("unguided", "auto_equal_evals", "auto_equal_steps")]
    assert sorted(record["results"]) == sorted(settings) and record["quick"] is True
    res = record["results"]
    assert res["ddim:unguided"]["weight"] == 1.0 and res["ddim:auto_equal_evals"]["weight"] == 3.0  # fixed, not tuned
    assert res["ddim:auto_equal_steps"]["evals_per_sample"] == 2 * res["ddim:unguided"]["evals_per_sample"]
    assert res["ddim:auto_equal_evals"]["evals_per_sample"] <= res["ddim:unguided"]["evals_per_sample"] + 2
    assert all(len(r["plausible"]) == 4 and r["pass_rate"] == sum(r["plausible"]) / 4 for r in res.values())
    report = json.loads((out / "autoguidance_claim.json").read_text())
    assert report["complete_seeds"] == [7301, 7302] and report["is_claim"] is False
    assert list(report["primary"]) == [
        "plain:auto_equal_evals - plain:unguided (ddim)", "plain:auto_equal_evals - plain:unguided (ddim_eta1)",
        "anatomical:auto_equal_evals - matched:auto_equal_evals (ddim)",
        "anatomical:auto_equal_evals - matched:auto_equal_evals (ddim_eta1)"]
    assert all(t["seeds"] == [7301, 7302] and "p_holm" in t for t in report["primary"].values())
    assert "partial: 2 of 5 training seeds" in (out / "autoguidance_claim.md").read_text()
    # kept records are not redone; a record of another addendum is refused
    before = (out / "records" / "plain_seed7301.json").stat().st_mtime_ns
    assert _run("--quick", "--claim", "-o", str(out)).returncode == 0
    assert (out / "records" / "plain_seed7301.json").stat().st_mtime_ns == before
    record["addendum_hash"] = "0" * 16
    (out / "records" / "plain_seed7301.json").write_text(json.dumps(record))
    proc = _run("--quick", "--claim", "-o", str(out))
    assert proc.returncode == 2 and "made under another addendum" in proc.stderr


def test_claim_mode_refuses_development_seeds_and_other_runs(tmp_path):
    proc = _run("--quick", "--claim", "--seeds", "0", "-o", str(tmp_path / "x"), timeout=120)
    assert proc.returncode == 2 and "training seeds [7301" in proc.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"protocol_hash": "feedfacefeedface"}))
    proc = _run("--claim", "--run", str(tmp_path / "run"), "-o", str(tmp_path / "y"), timeout=120)
    assert proc.returncode == 2 and "is a run of protocol feedfacefeedface" in proc.stderr


def test_a_claim_report_waits_for_every_model_unless_asked(tmp_path, monkeypatch, capsys):
    """--claim on a real run folder: with some of the addendum's models recorded, no report is written (nobody reads
    a claim before its end) unless --partial-report, which marks it partial; with all of them it is the claim.
    (Made-up records; the run folder's models are all recorded, so nothing is sampled.)"""
    bench = os.path.join(ROOT, "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import autoguidance_v2 as ag
    import records as rec
    import trained_v2 as tv2

    addendum = ag.load_addendum()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"protocol_hash": addendum["base_protocol_hash"]}))
    real_setup = tv2.study_setup  # the quick preset's judge instead of a trained run's (nothing is sampled)
    monkeypatch.setattr(tv2, "study_setup", lambda r, quick, device: real_setup(r, True, device))
    records, out = tmp_path / "records", tmp_path / "report"
    records.mkdir()
    keys = [f"{s}:{k}" for s in addendum["primary"]["samplers"] for k in ("unguided", "auto_equal_evals",
                                                                         "auto_equal_steps")]

    def record(arm, seed):
        rate = 0.3 + 0.01 * (seed - 7300) + (0.1 if arm == "anatomical" else 0.0)
        (records / f"{arm}_seed{seed}.json").write_text(json.dumps({
            "addendum_hash": rec.canonical_hash(addendum), "arm": arm, "training_seed": seed,
            "results": {k: {"pass_rate": rate + (0.05 if "auto" in k else 0.0)} for k in keys}}))

    for seed in addendum["training_seeds"][:2]:
        for arm in addendum["arms"]:
            record(arm, seed)
    args = ["--claim", "--run", str(run), "--records", str(records), "-o", str(out), "--seeds", "7301,7302"]
    assert ag.main(args) == 0
    assert "the report is written when all are in" in capsys.readouterr().out and not out.exists()
    assert ag.main([*args, "--partial-report"]) == 0
    assert "partial: 2 of 5 training seeds" in (out / "autoguidance_claim.md").read_text()
    for seed in addendum["training_seeds"][2:]:
        for arm in addendum["arms"]:
            record(arm, seed)
    assert ag.main([*args[:-2]]) == 0
    report = json.loads((out / "autoguidance_claim.json").read_text())
    assert report["is_claim"] is True and report["complete_seeds"] == addendum["training_seeds"]
    assert "every seed is in" in (out / "autoguidance_claim.md").read_text()
