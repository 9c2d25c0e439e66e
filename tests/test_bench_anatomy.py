"""The anatomy benchmark: its statistics against known values, and ``bench/anatomy.py --quick`` end to end."""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import anatomy_models as am  # noqa: E402
from anatomy_stats import mcnemar, mean_interval, paired_bootstrap, wilson  # noqa: E402
from ldm.evaluation.segmenter import load_segmenter  # noqa: E402


def test_wilson_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 32)[0] == 0.0 and wilson(0, 32)[1] == pytest.approx(0.1072, abs=1e-4)
    # the demo's 28/32: the interval the benchmark issue quotes
    lo, hi = wilson(28, 32)
    assert (round(lo, 2), round(hi, 2)) == (0.72, 0.95)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_mcnemar_exact():
    a = np.array([True] * 10 + [False] * 5)
    b = np.array([False] * 10 + [False] * 5)
    out = mcnemar(a, b)
    assert (out["a_only"], out["b_only"]) == (10, 0)
    assert out["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError):
        mcnemar(a, b[:3])


def test_paired_bootstrap_covers_and_pairs():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=(3, 400)) < 0.6
    same = paired_bootstrap(base, base, reps=300)
    assert same == (0.0, (0.0, 0.0))  # paired: identical outcomes give a zero-width interval
    better = base | (rng.uniform(size=base.shape) < 0.5)
    diff, (lo, hi) = paired_bootstrap(better, base, reps=500)
    assert diff == pytest.approx(better.mean() - base.mean())
    assert 0 < lo < diff < hi
    with pytest.raises(ValueError):
        paired_bootstrap(base, base[:, :10])


