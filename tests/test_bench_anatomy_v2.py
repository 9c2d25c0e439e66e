"""The anatomy benchmark v2: ``bench/anatomy.py --quick`` end to end (records, report), the records' guarantees
(hashes, duplicates, protocols) and the protocol's seed rules."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import records as rec  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick v2 run (3 arms x 2 development seeds), shared by the tests below."""
    import anatomy

    out = str(tmp_path_factory.mktemp("anatomy_v2") / "run")
    assert anatomy.main(["-o", out, "--quick", "--no-progress", "--threads", "1"]) == 0
    return out


@pytest.mark.slow(120)
def test_quick_run_writes_records_and_a_report(quick_run):
    protocol = rec.load_protocol()
    records_dir = os.path.join(quick_run, "records")
    names = sorted(os.listdir(records_dir))
    for arm in protocol["arms"]:
        for seed in protocol["dev_training_seeds"][:2]:
            assert f"{arm}_seed{seed}.json" in names and f"{arm}_seed{seed}.npz" in names
    assert sum(n.startswith("setup_") for n in names) == 1
    collected = rec.collect([records_dir])
    assert len(collected["records"]) == 2 * len(protocol["arms"])
    record, arrays = collected["records"][0]
    assert record["claim"] is False and record["noise_seed"] == protocol["dev_noise_seed"]
    assert set(record["evals"]) >= {f"{b}/{s}" for b in ("steps", "flops") for s in protocol["samplers"]} | \
        {"quarter/ddim"}
    ev = record["evals"]["steps/ddim"]
    n = ev["n"]
    assert arrays["steps/ddim/A/primary/plausible"].shape == (n,)
    assert ev["judges"]["A"]["primary"]["pass_rate"] == pytest.approx(
        float(arrays["steps/ddim/A/primary/plausible"].mean()))
    assert arrays["steps/ddim/A/variant"].shape == (n,)

    with open(os.path.join(quick_run, "anatomy_v2.json")) as f:
        summary = json.load(f)
    # the primary family: 2 contrasts x 2 samplers, each over the 2 seeds, Holm-adjusted
    assert len(summary["primary"]) == 4
    for row in summary["primary"]:
        assert row["n"] == 2
        assert row["p_holm"] is None or row["p_holm"] >= row["p"]
    costs = summary["cost"]
    ratio_p = costs["matched"]["params"] / costs["anatomical"]["params"]
    ratio_f = costs["matched"]["train_flops_per_sample"] / costs["anatomical"]["train_flops_per_sample"]
    assert abs(ratio_p - 1) <= 0.05 and abs(ratio_f - 1) <= 0.05
    assert costs["plain"]["train_flops_per_sample"] < 0.95 * costs["anatomical"]["train_flops_per_sample"]
    # the anatomical arm stops at the plain arm's FLOPs for the equal-FLOPs budget
    steps = costs["anatomical"]["budget_steps"]
    assert steps["flops"] < steps["steps"] and costs["plain"]["budget_steps"]["flops"] == steps["steps"]
    setup = next(iter(summary["setups"].values()))["calibration"]
    from ldm.data.phantom_v2 import CORRUPTIONS
    assert set(setup["sensitivity"]) == set(CORRUPTIONS)
    report = open(os.path.join(quick_run, "report.md")).read()
    for heading in ("development run, not a claim", "Primary analysis", "Power analysis", "Judge sensitivity",
                    "Capacity, compute and convergence", "Secondary analyses"):
        assert heading in report
    assert os.path.isfile(os.path.join(quick_run, "figures", "samples_v2.png"))


@pytest.mark.slow(60)
def test_rerun_reuses_records_and_report_from_copied_records(quick_run, tmp_path):
    import anatomy

    record_path = os.path.join(quick_run, "records", "plain_seed0.json")
    before = os.path.getmtime(record_path)
    assert anatomy.main(["-o", quick_run, "--quick", "--no-progress", "--threads", "1", "--arms", "plain"]) == 0
    assert os.path.getmtime(record_path) == before  # the task was not run again

    # the records alone, copied elsewhere (as committed under bench/records/), give the same primary numbers
    copied = tmp_path / "committed"
    shutil.copytree(os.path.join(quick_run, "records"), copied)
    assert anatomy.main(["--report", str(copied), "-o", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "anatomy_v2.json") as f:
        again = json.load(f)
    with open(os.path.join(quick_run, "anatomy_v2.json")) as f:
        first = json.load(f)
    assert [r["diff"] for r in again["primary"]] == [r["diff"] for r in first["primary"]]

    # a changed per-sample file is refused, naming it
    npz = copied / "plain_seed0.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not match the hash"):
        rec.collect([str(copied)])
    # the same task twice (e.g. copied from two machines) is refused
    shutil.copy(os.path.join(quick_run, "records", "plain_seed0.npz"), npz)
    os.makedirs(copied / "second")
    for ext in ("json", "npz"):
        shutil.copy(os.path.join(quick_run, "records", f"plain_seed0.{ext}"), copied / "second")
    with pytest.raises(ValueError, match="one task counted twice"):
        rec.collect([str(copied)])


