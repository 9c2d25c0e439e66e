#!/usr/bin/env python
"""Sampling from a labelmap on trained benchmark-v2 models (issue 28): faithfulness, realism and diversity of
mask-conditioned samples, judged by benchmark v2's judge A, at the seed level.

    python bench/labelmap_v2.py --run bench/out/v2_cpu --arms plain_labelmap --seeds 0,1,2 \\
        -o bench/labelmap_v2_cpu_dev          # the CPU development run
    python bench/labelmap_v2.py -o /tmp/q --quick     # untrained toy models (tests/test_labelmap_bench.py)

For every (arm, training seed) of a benchmark-v2 run folder (``--run``; the arm trained with ``bench/anatomy.py
--arms plain_labelmap``; the benchmark itself measures its samples drawn *without* a mask against the plain LDM),
the first ``--n`` masks of the test split (real masks, never seen in training) are given to the final model, one
sample each, at every guidance scale of ``--scales`` (DDIM at the protocol's steps, eta 0, the protocol's development
noise seed). Per sample, judge A segments the image and:

- **faithfulness**: Dice per class between judge A's mask and the input mask, pooled over the samples (foreground
  classes; ``fg_mean`` is their mean). The ceiling is judge A's Dice on the real test images of the same masks;
  a latent model's own ceiling is that on their reconstructions by the run's autoencoder (``reconstruction`` in the
  reference). Scale 0 is the unconditional model: its Dice against masks it never saw is the chance level;
- **realism**: the share of samples whose judge-A mask passes the phantom-v2 rules (the benchmark's primary
  measure; real images of the same masks give the reference), the benchmark's image statistics against the whole
  real test split (FID on judge-A features and on pooled pixels, intensity-histogram W1; the unconditional model at
  scale 0, and the ``--baseline`` arm trained without the condition, sampled as the benchmark does, are the
  references the issue names), and the mean absolute difference, per class region of the input mask,
  of mean intensity between sample and real image (``intensity_gap``, image units in [-1, 1]);
- **autoguided** (``--auto-weights``): the same masks' samples guided by the model's own quarter checkpoint given
  the same masks (:class:`~ldm.models.diffusion.autoguidance.Autoguidance` in place of classifier-free guidance;
  two model calls per step), with every measure above;
- **diversity**: mean MS-SSIM between the ``--per-mask`` samples of each of the first ``--div-masks`` masks (lower:
  more diverse), against that of as many unconditional samples;
- **partial masks**: the same masks with only the liver drawn (every other pixel unknown): the liver's Dice and the
  rule pass rate of the whole image (a plausible slice around the given liver);
- **editing** (``ldm.sampling.edit.edit_image``): in the first ``--n-edit`` test slices with a liver, the liver moved
  ``EDIT_SHIFT`` pixels to the patient's left (its old place unknown) and the slice redrawn there: the kept region's
  MAE and PSNR against the real slice (beside those of the autoencoder's reconstruction, the floor), and the moved
  liver's Dice in the edited slice; ``editing.png`` shows examples (slice | its mask | the edited mask | the edit).

Each (arm, seed)'s numbers are kept in ``<out>/per_seed/`` as they are measured; a later run with the same
settings reuses them and measures only what is missing (e.g. ``--seeds 0,1,2`` after a run of ``0,1``), so a study
can span sessions. Development seeds: a hypothesis, not a claim.
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

IGNORE = 255
LIVER = 1  # phantom2 class id (ldm.data.labels: background, liver, spleen, ...)
IMAGE_STATISTICS = ("fid_segmenter", "fid_pixel8", "histogram_w1")  # bench/anatomy_eval.image_statistics
EDIT_SHIFT = 6  # pixels the liver moves in the editing measurement (64-pixel slices: about a tenth of the body)


def moved_liver(masks: torch.Tensor, shift: int = EDIT_SHIFT) -> torch.Tensor:
    """The masks with the liver moved ``shift`` pixels along the columns; its old place and what it covers now
    unknown except the liver itself (the model decides what lies around it)."""
    new = masks.clone()
    liver = masks == LIVER
    new[liver] = IGNORE
    new[torch.roll(liver, shifts=shift, dims=-1)] = LIVER
    return new


def editing(model: torch.nn.Module, judge: torch.nn.Module, test: dict[str, torch.Tensor], steps: int,
            noise_seed: int, n_edit: int, num_classes: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The editing measures (see the module docstring) and the arrays of the first examples for the figure."""
    from ldm.evaluation.segmenter import segment
    from ldm.sampling.edit import edit_image, kept_region_error

    has_liver = [i for i in range(len(test["segmentation"])) if bool((test["segmentation"][i] == LIVER).any())]
    idx = has_liver[:n_edit]
    if not idx:
        raise ValueError("no test slice has a liver to move; the editing measurement needs one")
    image, masks = test["image"][idx], test["segmentation"][idx]
    new = moved_liver(masks)
    out = edit_image(model, image, new, old_mask=masks, ddim_steps=steps, seed=noise_seed)
    edited = out["images"].clamp(-1, 1).cpu()
    with model.ema_scope("editing"):
        source = image.to(next(model.parameters()).device).clamp(-1, 1)
        recon = model.decode_first_stage(model.encode_mean(source)).cpu()
    keep = out["keep"].cpu()
    seg = segment(judge, edited, batch_size=128)
    return ({"n": len(idx), "kept_region": kept_region_error(edited, image, keep),
             "reconstruction": kept_region_error(recon, image, keep),
             "redrawn_pixel_share": float((~keep).float().mean()),
             "moved_liver_dice": pooled_dice(seg, new, num_classes)[LIVER]},
            {"image": image[:4], "mask": masks[:4], "new": new[:4], "edited": edited[:4]})


