#!/usr/bin/env python
"""The cascade (issues 28 and 29) on trained benchmark-v2 models: masks drawn from a mask prior, images drawn from
those masks by a mask-conditioned model, so the images' anatomy is the prior's. Judged by benchmark v2's judge A at
the seed level, beside the plain LDM and the prior's own images.

    python bench/cascade_v2.py --run bench/out/v2_cpu --seeds 0,1,2 -o bench/cascade_v2_cpu_dev   # CPU development
    python bench/cascade_v2.py -o /tmp/q --quick     # untrained toy models (tests/test_cascade_bench.py)

The mask prior is the joint model's masks: the ``--prior`` arm (an anatomical arm, default ``lean``) samples images
*and* masks (its segmentation head on its own samples); the ``--image-arm`` (a mask-conditioned arm, default
``plain_labelmap``) of the same training seed draws one image for each of those masks, at every guidance scale of
``--scales``. Per training seed and sampler of the protocol (DDIM 25 steps, eta 0 and eta 1; the prior and the image
stage use the same one), ``--n`` samples from the protocol's development noise seed (the benchmark's start noises
``0..n-1`` for the prior and the plain LDM, the next ``n`` for the image stage, so its noise is not the prior's):

- ``plain``: the plain LDM's samples (``--baseline``), as the benchmark draws them;
- ``prior``: the prior arm's own samples (its images);
- ``prior_masks``: the prior's masks themselves checked by the rules (no judge: what the cascade hands on);
- ``cascade:s<S>``: the image arm's samples of the prior's masks at guidance scale ``S``;
- ``cascade_half:s1``: the same at guidance scale 1 with both stages at half the sampler steps (the prior's masks
  drawn again at that count): as many model evaluations per sample as the plain LDM's;
- ``real_masks:s<S>``: the image arm's samples of the first ``n`` real test masks (a perfect prior of real anatomy:
  the cascade's ceiling with this image model);
- ``unconditional``: the image arm's samples without a mask (its own unconditional model).

Measure: benchmark v2's primary measure (judge A's masks of the images pass the phantom-v2 rules at the primary
minimum size); for the cascade and real-mask rows also the **faithfulness** (judge A's foreground Dice against the
masks the images were drawn from). Seed-level paired differences of the cascade against ``plain`` and ``prior``,
Holm over all of them. A cascade sample costs the prior's model evaluations plus the image stage's (two per step at
a scale other than 0 and 1): the table gives both. Development seeds: a hypothesis, not a claim.
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


def judged(images: torch.Tensor, judge: torch.nn.Module, min_frac: float, target: Optional[torch.Tensor] = None,
           num_classes: int = 0) -> dict[str, Any]:
    """``{"pass_rate"}`` of images by judge A and the rules; with ``target`` masks also their ``faithfulness``
    (judge A's foreground Dice against them, pooled over the images)."""
    import anatomy_v2 as av2
    from labelmap_v2 import pooled_dice
    from ldm.evaluation.segmenter import segment

    seg = segment(judge, images, batch_size=128)
    out: dict[str, Any] = {"pass_rate": float(np.mean(av2.judge_masks(seg, min_frac)["plausible"]))}
    if target is not None:
        present = [v for v in pooled_dice(seg, target, num_classes).values() if v is not None]
        out["faithfulness"] = float(np.mean(present)) if present else None
    return out


def evaluate_seed(models: dict[str, torch.nn.Module], judge: torch.nn.Module, real_masks: torch.Tensor,
                  samplers: dict[str, float], scales: list[float], n: int, steps: int, noise_seed: int,
                  min_frac: float, num_classes: int) -> dict[str, dict[str, Any]]:
    """Every row of one training seed (see the module docstring): ``{"<sampler>:<row>": {...}}``."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.sampling.masks import sample_from_masks

    out: dict[str, dict[str, Any]] = {}
    for name, eta in samplers.items():
        def timed(key: str, evals: int, fn, target: Optional[torch.Tensor] = None) -> None:
            t0 = time.perf_counter()
            images = fn()
            out[f"{name}:{key}"] = {**judged(images, judge, min_frac, target, num_classes), "evals_per_sample": evals,
                                    "seconds_per_sample": (time.perf_counter() - t0) / len(images)}

        timed("plain", steps, lambda: am.draw_samples(models["plain"], n, steps, noise_seed, 100, None, False,
                                                      eta=eta)["image"])
        t0 = time.perf_counter()
        prior = am.draw_samples(models["prior"], n, steps, noise_seed, 100, None, True, eta=eta)
        prior_seconds = (time.perf_counter() - t0) / n
        out[f"{name}:prior"] = {**judged(prior["image"], judge, min_frac), "evals_per_sample": steps,
                                "seconds_per_sample": prior_seconds}
        masks = prior["own_mask"].long()
        out[f"{name}:prior_masks"] = {"pass_rate": float(np.mean(av2.judge_masks(masks, min_frac)["plausible"]))}
        half = max(1, steps // 2)
        t0 = time.perf_counter()
        short = am.draw_samples(models["prior"], n, half, noise_seed, 100, None, True, eta=eta)["own_mask"].long()
        short_seconds = (time.perf_counter() - t0) / n
        for s in scales:
            per_step = 1 if s in (0.0, 1.0) else 2

            def draw(m: torch.Tensor, k: int = steps, s: float = s) -> torch.Tensor:
                return sample_from_masks(models["image"], m, k, eta, noise_seed, s, batch_size=100,
                                         first_index=n).clamp(-1, 1).cpu()
            timed(f"cascade:s{s:g}", steps + per_step * steps, lambda: draw(masks), masks)
            out[f"{name}:cascade:s{s:g}"]["seconds_per_sample"] += prior_seconds
            if s == 1.0:  # both stages at half the steps: the plain LDM's model evaluations
                timed("cascade_half:s1", 2 * half, lambda: draw(short, half), short)
                out[f"{name}:cascade_half:s1"]["seconds_per_sample"] += short_seconds
            timed(f"real_masks:s{s:g}", per_step * steps, lambda: draw(real_masks), real_masks)
        timed("unconditional", steps, lambda: sample_from_masks(models["image"], real_masks, steps, eta, noise_seed,
                                                                0.0, batch_size=100, first_index=n).clamp(-1, 1).cpu())
    return out


def summarise(per_seed: dict[int, dict[str, dict[str, Any]]], samplers: list[str], scales: list[float]
              ) -> dict[str, Any]:
    """Mean [t interval] over seeds of every row's numbers, and the cascade's paired differences to ``plain`` and
    ``prior`` (Holm over all of them)."""
    from anatomy_stats import holm, mean_interval, seed_paired_test

    order = sorted(per_seed)
    rows = list(per_seed[order[0]])
    values = {r: {m: [per_seed[k][r].get(m) for k in order] for m in per_seed[order[0]][r]
                  if m in ("pass_rate", "faithfulness")} for r in rows}
    tests = {}
    for name in samplers:
        cascades = [f"cascade:s{s:g}" for s in scales] + (["cascade_half:s1"] if 1.0 in scales else [])
        for row in cascades:
            for ref in ("plain", "prior"):
                tests[f"{name}:{row} - {name}:{ref}"] = seed_paired_test(values[f"{name}:{row}"]["pass_rate"],
                                                                         values[f"{name}:{ref}"]["pass_rate"])
    adjusted = holm({k: t["p"] for k, t in tests.items()})
    for k, t in tests.items():
        t["p_holm"] = adjusted[k]
    return {"seeds": order, "rows": {r: {m: mean_interval(v) for m, v in ms.items()} for r, ms in values.items()},
            "per_seed": values, "contrasts": tests,
            "evals_per_sample": {r: per_seed[order[0]][r].get("evals_per_sample") for r in rows},
            "seconds_per_sample": {r: (None if "seconds_per_sample" not in per_seed[order[0]][r] else
                                       float(np.mean([per_seed[k][r]["seconds_per_sample"] for k in order])))
                                   for r in rows}}


def markdown(report: dict[str, Any]) -> str:
    def cell(iv: Optional[dict[str, Any]], scale: float = 100.0, digits: int = 1) -> str:
        if iv is None or iv.get("mean") is None:
            return "-"
        text = f"{scale * iv['mean']:.{digits}f}"
        return text + (f" [{scale * iv['lo']:.{digits}f}, {scale * iv['hi']:.{digits}f}]" if iv.get("lo") is not None
                       else "")

    s = report["summary"]
    lines = [f"# The cascade on trained benchmark-v2 models ({report['mode']}, not a claim)", "",
             f"Run `{report['run']}`, preset {report['preset']}: masks from the `{report['prior']}` arm's own samples, "
             f"images of them from the `{report['image_arm']}` arm of the same training seed, beside the "
             f"`{report['baseline']}` arm. {report['n']} samples per model and row, DDIM {report['sampler_steps']} "
             f"steps, noise seed {report['noise_seed']}; judge A at the primary minimum size; {report['device']}. "
             f"Training seeds {s['seeds']}.", "",
             "| row | pass rate % (mean over seeds [95 % t]) | per seed | faithfulness (judge-A Dice to the masks "
             "drawn from) | evals/sample | s/sample |", "|---|---|---|---|---|---|"]
    for r, ms in s["rows"].items():
        per = ", ".join("-" if v is None else f"{100 * v:.1f}" for v in s["per_seed"][r]["pass_rate"])
        secs = s["seconds_per_sample"][r]
        lines.append(f"| {r} | {cell(ms['pass_rate'])} | {per} | {cell(ms.get('faithfulness'), 1.0, 3)} | "
                     f"{s['evals_per_sample'][r] or '-'} | {'-' if secs is None else f'{secs:.3f}'} |")
    lines += ["", "Seed-level paired differences (points [95 % t], p after Holm over the table):", "",
              "| contrast | difference | p (Holm) |", "|---|---|---|"]
    for k, t in s["contrasts"].items():
        diff = "-" if t.get("diff") is None else f"{100 * t['diff']:+.1f}" + (
            f" [{100 * t['lo']:+.1f}, {100 * t['hi']:+.1f}]" if t.get("lo") is not None else "")
        p_holm = "-" if t.get("p_holm") is None else f"{t['p_holm']:.3f}"
        if t.get("note"):  # the t-test's limit, not evidence: the seeds' differences happened to be equal
            p_holm += " (differences equal in every seed: no variance to test against)"
        lines.append(f"| {k} | {diff} | {p_holm} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tv2.add_run_arguments(p, None, "0,1,2", "untrained toy models at the quick preset, 4 samples, 2 seeds")
    p.add_argument("--prior", default="lean", help="the anatomical arm whose samples' masks are the prior")
    p.add_argument("--image-arm", "--image_arm", dest="image_arm", default="plain_labelmap",
                   help="the mask-conditioned arm that draws the images")
    p.add_argument("--baseline", default="plain", help="the plain arm beside them")
    p.add_argument("--scales", default="1,2", help="comma-separated guidance scales of the image stage")
    p.add_argument("--n", type=int, default=300, help="samples per model and row")
    args = p.parse_args(argv)
    import anatomy_v2 as av2
    import records as rec
    from anatomy import _device_name

    protocol = rec.load_protocol()
    try:
        seeds = av2._seed_list(args.seeds)
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
        quick_cfg = {a: av2.arm_config(a, av2.PRESETS_V2["quick"], None, 1.0)["params"]
                     for a in (args.prior, args.image_arm, args.baseline)}  # ValueError for an unknown arm
        priors = [a for a in av2.MASK_ARMS_V2 if not a.endswith("no_loss")]  # arms whose head is trained
        if args.prior not in priors:
            raise ValueError(f"--prior {args.prior!r} must be an anatomical arm with a trained mask head (its masks "
                             f"are the prior): one of {', '.join(priors)}")
        if "mask_condition" not in quick_cfg[args.image_arm]:
            raise ValueError(f"--image-arm {args.image_arm!r} is not mask-conditioned")
        if not scales or any(not np.isfinite(s) or s <= 0 for s in scales) or args.n < 1:
            raise ValueError("--scales must be numbers > 0 (0 is the 'unconditional' row) and --n >= 1")
    except ValueError as err:
        print(f"cascade_v2.py: error: {err}", file=sys.stderr)
        return 2
    device = tv2.study_device(args.device)
    noise_seed, min_frac = int(protocol["dev_noise_seed"]), av2.min_sizes(protocol)["primary"]
    samplers = {k: float(protocol["samplers"][k]["eta"]) for k in ("ddim", "ddim_eta1")}
    roles = {"plain": args.baseline, "prior": args.prior, "image": args.image_arm}
    try:
        study = tv2.study_setup(args.run, args.quick, device)
    except FileNotFoundError as err:
        print(f"cascade_v2.py: error: {err}", file=sys.stderr)
        return 2
    preset_name, preset, judge, setup = (study[k] for k in ("preset_name", "preset", "judge", "setup"))
    n = 4 if args.quick else args.n
    if args.quick:
        seeds = seeds[:2] if len(seeds) >= 2 else [0, 1]
    steps = int(preset.sampler_steps or protocol["samplers"]["ddim"]["steps"])
    real_masks = torch.as_tensor(av2.split(preset, "test")["segmentation"][:n]).long()
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in seeds:
        try:
            models = {role: (tv2.toy_model(arm, 100 * seed + i, device, perturb=0.02) if args.quick else
                             tv2.trained_model(args.run, setup, arm, seed, preset.steps, device))
                      for i, (role, arm) in enumerate(roles.items())}
        except FileNotFoundError as err:
            print(f"cascade_v2.py: error: {err}", file=sys.stderr)
            return 2
        per_seed[seed] = evaluate_seed(models, judge, real_masks, samplers, scales, n, steps, noise_seed, min_frac,
                                       av2.NUM_CLASSES)
        print(f"seed {seed}: " + ", ".join(f"{r} {100 * v['pass_rate']:.1f} %" for r, v in per_seed[seed].items()),
              flush=True)
        del models
    report = {"mode": "quick" if args.quick else "development", "claim": False, "preset": preset_name,
              "run": tv2.run_label(args.run, args.quick), **{k: v for k, v in vars(args).items()
                                                             if k in ("prior", "image_arm", "baseline")},
              "n": n, "scales": scales, "noise_seed": noise_seed, "sampler_steps": steps, "min_area_frac": min_frac,
              "device": _device_name(device), "summary": summarise(per_seed, list(samplers), scales),
              "raw": {str(k): v for k, v in per_seed.items()}, "code": rec.code_commit()}
    tv2.write_study(args.out, "cascade", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
