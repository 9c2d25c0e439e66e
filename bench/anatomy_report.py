"""Aggregation, ``anatomy.json``, ``report.md`` and figures of the anatomy benchmark."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from anatomy_models import REENCODED
from anatomy_stats import mcnemar, mean_interval, paired_bootstrap, wilson
from ldm.data.anatomy_check import RULES
from ldm.data.labels import CTORGAN_CLASSES as CLASS_NAMES, CTORGAN_COLOURS

Results = dict[str, dict[int, dict[str, Any]]]


# arms that take one part away from (or add one to) the shipped anatomical method
ABLATIONS = ("registers_no_loss", "shuffled_masks", "anatomical_v1", "joint", "anatomical_stopgrad")


def _outcomes(results: Results, arm: str, tag: str, key: str = "seg_plausible") -> Optional[np.ndarray]:
    """``[seeds, samples]`` booleans of one arm at one evaluation tag (``None`` if an arm lacks them)."""
    rows = [results[arm][s]["evals"][tag]["arrays"].get(key) for s in sorted(results[arm])]
    if any(r is None for r in rows):
        return None
    n = min(len(r) for r in rows)
    return np.stack([r[:n] for r in rows])


def _rate(x: np.ndarray) -> dict[str, Any]:
    lo, hi = wilson(int(x.sum()), int(x.size))
    return {"pass_rate": float(x.mean()), "ci95": [lo, hi], "n": int(x.size)}


def aggregate(cal: dict, results: Results, steps: int) -> dict[str, Any]:
    final = f"step{steps}"
    arms: dict[str, Any] = {}
    for arm, per_seed in results.items():
        seeds = sorted(per_seed)
        seg = _outcomes(results, arm, final)
        entry: dict[str, Any] = {"n_samples": int(seg.shape[1]), "seeds": seeds, **_rate(seg)}
        entry["per_seed_pass_rate"] = [float(v) for v in seg.mean(axis=1)]
        entry["rules"] = {r: float(1 - _outcomes(results, arm, final, f"seg_{r}").mean()) for r in RULES}
        finals = [per_seed[s]["evals"][final] for s in seeds]
        own = _outcomes(results, arm, final, "own_plausible")
        entry["own_mask_pass_rate"] = None if own is None else _rate(own)
        dice = [f["own_dice"]["foreground_mean"] for f in finals if f.get("own_dice")]
        entry["own_mask_dice"] = mean_interval(dice)["mean"] if dice else None
        entry["own_mask_dice_ci95"] = mean_interval(dice) if dice else None
        real = [f["own_dice_real"] for f in finals if f.get("own_dice_real")]
        entry["own_mask_dice_real_ci95"] = (mean_interval([r["foreground_mean"] for r in real])
                                            if len(real) == len(finals) else None)
        entry["own_mask_dice_real_per_class"] = (
            [None if any(r["per_class"][c] is None for r in real) else float(np.mean([r["per_class"][c] for r in real]))
             for c in range(len(real[0]["per_class"]))] if entry["own_mask_dice_real_ci95"] else None)
        real_pass = [f["own_real_pass_rate"] for f in finals if f.get("own_real_pass_rate") is not None]
        entry["own_mask_real_pass_rate"] = float(np.mean(real_pass)) if len(real_pass) == len(finals) else None
        tstr = [f.get("tstr_dice") for f in finals if f.get("tstr_dice") is not None]
        entry["tstr_dice"] = mean_interval(tstr)["mean"] if tstr else None
        entry["tstr_dice_ci95"] = mean_interval(tstr) if tstr else None
        stats = {k: mean_interval([f["image_stats"][k] for f in finals]) for k in finals[0]["image_stats"]}
        entry["fid"] = stats["fid_segmenter"]["mean"]
        entry["image_stats"] = stats
        entry["memorisation"] = {k: mean_interval([f["memorisation"][k] for f in finals])
                                 for k in finals[0]["memorisation"]}
        rms = [f.get("latent_rms") for f in finals]
        entry["latent_rms"] = mean_interval(rms) if all(r is not None for r in rms) else None
        agree = [f["latent_rms_resampled_agreement"] for f in finals if "latent_rms_resampled_agreement" in f]
        entry["latent_rms_resampled_agreement"] = min(agree) if agree else None
        entry["train_seconds"] = float(np.mean([per_seed[s]["train"]["train_seconds"] for s in seeds]))
        entry["sampling_seconds_per_sample"] = float(np.mean([f["sampling_seconds"] / f["n"] for f in finals]))
        entry["curve"] = {}
        for tag in sorted((t for t in per_seed[seeds[0]]["evals"] if t.startswith("step")), key=lambda t: int(t[4:])):
            entry["curve"][tag[4:]] = _rate(_outcomes(results, arm, tag))
        if "equal_time" in per_seed[seeds[0]]["evals"]:
            eq = _outcomes(results, arm, "equal_time")
            entry["equal_time"] = {**_rate(eq), "steps": [per_seed[s]["train"]["equal_time"]["step"] for s in seeds]}
        arms[arm] = entry
    base_seconds = arms["baseline"]["train_seconds"]
    for entry in arms.values():
        entry["train_time_ratio"] = entry["train_seconds"] / base_seconds if base_seconds else None
    pairs = [(arm, "baseline", kind, tag) for arm in results if arm != "baseline"
             for kind, tag in (("equal_steps", final), ("equal_wall_clock", "equal_time"))
             if tag in results[arm][min(results[arm])]["evals"]]
    if "anatomical_guided" in results and "anatomical" in results:
        pairs.append(("anatomical_guided", "anatomical", "guidance_effect", final))
    pairs += [(arm, same, "own_masks_reencoded", final)  # same images; own masks differ
              for arm, same in REENCODED.items() if arm in results and same in results]
    # an ablation against the shipped method: which part of it does the work
    pairs += [(arm, "anatomical", "ablation", final) for arm in ABLATIONS if arm in results and "anatomical" in results]
    comparisons = [compare(results, a, b, kind, tag, final,
                           "own_plausible" if kind == "own_masks_reencoded" else "seg_plausible")
                   for a, b, kind, tag in pairs]
    return {"calibration": cal, "arms": arms, "comparisons": comparisons}


def compare(results: Results, a_arm: str, b_arm: str, kind: str, tag: str, final: str,
            key: str = "seg_plausible") -> dict[str, Any]:
    """Arm ``a`` at evaluation ``tag`` against arm ``b`` at its final checkpoint, paired by seed and sample
    (``key``: the segmenter's masks of the samples, or ``own_plausible``, the models' own masks)."""
    a, b = _outcomes(results, a_arm, tag, key), _outcomes(results, b_arm, final, key)
    n = min(a.shape[1], b.shape[1])
    a, b = a[:, :n], b[:, :n]
    diff, ci = paired_bootstrap(a, b)
    test = mcnemar(a, b)
    fail_a, fail_b = 1 - a.mean(), 1 - b.mean()
    return {"a": a_arm, "b": b_arm, "kind": kind, "diff": diff, "ci95": list(ci), "p_value": test["p_value"],
            "a_only": test["a_only"], "b_only": test["b_only"],
            "failure_ratio": float(fail_a / fail_b) if fail_b > 0 else None}


# ------------------------------------------------------------------------------------------------ report
def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(ci: Optional[dict], digits: int = 3) -> str:
    if not ci or ci.get("mean") is None:
        return "–"
    if ci.get("lo") is None:
        return _num(ci["mean"], digits)
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def _scarce(settings: dict[str, Any]) -> str:
    n = settings.get("ldm_train_slices")
    if n is None:
        return ""
    return (f"; **data-scarce run: the diffusion models see only {n} training slices** ({max(1, n // 8)} patients), "
            "the autoencoder and the independent segmenter the whole split")


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    cal, arms, comps = summary["calibration"], summary["arms"], summary["comparisons"]
    s = meta["settings"]
    lines = ["# Anatomy benchmark report", "",
             f"Command: `{meta['command']}`  ", f"Preset `{meta['preset']}` on {meta['device']}; torch {meta['torch']}, "
             f"Lightning {meta['lightning']}; seeds {meta['seeds']}; start-noise seed {meta['noise_seed']}.  ",
             f"Phantom {s['size']}x{s['size']} slices ({s['train_slices']} train, {s['test_slices']} test, "
             f"different patients{_scarce(s)}), f4 KL autoencoder ({s['size'] // 4}x{s['size'] // 4}x3 latents, scale "
             f"{meta['scale_factor']:.4g} for every arm), UNet {s['unet']}, self-attention only in the middle block; "
             f"{s['steps']} AdamW steps (lr {s['lr']}, batch {s['batch']}), EMA weights, DDIM {s['sampler_steps']} "
             "steps (eta 0).", ""]
    if meta.get("note"):
        lines += [f"**Note:** {meta['note']}", ""]
    lines += ["Every image is judged by an **independent segmenter** (trained on the real training split only) and "
             "its mask checked against the phantom's anatomy rules (`ldm/data/anatomy_check.py`). A model's own "
             "masks are scored separately.", "",
             "## Calibration (real held-out slices)", "",
             "| what | value |", "|---|---|",
             f"| rule pass rate, true masks | {_pct(cal['true_mask_pass_rate'])} |",
             f"| rule pass rate, segmenter on real slices | {_pct(cal['real_pass_rate'])} |",
             f"| rule pass rate, segmenter on autoencoder reconstructions (ceiling of any LDM) | "
             f"{_pct(cal['reconstructed_pass_rate'])} |",
             f"| segmenter foreground Dice on real slices (per class {_fmt_list(cal['segmenter_dice']['per_class'])}) |"
             f" {_num(cal['segmenter_dice']['foreground_mean'])} |",
             f"| segmenter Dice on reconstructions | {_num(cal['reconstructed_segmenter_dice']['foreground_mean'])} |",
             f"| autoencoder L1 on real slices | {_num(cal['reconstruction_l1'])} |",
             f"| FID (segmenter features): reconstructions / real train slices vs test | "
             f"{_num(cal['reconstructed_image_stats']['fid_segmenter'])} / "
             f"{_num(cal['train_vs_test_image_stats']['fid_segmenter'])} |",
             f"| TSTR reference: segmenter trained on {s['tstr_pairs']} real pairs, Dice on test | "
             f"{_ci(mean_interval(list(cal['tstr_real_dice'].values())))} |"]
    if meta.get("mask_autoencoder"):
        d = meta["mask_autoencoder"]["train_reconstruction_dice"]
        steps = meta["mask_autoencoder"].get("steps")
        lines.append(f"| joint arm's mask autoencoder{f' ({steps} steps)' if steps else ''}: reconstruction Dice on "
                     f"the training masks (per class {_fmt_list(d['per_class'])}) | {_num(d['foreground_mean'])} |")
        d = meta["mask_autoencoder"].get("validation_reconstruction_dice")
        if d:
            lines.append(f"| joint arm's mask autoencoder: reconstruction Dice on the validation split's masks (per "
                         f"class {_fmt_list(d['per_class'])}) | {_num(d['foreground_mean'])} |")
    lines += ["",
             "## Arms (final checkpoint, equal optimiser steps)", "",
             "| arm | n | pass rate [95% Wilson] | own-mask pass | own vs segmenter Dice | TSTR Dice | FID seg | "
             "FID pixel | hist W1 | memorisation share | train s (ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        own = a["own_mask_pass_rate"]
        mem = a["memorisation"]["share_below_heldout_p05"]
        lines.append(f"| {name} | {a['n_samples']}x{len(a['seeds'])} | {_pct(a['pass_rate'])} "
                     f"[{_pct(a['ci95'][0])}, {_pct(a['ci95'][1])}] | {_pct(own['pass_rate']) if own else '–'} | "
                     f"{_ci(a['own_mask_dice_ci95'])} | {_ci(a['tstr_dice_ci95'])} | "
                     f"{_ci(a['image_stats']['fid_segmenter'], 2)} | {_ci(a['image_stats']['fid_pixel8'], 3)} | "
                     f"{_ci(a['image_stats']['histogram_w1'], 4)} | {_ci(mem)} | "
                     f"{a['train_seconds']:.1f} ({a['train_time_ratio']:.2f}x) |")
    if any(a.get("latent_rms") for a in arms.values()):
        real = cal.get("real_latent_rms")
        lines += ["", "Sampled latents' spread: RMS of the final image latents (scaled space) against the real test "
                  f"slices' ({_num(real, 2)}): a model far from convergence samples latents well off the encoder's "
                  "manifold that may still decode to plausible images. "
                  + "; ".join(f"{n} {_ci(a['latent_rms'], 2)}" for n, a in arms.items() if a.get("latent_rms")) + "."]
        again = {n: a["latent_rms_resampled_agreement"] for n, a in arms.items()
                 if a.get("latent_rms_resampled_agreement") is not None}
        if again:
            lines[-1] += (" Measured after the run by drawing the same samples again for "
                          + ", ".join(f"{n} (rule outcomes reproduced for {_pct(v)} of the samples)"
                                      for n, v in again.items()) + ".")
    heads = {n: a for n, a in arms.items() if a.get("own_mask_dice_real_ci95")}
    if heads:
        lines += ["", "Own masks of **real** test slices (the segmentation head at t = 0 on their posterior means, "
                  "against the true masks): the head alone, apart from how plausible the samples are. Per class: "
                  + ", ".join(CLASS_NAMES[1:]) + ".", "",
                  "| arm | Dice on real slices [95% t, seeds] | per class | rule pass of these masks |", "|---|---|---|---|"]
        for name, a in heads.items():
            lines.append(f"| {name} | {_ci(a['own_mask_dice_real_ci95'])} | "
                         f"{_fmt_list(a['own_mask_dice_real_per_class'][1:])} | {_pct(a['own_mask_real_pass_rate'])} |")
    lines += ["", "Per-seed pass rates: " + "; ".join(f"{n} {[round(v, 3) for v in a['per_seed_pass_rate']]}"
                                                        for n, a in arms.items()), "",
              "## Comparisons", "",
              "Against the baseline at equal steps and at equal wall-clock; the guided arm and the ablations (kind "
              "`ablation`) also against the shipped `anatomical` arm; `own masks reencoded` compares the rule pass rate of "
              "the own masks (same models, same images). "
              "diff = pass rate of the arm minus the other's; interval from a paired bootstrap over training "
              "seeds and samples; p from an exact McNemar test on the paired samples (same training seed, same start "
              "noise). McNemar treats the trained models as fixed; the bootstrap interval also covers training-seed "
              "variation, so read both. Failure ratio = arm failure rate / the other's failure rate.", "",
              "| arm | against | comparison | diff [95% CI] | McNemar p (arm only / other only) | failure ratio |",
              "|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['a']} | {c['b']} | {c['kind'].replace('_', ' ')} | {100 * c['diff']:+.1f} pts "
                     f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] | {c['p_value']:.3g} "
                     f"({c['a_only']} / {c['b_only']}) | {_num(c['failure_ratio'], 2)} |")
    eq = {n: a["equal_time"] for n, a in arms.items() if "equal_time" in a}
    if eq:
        lines += ["", "Equal wall-clock: each arm's checkpoint at the time the baseline (same seed) took for all its "
                  "steps: " + "; ".join(f"{n} at steps {v['steps']}" for n, v in eq.items()) + "."]
    lines += ["", "## Failure rate per rule (segmenter masks of the samples)", "",
              "| rule | real | reconstructed | " + " | ".join(arms) + " |",
              "|---|---|---|" + "---|" * len(arms)]
    for r in RULES:
        lines.append(f"| {r} | {_pct(cal['real_rules_failure'][r])} | {_pct(cal['reconstructed_rules_failure'][r])} | "
                     + " | ".join(_pct(a["rules"][r]) for a in arms.values()) + " |")
    steps = arms["baseline"]["curve"]
    lines += ["", "## Pass rate against training step", "",
              "| arm | " + " | ".join(f"step {k}" for k in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, a in arms.items():
        cells = [a["curve"].get(k) for k in steps]
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{_pct(v['pass_rate'])} [{_pct(v['ci95'][0])}, "
                                                 f"{_pct(v['ci95'][1])}] (n={v['n']})" for v in cells) + " |")
    lines += ["", "## Figures", "", "![pass rates](figures/pass_rates.png)", "", "![curve](figures/curve.png)", "",
              "![samples](figures/samples.png)", ""]
    return "\n".join(lines)


def _fmt_list(values: list) -> str:
    return ", ".join("–" if v is None else f"{v:.2f}" for v in values)


# ------------------------------------------------------------------------------------------------ figures
def _colour(masks: np.ndarray) -> np.ndarray:
    palette = np.asarray(CTORGAN_COLOURS, dtype=np.float32) / 255.0
    return palette[np.clip(masks, 0, len(palette) - 1)]


def figures(out_dir: str, summary: dict[str, Any], results: Results, steps: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    arms, cal = summary["arms"], summary["calibration"]
    paths = []
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    names = list(arms)
    rates = [arms[n]["pass_rate"] for n in names]
    err = [[r - arms[n]["ci95"][0] for n, r in zip(names, rates)], [arms[n]["ci95"][1] - r for n, r in zip(names, rates)]]
    ax.bar(names, rates, yerr=err, capsize=5, color="#4c72b0")
    for value, label, style in ((cal["real_pass_rate"], "real slices", "--"),
                                (cal["reconstructed_pass_rate"], "AE reconstructions", ":")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1, label=f"{label} {100 * value:.0f}%")
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("rule pass rate (independent segmenter)")
    ax.set_title("pass rate, 95% Wilson interval")
    ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="x", rotation=20)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(RULES))
    for i, n in enumerate(names):
        ax2.bar(x + i * width, [arms[n]["rules"][r] for r in RULES], width, label=n)
    ax2.set_xticks(x + width * (len(names) - 1) / 2, RULES, rotation=35, ha="right", fontsize=8)
    ax2.set_ylabel("failure rate")
    ax2.set_title("failures per rule")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "pass_rates.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in names:
        curve = arms[n]["curve"]
        st = [int(k) for k in curve]
        ax.plot(st, [v["pass_rate"] for v in curve.values()], marker="o", label=n)
        ax.fill_between(st, [v["ci95"][0] for v in curve.values()], [v["ci95"][1] for v in curve.values()], alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("rule pass rate")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "curve.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    final = f"step{steps}"
    rows = []
    for n in names:
        arr = results[n][0]["evals"][final]["arrays"]
        rows.append((f"{n}: samples", (arr["grid_images"][:8, 0] + 1) / 2, True))
        rows.append((f"{n}: segmenter masks", _colour(arr["grid_seg_masks"][:8]), False))
        if "grid_own_masks" in arr:
            rows.append((f"{n}: own masks", _colour(arr["grid_own_masks"][:8]), False))
    paths.append(sample_grid(rows, os.path.join(out_dir, "samples.png")))
    return paths


def sample_grid(rows: list[tuple[str, np.ndarray, bool]], path: str, columns: int = 8) -> str:
    """A figure of labelled rows of images (``(label, images in [0, 1] or RGB, greyscale?)``) saved at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), columns, figsize=(1.5 * columns, 1.6 * len(rows)), squeeze=False)
    for r, (label, imgs, grey) in enumerate(rows):
        for c in range(columns):
            axes[r, c].axis("off")
            if c < len(imgs):
                axes[r, c].imshow(imgs[c], cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_outputs(out: str, cal: dict, results: Results, preset: Any, meta: dict[str, Any]) -> dict[str, Any]:
    summary = aggregate(cal, results, preset.steps)
    summary["meta"] = meta
    tmp = os.path.join(out, "anatomy.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(out, "anatomy.json"))
    figures(os.path.join(out, "figures"), summary, results, preset.steps)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(summary, meta))
    return summary