def pooled_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[int, Optional[float]]:
    """Foreground Dice per class pooled over all samples (:func:`ldm.modules.dice.dice_scores`; ``None`` for a class
    absent from both); unknown target pixels (``IGNORE``) are left out."""
    from ldm.modules.dice import dice_scores

    scores = dice_scores(pred, target, num_classes, ignore_index=IGNORE).tolist()
    return {c: (None if np.isnan(scores[c]) else float(scores[c])) for c in range(1, num_classes)}


def intensity_gap(images: torch.Tensor, real: torch.Tensor, masks: torch.Tensor, num_classes: int) -> float:
    """Mean over samples and the classes present of |mean intensity of the sample - of the real image| inside the
    class's region of the input mask."""
    gaps = []
    for img, ref, m in zip(images[:, 0], real[:, 0], masks):
        for c in range(num_classes):
            region = m == c
            if int(region.sum()) > 0:
                gaps.append(abs(float(img[region].mean()) - float(ref[region].mean())))
    return float(np.mean(gaps)) if gaps else float("nan")


def within_mask_ms_ssim(images: torch.Tensor, per_mask: int) -> float:
    """Mean MS-SSIM over every pair of samples drawn for the same mask (``images`` grouped by mask)."""
    from ldm.evaluation.diversity import ms_ssim

    groups = images.reshape(-1, per_mask, *images.shape[1:])
    a, b = zip(*[(g[i], g[j]) for g in groups for i in range(per_mask) for j in range(i + 1, per_mask)])
    return float(ms_ssim(torch.stack(a), torch.stack(b)).mean())