def test_mean_interval_t():
    out = mean_interval([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["hi"] - 2.0 == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)
    assert mean_interval([None, 0.5])["lo"] is None


def test_stream_sampler_same_order_and_resume():
    full = list(am.StreamSampler(10, 35, seed=3))
    assert full == list(am.StreamSampler(10, 35, seed=3))
    assert sorted(full[:10]) == list(range(10))  # each pass is a permutation
    assert list(am.StreamSampler(10, 35, seed=3, start=17)) == full[17:]
    assert full != list(am.StreamSampler(10, 35, seed=4))


def test_derangement_moves_every_mask():
    perm = am.derangement(50, seed=1)
    assert sorted(perm.tolist()) == list(range(50))
    assert not torch.any(perm == torch.arange(50))


def test_arms_follow_the_shipped_configs():
    preset = am.PRESETS["cpu"]
    base = am.arm_config("baseline", preset, "ae.ckpt", 0.5)
    anat = am.arm_config("anatomical", preset, "ae.ckpt", 0.5)
    bp, ap = base["params"], anat["params"]
    assert bp["scale_by_std"] and ap["scale_by_std"] and bp["scale_factor"] == ap["scale_factor"] == 0.5
    assert ap["unet_config"]["target"].endswith("AnatomicalUNetModel")
    assert ap["anatomical_warmup_steps"] == 100  # 10 % of the preset's 1000 steps
    # everything but the anatomical additions is identical
    shared = {k: v for k, v in ap["unet_config"]["params"].items() if k in bp["unet_config"]["params"]}
    assert shared == bp["unet_config"]["params"]
    assert am.arm_config("registers_no_loss", preset, "a", 1.0)["params"]["anatomical_loss_weight"] == 0.0
    with pytest.raises(ValueError, match="unknown arm"):
        am.arm_config("nope", preset, "a", 1.0)


def _run(out: str, *extra: str) -> int:
    """``bench/anatomy.py -o OUT --quick ...`` in this process (saves the start-up of three interpreters)."""
    import anatomy

    return anatomy.main(["--phantom", "v1", "-o", out, "--quick", "--no-progress", *extra])


@pytest.mark.slow(70)
def test_quick_benchmark_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _run(out) == 0
    with open(os.path.join(out, "anatomy.json")) as f:
        result = json.load(f)
    cal = result["calibration"]
    assert cal["true_mask_pass_rate"] == 1.0  # every phantom slice passes its own rules
    assert set(cal) >= {"real_pass_rate", "reconstructed_pass_rate", "segmenter_dice"}
    arms = result["arms"]
    assert set(arms) == {"baseline", "anatomical"}
    preset = am.PRESETS["quick"]
    for name, arm in arms.items():
        assert arm["n_samples"] == preset.samples and arm["seeds"] == list(range(preset.seeds))
        assert arm["ci95"][0] <= arm["pass_rate"] <= arm["ci95"][1]
        assert set(arm["rules"]) >= {"spine_present", "co_occurrence_ok"}
        assert arm["train_seconds"] > 0 and np.isfinite(arm["fid"])
        assert list(arm["curve"]) == [str(preset.steps // 2), str(preset.steps)]
    assert arms["baseline"]["own_mask_dice"] is None and arms["baseline"]["tstr_dice"] is None
    assert 0.0 <= arms["anatomical"]["own_mask_dice"] <= 1.0 and arms["anatomical"]["tstr_dice"] is not None
    # the head alone, on the real test slices: one Dice per seed, per class, and the rule pass rate of its masks
    real = arms["anatomical"]["own_mask_dice_real_ci95"]
    assert real["n"] == preset.seeds and 0.0 <= real["mean"] <= 1.0
    assert len(arms["anatomical"]["own_mask_dice_real_per_class"]) == am.NUM_CLASSES
    assert 0.0 <= arms["anatomical"]["own_mask_real_pass_rate"] <= 1.0
    assert arms["baseline"]["own_mask_dice_real_ci95"] is None
    # the sampled latents' spread against the real latents' (about 1 in the scaled space)
    assert 0.5 < cal["real_latent_rms"] < 2.0
    assert all(a["latent_rms"]["mean"] > 0 and a["latent_rms"]["n"] == preset.seeds for a in arms.values())
    assert "Sampled latents' spread" in open(os.path.join(out, "report.md")).read()
    kinds = {(c["a"], c["b"], c["kind"]) for c in result["comparisons"]}
    assert kinds == {("anatomical", "baseline", "equal_steps"), ("anatomical", "baseline", "equal_wall_clock")}
    for c in result["comparisons"]:
        assert c["ci95"][0] <= c["diff"] <= c["ci95"][1] and 0.0 <= c["p_value"] <= 1.0
    assert result["meta"]["seeds"] == [0, 1] and "torch" in result["meta"]
    for name in ("pass_rates.png", "curve.png", "samples.png"):
        assert os.path.getsize(os.path.join(out, "figures", name)) > 1000
    report = open(os.path.join(out, "report.md")).read()
    assert "Calibration" in report and "McNemar" in report

    # an evaluation made before the head-on-real measure existed gets it added from its checkpoint
    final_eval = os.path.join(out, "arms", "anatomical", "seed0", f"eval_step{preset.steps:06d}.json")
    with open(final_eval) as f:
        info = json.load(f)
    first = info.pop("own_dice_real")
    info.pop("own_real_pass_rate")
    with open(final_eval, "w") as f:
        json.dump(info, f)
    # ... and one made before the samples' latent spread was measured gets it by drawing the samples again
    base_eval = os.path.join(out, "arms", "baseline", "seed1", f"eval_step{preset.steps:06d}.json")
    with open(base_eval) as f:
        info = json.load(f)
    base_rms = info.pop("latent_rms")
    with open(base_eval, "w") as f:
        json.dump(info, f)

    # a second call on the same run directory reuses every checkpoint and evaluation (nothing is retrained) and
    # adds an arm: the anatomical models sampled with anatomy guidance, compared with the same models unguided
    ckpt = os.path.join(out, "arms", "anatomical", "seed1", f"step{preset.steps:06d}.ckpt")
    before = os.path.getmtime(ckpt)
    assert _run(out, "--arms", "anatomical_guided,anatomical_reencoded,joint", "--guidance", "2") == 0
    assert os.path.getmtime(ckpt) == before
    with open(os.path.join(out, "anatomy.json")) as f:
        again = json.load(f)
    assert again["arms"]["anatomical"]["pass_rate"] == arms["anatomical"]["pass_rate"]
    with open(final_eval) as f:
        assert json.load(f)["own_dice_real"] == first
    assert again["arms"]["anatomical"]["own_mask_dice_real_ci95"] == real
    with open(base_eval) as f:
        info = json.load(f)
    assert info["latent_rms"] == pytest.approx(base_rms, rel=1e-5)
    assert info["latent_rms_resampled_agreement"] == 1.0  # the same samples, judged the same
    assert again["arms"]["baseline"]["latent_rms_resampled_agreement"] == 1.0
    assert "baseline (rule outcomes reproduced for 100.0% of the samples)" in open(
        os.path.join(out, "report.md")).read()
    assert again["arms"]["anatomical_guided"]["n_samples"] == preset.samples
    assert again["meta"]["guidance_scale"] == 2.0
    assert ("anatomical_guided", "anatomical", "guidance_effect") in {(c["a"], c["b"], c["kind"])
                                                                      for c in again["comparisons"]}
    # masks from the re-encoded samples: the anatomical models' images (same start noise, same pass rate), their
    # own masks compared with the anatomical arm's on the own-mask rule pass rate
    reenc = again["arms"]["anatomical_reencoded"]
    assert reenc["pass_rate"] == arms["anatomical"]["pass_rate"] and reenc["own_mask_pass_rate"] is not None
    assert again["meta"]["configs"]["anatomical_reencoded"]["params"]["mask_from"] == "reencoded"
    assert ("anatomical_reencoded", "anatomical", "own_masks_reencoded") in {
        (c["a"], c["b"], c["kind"]) for c in again["comparisons"]}
    # the joint arm: its own masks are the generated ones, its mask autoencoder is reported
    joint = again["arms"]["joint"]
    assert joint["own_mask_pass_rate"] is not None and 0.0 <= joint["own_mask_dice"] <= 1.0
    assert again["meta"]["mask_autoencoder"]["scale_factor"] > 0
    mask_ae = again["meta"]["mask_autoencoder"]
    assert mask_ae["steps"] == preset.ae_steps  # the default: as many steps as the image autoencoder
    val = mask_ae["validation_reconstruction_dice"]  # issue 13's measure: masks of patients it never saw
    assert len(val["per_class"]) == am.NUM_CLASSES and 0.0 <= val["foreground_mean"] <= 1.0
    assert "reconstruction Dice on the validation split's masks" in open(os.path.join(out, "report.md")).read()
    assert "mask autoencoder" in open(os.path.join(out, "report.md")).read()
    # the joint arm is an ablation of the shipped method: compared with it as well as with the baseline
    assert ("joint", "anatomical", "ablation") in {(c["a"], c["b"], c["kind"]) for c in again["comparisons"]}

    # bench/anatomy_samplers.py re-samples a trained model with other samplers from the same start noise: its
    # DDIM eta-0 row at the preset's steps reproduces the benchmark's own outcomes sample by sample
    import anatomy_samplers

    n = preset.samples
    samplers = f"ddim:{preset.sampler_steps}:0,ddim:4:1,dpmpp2m:4"
    assert anatomy_samplers.main(["-o", out, "--seed", "1", "-n", str(n), "--samplers", samplers,
                                  "--batch", "7", "--no-progress"]) == 0
    table = os.path.join(out, "samplers", f"baseline_seed1_step{preset.steps:06d}")
    with open(table + ".json") as f:
        measured = json.load(f)
    stored = np.load(os.path.join(out, "arms", "baseline", "seed1", f"eval_step{preset.steps:06d}.npz"))
    rows = {r["sampler"]: r for r in measured["results"]}
    assert rows[f"ddim:{preset.sampler_steps}:0"]["outcomes"]["plausible"] == stored["seg_plausible"].tolist()
    assert np.sqrt(np.mean(np.square(rows[f"ddim:{preset.sampler_steps}:0"]["latent_rms"]))) == pytest.approx(
        info["latent_rms"], rel=1e-4)
    summary = measured["summary"]
    assert [r["sampler"] for r in summary] == samplers.split(",") and "vs_first" not in summary[0]
    for r in summary[1:]:
        v = r["vs_first"]
        assert v["interval"][0] <= v["difference"] <= v["interval"][1] and 0.0 <= v["mcnemar"]["p_value"] <= 1.0
        assert r["n"] == n and r["pass_interval"][0] <= r["pass_rate"] <= r["pass_interval"][1]
    # the stochastic sampler's samples do not depend on the batch they are in; a measured sampler is reused
    seconds = rows["ddim:4:1"]["sampling_seconds"]
    assert anatomy_samplers.main(["-o", out, "--seed", "1", "-n", str(n), "--samplers", "ddim:4:1,dpmpp2m:4",
                                  "--batch", str(n), "--no-progress"]) == 0
    with open(table + ".json") as f:
        again_rows = {r["sampler"]: r for r in json.load(f)["results"]}
    assert again_rows["ddim:4:1"]["sampling_seconds"] == seconds  # not drawn again
    assert "| ddim:4:1 |" in open(table + ".md").read()
    stochastic = anatomy_samplers.measure(anatomy_samplers.am.load_trained(
        anatomy_samplers.am.arm_config("baseline", preset, os.path.join(out, "autoencoder.ckpt"),
                                       result["meta"]["scale_factor"]),
        os.path.join(out, "arms", "baseline", "seed1", f"step{preset.steps:06d}.ckpt"), torch.device("cpu")),
        anatomy_samplers.parse_sampler("ddim:4:1"), n, n, load_segmenter(os.path.join(out, "segmenter.pt"), torch.device("cpu"))[0],
        torch.device("cpu"), False)
    assert stochastic["latent_rms"] == pytest.approx(rows["ddim:4:1"]["latent_rms"], rel=1e-5)
    capsys.readouterr()
    for bad, says in ((["--samplers", "ancestral:10"], "takes no steps"), (["--samplers", "ddim:25"], "ddim:STEPS:ETA"),
                      (["--samplers", "euler:10"], "unknown sampler"), (["--step", "3"], "no checkpoint at step 3"),
                      (["--arm", "joint", "--seed", "5"], "has not finished training")):
        assert anatomy_samplers.main(["-o", out, "--no-progress", *bad]) == 2
        assert says in capsys.readouterr().err
    assert anatomy_samplers.main(["-o", str(tmp_path / "nothing")]) == 2
    assert "run.json is missing" in capsys.readouterr().err

    # --report-only rebuilds the same report from the evaluations alone (a run copied without its weights)
    import anatomy

    for path in glob.glob(os.path.join(out, "**", "*.ckpt"), recursive=True) + [os.path.join(out, "segmenter.pt")]:
        os.remove(path)
    os.remove(os.path.join(out, "anatomy.json"))
    assert anatomy.main(["--phantom", "v1", "-o", out, "--report-only", "--note", "weights removed"]) == 0
    with open(os.path.join(out, "anatomy.json")) as f:
        rebuilt = json.load(f)
    assert list(rebuilt["arms"]) == ["baseline", "anatomical", "anatomical_guided", "anatomical_reencoded", "joint"]
    for arm in rebuilt["arms"]:
        assert rebuilt["arms"][arm]["pass_rate"] == again["arms"][arm]["pass_rate"]
    def by_pair(summary: dict) -> dict:
        return {(c["a"], c["b"], c["kind"]): c["diff"] for c in summary["comparisons"]}

    assert by_pair(rebuilt) == by_pair(again)
    assert "**Note:** weights removed" in open(os.path.join(out, "report.md")).read()
    assert anatomy.main(["--phantom", "v1", "-o", str(tmp_path / "nothing"), "--report-only"]) == 2
    assert "no benchmark run" in capsys.readouterr().err

    # other settings in the same run directory are refused, naming what differs
    assert _run(out, "--steps", "5") == 2
    err = capsys.readouterr().err
    assert "steps" in err and "other settings" in err


def test_bad_arm_is_a_clear_error(tmp_path, capsys):
    assert _run(str(tmp_path / "x"), "--arms", "baseline,nonsense") == 2
    err = capsys.readouterr().err
    assert "unknown arm" in err and "anatomical" in err


def test_exclusive_waits_for_a_live_holder_and_clears_a_stale_lock(tmp_path):
    import threading
    import time

    import anatomy

    path = str(tmp_path / "stage")
    with open(path + ".lock", "w") as f:
        f.write("999999999")  # no such process: a stale lock from a killed run
    with anatomy.exclusive(path, poll_s=0.01):
        assert open(path + ".lock").read() == str(os.getpid())
    assert not os.path.exists(path + ".lock")

    order = []

    def holder():
        with anatomy.exclusive(path, poll_s=0.01):
            order.append("holder in")
            time.sleep(0.3)
            order.append("holder out")

    t = threading.Thread(target=holder)
    t.start()
    while not order:
        time.sleep(0.01)
    with anatomy.exclusive(path, poll_s=0.01):
        order.append("second in")
    t.join()
    assert order == ["holder in", "holder out", "second in"]


@pytest.mark.slow(20)
def test_data_scarce_run_limits_only_the_diffusion_models(tmp_path, monkeypatch):
    """``--train-slices N``: the diffusion models (and the train-on-real reference and the memorisation check)
    see N slices; the autoencoder and the independent segmenter, the instrument, still see the whole split."""
    import anatomy

    seen: dict[str, list[int]] = {"ldm": [], "segmenter": [], "tstr": []}
    real_train_ldm, real_seg, real_tstr = am.train_ldm, anatomy.train_segmenter, anatomy.ev.tstr_dice

    def train_ldm(config, data, *a, **k):
        seen["ldm"].append(len(data["image"]))
        return real_train_ldm(config, data, *a, **k)

    def train_segmenter(dataset, *a, **k):
        seen["segmenter"].append(len(dataset))
        return real_seg(dataset, *a, **k)

    def tstr(images, masks, *a, **k):
        seen["tstr"].append(len(images))
        return real_tstr(images, masks, *a, **k)

    monkeypatch.setattr(am, "train_ldm", train_ldm)
    monkeypatch.setattr(anatomy, "train_segmenter", train_segmenter)
    monkeypatch.setattr(anatomy.ev, "tstr_dice", tstr)
    out = str(tmp_path / "scarce")
    assert _run(out, "--train-slices", "16", "--seeds", "1", "--samples", "8") == 0
    preset = am.PRESETS["quick"]
    assert seen["segmenter"] == [preset.train_slices]  # the independent segmenter: the whole split
    assert seen["ldm"] == [16, 16]  # baseline and anatomical, one seed each
    assert seen["tstr"] and all(n <= 16 for n in seen["tstr"])  # real reference and synthetic pairs: <= N
    with open(os.path.join(out, "anatomy.json")) as f:
        meta = json.load(f)["meta"]
    assert meta["settings"]["ldm_train_slices"] == 16 and meta["settings"]["tstr_pairs"] == 16
    assert "data-scarce run" in open(os.path.join(out, "report.md")).read()
    # more slices than the split holds is refused before any work
    assert _run(str(tmp_path / "too_many"), "--train-slices", str(preset.train_slices + 1)) == 2
    assert _run(str(tmp_path / "no_steps"), "--mask-ae-steps", "0") == 2


def test_mask_autoencoder_steps_and_validation_dice(tmp_path, monkeypatch):
    """``--mask-ae-steps``: the joint arm's mask autoencoder trains that many batches (default: the image
    autoencoder's); its reconstruction Dice on the validation split is measured, and added to a run made before."""
    import dataclasses

    import anatomy

    steps_seen = []
    real_trainer = anatomy.scripted_trainer

    def scripted_trainer(device, steps, *args, **kwargs):
        steps_seen.append(steps)
        return real_trainer(device, steps, *args, **kwargs)

    monkeypatch.setattr(anatomy, "scripted_trainer", scripted_trainer)
    preset = dataclasses.replace(am.PRESETS["quick"], mask_ae_steps=5)
    train = am.phantom_split(preset, "train")
    ckpt, scale = anatomy.train_mask_autoencoder(preset, train, str(tmp_path), torch.device("cpu"), False)
    assert steps_seen == [5] and scale > 0
    path = os.path.join(str(tmp_path), "mask_autoencoder.json")
    with open(path) as f:
        info = json.load(f)
    assert info["steps"] == 5
    val = info.pop("validation_reconstruction_dice")
    assert len(val["per_class"]) == am.NUM_CLASSES and 0.0 <= val["foreground_mean"] <= 1.0
    with open(path, "w") as f:
        json.dump(info, f)
    # a run directory made before the measure existed: the checkpoint is reused (no training) and measured
    assert anatomy.train_mask_autoencoder(preset, train, str(tmp_path), torch.device("cpu"), False) == (ckpt, scale)
    assert steps_seen == [5]
    with open(path) as f:
        again = json.load(f)["validation_reconstruction_dice"]
    assert again["per_class"] == pytest.approx(val["per_class"], abs=1e-6)
    args = anatomy.parse_args(["-o", "x", "--quick", "--mask-ae-steps", "7"])
    assert anatomy.resolve_preset(args, torch.device("cpu")).mask_ae_steps == 7
    assert anatomy.resolve_preset(anatomy.parse_args(["-o", "x", "--quick"]), torch.device("cpu")).mask_ae_steps is None
    # the shipped config's learning-rate schedule decays over the benchmark's mask-autoencoder steps
    decay = am.mask_autoencoder_config(preset)["params"]["scheduler_config"]["params"]["max_decay_steps"]
    assert decay == 5
    assert am.mask_autoencoder_config(dataclasses.replace(preset, mask_ae_steps=None, ae_steps=40)
                                      )["params"]["scheduler_config"]["params"]["max_decay_steps"] == 40