def test_records_of_two_protocols_need_a_choice(tmp_path):
    for h in ("aaaa", "bbbb"):
        d = tmp_path / h
        rec.write_setup(str(d), {"setup_id": "s1", "calibration": {}})
        rec.write_record(str(d), {"arm": "plain", "training_seed": 0, "protocol_hash": h, "setup_id": "s1"},
                         {"x": np.arange(3)})
    with pytest.raises(ValueError, match="several protocols"):
        rec.collect([str(tmp_path)])
    chosen = rec.collect([str(tmp_path)], "bbbb")
    assert len(chosen["records"]) == 1 and chosen["other_hashes"] == {"aaaa": 1}
    assert chosen["records"][0][1]["x"].tolist() == [0, 1, 2]
    os.remove(tmp_path / "aaaa" / "setup_s1.json")
    os.remove(tmp_path / "bbbb" / "setup_s1.json")
    with pytest.raises(ValueError, match="setup record"):
        rec.collect([str(tmp_path)], "aaaa")


def test_claim_seeds_are_kept_out_of_development_runs(tmp_path, capsys):
    import anatomy

    protocol = rec.load_protocol()
    claim_seed = protocol["claim_training_seeds"][0]
    cases = [(["--seeds", str(claim_seed)], "claim seeds"),
             (["--noise-seed", str(protocol["claim_noise_seed"])], "claim seeds"),
             (["--claim", "--quick"], "protocol's scale"),
             (["--claim", "--noise-seed", "5"], "drop --noise-seed"),
             (["--claim", "--seeds", "3"], "not claim seeds"),
             (["--arms", "nope"], "unknown arm"),
             (["--seeds", "1,1"], "distinct seeds")]
    for extra, says in cases:
        assert anatomy.main(["-o", str(tmp_path / "x"), "--no-progress", *extra]) == 2, extra
        assert says in capsys.readouterr().err, extra
    assert anatomy.main(["--phantom", "v3", "-o", str(tmp_path / "y")]) == 2


def test_protocol_hash_covers_the_protocol_and_the_settings(tmp_path):
    protocol = rec.load_protocol()
    h = rec.protocol_hash(protocol, {"steps": 10})
    assert h == rec.protocol_hash(json.loads(json.dumps(protocol)), {"steps": 10})
    assert h != rec.protocol_hash(protocol, {"steps": 11})
    assert h != rec.protocol_hash({**protocol, "version": protocol["version"] + 1}, {"steps": 10})
    bad = tmp_path / "PROTOCOL.md"
    bad.write_text("```json\n" + json.dumps({**protocol, "claim_training_seeds": protocol["dev_training_seeds"]})
                   + "\n```\n")
    with pytest.raises(ValueError, match="must differ"):
        rec.load_protocol(str(bad))


@pytest.mark.slow(60)
def test_a_task_run_again_elsewhere_reproduces_its_record(quick_run, tmp_path):
    """The same task with the same seeds on the same device class gives the same record (per-sample outcomes,
    descriptors, metrics): what lets a claim run be split across machines."""
    import anatomy

    again = str(tmp_path / "again")
    assert anatomy.main(["-o", again, "--quick", "--no-progress", "--threads", "1", "--arms", "plain",
                         "--seeds", "0"]) == 0
    first, first_arrays = rec.read_record(os.path.join(quick_run, "records", "plain_seed0.json"))
    second, second_arrays = rec.read_record(os.path.join(again, "records", "plain_seed0.json"))
    assert first["setup_id"] == second["setup_id"] and first["protocol_hash"] == second["protocol_hash"]
    assert sorted(first_arrays) == sorted(second_arrays)
    for key in first_arrays:
        assert np.array_equal(first_arrays[key], second_arrays[key], equal_nan=first_arrays[key].dtype.kind == "f"), key
    for key, ev in first["evals"].items():
        assert ev["judges"] == second["evals"][key]["judges"] and ev["measures"] == second["evals"][key]["measures"]


def test_judge_sensitivity_script_reports_a_variant_beside_the_runs_judges(quick_run, tmp_path):
    import judge_sensitivity

    out = tmp_path / "judge.json"
    assert judge_sensitivity.main(["-o", str(out), "--preset", "quick", "--copy-paste", "0.5", "--run", quick_run,
                                   "--figure", str(tmp_path / "judges.png")]) == 0
    res = json.loads(out.read_text())
    from ldm.data.phantom_v2 import CORRUPTIONS
    assert set(res["sensitivity"]) == set(CORRUPTIONS) and res["judge"]["copy_paste_prob"] == 0.5
    for row in res["sensitivity"].values():
        assert 0.0 <= row["judge_copy_paste_0.5/primary"] <= 1.0 and row["true_mask/primary"] >= 0.95
    assert set(res["run_judges"]["real_pass_rate"]) == {"A", "B"}
    assert os.path.getsize(tmp_path / "judges.png") > 5000