def evaluate_model(model: torch.nn.Module, judge: torch.nn.Module, test: dict[str, torch.Tensor], scales: list[float],
                   steps: int, noise_seed: int, min_frac: float, num_classes: int, div_masks: int,
                   per_mask: int, n_edit: int = 50, guide: Optional[torch.nn.Module] = None,
                   auto_weights: tuple[float, ...] = ()) -> dict[str, Any]:
    """Every measure of one model (see the module docstring); with a ``guide`` (the model's quarter checkpoint, EMA
    weights in place) also the samples of the masks autoguided at each of ``auto_weights`` (``"auto"``)."""
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import segment
    from ldm.models.diffusion.autoguidance import Autoguidance
    from ldm.sampling.masks import sample_from_masks

    masks, real = test["segmentation"], test["image"]
    out: dict[str, Any] = {"scales": {}, "auto": {}}
    settings = [("scales", f"{s:g}", s, None) for s in scales] + [
        ("auto", f"{w:g}", 1.0, Autoguidance(model, guide, w, guide_ema=False)) for w in auto_weights]
    for group, key, s, steer in settings:
        t0 = time.perf_counter()
        images = sample_from_masks(model, masks, steps, 0.0, noise_seed, s, batch_size=100,
                                   autoguidance=steer).clamp(-1, 1).cpu()
        seconds = time.perf_counter() - t0
        seg = segment(judge, images, batch_size=128)
        dice = pooled_dice(seg, masks, num_classes)
        present = [v for v in dice.values() if v is not None]
        out[group][key] = {
            "dice": {str(c): v for c, v in dice.items()}, "fg_mean": float(np.mean(present)) if present else None,
            "pass_rate": float(np.mean(av2.judge_masks(seg, min_frac)["plausible"])),
            "intensity_gap": intensity_gap(images, real, masks, num_classes),
            **image_statistics(images, test["real"], judge, test["real_features"]),
            "seconds_per_sample": seconds / len(masks)}
    div = masks[:div_masks]
    cond = sample_from_masks(model, div, steps, 0.0, noise_seed + 1, 1.0, per_mask=per_mask).clamp(-1, 1).cpu()
    uncond = sample_from_masks(model, div, steps, 0.0, noise_seed + 1, 0.0, per_mask=per_mask).clamp(-1, 1).cpu()
    out["diversity"] = {"ms_ssim_within_mask": within_mask_ms_ssim(cond, per_mask),
                        "ms_ssim_unconditional": within_mask_ms_ssim(uncond, per_mask)}
    liver_only = torch.where(masks == LIVER, masks, torch.full_like(masks, IGNORE))
    images = sample_from_masks(model, liver_only, steps, 0.0, noise_seed, 1.0, batch_size=100).clamp(-1, 1).cpu()
    seg = segment(judge, images, batch_size=128)
    out["partial_liver"] = {"liver_dice": pooled_dice(seg, liver_only, num_classes)[LIVER],
                            "pass_rate": float(np.mean(av2.judge_masks(seg, min_frac)["plausible"]))}
    out["editing"], out["_examples"] = editing(model, judge, test, steps, noise_seed, n_edit, num_classes)
    return out


