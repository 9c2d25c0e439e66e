#!/usr/bin/env python
"""Fewer sampling steps on trained models: DPM-Solver++(2M) at 20 (and 10) steps against DDIM at 200 and at the
benchmark's 25, judged by benchmark v2's own judge at the seed level (issue 27).

    python bench/sampler_steps_v2.py --run bench/out/v2_cpu --arms plain,lean --seeds 0,1,2 --n 300 \\
        -o bench/sampler_steps_v2_cpu_dev          # the CPU development run
    python bench/sampler_steps_v2.py -o /tmp/q --quick     # untrained toy models (tests/test_lean_registers.py)

For every (arm, training seed) of a benchmark-v2 run folder (``--run``: its ``setup/`` judges and autoencoder and
``arms/<arm>/seed<s>/step<steps>.ckpt``), the same ``--n`` start noises (indices ``0..n-1`` of the protocol's
development noise seed, as the benchmark draws them) are sampled with every sampler of ``SAMPLERS`` (all
deterministic, eta 0), decoded, segmented by judge A and checked by the phantom-v2 rules at the protocol's primary
minimum size (the benchmark's ``judge_masks``). Per arm and sampler: the pass rate per seed and its mean with a t
interval over seeds; the seed-level paired difference of each sampler against DDIM-200 (``seed_paired_test``,
Holm over the comparisons of one arm); and the mean per-sample agreement of the pass/fail outcome with DDIM-200
(same noise: how often the two samplers reach the same verdict). Development seeds only: not a claim.
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

# name -> (registry sampler, steps); all eta 0 (deterministic), so the comparison is of ODE solvers
SAMPLERS: dict[str, tuple[str, int]] = {"ddim200": ("ddim", 200), "ddim25": ("ddim", 25),
                                        "dpmpp2m20": ("dpmpp2m", 20), "dpmpp2m10": ("dpmpp2m", 10)}
REFERENCE = "ddim200"


def evaluate_model(model: torch.nn.Module, judge: torch.nn.Module, n: int, noise_seed: int, min_frac: float,
                   device: torch.device, samplers: dict[str, tuple[str, int]], batch: int = 100) -> dict[str, Any]:
    """``{sampler: {"plausible": bool array [n], "pass_rate", "seconds_per_sample", "latent_rms"}}`` for one model."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import segment

    out = {}
    for name, (sampler, steps) in samplers.items():
        t0 = time.perf_counter()
        drawn = am.draw_samples(model, n, steps, noise_seed, batch, device, False, sampler=sampler, eta=0.0)
        seconds = time.perf_counter() - t0
        plausible = np.asarray(av2.judge_masks(segment(judge, drawn["image"], batch_size=128), min_frac)["plausible"],
                               dtype=bool)
        out[name] = {"plausible": plausible, "pass_rate": float(plausible.mean()), "seconds_per_sample": seconds / n,
                     "latent_rms": float(drawn["latent_rms"].pow(2).mean().sqrt())}
    return out


def summarise(per_seed: dict[str, dict[int, dict[str, Any]]], samplers: list[str]) -> dict[str, Any]:
    """Seed-level summary per arm: mean pass rate (t interval) per sampler, paired differences to the reference
    (Holm over one arm's comparisons) and per-sample verdict agreement with it."""
    from anatomy_stats import holm, mean_interval, seed_paired_test

    arms = {}
    for arm, seeds in per_seed.items():
        order = sorted(seeds)
        rates = {s: [seeds[k][s]["pass_rate"] for k in order] for s in samplers}
        tests = {s: seed_paired_test(rates[s], rates[REFERENCE]) for s in samplers if s != REFERENCE}
        p_adj = holm({s: t["p"] for s, t in tests.items()})
        for s, t in tests.items():
            t["p_holm"] = p_adj[s]
            t["agreement_with_reference"] = float(np.mean([np.mean(seeds[k][s]["plausible"] ==
                                                                    seeds[k][REFERENCE]["plausible"]) for k in order]))
        arms[arm] = {"seeds": order, "pass_rate": {s: mean_interval(rates[s]) for s in samplers},
                     "per_seed": rates, "vs_" + REFERENCE: tests}
    return arms


