#!/usr/bin/env python
"""The anatomy benchmark on real anatomy: the MNI ICBM152 2009 brain template, grey and white matter.

    python bench/anatomy_mni.py -o bench/out/mni            # baseline + anatomical, 3 seeds (cpu preset)
    python bench/anatomy_mni.py -o /tmp/mni_quick --quick   # every stage at toy size (the tests)

The phantom's anatomy rules do not apply to a brain, so this arm reports what can be measured without them:
image statistics against the real slices, tissue statistics of the samples (through an independent tissue
segmenter trained on the real training slices), memorisation, the anatomical model's own masks (Dice against
the true tissue masks on autoencoder reconstructions of held-out slices, and against the segmenter on its
samples) and samples side by side. Writes ``OUT/mni.json``, ``OUT/report.md`` and ``OUT/figures/*.png``;
the run directory is resumable like ``bench/anatomy.py``'s.

Data: nilearn ships the template (T1, 1 mm, 197 x 233 x 189) and its grey/white-matter probability maps inside
the package (no download; ``pip install nilearn``, part of the ``test`` extra). Classes: 0 background
(everything that is not brain tissue, CSF included), 1 grey matter, 2 white matter: the likelier tissue where
its probability is >= 0.5. The volumes are written as NIfTI under ``OUT/data`` and read back through the
project's NIfTI dataset (axial slices with tissue, MR percentile scaling, padded square, resized). It is one
brain: training and held-out slices are interleaved blocks of axial levels of the same anatomy, so this
measures how well a model learns one real anatomy from ~100 slices, not generalisation to new subjects.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from scipy.stats import wasserstein_distance  # noqa: E402
from tqdm import tqdm  # noqa: E402

import anatomy as bench  # noqa: E402
import anatomy_eval as ev  # noqa: E402
import anatomy_models as am  # noqa: E402
from anatomy_report import sample_grid  # noqa: E402
from anatomy_stats import holm, mean_interval, seed_paired_test  # noqa: E402
from ldm.cli_flags import THREADS_HELP  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.evaluation.anatomy import dice_per_class  # noqa: E402
from ldm.evaluation.metrics import (PixelFeatureExtractor, extract_features, fid_from_features,  # noqa: E402
                                   histogram_distance)
from ldm.evaluation.segmenter import load_segmenter, save_segmenter, segment, train_segmenter  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

logger = logging.getLogger("anatomy_mni")
CLASSES = ("background", "grey_matter", "white_matter")
COLOURS = np.array([(0, 0, 0), (150, 150, 150), (245, 245, 245)], dtype=np.float32) / 255.0
TISSUE_PROBABILITY = 0.5
BLOCK = 8  # axial levels per block; every fourth block is held out
ARMS = ("baseline", "anatomical")


# ------------------------------------------------------------------------------------------------ data
def template_volumes() -> tuple[Any, np.ndarray]:
    """The MNI ICBM152 2009 T1 template (a nibabel image) and its tissue labels (uint8, same grid)."""
    try:
        from nilearn import datasets
    except ImportError as err:
        raise RuntimeError("the MNI arm needs nilearn, which ships the ICBM152 template inside the package: "
                           "pip install nilearn (or pip install -e '.[test]')") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = datasets.load_mni152_template(resolution=1)
        gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
        wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    labels = np.zeros(gm.shape, dtype=np.uint8)
    labels[(gm >= TISSUE_PROBABILITY) & (gm >= wm)] = 1
    labels[(wm >= TISSUE_PROBABILITY) & (wm > gm)] = 2
    return t1, labels


def write_template(root: str) -> tuple[str, str]:
    """``root/images/mni152.nii.gz`` (T1, float32) and ``root/masks/mni152.nii.gz`` (labels), same affine."""
    import nibabel as nib

    images, masks = os.path.join(root, "images"), os.path.join(root, "masks")
    if not all(os.path.isfile(os.path.join(folder, "mni152.nii.gz")) for folder in (images, masks)):
        t1, labels = template_volumes()
        os.makedirs(images, exist_ok=True)
        os.makedirs(masks, exist_ok=True)
        for folder, data in ((images, np.asarray(t1.get_fdata(), dtype=np.float32)), (masks, labels)):
            img = nib.Nifti1Image(data, t1.affine)
            img.header.set_xyzt_units("mm")
            tmp = os.path.join(folder, "mni152.tmp.nii.gz")
            nib.save(img, tmp)
            os.replace(tmp, os.path.join(folder, "mni152.nii.gz"))
    return images, masks


def mni_slices(root: str, size: int) -> dict[str, torch.Tensor]:
    """Every axial slice with brain tissue, through ``MedicalImagesBase``: images ``[N, 1, size, size]`` in
    [-1, 1], masks ``[N, size, size]``, ``level`` (the slice index along the axial axis)."""
    from ldm.data.medical_images import MedicalImagesBase

    images, masks = write_template(root)
    ds = MedicalImagesBase(images, masks, size=size, n_labels=len(CLASSES), intensity="mr", slice_axis=2,
                           skip_empty_slices=True, square="pad", interpolation="area")
    items = [ds[i] for i in range(len(ds))]
    return {"image": torch.stack([torch.as_tensor(np.asarray(it["image"])) for it in items]).permute(0, 3, 1, 2)
            .float().contiguous(),
            "segmentation": torch.stack([torch.as_tensor(np.asarray(it["segmentation"])).long() for it in items]),
            "level": torch.tensor([e.slice_index for e in ds.examples])}


def split(data: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Training and held-out slices: blocks of ``BLOCK`` consecutive axial levels, every fourth held out."""
    held = ((data["level"] - data["level"].min()) // BLOCK) % 4 == 2
    pick = lambda m: {k: v[m] for k, v in data.items()}  # noqa: E731
    return pick(~held), pick(held)


# ------------------------------------------------------------------------------------------------ measures
def dice(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Pooled Dice of grey and white matter and their mean."""
    per = dice_per_class(pred, target, len(CLASSES))[1:]
    return {"grey_matter": float(per[0]), "white_matter": float(per[1]), "mean": float(np.nanmean(per))}


def tissue_fractions(masks: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per mask: the share of the image that is brain tissue, and grey matter's share of the tissue (NaN when
    there is none)."""
    m = np.asarray(masks)
    gm, wm = (m == 1).mean(axis=(1, 2)), (m == 2).mean(axis=(1, 2))
    tissue = gm + wm
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(tissue > 0, gm / np.where(tissue > 0, tissue, 1), np.nan)
    return {"tissue": tissue, "grey_share": share}


def tissue_statistics(masks: torch.Tensor | np.ndarray, real: dict[str, np.ndarray]) -> dict[str, float]:
    """W1 distances of the tissue fractions from the real slices', and the share of images with no tissue."""
    f = tissue_fractions(masks)
    share = f["grey_share"][np.isfinite(f["grey_share"])]
    return {"w1_tissue_fraction": float(wasserstein_distance(f["tissue"], real["tissue"])),
            "w1_grey_share": float(wasserstein_distance(share, real["grey_share"])) if share.size else float("nan"),
            "no_tissue_share": float((f["tissue"] == 0).mean())}


def pixel_fid(samples: torch.Tensor, real: torch.Tensor) -> float:
    pixel = PixelFeatureExtractor(8)
    return fid_from_features(extract_features(pixel, samples), extract_features(pixel, real))


# ------------------------------------------------------------------------------------------------ arms
def arm_config(arm: str, preset: am.Preset, ae_ckpt: str, scale: float) -> dict[str, Any]:
    """The phantom benchmark's arm config with the brain's three classes (no label set, no anatomy rules)."""
    cfg = am.arm_config(arm, preset, ae_ckpt, scale)
    if arm != "baseline":
        cfg["params"]["unet_config"]["params"]["num_anatomical_classes"] = len(CLASSES)
        cfg["params"]["label_set"] = None
        cfg["params"]["anatomical_class_weights"] = None
    return cfg


def evaluate(arm: str, config: dict, ckpt: str, seed: int, preset: am.Preset, ctx: dict, path: str) -> dict:
    """Sample ``preset.samples`` images from one trained model and measure them (cached in ``path``.json/.npz)."""
    if os.path.isfile(path + ".json") and os.path.isfile(path + ".npz"):
        return bench._load_eval(path)
    device, seg = ctx["device"], ctx["seg"]
    model = am.load_trained(config, ckpt, device)
    own = arm != "baseline"
    bar = tqdm(total=preset.samples, desc=f"mni {arm} seed {seed}", unit="img", disable=not ctx["progress"])
    drawn = am.draw_samples(model, preset.samples, preset.sampler_steps, bench.NOISE_SEED, 250, device, own, bar.update)
    bar.close()
    images = drawn["image"]
    seg_masks = segment(seg, images, batch_size=128)
    info: dict[str, Any] = {"n": len(images), "ckpt": os.path.basename(ckpt),
                            "fid_pixel8": pixel_fid(images, ctx["all"]["image"]),
                            "histogram_w1": histogram_distance(images, ctx["all"]["image"]),
                            "tissue": tissue_statistics(seg_masks, ctx["real_fractions"]),
                            "memorisation": ev.memorisation(images, ctx["train"]["image"], ctx["heldout_nn"])}
    arrays = {"grid_images": images[:16].numpy(), "grid_seg_masks": seg_masks[:16].numpy(),
              **{f"tissue_{k}": v for k, v in tissue_fractions(seg_masks).items()}}
    if own:
        info["own_dice_vs_segmenter"] = dice(drawn["own_mask"], seg_masks)
        # the head on the posterior means of held-out real slices, against their true tissue masks
        info["own_dice_on_reconstructions"] = dice(ev.head_masks_on_real(model, ctx["held"]["image"]),
                                                   ctx["held"]["segmentation"])
        arrays["grid_own_masks"] = drawn["own_mask"][:16].numpy()
    np.savez_compressed(path + ".npz", **arrays)
    bench._jdump(info, path + ".json")
    return bench._load_eval(path)


def run_arm_seed(arm: str, seed: int, preset: am.Preset, ctx: dict, wait: bool = True) -> dict:
    """Train and evaluate one arm for one seed (or reuse what is on disk); ``bench.Busy`` if another process is
    on it and ``wait`` is false."""
    out = os.path.join(ctx["out"], "arms", arm, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    with bench.exclusive(os.path.join(out, "work"), wait=wait):
        config = arm_config(arm, preset, ctx["ae_ckpt"], ctx["scale"])
        info = am.train_ldm(config, ctx["train"], preset, seed, out, ctx["device"], progress=ctx["progress"])
        ckpt = info["checkpoints"][str(preset.steps)]
        return {"train": info, "eval": evaluate(arm, config, ckpt, seed, preset, ctx,
                                                os.path.join(out, f"eval_step{preset.steps:06d}"))}


# ------------------------------------------------------------------------------------------------ report
METRICS = (  # (key, how to read it from an evaluation, lower is better)
    ("fid_pixel8", lambda e: e["fid_pixel8"], True),
    ("histogram_w1", lambda e: e["histogram_w1"], True),
    ("w1_tissue_fraction", lambda e: e["tissue"]["w1_tissue_fraction"], True),
    ("w1_grey_share", lambda e: e["tissue"]["w1_grey_share"], True),
    ("no_tissue_share", lambda e: e["tissue"]["no_tissue_share"], True),
    ("memorisation_share", lambda e: e["memorisation"]["share_below_heldout_p05"], None),
    ("median_nn_ratio", lambda e: e["memorisation"]["median_nn_ratio"], None),
)
OWN_METRICS = (
    ("own_dice_on_reconstructions", lambda e: e["own_dice_on_reconstructions"]["mean"]),
    ("own_dice_on_reconstructions_grey", lambda e: e["own_dice_on_reconstructions"]["grey_matter"]),
    ("own_dice_on_reconstructions_white", lambda e: e["own_dice_on_reconstructions"]["white_matter"]),
    ("own_dice_vs_segmenter", lambda e: e["own_dice_vs_segmenter"]["mean"]),
)


def summarise(cal: dict, results: dict[str, dict[int, dict]]) -> dict[str, Any]:
    arms: dict[str, Any] = {}
    for arm, per_seed in results.items():
        seeds = sorted(per_seed)
        evals = [per_seed[s]["eval"] for s in seeds]
        row: dict[str, Any] = {"seeds": seeds, "n_samples": int(sum(e["n"] for e in evals)),
                               "train_seconds": float(np.mean([per_seed[s]["train"]["train_seconds"] for s in seeds]))}
        for key, get, _ in METRICS:
            row[key] = mean_interval([get(e) for e in evals])
        for key, get in OWN_METRICS:
            row[key] = mean_interval([get(e) for e in evals]) if "own_dice_vs_segmenter" in evals[0] else None
        arms[arm] = row
    comparisons = []
    if "baseline" in results:
        for arm in results:
            if arm == "baseline":
                continue
            common = sorted(set(results[arm]) & set(results["baseline"]))
            for key, get, _ in METRICS:
                a = [get(results[arm][s]["eval"]) for s in common]
                b = [get(results["baseline"][s]["eval"]) for s in common]
                comparisons.append({"a": arm, "b": "baseline", "metric": key,
                                    "diff": mean_interval([x - y for x, y in zip(a, b)]),
                                    "seed_test": seed_paired_test(a, b)})
    # seed-level paired t-tests (the training seed is the unit), Holm over every metric and arm
    adjusted = holm({str(i): c["seed_test"].get("p") for i, c in enumerate(comparisons)})
    for i, c in enumerate(comparisons):
        c["p_holm"] = adjusted[str(i)]
    return {"calibration": cal, "arms": arms, "comparisons": comparisons}


def _ci(c: Optional[dict], digits: int = 3) -> str:
    if c is None or c.get("mean") is None:
        return "–"
    if c.get("lo") is None:
        return f"{c['mean']:.{digits}f}"
    return f"{c['mean']:.{digits}f} [{c['lo']:.{digits}f}, {c['hi']:.{digits}f}]"


def _p(p: Optional[float]) -> str:
    return "–" if p is None else f"{p:.3g}"


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    cal, arms = summary["calibration"], summary["arms"]
    s = meta["settings"]
    lines = ["# Anatomy benchmark on real anatomy: MNI ICBM152 2009 (grey and white matter)", "",
             f"Command: `{meta['command']}`  ", f"Preset `{meta['preset']}` on {meta['device']}; torch {meta['torch']}; "
             f"seeds {meta['seeds']}; start-noise seed {meta['noise_seed']}.  ",
             f"{cal['n_slices']} axial slices with tissue of one template brain at {s['size']}x{s['size']} "
             f"({cal['n_train']} for training, {cal['n_held_out']} held out: every fourth block of {BLOCK} levels), "
             f"f4 KL autoencoder (latent scale {meta['scale_factor']:.4g}), UNet {s['unet']}, {s['steps']} AdamW steps "
             f"(lr {s['lr']}, batch {s['batch']}), EMA weights, DDIM {s['sampler_steps']} steps (eta 0).", "",
             "One brain: held-out slices are other axial levels of the same anatomy, so this measures how well a model "
             "learns one real anatomy from about a hundred slices, not generalisation to new subjects. The phantom's "
             "anatomy rules do not apply; samples are described by image statistics against all real slices and by "
             "the tissue an **independent segmenter** (trained on the training slices only) finds in them.", "",
             "## Calibration", "", "| what | value |", "|---|---|",
             f"| segmenter Dice on held-out slices (grey, white) | {cal['segmenter_dice']['mean']:.3f} "
             f"({cal['segmenter_dice']['grey_matter']:.3f}, {cal['segmenter_dice']['white_matter']:.3f}) |",
             f"| segmenter Dice on held-out reconstructions | {cal['reconstructed_segmenter_dice']['mean']:.3f} |",
             f"| autoencoder reconstruction L1 (held out) | {cal['reconstruction_l1']:.4f} |",
             f"| pixel FID, reconstructions of all slices vs real (floor) | {cal['reconstructed_fid_pixel8']:.3f} |",
             f"| tissue-fraction W1, reconstructions vs real | {cal['reconstructed_tissue']['w1_tissue_fraction']:.4f} |",
             "", "## Arms (mean over training seeds, 95 % t interval)", "",
             "| arm | samples | pixel FID | histogram W1 | tissue-fraction W1 | grey-share W1 | no tissue | "
             "memorisation share | NN ratio | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        lines.append(f"| {name} | {a['n_samples']} | {_ci(a['fid_pixel8'])} | {_ci(a['histogram_w1'], 4)} | "
                     f"{_ci(a['w1_tissue_fraction'], 4)} | {_ci(a['w1_grey_share'], 4)} | {_ci(a['no_tissue_share'])} | "
                     f"{_ci(a['memorisation_share'])} | {_ci(a['median_nn_ratio'])} | {a['train_seconds']:.0f} |")
    own = {n: a for n, a in arms.items() if a.get("own_dice_vs_segmenter")}
    if own:
        lines += ["", "## Own masks", "",
                  "Dice of the model's segmentation head on the posterior means of held-out real slices against the "
                  "true tissue masks (how well it labels real anatomy), and of its masks of its own samples against "
                  "the independent segmenter's masks of them.", "",
                  "| arm | Dice on held-out reconstructions (grey, white) | Dice vs segmenter on samples |",
                  "|---|---|---|"]
        for name, a in own.items():
            lines.append(f"| {name} | {_ci(a['own_dice_on_reconstructions'])} "
                         f"({_ci(a['own_dice_on_reconstructions_grey'])}, {_ci(a['own_dice_on_reconstructions_white'])}) "
                         f"| {_ci(a['own_dice_vs_segmenter'])} |")
    if summary["comparisons"]:
        lines += ["", "## Against the baseline", "",
                  "Difference arm − baseline per metric, paired by training seed (mean, 95 % t interval over seeds; "
                  "an interval that holds 0 shows no difference), the paired t-test's p over seeds and its Holm "
                  "adjustment over every row.", "", "| arm | metric | diff | seeds | p | p (Holm) |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['a']} | {c['metric']} | {_ci(c['diff'], 4)} | {c['seed_test']['n']} | "
                  f"{_p(c['seed_test'].get('p'))} | {_p(c.get('p_holm'))} |" for c in summary["comparisons"]]
    lines += ["", "Memorisation share: samples closer (pixel L2 at 32x32) to a training slice than 95 % of held-out "
              "slices are (0.05 without copying; held-out slices are neighbours of training levels here, so read it "
              "between arms). Figures: `figures/samples.png` (real slices, samples, masks), `figures/tissue.png` "
              "(tissue fractions of samples and real slices).", ""]
    return "\n".join(lines)


def figures(out_dir: str, results: dict[str, dict[int, dict]], real: dict[str, torch.Tensor],
            real_fractions: dict[str, np.ndarray]) -> list[str]:
    """``samples.png`` (real slices and masks, each arm's samples and masks) and ``tissue.png`` (per image: tissue
    share and grey-matter share, samples of each arm's first seed against the real slices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    idx = np.linspace(0, len(real["image"]) - 1, 8).round().astype(int)
    rows = [("real slices", (real["image"][idx, 0].numpy() + 1) / 2, True),
            ("true tissue masks", COLOURS[real["segmentation"][idx].numpy()], False)]
    for arm, per_seed in results.items():
        arr = per_seed[min(per_seed)]["eval"]["arrays"]
        rows.append((f"{arm}: samples", (arr["grid_images"][:8, 0] + 1) / 2, True))
        rows.append((f"{arm}: segmenter masks", COLOURS[arr["grid_seg_masks"][:8]], False))
        if "grid_own_masks" in arr:
            rows.append((f"{arm}: own masks", COLOURS[np.clip(arr["grid_own_masks"][:8], 0, 2)], False))
    paths = [sample_grid(rows, os.path.join(out_dir, "samples.png"))]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm, per_seed in results.items():
        arr = per_seed[min(per_seed)]["eval"]["arrays"]
        ax.scatter(arr["tissue_tissue"], arr["tissue_grey_share"], s=4, alpha=0.3, label=f"{arm} (seed {min(per_seed)})")
    ax.scatter(real_fractions["tissue"], real_fractions["grey_share"], s=14, c="k", marker="x", label="real slices")
    ax.set_xlabel("brain tissue share of the image (segmenter)")
    ax.set_ylabel("grey matter share of the tissue")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "tissue.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="run directory (created; reused when it exists)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms, from: {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per arm (preset: 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (preset)")
    p.add_argument("--samples", type=int, default=None, help="samples per trained model (preset: 1000)")
    p.add_argument("--preset", choices=sorted(am.PRESETS), default=None,
                   help="scale (default: quick with --quick, gpu on CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="toy sizes: every stage in well under a minute")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", default="auto", help=THREADS_HELP + " (decided once at the start here)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with bench.quiet_training_logs():
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Optional[list[str]]) -> int:
    try:
        device = resolve_device(args.device)
        configure_threads(args.threads, device.type == "cpu")
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; arms of the MNI run: {', '.join(ARMS)}")
        arms = ["baseline"] + [a for a in arms if a != "baseline"]
        name = args.preset or ("quick" if args.quick else "gpu" if device.type == "cuda" else "cpu")
        preset = dataclasses.replace(bench.resolve_preset(args_for_preset(args, name), device), fractions=(1.0,))
        settings = bench.check_run_dir(args.out, preset, name)
        data = mni_slices(os.path.join(args.out, "data"), preset.size)
    except (ValueError, RuntimeError) as err:
        print(f"anatomy_mni.py: error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    logger.info("MNI ICBM152, preset %s on %s -> %s", name, bench._device_name(device), args.out)
    train, held = split(data)
    with bench.exclusive(os.path.join(args.out, "autoencoder")):
        ae_ckpt, scale = bench.train_autoencoder(preset, train, args.out, device, args.progress)
    with bench.exclusive(os.path.join(args.out, "segmenter")):
        seg = tissue_segmenter(preset, train, args.out, device, args.progress)
    with bench.exclusive(os.path.join(args.out, "calibration")):
        real_pairs = tissue_fractions(segment(seg, data["image"], batch_size=128))  # per slice, for the figure
        real_fractions = {"tissue": real_pairs["tissue"],
                          "grey_share": real_pairs["grey_share"][np.isfinite(real_pairs["grey_share"])]}
        cal = calibrate(preset, data, train, held, ae_ckpt, seg, args.out, device, real_fractions)
    ctx = {"out": args.out, "device": device, "seg": seg, "train": train, "held": held, "all": data,
           "ae_ckpt": ae_ckpt, "scale": scale, "progress": args.progress, "real_fractions": real_fractions,
           "heldout_nn": ev.pixel_nn_distances(held["image"], train["image"])}
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    pending = [(seed, arm) for seed in range(preset.seeds) for arm in arms]
    while pending:  # several processes may share the run directory: each takes the tasks no other one holds
        for seed, arm in list(pending):
            try:
                results[arm][seed] = run_arm_seed(arm, seed, preset, ctx, wait=len(pending) == 1)
            except bench.Busy:
                continue
            pending.remove((seed, arm))
            break
        else:
            time.sleep(10)
    summary = summarise(cal, results)
    meta = {"command": "python bench/anatomy_mni.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": name, "settings": settings, "seeds": list(range(preset.seeds)), "noise_seed": bench.NOISE_SEED,
            "device": bench._device_name(device), "torch": torch.__version__, "lightning": pl.__version__,
            "python": platform.python_version(), "wall_seconds_this_call": time.time() - started,
            "scale_factor": scale, "classes": list(CLASSES), "tissue_probability": TISSUE_PROBABILITY,
            "configs": {a: arm_config(a, preset, "<autoencoder.ckpt>", scale) for a in arms}}
    summary["meta"] = meta
    bench._jdump(summary, os.path.join(args.out, "mni.json"))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(markdown(summary, meta))
    figures(os.path.join(args.out, "figures"), results, data, real_pairs)
    logger.info("wrote %s and %s", os.path.join(args.out, "mni.json"), os.path.join(args.out, "report.md"))
    return 0


def args_for_preset(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """What ``bench.resolve_preset`` reads (no data-scarce option here: the whole template is used)."""
    return argparse.Namespace(preset=name, quick=args.quick, seeds=args.seeds, steps=args.steps,
                              samples=args.samples, train_slices=None)


def tissue_segmenter(preset: am.Preset, train: dict, out: str, device: torch.device,
                     progress: bool) -> torch.nn.Module:
    """The independent tissue segmenter, trained on the real training slices only."""
    path = os.path.join(out, "segmenter.pt")
    if not os.path.isfile(path):
        model = train_segmenter(am.TensorSlices(train["image"], train["segmentation"]), len(CLASSES),
                                steps=preset.seg_steps, batch_size=16, seed=0, device=device, progress=progress)
        save_segmenter(path, model, {"trained_on": "MNI ICBM152 training slices (real)", "steps": preset.seg_steps})
    return load_segmenter(path, device)[0]


def calibrate(preset: am.Preset, data: dict, train: dict, held: dict, ae_ckpt: str, seg: torch.nn.Module,
              out: str, device: torch.device, real_fractions: dict[str, np.ndarray]) -> dict[str, Any]:
    """What real slices score: the segmenter on held-out slices and their reconstructions, the autoencoder's
    floor for the image and tissue statistics."""
    path = os.path.join(out, "calibration.json")
    if os.path.isfile(path):
        return bench._jload(path)
    ae = am.load_autoencoder(ae_ckpt, preset, device)
    with torch.no_grad():
        rec = torch.cat([ae.decode(ae.encode(x.to(device)).mode()).clamp(-1, 1).float().cpu()
                         for x in data["image"].split(128)])
    is_held = torch.isin(data["level"], held["level"])
    cal = {"n_slices": len(data["image"]), "n_train": len(train["image"]), "n_held_out": len(held["image"]),
           "segmenter_dice": dice(segment(seg, held["image"], batch_size=128), held["segmentation"]),
           "reconstructed_segmenter_dice": dice(segment(seg, rec[is_held], batch_size=128), held["segmentation"]),
           "reconstruction_l1": float((rec[is_held] - held["image"]).abs().mean()),
           "reconstructed_fid_pixel8": pixel_fid(rec, data["image"]),
           "reconstructed_tissue": tissue_statistics(segment(seg, rec, batch_size=128), real_fractions),
           "true_tissue_fraction_mean": float(tissue_fractions(data["segmentation"])["tissue"].mean())}
    bench._jdump(cal, path)
    return cal


if __name__ == "__main__":
    sys.exit(main())