def evaluate_baseline(model: torch.nn.Module, judge: torch.nn.Module, test: dict[str, torch.Tensor], n: int,
                      steps: int, noise_seed: int, min_frac: float) -> dict[str, Any]:
    """The model trained without the condition, sampled as the benchmark samples it (``n`` samples, DDIM eta 0, the
    noise seed's start noises): rule pass rate and image statistics, the reference of realism."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import segment

    images = am.draw_samples(model, n, steps, noise_seed, 100, None, False)["image"]
    seg = segment(judge, images, batch_size=128)
    return {"pass_rate": float(np.mean(av2.judge_masks(seg, min_frac)["plausible"])),
            **image_statistics(images, test["real"], judge, test["real_features"])}


def editing_figure(path: str, examples: dict[str, torch.Tensor]) -> None:
    """Rows of examples: the real slice | its mask | the edited mask | the edited slice."""
    from PIL import Image

    from ldm.data.labels import colourise, get_label_set
    from ldm.sample_io import to_uint8

    palette = get_label_set("phantom2").palette()
    rows = []
    for i in range(len(examples["image"])):
        grey = [np.repeat(to_uint8(examples[k][i:i + 1])[0][..., None], 3, -1) for k in ("image", "edited")]
        panels = [grey[0], colourise(examples["mask"][i].numpy(), palette),
                  colourise(examples["new"][i].numpy(), palette), grey[1]]
        rows.append(np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in panels], 1))
    figure = np.concatenate(rows, 0)
    Image.fromarray(figure).resize((figure.shape[1] * 3, figure.shape[0] * 3), Image.NEAREST).save(path)


def image_statistics(images: torch.Tensor, real: torch.Tensor, judge: torch.nn.Module,
                     real_features: np.ndarray) -> dict[str, float]:
    """The benchmark's image statistics of ``images`` against the whole real test split (``bench/anatomy_eval.py``):
    FID on judge-A features and on pooled pixels, intensity-histogram W1 (lower: closer to real)."""
    from anatomy_eval import image_statistics as stats

    return stats(images, real, judge, real_features)


def judged_reference(images: torch.Tensor, judge: torch.nn.Module, test: dict[str, torch.Tensor], min_frac: float,
                     num_classes: int) -> dict[str, Any]:
    """Judge A on ``images`` drawn for (or of) the test masks: Dice per class against them, their mean, the rule
    pass rate and the image statistics."""
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import segment

    seg = segment(judge, images, batch_size=128)
    dice = pooled_dice(seg, test["segmentation"], num_classes)
    present = [v for v in dice.values() if v is not None]
    return {"dice": {str(c): v for c, v in dice.items()}, "fg_mean": float(np.mean(present)),
            "pass_rate": float(np.mean(av2.judge_masks(seg, min_frac)["plausible"])),
            **image_statistics(images, test["real"], judge, test["real_features"])}


def condition_information(masks: torch.Tensor, latent: int, num_classes: int, details: tuple[int, ...] = (1, 4)
                          ) -> dict[str, float]:
    """What the mask condition can say at all: the test masks recovered from their condition's class fractions on
    the ``latent x detail`` grid (bilinear upsampling, then the most likely class), foreground Dice against the
    masks (pooled per class, mean). No model: a bound on the information the encoder receives."""
    import torch.nn.functional as F

    from ldm.modules.mask_condition import mask_fractions

    out = {}
    for d in details:
        grid = latent * d
        if masks.shape[-1] % grid:
            continue
        fractions = mask_fractions(masks.long(), num_classes, IGNORE, (grid, grid))
        up = F.interpolate(fractions, size=tuple(masks.shape[-2:]), mode="bilinear", align_corners=False)
        dice = [v for v in pooled_dice(up.argmax(1), masks, num_classes).values() if v is not None]
        out[f"detail {d}"] = float(np.mean(dice))
    return out

def reference(judge: torch.nn.Module, test: dict[str, torch.Tensor], min_frac: float, num_classes: int,
              model: torch.nn.Module) -> dict[str, Any]:
    """Judge A on the real test images of the same masks (the ceiling of faithfulness and the realism reference)
    and on their reconstructions by the run's autoencoder (``model``'s first stage, shared by every arm: the ceiling
    of any latent model, ``reconstruction``)."""
    with torch.no_grad():
        recon = model.decode_first_stage(model.encode_mean(
            test["image"].to(next(model.parameters()).device))).clamp(-1, 1).float().cpu()
    return {**judged_reference(test["image"], judge, test, min_frac, num_classes),
            "reconstruction": judged_reference(recon, judge, test, min_frac, num_classes)}


def _rows(scales: list[float], auto_weights: tuple[float, ...] = ()) -> dict[str, tuple[str, ...]]:
    """Headline row name -> the path of its number in one seed's result."""
    measures = ("fg_mean", "pass_rate", "intensity_gap") + IMAGE_STATISTICS
    rows = {f"scale {s:g}: {m}": ("scales", f"{s:g}", m) for s in scales for m in measures}
    rows.update({f"autoguided w {w:g}: {m}": ("auto", f"{w:g}", m) for w in auto_weights for m in measures})
    rows.update({f"diversity: {m}": ("diversity", m) for m in ("ms_ssim_within_mask", "ms_ssim_unconditional")})
    rows.update({f"partial liver: {m}": ("partial_liver", m) for m in ("liver_dice", "pass_rate")})
    rows.update({"editing: kept-region PSNR": ("editing", "kept_region", "psnr"),
                 "editing: reconstruction PSNR (floor)": ("editing", "reconstruction", "psnr"),
                 "editing: kept-region MAE": ("editing", "kept_region", "mae"),
                 "editing: moved liver Dice": ("editing", "moved_liver_dice")})
    return rows