def test_lean_ablation_arms():
    """The two arms that separate the lean design's parts: ``lean_no_loss`` is the lean arm with the anatomical loss
    off, ``matched_lean`` a plain UNet of the lean arm's parameters and training FLOPs (within the tolerance)."""
    import anatomy_v2 as v2
    import capacity

    quick = v2.PRESETS_V2["quick"]
    lean, no_loss = v2.arm_config("lean", quick, None, 1.0), v2.arm_config("lean_no_loss", quick, None, 1.0)
    assert no_loss["params"]["anatomical_loss_weight"] == 0.0 and lean["params"].get("anatomical_loss_weight") != 0.0
    assert no_loss["params"]["unet_config"] == lean["params"]["unet_config"]
    assert "lean_no_loss" in v2.MASK_ARMS_V2 and "matched_lean" not in v2.MASK_ARMS_V2
    cpu = v2.PRESETS_V2["cpu"]
    matched = v2.arm_config("matched_lean", cpu, None, 1.0)
    assert matched["params"]["unet_config"]["target"].endswith("openaimodel.UNetModel")
    target = capacity.training_flops_per_sample(v2.arm_config("lean", cpu, None, 1.0))
    got = capacity.training_flops_per_sample(matched)
    assert abs(got["params"] / target["params"] - 1) <= v2.CAPACITY_TOL
    assert abs(got["train_flops_per_sample"] / target["train_flops_per_sample"] - 1) <= v2.CAPACITY_TOL
    assert matched["params"]["unet_config"] != v2.arm_config("matched", cpu, None, 1.0)["params"]["unet_config"]


def test_audit_fix_arms_change_only_what_they_name():
    """``lean_v3`` is the lean arm with the audit's four fixes and ``lean_stopgrad`` the lean arm with a
    stop-gradient mask probe; every other model and UNet parameter is the lean arm's, and both stay within 1 % of
    its parameters and training FLOPs (at the cpu preset the fusion reads all three decoder levels)."""
    import anatomy_v2 as v2
    import capacity

    for name in ("quick", "cpu"):
        preset = v2.PRESETS_V2[name]
        lean = v2.arm_config("lean", preset, None, 1.0)
        base = capacity.training_flops_per_sample(lean)
        for arm, (ldm, unet) in {
                "lean_v3": ({"anatomical_schedule": "ramp", "anatomical_timestep_weighting": "none",
                             "attention_alignment_weight": 0.0},
                            {"mask_head_levels": len(lean["params"]["unet_config"]["params"]["channel_mult"])}),
                "lean_stopgrad": ({"attention_alignment_weight": 0.0}, {"segmentation_stop_gradient": True})}.items():
            cfg = v2.arm_config(arm, preset, None, 1.0)
            got = {k: v for k, v in cfg["params"].items() if k != "unet_config" and lean["params"].get(k) != v}
            assert got == ldm, (name, arm)
            u, lu = cfg["params"]["unet_config"]["params"], lean["params"]["unet_config"]["params"]
            assert {k: v for k, v in u.items() if lu.get(k) != v} == unet, (name, arm)
            cost = capacity.training_flops_per_sample(cfg)
            assert abs(cost["params"] / base["params"] - 1) < 0.01
            assert abs(cost["train_flops_per_sample"] / base["train_flops_per_sample"] - 1) < 0.01
            assert arm in v2.MASK_ARMS_V2
    assert v2.arm_config("lean_v3", v2.PRESETS_V2["cpu"], None, 1.0)["params"]["unet_config"]["params"][
        "mask_head_levels"] == 3


def test_the_labelmap_arm_is_the_plain_arm_plus_the_mask_condition():
    import anatomy_v2 as v2

    preset = v2.PRESETS_V2["quick"]
    plain, cond = v2.arm_config("plain", preset, None, 1.0), v2.arm_config("plain_labelmap", preset, None, 1.0)
    params = dict(cond["params"])
    assert params.pop("mask_condition") == {"key": "segmentation", "num_classes": v2.NUM_CLASSES,
                                            "ignore_index": 255, "dropout": 0.1, "partial": 0.3}
    unet = dict(params["unet_config"]["params"])
    assert unet.pop("mask_condition_classes") == v2.NUM_CLASSES
    assert unet == plain["params"]["unet_config"]["params"]
    assert {k: v for k, v in params.items() if k != "unet_config"} == \
        {k: v for k, v in plain["params"].items() if k != "unet_config"}