def markdown(report: dict[str, Any]) -> str:
    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"# Sampler steps on trained benchmark-v2 models ({report['mode']}, not a claim)", "",
             f"Run `{report['run']}`, preset {report['preset']}, {report['n']} samples per model (noise seed "
             f"{report['noise_seed']}), judge A at the primary minimum size; {report['device']}.", "",
             "| arm | sampler | pass rate % (mean over seeds [95 % t]) | per seed | minus DDIM-200 (points [95 %], p Holm) "
             "| same verdict as DDIM-200 | s/sample |", "|---|---|---|---|---|---|---|"]
    for arm, a in report["arms"].items():
        for s in report["samplers"]:
            iv = a["pass_rate"][s]
            cell = pct(iv["mean"]) + (f" [{pct(iv['lo'])}, {pct(iv['hi'])}]" if iv.get("lo") is not None else "")
            test = a["vs_" + REFERENCE].get(s)
            diff = "-" if test is None else (f"{100 * test['diff']:+.1f}" + (
                f" [{100 * test['lo']:+.1f}, {100 * test['hi']:+.1f}], p {test['p_holm']:.3f}"
                if test.get("lo") is not None and test.get("p_holm") is not None else ""))
            agree = "-" if test is None else f"{100 * test['agreement_with_reference']:.1f} %"
            secs = np.mean([report["raw"][arm][str(k)][s]["seconds_per_sample"] for k in a["seeds"]])
            lines.append(f"| {arm} | {s} | {cell} | {', '.join(pct(v) for v in a['per_seed'][s])} | {diff} | "
                         f"{agree} | {secs:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tv2.add_run_arguments(p, "plain,lean", "0,1", "untrained toy models at the quick preset, 4 samples, 2 seeds")
    p.add_argument("--n", type=int, default=300, help="samples per model and sampler")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help=f"comma-separated subset of {', '.join(SAMPLERS)}")
    args = p.parse_args(argv)
    import anatomy_v2 as av2
    import records as rec
    from anatomy import _device_name

    try:
        seeds = av2._seed_list(args.seeds)
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        names = [s.strip() for s in args.samplers.split(",") if s.strip()]
        unknown = [s for s in names if s not in SAMPLERS] + [a for a in arms if a not in av2.ARMS_V2]
        if unknown or REFERENCE not in names or args.n < 1:
            raise ValueError(f"unknown sampler/arm {unknown}, or {REFERENCE} missing, or --n < 1")
    except ValueError as err:
        print(f"sampler_steps_v2.py: error: {err}", file=sys.stderr)
        return 2
    device = tv2.study_device(args.device)
    protocol = rec.load_protocol()
    noise_seed = int(protocol["dev_noise_seed"])
    min_frac = av2.min_sizes(protocol)["primary"]
    samplers = {s: SAMPLERS[s] for s in names}
    if args.quick:
        preset_name, preset = "quick", av2.PRESETS_V2["quick"]
        seeds, n = seeds[:2] if len(seeds) >= 2 else [0, 1], 4
        judge = tv2.toy_judge(device)
    else:
        setup = tv2.run_setup(args.run, device)
        preset_name, preset, judge, n = setup["preset_name"], setup["preset"], setup["judge"], args.n
    raw: dict[str, dict[str, Any]] = {}
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        for seed in seeds:
            if args.quick:
                model = tv2.toy_model(arm, seed, device)
            else:
                try:
                    model = tv2.trained_model(args.run, setup, arm, seed, preset.steps, device)
                except FileNotFoundError as err:
                    print(f"sampler_steps_v2.py: error: {err}", file=sys.stderr)
                    return 2
            res = evaluate_model(model, judge, n, noise_seed, min_frac, device, samplers)
            per_seed.setdefault(arm, {})[seed] = res
            raw.setdefault(arm, {})[str(seed)] = {s: {k: v for k, v in r.items() if k != "plausible"}
                                                  for s, r in res.items()}
            print(f"{arm} seed {seed}: " + ", ".join(f"{s} {100 * r['pass_rate']:.1f} %" for s, r in res.items()),
                  flush=True)
            del model
    report = {"mode": "quick" if args.quick else "development", "claim": False, "preset": preset_name,
              "run": tv2.run_label(args.run, args.quick),
              "n": n, "noise_seed": noise_seed, "min_area_frac": min_frac, "device": _device_name(device),
              "samplers": names, "sampler_specs": {s: {"sampler": samplers[s][0], "steps": samplers[s][1], "eta": 0.0}
                                                   for s in names},
              "arms": summarise(per_seed, names), "raw": raw, "code": rec.code_commit()}
    tv2.write_study(args.out, "sampler_steps", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
