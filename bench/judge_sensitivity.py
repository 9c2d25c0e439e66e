#!/usr/bin/env python
"""How much of a corruption the benchmark-v2 judge sees: train a judge variant on the phantom-v2 training split and
report its sensitivity (share of corrupted test slices flagged, per corruption kind, at both minimum component
sizes), its pass rate on real test slices (specificity) and its Dice, beside a run's own judges.

    python bench/judge_sensitivity.py --copy-paste 0.5 -o bench/anatomy_v2_diagnostics/judge_copy_paste.json \
        [--run bench/out/v2_cpu] [--preset cpu] [--figure PATH]

With ``--run``, the run's setup record (its judges A and B, trained without augmentation) is put beside the new
judge in the output, and ``--figure`` draws a few corrupted slices with the true masks and each judge's masks.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import anatomy_models as am  # noqa: E402
import anatomy_v2 as v2  # noqa: E402
import records as rec  # noqa: E402
from ldm.evaluation.segmenter import load_segmenter, save_segmenter, segment, train_segmenter  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-o", "--out", required=True, help="JSON to write")
    p.add_argument("--preset", choices=sorted(v2.PRESETS_V2), default="cpu")
    p.add_argument("--copy-paste", "--copy_paste", dest="copy_paste", type=float, default=0.5,
                   help="copy-paste augmentation probability per training example (0: none)")
    p.add_argument("--base-channels", "--base_channels", dest="base_channels", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default=None, help="a bench/anatomy.py v2 run directory: its judges go beside")
    p.add_argument("--figure", default=None, help="PNG of corrupted slices with the judges' masks")
    p.add_argument("--threads", default="1")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    configure_threads(args.threads, True)
    preset = v2.PRESETS_V2[args.preset]
    protocol = rec.load_protocol()
    train, test = v2.split(preset, "train"), v2.split(preset, "test")
    t0 = time.perf_counter()
    judge = train_segmenter(am.TensorSlices(train["image"], train["segmentation"]), v2.NUM_CLASSES,
                            steps=preset.seg_steps, batch_size=16, base_channels=args.base_channels, seed=args.seed,
                            copy_paste_prob=args.copy_paste)
    name = f"copy_paste_{args.copy_paste:g}"
    out = {"preset": args.preset, "judge": {"base_channels": args.base_channels, "seed": args.seed,
                                            "copy_paste_prob": args.copy_paste, "steps": preset.seg_steps},
           "train_seconds": time.perf_counter() - t0, "code": rec.code_commit()}
    out["sensitivity"] = v2.sensitivity(preset, {name: judge}, protocol)
    seg = segment(judge, test["image"], batch_size=128)
    out["real_pass_rate"] = {k: float(v2.judge_masks(seg, f)["plausible"].mean())
                             for k, f in v2.min_sizes(protocol).items()}
    out["dice"] = v2._foreground_dice(seg, test["segmentation"])["foreground_mean"]
    judges = {name: judge}
    if args.run:
        setup = sorted(glob.glob(os.path.join(args.run, "records", "setup_*.json")))
        if setup:
            with open(setup[-1]) as f:
                cal = json.load(f)["calibration"]
            out["run_judges"] = {"sensitivity": cal["sensitivity"],
                                 "real_pass_rate": {j: cal[f"judge_{j}/real/primary"]["pass_rate"] for j in v2.JUDGES},
                                 "dice": {j: cal["judge_dice"][j]["foreground_mean"] for j in v2.JUDGES}}
        for j in v2.JUDGES:
            path = os.path.join(args.run, "setup", f"judge_{j}.pt")
            if os.path.isfile(path):
                judges[j] = load_segmenter(path)[0]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    if args.figure:
        figure(args.figure, preset, judges)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk.endswith("/primary")}
                      for k, v in out["sensitivity"].items()}, indent=1))
    return 0


def figure(path: str, preset: v2.PresetV2, judges: dict[str, torch.nn.Module], n: int = 6) -> None:
    """Rows per corruption kind: the true corrupted masks, then each judge's masks of the corrupted images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.data.labels import get_label_set
    from ldm.evaluation.report import overlay_masks

    palette = get_label_set("phantom2").palette()
    rows = []
    for kind in v2.pv2.CORRUPTIONS:
        data = v2.pv2.corrupted_arrays(preset.size, n, kind, seed=0, split="test")
        images = data["image"][:, 0].numpy()
        rows.append((f"{kind}: true mask", overlay_masks(images, data["segmentation"].numpy(), palette)))
        for name, judge in judges.items():
            rows.append((f"judge {name}", overlay_masks(images, segment(judge, data["image"]).numpy(), palette)))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.6 * len(rows)), squeeze=False)
    for i, (title, shown) in enumerate(rows):
        for k in range(n):
            axes[i][k].imshow(shown[k])
            axes[i][k].axis("off")
        axes[i][0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