def test_the_labelmap_dropout_arms_differ_from_plain_labelmap_only_in_the_dropout():
    import anatomy_v2 as v2

    preset = v2.PRESETS_V2["quick"]
    base = v2.arm_config("plain_labelmap", preset, None, 1.0)
    for arm, p in (("plain_labelmap_nodrop", 0.0), ("plain_labelmap_drop30", 0.3), ("plain_labelmap_drop50", 0.5)):
        cfg = v2.arm_config(arm, preset, None, 1.0)
        assert cfg["params"]["mask_condition"]["dropout"] == p
        cfg["params"]["mask_condition"]["dropout"] = 0.1
        assert cfg == base
    detail = v2.arm_config("plain_labelmap_detail4", preset, None, 1.0)  # only the condition's grid differs
    assert detail["params"]["unet_config"]["params"].pop("mask_condition_detail") == 4
    assert detail == base


@pytest.mark.slow(60)
def test_a_committed_instrument_is_adopted_by_new_run_folders_and_a_foreign_one_refused(quick_run, tmp_path,
                                                                                         monkeypatch, capsys):
    """A claim run spans sessions and machines: the autoencoder and judges committed under bench/instruments are
    copied into a new run folder instead of trained (its records carry that instrument's id), and a run folder
    built with another instrument is refused."""
    import json

    import torch

    import anatomy
    import anatomy_v2 as av2

    phash = json.load(open(os.path.join(quick_run, "run.json")))["protocol_hash"]
    root = tmp_path / "instruments"
    quick = av2.PRESETS_V2["quick"]
    target = av2.save_instrument(quick_run, "quick", quick, phash, root=str(root))
    with pytest.raises(ValueError, match="is never replaced"):
        av2.save_instrument(quick_run, "quick", quick, phash, root=str(root))
    judge = os.path.join(target, "judge_A.pt")  # another instrument than the one a quick run builds
    state = torch.load(judge, weights_only=True)
    first = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][first] = state["state_dict"][first] + 1e-3
    torch.save(state, judge)
    record_path = os.path.join(target, av2.INSTRUMENT_RECORD)
    record = json.load(open(record_path))
    record["setup_id"] = av2.setup_identity(target, os.path.join(target, "autoencoder.ckpt"))
    json.dump(record, open(record_path, "w"))
    monkeypatch.setattr(av2, "INSTRUMENTS", str(root))
    new = str(tmp_path / "new")
    args = ["--quick", "--no-progress", "--threads", "1", "--arms", "plain", "--seeds", "0"]
    assert anatomy.main(["-o", new, *args]) == 0
    adopted, _ = rec.read_record(os.path.join(new, "records", "plain_seed0.json"))
    built, _ = rec.read_record(os.path.join(quick_run, "records", "plain_seed0.json"))
    assert adopted["setup_id"] == record["setup_id"] != built["setup_id"]
    for f in av2.INSTRUMENT_FILES:  # copied, not trained
        assert open(os.path.join(new, "setup", f), "rb").read() == open(os.path.join(target, f), "rb").read()
    capsys.readouterr()
    assert anatomy.main(["-o", quick_run, *args]) == 2  # built with its own instrument: refused ...
    assert f"not the committed {record['setup_id']}" in capsys.readouterr().err
    assert anatomy.main(["-o", quick_run, *args, "--new-instrument"]) == 0  # ... unless asked to keep it
    import dataclasses

    with pytest.raises(ValueError, match="built with other preset settings"):  # the preset now builds another one
        av2.adopt_instrument(str(tmp_path / "other"), target, dataclasses.replace(quick, ae_steps=quick.ae_steps + 1))


def test_a_claim_report_is_a_claim_only_when_every_arm_has_the_decided_seeds():
    import anatomy_v2_report as report

    seeds = list(report.DECIDED_CLAIM_SEEDS)
    base = {"protocol": {"arms": ["plain", "matched", "anatomical"]}, "claim": True, "mixed_claim": False,
            "setups": {"da1b59efe1a61e1f": {}}, "seeds": {a: seeds for a in ("plain", "matched", "anatomical")}}
    assert report.claim_status(base) == "**claim run** (the protocol's claim seeds)"
    partial = {**base, "seeds": {"plain": seeds[:2], "matched": seeds[:1]}}
    status = report.claim_status(partial)
    assert status.startswith("**partial claim run: not a claim")
    assert "plain [7303, 7304, 7305]" in status and "anatomical [7301, 7302, 7303, 7304, 7305]" in status
    assert "several instruments" in report.claim_status({**base, "setups": {"a": {}, "b": {}}})
    assert "not a claim" in report.claim_status({**base, "mixed_claim": True})
    assert "development run" in report.claim_status({**base, "claim": False})