def summarise(per_seed: dict[str, dict[int, dict[str, Any]]], scales: list[float],
              auto_weights: tuple[float, ...] = ()) -> dict[str, Any]:
    """Per arm: every headline number per seed, with its mean and t interval over seeds."""
    from anatomy_stats import mean_interval

    def get(result: dict[str, Any], path: tuple[str, ...]) -> Any:
        for key in path:
            result = result[key]
        return result

    arms = {}
    for arm, seeds in per_seed.items():
        order = sorted(seeds)
        values = {row: [get(seeds[k], path) for k in order] for row, path in _rows(scales, auto_weights).items()}
        arms[arm] = {"seeds": order, "rows": {row: mean_interval(v) for row, v in values.items()}, "per_seed": values}
    return arms


def markdown(report: dict[str, Any]) -> str:
    def num(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.3f}"

    ref = report["reference"]
    lines = [f"# Sampling from a labelmap on trained benchmark-v2 models ({report['mode']}, not a claim)", "",
             f"Run `{report['run']}`, preset {report['preset']}: the first {report['n']} test-split masks, one sample "
             f"each, DDIM {report['sampler_steps']} steps eta 0, noise seed {report['noise_seed']}; judge A at the "
             f"primary minimum size; {report['device']}. Real test images of the same masks: judge-A Dice "
             f"(foreground mean) {num(ref['fg_mean'])}, rule pass rate {num(ref['pass_rate'])}; their reconstructions by the "
             f"autoencoder (the ceiling of a latent model): Dice {num(ref['reconstruction']['fg_mean'])}, pass rate "
             f"{num(ref['reconstruction']['pass_rate'])}, judge-A FID {num(ref['reconstruction']['fid_segmenter'])}, "
             f"histogram W1 {num(ref['reconstruction']['histogram_w1'])}. The masks recovered from their condition alone "
             f"(fractions upsampled, no model): Dice " + ", ".join(f"{num(v)} at {k}" for k, v in
                                                          report.get("condition_information", {}).items()) +
             ". Image statistics against the whole test "
             f"split ({report['n_real']} slices; FID of {report['n']} samples: compare rows, not with other "
             "studies). Scale 0 = the unconditional model (chance-level Dice)." + (
                 f" Autoguided rows: guidance scale 1, guided by each model's step-{report['guide_step']} checkpoint "
                 "given the same masks." if report.get("auto_weights") else ""), "",
             "| arm | measure | mean over seeds [95 % t] | per seed |", "|---|---|---|---|"]
    groups = list(report["arms"].items())
    if report.get("baseline"):
        groups.append((f"{report['baseline']['arm']} (trained without the condition)", report["baseline"]))
    for arm, a in groups:
        for row, iv in a["rows"].items():
            cell = num(iv["mean"]) + (f" [{num(iv['lo'])}, {num(iv['hi'])}]" if iv.get("lo") is not None else "")
            lines.append(f"| {arm} | {row} | {cell} | {', '.join(num(v) for v in a['per_seed'][row])} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    tv2.add_run_arguments(p, "plain_labelmap", "0,1,2", "untrained toy models at the quick preset, 4 masks, 2 seeds")
    p.add_argument("--n", type=int, default=200, help="test masks (one sample each per scale)")
    p.add_argument("--scales", default="0,1,2", help="comma-separated guidance scales")
    p.add_argument("--div-masks", "--div_masks", dest="div_masks", type=int, default=8)
    p.add_argument("--per-mask", "--per_mask", dest="per_mask", type=int, default=4)
    p.add_argument("--n-edit", "--n_edit", dest="n_edit", type=int, default=50, help="test slices edited")
    p.add_argument("--baseline", default="plain",
                   help="the arm trained without the condition whose unconditional samples (--n, as the benchmark "
                        "draws them) are the realism reference, per seed ('' : none)")
    p.add_argument("--auto-weights", "--auto_weights", dest="auto_weights", default="",
                   help="comma-separated autoguidance weights (> 1): the masks' samples also autoguided by each "
                        "model's quarter checkpoint (the benchmark keeps it), guidance scale 1")
    args = p.parse_args(argv)
    import anatomy_v2 as av2
    import records as rec
    from anatomy import _device_name

    try:
        seeds = av2._seed_list(args.seeds)
        if args.baseline and args.baseline not in av2.ARMS_V2:
            raise ValueError(f"--baseline {args.baseline!r} is not a benchmark-v2 arm")
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
        auto_weights = tuple(float(w) for w in args.auto_weights.split(",") if w.strip())
        if any(not np.isfinite(w) or w <= 1 for w in auto_weights):
            raise ValueError(f"--auto-weights must be numbers > 1, got {args.auto_weights}")
        for arm in arms:
            if "mask_condition" not in av2.arm_config(arm, av2.PRESETS_V2["quick"], None, 1.0)["params"]:
                raise ValueError(f"arm {arm!r} is not mask-conditioned")
        if not scales or any(not np.isfinite(s) or s < 0 for s in scales) or min(args.n, args.per_mask - 1,
                                                                                  args.div_masks) < 1:
            raise ValueError("--scales must be numbers >= 0, --n and --div-masks >= 1, --per-mask >= 2")
    except (ValueError, KeyError) as err:
        print(f"labelmap_v2.py: error: {err}", file=sys.stderr)
        return 2
    device = tv2.study_device(args.device)
    protocol = rec.load_protocol()
    noise_seed, min_frac = int(protocol["dev_noise_seed"]), av2.min_sizes(protocol)["primary"]
    try:
        study = tv2.study_setup(args.run, args.quick, device)
    except FileNotFoundError as err:
        print(f"labelmap_v2.py: error: {err}", file=sys.stderr)
        return 2
    preset_name, preset, judge, setup = (study[k] for k in ("preset_name", "preset", "judge", "setup"))
    n, div = (4, 2) if args.quick else (args.n, args.div_masks)
    if args.quick:
        seeds = seeds[:2] if len(seeds) >= 2 else [0, 1]
    steps = int(preset.sampler_steps or protocol["samplers"]["ddim"]["steps"])
    test_split = av2.split(preset, "test")
    from anatomy_eval import segmenter_features

    real = torch.as_tensor(test_split["image"]).float()
    test = {"image": real[:n], "segmentation": torch.as_tensor(test_split["segmentation"][:n]).long(),
            "real": real, "real_features": segmenter_features(judge, real)}
    settings = {"run": tv2.run_label(args.run, args.quick), "n": n, "scales": scales, "auto_weights": list(auto_weights),
                "per_mask": args.per_mask, "div_masks": div, "n_edit": 2 if args.quick else args.n_edit,
                "noise_seed": noise_seed, "sampler_steps": steps, "min_area_frac": min_frac,
                "setup_id": "quick" if setup is None else setup["setup_id"]}  # results of one instrument only
    ref = tv2.cached_result(args.out, "reference", {"run": settings["run"], "n": n, "setup_id": settings["setup_id"]})
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        for seed in seeds:
            done = tv2.cached_result(args.out, f"{arm}_seed{seed}", settings)
            if done is not None:  # measured by an earlier run of the same settings: kept, not redone
                per_seed.setdefault(arm, {})[seed] = done
                print(f"{arm} seed {seed}: kept from {os.path.join(args.out, tv2.PER_SEED_DIR)}", flush=True)
                continue
            guide = None
            if args.quick:
                model = tv2.toy_model(arm, seed, device, perturb=0.02)
                if auto_weights:
                    guide = tv2.with_guide_ema(tv2.toy_model(arm, seed + 100, device, perturb=0.02))
            else:
                try:
                    model = tv2.trained_model(args.run, setup, arm, seed, preset.steps, device)
                    if auto_weights:
                        guide = tv2.with_guide_ema(tv2.trained_model(args.run, setup, arm, seed,
                                                                     tv2.guide_step(preset), device))
                except FileNotFoundError as err:
                    print(f"labelmap_v2.py: error: {err}", file=sys.stderr)
                    return 2
            if ref is None:
                ref = reference(judge, test, min_frac, av2.NUM_CLASSES, model)
                tv2.cache_result(args.out, "reference", {"run": settings["run"], "n": n,
                                                         "setup_id": settings["setup_id"]}, ref)
            res = evaluate_model(model, judge, test, scales, steps, noise_seed, min_frac, av2.NUM_CLASSES, div,
                                 args.per_mask, 2 if args.quick else args.n_edit, guide, auto_weights)
            examples = res.pop("_examples")
            if seed == seeds[0]:
                os.makedirs(args.out, exist_ok=True)
                editing_figure(os.path.join(args.out, f"editing_{arm}.png"), examples)
            per_seed.setdefault(arm, {})[seed] = res
            tv2.cache_result(args.out, f"{arm}_seed{seed}", settings, res)
            print(f"{arm} seed {seed}: " + ", ".join(f"scale {k}: Dice {v['fg_mean']:.3f} pass {v['pass_rate']:.3f}"
                                                     for k, v in res["scales"].items()), flush=True)
            del model
    baseline = None
    if args.baseline:
        base_settings = {k: settings[k] for k in ("run", "n", "noise_seed", "sampler_steps", "min_area_frac",
                                                  "setup_id")}
        base_seeds = {}
        for seed in seeds:
            name = f"baseline_{args.baseline}_seed{seed}"
            res = tv2.cached_result(args.out, name, base_settings)
            if res is None:
                try:
                    model = (tv2.toy_model(args.baseline, seed, device, perturb=0.02) if args.quick else
                             tv2.trained_model(args.run, setup, args.baseline, seed, preset.steps, device))
                except FileNotFoundError as err:
                    print(f"labelmap_v2.py: error: {err}", file=sys.stderr)
                    return 2
                res = evaluate_baseline(model, judge, test, n, steps, noise_seed, min_frac)
                tv2.cache_result(args.out, name, base_settings, res)
            base_seeds[seed] = res
        from anatomy_stats import mean_interval

        order = sorted(base_seeds)
        values = {f"unconditional: {m}": [base_seeds[k][m] for k in order] for m in ("pass_rate",) + IMAGE_STATISTICS}
        baseline = {"arm": args.baseline, "seeds": order, "rows": {r: mean_interval(v) for r, v in values.items()},
                    "per_seed": values}
    report = {"mode": "quick" if args.quick else "development", "claim": False, "preset": preset_name,
              "run": tv2.run_label(args.run, args.quick),
              "n": n, "noise_seed": noise_seed, "sampler_steps": steps, "min_area_frac": min_frac, "scales": scales,
              "per_mask": args.per_mask, "div_masks": div, "device": _device_name(device),
              "n_real": len(real), "reference": ref,
              "condition_information": condition_information(test["segmentation"], preset.size // 4, av2.NUM_CLASSES), "baseline": baseline, "arms": summarise(per_seed, scales, auto_weights),
              "auto_weights": list(auto_weights), "guide_step": tv2.guide_step(preset) if auto_weights else None,
              "raw": {a: {str(k): v for k, v in s.items()} for a, s in per_seed.items()}, "code": rec.code_commit()}
    tv2.write_study(args.out, "labelmap", report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
