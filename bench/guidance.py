"""Cost of mask-free anatomy guidance per sampling step: guided vs unguided, measured side by side.

    python bench/guidance.py [--quick] [--device auto|cpu|cuda] [--scale 1.0] [--steps 4] [--batch 2]
                             [--sampler ddim|dpmpp2m|ancestral] [--run RUN_DIR_OR_CKPT]

Each variant samples ``--steps`` steps from the same x_T with the registry sampler; the variants alternate
(``common.interleaved``) and the ratio of medians is the cost per step. ``scale-0`` goes through
``AnatomyGuidance(model, 0).denoiser`` (the plain denoiser; its ratio to ``plain`` should be 1). Without
``--run`` the model is the anatomical LDM at CT-Organ size (or the quick size) with random weights: the
timing does not depend on the weights. The CT-Organ energy is used when the model has 6 classes.

Only the cost is measured here; whether guidance helps is measured by ``bench/anatomy.py`` with an
independent segmenter (guidance can fool the model's own head).
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402


def load_model(args: Any, device: torch.device) -> tuple[torch.nn.Module, str]:
    if args.run:
        from ldm import sampling

        model, info = sampling.load_model_for_sampling(args.run, device=device)
        return model, info["checkpoint"]
    model, source = common.build_model("anatomical", args.quick, device)
    return model, source


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="guidance scale of the guided variant")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per timed run (default 4, quick 3)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 2 on CPU, 8 on CUDA)")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp2m", "ancestral"))
    parser.add_argument("--run", default=None, help="a trained run (log dir or checkpoint) instead of random weights")
    args = parser.parse_args()
    device = common.setup(args)

    from ldm.data.labels import get_label_set
    from ldm.models.diffusion.guidance import AnatomicalEnergy, AnatomyGuidance
    from ldm.models.diffusion.samplers import sample_model

    model, source = load_model(args, device)
    model.eval()
    if model.num_anatomical_classes == 6 and model.label_set.name != "ctorgan":
        model.label_set = get_label_set("ctorgan")
    energy = AnatomicalEnergy(model.label_set)
    steps = args.steps or (3 if args.quick else 4)
    batch = args.batch or (8 if device.type == "cuda" else 2)
    reps = args.reps or 3
    metric = args.metric or common.default_metric(device)
    shape = common.latent_shape(model)
    x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    guides = {"plain": None, "scale-0": AnatomyGuidance(model, 0.0),
              f"scale-{args.scale:g}": AnatomyGuidance(model, args.scale, energy)}
    print(f"guidance cost on {common.device_name(device)}; anatomical model ({source}); latents {list(shape)}; "
          f"{args.sampler}, {steps} steps per run, batch {batch}; reps {reps}; metric {metric}; "
          f"energy terms {energy.weights}")

    def run(name: str) -> tuple[float, ...]:
        guide = guides[name]
        make = None if guide is None else guide.denoiser
        with torch.no_grad():
            return common.time_call(lambda: sample_model(model, args.sampler, x_T, steps, make_denoiser=make),
                                    device)

    times = common.interleaved(list(guides), run, reps, warmup=1)
    plain = common.median(times["plain"][metric])
    rows, results = [], {}
    for name, guide in guides.items():
        seconds = common.median(times[name][metric])
        results[name] = {"seconds_per_run": seconds, "ratio_vs_plain": seconds / plain,
                         "times": times[name], "guidance": None if guide is None else guide.summary()}
        rows.append([name, seconds, seconds / plain])
    print()
    common.print_table(["variant", f"{metric} s / {steps}-step run", "x plain (cost per step)"], rows)
    common.write_json("guidance", args, device, {"model_source": source, "latent_shape": list(shape),
                                                 "sampler": args.sampler, "steps": steps, "batch": batch,
                                                 "scale": args.scale, "metric": metric, "reps": reps,
                                                 "energy_weights": energy.weights, "variants": results})


if __name__ == "__main__":
    main()
