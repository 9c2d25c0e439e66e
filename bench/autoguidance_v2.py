#!/usr/bin/env python
"""Autoguidance on trained benchmark-v2 models (issue 29): each model guided by its own quarter-way checkpoint
(Karras et al. 2024), against unguided DDIM, judged by benchmark v2's judge at the seed level.

    python bench/autoguidance_v2.py --run bench/out/v2_cpu --arms plain,lean --seeds 0,1,2 \\
        -o bench/autoguidance_v2_cpu_dev          # the CPU development run
    python bench/autoguidance_v2.py -o /tmp/q --quick     # untrained toy models (tests/test_autoguidance_bench.py)
    python bench/autoguidance_v2.py --claim --run bench/out/v2_cpu -o bench/autoguidance_v2_cpu_claim
                                                          # addendum 1 (bench/PROTOCOL_AUTOGUIDANCE.md) on the claim run

For every (arm, training seed) of a benchmark-v2 run folder (``--run``: its ``setup/`` judge A and autoencoder,
``arms/<arm>/seed<s>/step<steps>.ckpt`` and the quarter checkpoint ``step<steps/4>.ckpt``, which the benchmark keeps
for its learning curve) the final model is guided by the quarter checkpoint (both with their EMA weights).

1. **Tuning** (``--tune-noise-seed``, default the protocol's development noise seed + 1, never the claim noise seed):
   for each sampler of the protocol (DDIM 25 steps, eta 0 and eta 1) and each weight of ``--weights``, ``--n-tune``
   samples per model; per arm and sampler the weight with the highest mean pass rate over the training seeds is
   chosen.
2. **Evaluation** (the protocol's development noise seed, the benchmark's start noises): per arm and sampler,
   unguided DDIM at the protocol's steps (the reference, as the benchmark samples), autoguided at the chosen weight
   at the same steps (**equal steps**: twice the model evaluations), and autoguided at half the steps (**equal
   evaluations**, up to the grid's rounding: the table gives the evaluations per sample).

``--claim`` runs the pre-registered addendum instead (``bench/PROTOCOL_AUTOGUIDANCE.md``): no tuning (its fixed
weights), its claim seeds and the base protocol's claim noise, on the claim run's final and quarter checkpoints; one
record per (arm, training seed) into ``bench/records/v2_cpu_claim_autoguidance/`` as each model is done (models not
trained in the run folder yet are skipped, kept records are not redone), and once every model is in the report of
every record: the four primary tests with Holm and the secondary ones (``--partial-report``: before, marked
partial).

Measure: benchmark v2's primary measure (judge A's masks checked by the phantom-v2 rules at the primary minimum
size), one number per (arm, training seed, setting). Seed-level paired differences against the reference, Holm over
one arm's comparisons. Development seeds: a hypothesis, not a claim (a claim needs ``bench/anatomy.py --claim``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import trained_v2 as tv2  # noqa: E402

DEFAULT_WEIGHTS = (1.5, 2.0, 3.0, 4.0, 6.0)


def _evals(sampler_steps: int, alphas_cumprod: Any) -> int:
    """Model evaluations per sample of unguided DDIM at ``sampler_steps`` (one per step of the timestep grid)."""
    from ldm.models.diffusion.samplers import sampler_timesteps

    return int(len(sampler_timesteps("ddim", sampler_steps, alphas_cumprod))) - 1


MEASURES = ("recall", "coverage", "presence_tv", "ms_ssim")  # beside the pass rate, in the evaluation


def pass_rate(model: torch.nn.Module, judge: torch.nn.Module, n: int, noise_seed: int, min_frac: float,
              steps: int, eta: float, guide: Optional[torch.nn.Module], weight: float,
              real_seg: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """``{"plausible": bool [n], "pass_rate", "seconds_per_sample", "evals_per_sample"}`` of one setting; with
    ``real_seg`` (judge A's masks of the real test slices) also the guidance's price in diversity: ``recall`` and
    ``coverage`` of the samples' mask descriptors against the real ones, the presence-pattern ``presence_tv``
    (lower: closer) and the mean ``ms_ssim`` between sample pairs (lower: more diverse)."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.evaluation.descriptors import anatomy_measures
    from ldm.evaluation.diversity import ms_ssim_diversity
    from ldm.evaluation.segmenter import segment
    from ldm.models.diffusion.autoguidance import Autoguidance

    steer = None if guide is None or weight == 1.0 else Autoguidance(model, guide, weight, guide_ema=False)
    t0 = time.perf_counter()
    drawn = am.draw_samples(model, n, steps, noise_seed, 100, None, False, sampler="ddim", eta=eta,
                            autoguidance=steer)
    seconds = time.perf_counter() - t0
    seg = segment(judge, drawn["image"], batch_size=128)
    plausible = np.asarray(av2.judge_masks(seg, min_frac)["plausible"], dtype=bool)
    evals = _evals(steps, model.alphas_cumprod) * (1 if steer is None else 2)
    out = {"plausible": plausible, "pass_rate": float(plausible.mean()), "seconds_per_sample": seconds / n,
           "evals_per_sample": evals}
    if real_seg is not None:
        measures = anatomy_measures(real_seg.numpy(), seg.numpy(), av2.NUM_CLASSES)
        prdc = measures["prdc"] or {}
        out.update(recall=prdc.get("recall"), coverage=prdc.get("coverage"),
                   presence_tv=measures["presence"]["tv"],
                   ms_ssim=ms_ssim_diversity(drawn["image"], num_pairs=300)["ms_ssim"])
    return out


def tune(models: dict[str, dict[int, tuple]], judge: torch.nn.Module, samplers: dict[str, float], weights: list[float],
         n: int, noise_seed: int, min_frac: float, steps: int) -> dict[str, dict[str, Any]]:
    """Per arm and sampler: the mean pass rate over seeds of every weight on the tuning noise and the chosen one."""
    out: dict[str, dict[str, Any]] = {}
    for arm, seeds in models.items():
        for name, eta in samplers.items():
            rates = {w: [pass_rate(m, judge, n, noise_seed, min_frac, steps, eta, g, w)["pass_rate"]
                         for m, g in seeds.values()] for w in weights}
            means = {w: float(np.mean(r)) for w, r in rates.items()}
            best = max(weights, key=lambda w: (means[w], -w))  # ties: the smaller weight
            out.setdefault(arm, {})[name] = {"mean_pass_rate": {f"{w:g}": means[w] for w in weights},
                                             "per_seed": {f"{w:g}": rates[w] for w in weights}, "chosen": best}
            print(f"tune {arm} {name}: " + ", ".join(f"w {w:g} {100 * means[w]:.1f} %" for w in weights)
                  + f" -> w {best:g}", flush=True)
    return out


def summarise(per_seed: dict[str, dict[int, dict[str, Any]]], settings: list[str], reference: str) -> dict[str, Any]:
    """Per arm: mean pass rate (t interval over seeds) per setting and paired differences to its sampler's reference
    (Holm over the arm's comparisons)."""
    from anatomy_stats import holm, mean_interval, seed_paired_test

    arms = {}
    for arm, seeds in per_seed.items():
        order = sorted(seeds)
        rates = {s: [seeds[k][s]["pass_rate"] for k in order] for s in settings}
        tests = {}
        for s in settings:
            ref = f"{s.split(':')[0]}:{reference}"
            if s != ref:
                tests[s] = {**seed_paired_test(rates[s], rates[ref]), "reference": ref}
        p_adj = holm({s: t["p"] for s, t in tests.items()})
        for s, t in tests.items():
            t["p_holm"] = p_adj[s]
        arms[arm] = {"seeds": order, "pass_rate": {s: mean_interval(rates[s]) for s in settings},
                     "per_seed": rates, "vs_reference": tests,
                     "measures": {s: {m: mean_interval([seeds[k][s].get(m) for k in order]) for m in MEASURES}
                                  for s in settings}}
    return arms


def markdown(report: dict[str, Any]) -> str:
    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"# Autoguidance on trained benchmark-v2 models ({report['mode']}, not a claim)", "",
             f"Run `{report['run']}`, preset {report['preset']}; each final model guided by its own step-"
             f"{report['guide_step']} checkpoint (EMA weights). Weights tuned on noise seed "
             f"{report['tune_noise_seed']} "
             f"({report['n_tune']} samples per model and weight, from {report['weights']}); evaluated on noise seed "
             f"{report['noise_seed']} ({report['n']} samples per model). Judge A at the primary minimum size; "
             f"{report['device']}.", "",
             "| arm | setting | weight | evals/sample | pass rate % (mean over seeds [95 % t]) | per seed "
             "| minus unguided (points [95 %], p Holm) | recall / coverage / presence TV / MS-SSIM (means) "
             "| s/sample |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in report["arms"].items():
        for s in report["settings"]:
            iv = a["pass_rate"][s]
            cell = pct(iv["mean"]) + (f" [{pct(iv['lo'])}, {pct(iv['hi'])}]" if iv.get("lo") is not None else "")
            test = a["vs_reference"].get(s)
            diff = "-" if test is None else (f"{100 * test['diff']:+.1f}" + (
                f" [{100 * test['lo']:+.1f}, {100 * test['hi']:+.1f}], p {test['p_holm']:.3f}"
                if test.get("lo") is not None and test.get("p_holm") is not None else ""))
            raw = [report["raw"][arm][str(k)][s] for k in a["seeds"]]
            means = " / ".join("-" if a["measures"][s][m]["mean"] is None else f"{a['measures'][s][m]['mean']:.3f}"
                               for m in MEASURES)
            lines.append(f"| {arm} | {s} | {raw[0]['weight']:g} | {raw[0]['evals_per_sample']} | {cell} | "
                         f"{', '.join(pct(v) for v in a['per_seed'][s])} | {diff} | {means} | "
                         f"{np.mean([r['seconds_per_sample'] for r in raw]):.3f} |")
    return "\n".join(lines) + "\n"


def _load(args: argparse.Namespace, arms: list[str], seeds: list[int], device: torch.device
          ) -> tuple[str, Any, torch.nn.Module, dict[str, dict[int, tuple]], int]:
    """``(preset name, preset, judge, {arm: {seed: (model, guide)}}, guide step)``."""
    import anatomy_v2 as av2

    if args.quick:
        preset = av2.PRESETS_V2["quick"]
        models = {arm: {seed: (tv2.toy_model(arm, 100 * seed, device, perturb=0.02),
                               tv2.with_guide_ema(tv2.toy_model(arm, 100 * seed + 1, device, perturb=0.02)))
                        for seed in seeds} for arm in arms}
        return "quick", preset, tv2.toy_judge(device), models, preset.steps // 4
    setup = tv2.run_setup(args.run, device)
    preset = setup["preset"]
    guide_step = tv2.guide_step(preset)
    models = {arm: {seed: (tv2.trained_model(args.run, setup, arm, seed, preset.steps, device),
                           tv2.with_guide_ema(tv2.trained_model(args.run, setup, arm, seed, guide_step, device)))
                    for seed in seeds} for arm in arms}
    return setup["preset_name"], preset, setup["judge"], models, guide_step


# ------------------------------------------------------------------------------------ the pre-registered claim
ADDENDUM_PATH = os.path.join(HERE, "PROTOCOL_AUTOGUIDANCE.md")
CLAIM_RECORDS = os.path.join(HERE, "records", "v2_cpu_claim_autoguidance")
ADDENDUM_KEYS = ("addendum", "version", "base_protocol_hash", "arms", "training_seeds", "noise_seed", "samples",
                 "weights", "settings", "primary")


def load_addendum(path: str = ADDENDUM_PATH) -> dict[str, Any]:
    """The autoguidance addendum's JSON block (``bench/PROTOCOL_AUTOGUIDANCE.md``), checked."""
    import records as rec

    addendum = rec.json_block(path, "addendum")
    missing = [k for k in ADDENDUM_KEYS if k not in addendum]
    if missing:
        raise ValueError(f"{path}: the addendum lacks {missing}")
    return addendum


def claim_settings(addendum: dict[str, Any], quick_steps: Optional[int] = None) -> dict[str, tuple[int, bool]]:
    """``{setting: (sampler steps, guided)}``; at the quick preset the steps scale to its ``quick_steps``."""
    full = max(s["steps"] for s in addendum["settings"].values())
    out = {}
    for name, s in addendum["settings"].items():
        steps = s["steps"] if quick_steps is None else max(1, round(s["steps"] * quick_steps / full))
        out[name] = (int(steps), bool(s["guided"]))
    return out


def claim_record(model: torch.nn.Module, guide: torch.nn.Module, judge: torch.nn.Module, n: int, noise_seed: int,
                 min_frac: float, samplers: dict[str, float], weights: dict[str, float],
                 settings: dict[str, tuple[int, bool]], real_seg: torch.Tensor) -> dict[str, Any]:
    """Every (sampler, setting) of one model: its pass rate, per-sample verdicts, evaluations and measures."""
    out = {}
    for sampler, eta in samplers.items():
        for name, (steps, guided) in settings.items():
            weight = float(weights[sampler]) if guided else 1.0
            r = pass_rate(model, judge, n, noise_seed, min_frac, steps, eta, guide if guided else None, weight,
                          real_seg)
            out[f"{sampler}:{name}"] = {**{k: v for k, v in r.items() if k != "plausible"},
                                        "plausible": [int(v) for v in r["plausible"]], "weight": weight,
                                        "sampler_steps": steps, "eta": eta}
    return out


def v1_pass_rate(run: str, arm: str, seed: int, sampler: str) -> Optional[float]:
    """The claim record's own pass rate of the final model under ``sampler`` (``None`` without that record)."""
    import json

    path = os.path.join(run, "records", f"{arm}_seed{seed}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return float(json.load(f)["evals"][f"steps/{sampler}"]["judges"]["A"]["primary"]["pass_rate"])


def claim_report(records: list[dict[str, Any]], addendum: dict[str, Any]) -> dict[str, Any]:
    """Per arm and setting the mean pass rate over seeds; the primary contrasts (Holm over the 4) and the secondary
    ones, each over the training seeds both of its arms have."""
    from anatomy_stats import holm, mean_interval, seed_paired_test

    rates: dict[str, dict[int, dict[str, float]]] = {}
    for r in records:
        rates.setdefault(r["arm"], {})[r["training_seed"]] = {k: v["pass_rate"] for k, v in r["results"].items()}
    keys = sorted({k for r in records for k in r["results"]})
    arms = {arm: {"seeds": sorted(by_seed), "pass_rate": {k: mean_interval([by_seed[s][k] for s in sorted(by_seed)])
                                                          for k in keys}}
            for arm, by_seed in rates.items()}

    def contrast(a: str, b: str, sampler: str) -> dict[str, Any]:
        (arm_a, set_a), (arm_b, set_b) = a.split(":"), b.split(":")
        seeds = sorted(set(rates.get(arm_a, {})) & set(rates.get(arm_b, {})))
        x = [rates[arm_a][s][f"{sampler}:{set_a}"] for s in seeds]
        y = [rates[arm_b][s][f"{sampler}:{set_b}"] for s in seeds]
        return {"a": a, "b": b, "sampler": sampler, "seeds": seeds, **seed_paired_test(x, y)}

    primary = {f"{a} - {b} ({s})": contrast(a, b, s) for a, b in addendum["primary"]["contrasts"]
               for s in addendum["primary"]["samplers"]}
    for name, p in holm({k: v["p"] for k, v in primary.items()}).items():
        primary[name]["p_holm"] = p
    secondary_pairs = [("anatomical:auto_equal_evals", "plain:auto_equal_evals"),
                       ("matched:auto_equal_evals", "matched:unguided"),
                       ("anatomical:auto_equal_evals", "anatomical:unguided"),
                       ("anatomical:auto_equal_steps", "matched:auto_equal_steps"),
                       ("plain:auto_equal_steps", "plain:unguided")]
    secondary = {f"{a} - {b} ({s})": contrast(a, b, s) for a, b in secondary_pairs
                 for s in addendum["primary"]["samplers"]}
    complete = sorted(set.intersection(*(set(rates.get(a, {})) for a in addendum["arms"]))) if rates else []
    return {"arms": arms, "primary": primary, "secondary": secondary, "complete_seeds": complete,
            "is_claim": complete == sorted(addendum["training_seeds"])}


def claim_markdown(report: dict[str, Any], addendum: dict[str, Any], mode: str) -> str:
    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    n_all = len(addendum["training_seeds"])
    status = ("the pre-registered claim: every seed is in" if report["is_claim"] else
              f"partial: {len(report['complete_seeds'])} of {n_all} training seeds have every arm; not a claim until "
              "all are in")
    lines = [f"# Autoguidance on the claim models: addendum 1 ({mode}; {status})", "",
             f"Addendum `bench/PROTOCOL_AUTOGUIDANCE.md` (hash {report['addendum_hash']}), base protocol "
             f"{addendum['base_protocol_hash']}; weights {addendum['weights']} (fixed, not tuned); noise seed "
             f"{addendum['noise_seed']}, {report['n']} samples per model and setting; judge A at the primary minimum "
             "size.", "", "| arm | seeds | " + " | ".join(report["settings"]) + " |",
             "|---|---|" + "---|" * len(report["settings"])]
    for arm, a in report["arms"].items():
        cells = [pct(a["pass_rate"].get(k, {}).get("mean")) for k in report["settings"]]
        lines.append(f"| {arm} | {', '.join(map(str, a['seeds']))} | " + " | ".join(cells) + " |")
    for title, table, holm_col in (("Primary contrasts (Holm over these 4)", report["primary"], True),
                                   ("Secondary contrasts (not corrected; labelled as such)", report["secondary"],
                                    False)):
        lines += ["", f"{title}: seed-level paired differences, points [95 % t]:", "",
                  "| contrast | seeds | difference | p" + (" (Holm)" if holm_col else "") + " |", "|---|---|---|---|"]
        for name, t in table.items():
            diff = "-" if t.get("diff") is None else f"{100 * t['diff']:+.1f}" + (
                f" [{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}]" if t.get("lo") is not None else "")
            p = t.get("p_holm") if holm_col else t.get("p")
            lines.append(f"| {name} | {len(t['seeds'])} | {diff} | {'-' if p is None else f'{p:.4f}'} |")
    return "\n".join(lines) + "\n"


def run_claim(args: argparse.Namespace, device: torch.device) -> int:
    """``--claim``: the addendum's models (every arm and seed this run folder holds, or ``--arms``/``--seeds`` of
    them), one record each into ``--records`` (kept ones are skipped), then the report of all records there."""
    import json

    import anatomy_v2 as av2
    import records as rec
    from anatomy import _device_name
    from ldm.atomic_io import write_json
    from ldm.evaluation.segmenter import segment

    protocol = rec.load_protocol()
    addendum = load_addendum()
    ahash = rec.canonical_hash(addendum)
    arms = addendum["arms"] if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
    seeds = addendum["training_seeds"] if args.seeds is None else av2._seed_list(args.seeds)
    records_dir = os.path.join(args.out, "records") if args.quick else (args.records or CLAIM_RECORDS)
    try:
        if set(arms) - set(addendum["arms"]) or set(seeds) - set(addendum["training_seeds"]):
            raise ValueError(f"--claim runs the addendum's arms {addendum['arms']} and training seeds "
                             f"{addendum['training_seeds']} only")
        if int(addendum["noise_seed"]) != int(protocol["claim_noise_seed"]):
            raise ValueError("the addendum's noise seed is not the base protocol's claim noise seed")
        if not args.quick:
            run_json = os.path.join(args.run, "run.json")
            if not os.path.isfile(run_json):
                raise ValueError(f"{args.run} holds no run.json (not a benchmark-v2 run folder)")
            with open(run_json) as f:
                found = json.load(f).get("protocol_hash")
            if found != addendum["base_protocol_hash"]:
                raise ValueError(f"{args.run} is a run of protocol {found}; the addendum is for "
                                 f"{addendum['base_protocol_hash']}")
    except ValueError as err:
        print(f"autoguidance_v2.py: error: {err}", file=sys.stderr)
        return 2
    study = tv2.study_setup(args.run, args.quick, device)
    preset, judge = study["preset"], study["judge"]
    n = 4 if args.quick else int(addendum["samples"])
    settings = claim_settings(addendum, preset.sampler_steps if args.quick else None)
    samplers = {s: float(protocol["samplers"][s]["eta"]) for s in addendum["primary"]["samplers"]}
    min_frac = av2.min_sizes(protocol)["primary"]
    real_seg = segment(judge, torch.as_tensor(av2.split(preset, "test")["image"]).float(), batch_size=128)
    os.makedirs(records_dir, exist_ok=True)
    for arm in arms:
        for seed in seeds[:2] if args.quick else seeds:
            path = os.path.join(records_dir, f"{arm}_seed{seed}.json")
            if os.path.isfile(path):
                continue
            try:
                if args.quick:
                    model = tv2.toy_model(arm, seed, device, perturb=0.02)
                    guide = tv2.with_guide_ema(tv2.toy_model(arm, seed + 1, device, perturb=0.02))
                else:
                    model = tv2.trained_model(args.run, study["setup"], arm, seed, preset.steps, device)
                    guide = tv2.with_guide_ema(tv2.trained_model(args.run, study["setup"], arm, seed,
                                                                 tv2.guide_step(preset), device))
            except FileNotFoundError as err:
                print(f"{arm} seed {seed}: skipped, not trained in {args.run} ({err})", flush=True)
                continue
            t0 = time.perf_counter()
            results = claim_record(model, guide, judge, n, int(addendum["noise_seed"]), min_frac, samplers,
                                   addendum["weights"], settings, real_seg)
            reference = {s: None if args.quick else v1_pass_rate(args.run, arm, seed, s) for s in samplers}
            write_json(path, {"format": "anatomy-autoguidance-claim/1", "addendum_hash": ahash, "arm": arm,
                              "training_seed": seed, "quick": bool(args.quick), "preset": study["preset_name"],
                              "n": n, "results": results, "claim_record_pass_rate": reference,
                              "unguided_minus_claim_record": {
                                  s: None if reference[s] is None else
                                  results[f"{s}:unguided"]["pass_rate"] - reference[s] for s in samplers},
                              "device": _device_name(device), "code": rec.code_commit(),
                              "seconds": time.perf_counter() - t0,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {100 * v['pass_rate']:.1f} %" for k, v in results.items())
                  + f" -> {path}", flush=True)
    kept = []
    for name in sorted(os.listdir(records_dir)):
        if name.endswith(".json"):
            with open(os.path.join(records_dir, name)) as f:
                record = json.load(f)
            if record.get("addendum_hash") != ahash:
                print(f"autoguidance_v2.py: error: {name} was made under another addendum ({record.get('addendum_hash')}"
                      f", this one is {ahash}); keep records of one addendum in one folder", file=sys.stderr)
                return 2
            kept.append(record)
    if not kept:
        print("autoguidance_v2.py: no record yet (no arm of the addendum is trained in the run folder)")
        return 0
    report = {"addendum_hash": ahash, "mode": "quick" if args.quick else "claim", "n": n,
              "settings": [f"{s}:{k}" for s in samplers for k in settings], "records": records_dir,
              **claim_report(kept, addendum)}
    if not (report["is_claim"] or args.quick or args.partial_report):  # nobody reads a claim before its end
        print(f"autoguidance_v2.py: {len(kept)} of {len(addendum['arms']) * len(addendum['training_seeds'])} models "
              f"recorded in {records_dir}; the report is written when all are in (--partial-report: now)")
        return 0
    tv2.write_study(args.out, "autoguidance_claim", report, claim_markdown(report, addendum, report["mode"]))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tv2.add_run_arguments(p, None, None, "untrained toy models at the quick preset, 4 samples, 2 seeds")
    p.add_argument("--arms", default=None, help="comma-separated arms (default plain,lean; with --claim the addendum's)")
    p.add_argument("--n", type=int, default=300, help="samples per model and setting (evaluation)")
    p.add_argument("--n-tune", "--n_tune", dest="n_tune", type=int, default=150,
                   help="samples per model and weight (tuning)")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
                   help="comma-separated autoguidance weights to tune over (> 1)")
    p.add_argument("--tune-noise-seed", "--tune_noise_seed", dest="tune_noise_seed", type=int, default=None,
                   help="start-noise seed of the tuning (default: the protocol's development noise seed + 1)")
    p.add_argument("--claim", action="store_true",
                   help="the pre-registered addendum (bench/PROTOCOL_AUTOGUIDANCE.md): its fixed weights, claim seeds "
                        "and claim noise on the run's claim models, no tuning; one record per arm and seed into "
                        "--records, then the report of every record there")
    p.add_argument("--partial-report", "--partial_report", dest="partial_report", action="store_true",
                   help="with --claim: write the report before every model of the addendum is in (marked partial)")
    p.add_argument("--records", default=None,
                   help=f"with --claim: the records folder (default {os.path.relpath(CLAIM_RECORDS, os.path.dirname(HERE))})")
    args = p.parse_args(argv)
    import anatomy_v2 as av2
    import records as rec
    from anatomy import _device_name

    if args.claim:
        return run_claim(args, tv2.study_device(args.device))
    args.arms = "plain,lean" if args.arms is None else args.arms
    args.seeds = "0,1,2" if args.seeds is None else args.seeds
    protocol = rec.load_protocol()
    try:
        seeds = av2._seed_list(args.seeds)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        weights = [float(w) for w in args.weights.split(",") if w.strip()]
        unknown = [a for a in arms if a not in av2.ARMS_V2]
        tune_seed = int(protocol["dev_noise_seed"]) + 1 if args.tune_noise_seed is None else args.tune_noise_seed
        if unknown or not weights or any(not np.isfinite(w) or w <= 1 for w in weights) or min(args.n, args.n_tune) < 1:
            raise ValueError(f"unknown arms {unknown}, or a weight not > 1 in {args.weights}, or --n/--n-tune < 1")
        if tune_seed in (int(protocol["claim_noise_seed"]), int(protocol["dev_noise_seed"])):
            raise ValueError(f"--tune-noise-seed {tune_seed} is the protocol's claim or evaluation noise seed")
    except ValueError as err:
        print(f"autoguidance_v2.py: error: {err}", file=sys.stderr)
        return 2
    device = tv2.study_device(args.device)
    noise_seed = int(protocol["dev_noise_seed"])
    min_frac = av2.min_sizes(protocol)["primary"]
    samplers = {"ddim": float(protocol["samplers"]["ddim"]["eta"]),
                "ddim_eta1": float(protocol["samplers"]["ddim_eta1"]["eta"])}
    try:
        preset_name, preset, judge, models, guide_step = _load(args, arms, seeds if not args.quick else seeds[:2],
                                                               device)
    except FileNotFoundError as err:
        print(f"autoguidance_v2.py: error: {err}", file=sys.stderr)
        return 2
    steps = int(preset.sampler_steps or protocol["samplers"]["ddim"]["steps"])
    n, n_tune = (4, 4) if args.quick else (args.n, args.n_tune)
    tuned = tune(models, judge, samplers, weights, n_tune, tune_seed, min_frac, steps)
    from ldm.evaluation.segmenter import segment

    real_seg = segment(judge, torch.as_tensor(av2.split(preset, "test")["image"]).float(), batch_size=128)
    half = max(1, steps // 2)
    settings = [f"{s}:{label}" for s in samplers for label in ("unguided", "auto_equal_steps", "auto_equal_evals")]
    raw: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for arm, pairs in models.items():
        for seed, (model, guide) in pairs.items():
            res = {}
            for s, eta in samplers.items():
                w = tuned[arm][s]["chosen"]
                for label, (k, weight) in {"unguided": (steps, 1.0), "auto_equal_steps": (steps, w),
                                           "auto_equal_evals": (half, w)}.items():
                    r = pass_rate(model, judge, n, noise_seed, min_frac, k, eta, guide, weight, real_seg)
                    res[f"{s}:{label}"] = {**r, "weight": weight, "sampler_steps": k, "eta": eta}
            per_seed.setdefault(arm, {})[seed] = res
            raw.setdefault(arm, {})[str(seed)] = {s: {k: v for k, v in r.items() if k != "plausible"}
                                                  for s, r in res.items()}
            print(f"{arm} seed {seed}: " + ", ".join(f"{s} {100 * r['pass_rate']:.1f} %" for s, r in res.items()),
                  flush=True)
    report = {"mode": "quick" if args.quick else "development", "claim": False, "preset": preset_name,
              "run": tv2.run_label(args.run, args.quick),
              "n": n, "n_tune": n_tune, "weights": weights, "noise_seed": noise_seed, "tune_noise_seed": tune_seed,
              "guide_step": guide_step, "sampler_steps": steps, "min_area_frac": min_frac,
              "device": _device_name(device), "settings": settings, "tuning": tuned,
              "arms": summarise(per_seed, settings, "unguided"), "raw": raw, "code": rec.code_commit()}
    tv2.write_study(args.out, "autoguidance", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
