#!/usr/bin/env python
"""Figures and a JSON summary of what an anatomical run's registers learned.

Example:
    python scripts/inspect_registers.py -r logs/2026-01-01T00-00-00_demo -l reports/registers -n 4 -c 20
Writes register_similarity.png, attention_maps.png, attention_vs_timestep.png, register_diagnostics.png and
registers.json. The diagnostics (on phantom validation slices, noised at five levels): per register layer
||output - input|| / ||input||, the prediction error with the register outputs zeroed against intact, the
class-attention entropy, and the cosine similarity of register states between slices of different body heights.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402

import torch  # noqa: E402

from ldm.data.labels import label_set_of  # noqa: E402
from ldm.trust import add_trust_argument, check_run  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm import sampling  # noqa: E402
from ldm.evaluation.registers import inspect_registers  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml")
    p.add_argument("-l", "--logdir", required=True, metavar="OUT_DIR")
    p.add_argument("-n", "--n_samples", type=int, default=4, help="samples whose trajectories are recorded")
    p.add_argument("-c", "--custom_steps", type=int, default=20, help="DDIM steps")
    p.add_argument("-e", "--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class_names", nargs="+", default=None,
                   help="default: the names of the model's label_set (class0.. without one)")
    p.add_argument("--diag_latents", type=int, default=8,
                   help="phantom slices for the register diagnostics (0: skip them)")
    p.add_argument("--no-ema", dest="ema", action="store_false")
    p.add_argument("--unsafe-load", dest="unsafe_load", action="store_true")
    add_trust_argument(p)
    add_threads_argument(p)
    p.add_argument("--device", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_run(args.resume, args.base, args.trust_config)  # a run's config names allow-listed targets only
    device = resolve_device(args.device)
    configure_threads(args.threads, device.type == "cpu")
    model, info = sampling.load_model_for_sampling(args.resume, args.base, args.unsafe_load, device,
                                                   trust_config=args.trust_config)
    label_set = label_set_of(model, getattr(model.unet, "num_anatomical_classes", None))
    names = args.class_names or list(label_set.classes)
    summary = inspect_registers(model, args.logdir, args.n_samples, args.custom_steps, args.eta, args.seed,
                                class_names=names, colours=label_set.palette(),
                                use_ema=args.ema and info["has_ema"], diagnostic_latents=args.diag_latents)
    sim = summary["similarity"]
    print(f"register cosine similarity: within class {sim['within_class_mean']:.3f}, "
          f"across classes {sim['across_class_mean']:.3f}")
    print("final-step attention accuracy per level:", summary["trajectory"]["final_accuracy_per_level"])
    diag = summary["diagnostics"]
    if diag is not None:
        print("timesteps", diag["timesteps"])
        print("register output / features per layer:", {k: [round(v, 4) for v in vs]
                                                        for k, vs in diag["output_ratio"].items()})
        print("prediction MSE change with register outputs zeroed:", [round(v, 5) for v in diag["eps_mse_change"]])
        print("register state cosine, far / near body heights:",
              [(round(s["far_pairs_mean"], 4), round(s["near_pairs_mean"], 4)) for s in diag["register_similarity"]])
    print("wrote", ", ".join(os.path.join(args.logdir, f) for f in [*summary["files"].values(), "registers.json"]))
    return 0


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(main))
