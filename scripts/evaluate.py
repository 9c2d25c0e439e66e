#!/usr/bin/env python
r"""Compare sample folders (e.g. anatomical model vs baseline) against real data; writes a report.

Example:
    python scripts/evaluate.py --samples anatomical=samples/anat baseline=samples/base \
        --real configs/latent-diffusion/demo_phantom_anatomical.yaml --real_split validation \
        --rules phantom --segmenter logs/segmenter.pt -o reports/demo
Writes report.md, report.json and comparison.png into the output folder and prints the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ldm.data.labels import LABEL_SETS, get_label_set, get_rule_checker  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm.evaluation import compare, features, metrics, report  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", required=True, metavar="NAME=DIR",
                   help="sample folders of scripts/sample.py, each named (a bare DIR is named after the folder)")
    p.add_argument("--real", required=True, metavar="DIR_OR_CONFIG",
                   help="real images: a folder (images/*.png [+ masks/*.png]) or a dataset/main.py config YAML")
    p.add_argument("--real_split", default="validation", help="split of a main.py config's data section")
    p.add_argument("--max_real", type=int, default=None, help="use at most this many real images (default: all)")
    p.add_argument("--max_samples", type=int, default=None,
                   help="use at most this many samples per set (default: all)")
    p.add_argument("--label_set", default="ctorgan",
                   help=f"label set of the masks ({', '.join(LABEL_SETS)}): default class names and count, and the "
                        "checker of --rules label_set")
    p.add_argument("--num_classes", type=int, default=None,
                   help="label classes (default: from --class_names, else the label set's)")
    p.add_argument("--class_names", nargs="+", default=None,
                   help="class names, background first (default: the label set's when the class count matches)")
    p.add_argument("--rules", default="none",
                   help="mask rule checker: 'label_set' (the label set's), 'phantom' (ldm.data.anatomy_check), "
                        "a dotted function path, or 'none'")
    p.add_argument("--segmenter", default=None, help="checkpoint of scripts/train_segmenter.py")
    p.add_argument("--inception", default=None,
                   help=f"local Inception-v3 weights for FID/KID (or set {metrics.INCEPTION_ENV}); "
                        "without them only feature-free numbers and pixel-feature FID/KID are computed")
    p.add_argument("--fid_inception", default=None, metavar="PATH",
                   help=f"the standard FID Inception weights ({features.FID_INCEPTION_FILE}, torch-fidelity's; or "
                        f"set {features.FID_INCEPTION_ENV}): keys fid_tf_inception, kid_tf_inception, comparable with "
                        "published FIDs (needs the 'metrics' extra). Images: 8-bit, grey replicated to RGB, resized "
                        "to 299 px as the original FID")
    p.add_argument("--medical_features", nargs="+", default=[], metavar="[NAME=]PATH",
                   help="feature networks for FID/KID (e.g. RadImageNet ResNet-50): a torch.export archive (.pt2) "
                        "or a torchvision ResNet-50 state dict; keys fid_NAME (default NAME: the file name). "
                        "Images: grey replicated to RGB, resized to --feature_size px, normalised by --feature_norm")
    p.add_argument("--feature_size", type=int, default=224, help="input size of --medical_features networks")
    p.add_argument("--feature_norm", default="imagenet", choices=features.NORMALIZATIONS,
                   help="input normalisation of --medical_features networks: ImageNet mean/std on [0, 1], "
                        "[0, 1] (unit) or [-1, 1] (symmetric)")
    p.add_argument("--kid_subset_size", type=int, default=1000, help="images per KID subset")
    p.add_argument("--ms_ssim_pairs", type=int, default=1000,
                   help="image pairs per set for MS-SSIM diversity (0: skip)")
    p.add_argument("--grid", type=int, default=8, help="images per set shown in the figure (each with its mask)")
    p.add_argument("-o", "--outdir", required=True, help="report folder")
    add_threads_argument(p)
    p.add_argument("--device", default=None,
                   help="torch device for feature networks (default: the first accelerator, else the CPU)")
    return p


def _named(entries: list[str]) -> dict[str, str]:
    out = {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(entry)), entry
        if name in out:
            raise ValueError(f"two sample sets are named {name!r}; name them with NAME=DIR")
        out[name] = path
    return out


def check_sample_folder(folder: str) -> None:
    """Name the first unreadable file of a sample folder (an empty or damaged PNG, a damaged samples.json)
    instead of failing on it later; warn about samples an interrupted session left incomplete."""
    from PIL import Image

    from ldm.sample_io import IMAGE_DIR, MASK_DIR, read_manifest

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"sample folder {folder} does not exist")
    manifest = read_manifest(folder)
    subs = (IMAGE_DIR, MASK_DIR) if os.path.isdir(os.path.join(folder, IMAGE_DIR)) else ("",)  # or flat PNGs
    for sub in subs:
        path = os.path.join(folder, sub)
        names = sorted(n for n in os.listdir(path) if n.endswith(".png")) if os.path.isdir(path) else []
        for name in names:
            file = os.path.join(path, name)
            try:
                with Image.open(file) as img:
                    img.load()
            except (OSError, SyntaxError, ValueError) as err:
                raise ValueError(f"{file} is empty or not a readable image ({type(err).__name__}); a sampling session "
                                 "was interrupted or the file was damaged: rerun scripts/sample.py with the same -l "
                                 "to redo incomplete samples, or delete the file") from err
    if manifest.get("incomplete"):
        logging.getLogger(__name__).warning("%s: samples.json lists incomplete samples %s; rerun scripts/sample.py "
                                            "with the same -l to redo them", folder, manifest["incomplete"])


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    configure_threads(args.threads, device.type == "cpu")
    label_set = get_label_set(args.label_set)
    num_classes = args.num_classes or (len(args.class_names) if args.class_names else label_set.num_classes)
    names = args.class_names or (list(label_set.classes) if num_classes == label_set.num_classes else None)
    if names is not None and len(names) != num_classes:
        raise ValueError(f"--class_names has {len(names)} names but --num_classes is {num_classes}")

    for path in [*_named(args.samples).values(), *([args.real] if os.path.isdir(args.real) else [])]:
        check_sample_folder(path)
    sets = {name: compare.load_sample_set(path, args.max_samples) for name, path in _named(args.samples).items()}
    real = compare.load_real(args.real, args.real_split, args.max_real)
    extractors: dict = {"pixel": metrics.PixelFeatureExtractor(8)}
    if args.inception or os.environ.get(metrics.INCEPTION_ENV):
        extractors["inception"] = metrics.InceptionFeatureExtractor(args.inception).to(device)
    else:
        print(f"note: no Inception weights (--inception or {metrics.INCEPTION_ENV}); FID/KID use pixel features only")
    if args.fid_inception or os.environ.get(features.FID_INCEPTION_ENV):
        extractors["tf_inception"] = features.FIDInceptionExtractor(args.fid_inception).to(device)
    for name, path in _named(args.medical_features).items():
        extractors[os.path.splitext(name)[0]] = features.MedicalFeatureExtractor(
            path, args.feature_size, args.feature_norm).to(device)
    segmenter = None
    if args.segmenter:
        from ldm.evaluation.segmenter import load_segmenter

        segmenter, _ = load_segmenter(args.segmenter, device)
    checker = label_set.load_rule_checker() if args.rules == "label_set" else get_rule_checker(args.rules)
    evaluation = compare.evaluate_sets(sets, real, num_classes, extractors, checker, segmenter, names,
                                       kid_subset_size=args.kid_subset_size, ms_ssim_pairs=args.ms_ssim_pairs)
    results = evaluation.results
    panels = {}
    for name, images in [("real", real["images"]), *((n, d["images"]) for n, d in sets.items())]:
        masks, source, rate_key = evaluation.masks.get(name, (None, "", ""))
        panels[name] = report.SetPanel(images[:args.grid, 0].numpy(), None if masks is None else masks[:args.grid],
                                       source, results.get(name, {}).get(rate_key))
    meta = {"real": args.real, "real_split": args.real_split, "num_real": len(real["images"]),
            "samples": {n: {"dir": p, "checkpoint_sha256": sets[n]["manifest"].get("checkpoint_sha256"),
                            "ddim_steps": sets[n]["manifest"].get("ddim_steps"), "eta": sets[n]["manifest"].get("eta"),
                            "mask_source": sets[n]["manifest"].get("mask_source")}
                        for n, p in _named(args.samples).items()},
            "rules": args.rules, "segmenter": args.segmenter, "features": list(extractors),
            "num_classes": num_classes, "class_names": names}
    area_source = "the segmenter's masks (real: the true masks)" if segmenter is not None else "the masks shown"
    paths = report.write_report(args.outdir, results, meta, panels,
                                {k: np.asarray(v) for k, v in evaluation.area_fractions.items()}, names,
                                label_set.palette(num_classes), area_source)
    print(report.format_table(results))
    print("report:", ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
