"""Sampling speed: images/s and memory for DDIM at 20/50/200 steps and DPM-Solver++(2M) at 20/25 steps,
over batch sizes (1..64 on GPU, 1..8 on CPU); plus the solvers' accuracy on an analytic model.

    python bench/sampling.py [--quick] [--device auto|cpu|cuda] [--batches 1,4,8] [--kind plain|anatomical]
                             [--full-runs | --per-step]

Full runs time whole ``sampler.sample`` calls plus the first-stage decode (default on CUDA and with
--quick). At CT-Organ size on CPU a 200-step run takes many minutes, so there (``--per-step``) each
sampler runs ``--probe-steps`` steps, the median time per step is taken, and images/s is derived as
``batch / (steps * per_step + decode)``: every step of both samplers is one UNet call plus a few
element-wise ops, so this is exact up to the loop overhead, which the probe includes.

Accuracy table: RMS distance to the exact probability-flow ODE solution for Gaussian data (the
analytic model of tests/test_dpm_solver.py), the quality proxy that needs no trained weights.
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

SETTINGS = [("ddim", 20), ("ddim", 50), ("ddim", 200), ("dpmpp2m", 20), ("dpmpp2m", 25)]


def run_sampler(model: Any, name: str, steps: int, x_T: torch.Tensor, decode: bool) -> int:
    """Sample (and decode); returns the number of steps taken (DDIM's uniform grid may add one when
    ``steps`` does not divide the training timesteps, as CompVis)."""
    from ldm.models.diffusion.dpm_solver import get_sampler

    calls: list[int] = []
    samples, _ = get_sampler(name, model).sample(steps, x_T.shape[0], tuple(x_T.shape[1:]), x_T=x_T, eta=0.0,
                                                 verbose=False, callback=calls.append)
    if decode:
        model.decode_first_stage(samples)
    return len(calls)


def analytic_accuracy() -> list[dict]:
    """RMS error to the exact ODE solution (Gaussian data, CT-Organ schedule) per sampler and step count."""
    sys.path.insert(0, os.path.join(common.ROOT, "tests"))
    import test_dpm_solver as analytic

    from ldm.models.diffusion.ddim import DDIMSampler
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler

    model = analytic.analytic_model()
    x_T = torch.randn(analytic.BATCH, *analytic.SHAPE, generator=torch.Generator().manual_seed(5))
    abar = model.alphas_cumprod.double()
    rows = []
    for name, steps in [("ddim", s) for s in (10, 20, 50, 200, 500)] + [("dpmpp2m", s) for s in (10, 15, 20, 25, 50)]:
        sampler = DDIMSampler(model) if name == "ddim" else DPMSolverSampler(model)
        out, _ = sampler.sample(steps, analytic.BATCH, analytic.SHAPE, x_T=x_T, verbose=False)
        start = int(sampler.ddim_timesteps[-1]) if name == "ddim" else int(sampler.timesteps[0])
        ref = analytic.exact_flow(model, x_T, start, float(abar[0]))
        rows.append({"sampler": name, "steps": steps, "rms_error": analytic._rms(out, ref)})
    return rows


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--kind", default="plain", choices=("plain", "anatomical"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full-runs", action="store_true", help="time whole sampling runs (+ decode)")
    mode.add_argument("--per-step", action="store_true", help="time --probe-steps steps, derive images/s")
    parser.add_argument("--probe-steps", type=int, default=4, help="steps per probe (4: DDIM's grid has exactly 4)")
    args = parser.parse_args()
    device = common.setup(args)
    cuda = device.type == "cuda"
    full = args.full_runs or (not args.per_step and (cuda or args.quick))
    batches = [int(b) for b in args.batches.split(",")] if args.batches else (
        [1, 4, 16, 64] if cuda else ([1, 2] if args.quick else [1, 4, 8]))
    reps = args.reps or (3 if cuda else 2)
    model, source = common.build_model(args.kind, args.quick, device)
    model.eval()
    shape = common.latent_shape(model)
    metric = args.metric or common.default_metric(device)
    print(f"sampling on {common.device_name(device)}; {args.kind} model ({source}); latents {list(shape)}; "
          f"{'full runs' if full else f'per-step probes of {args.probe_steps} steps'}; reps {reps}; metric {metric}")
    results: dict[str, Any] = {"mode": "full" if full else "per_step", "metric": metric, "batches": {}}
    rows = []
    for batch in batches:
        x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch)).to(device)
        names = [f"{s}-{n}" for s, n in SETTINGS] if full else ["ddim-probe", "dpmpp2m-probe"]
        calls: dict[str, int] = {}

        def run(variant: str) -> tuple[float, ...]:
            sampler, steps = variant.split("-")
            steps = args.probe_steps if steps == "probe" else int(steps)
            with torch.no_grad():
                timing = common.time_call(lambda: calls.__setitem__(variant, run_sampler(
                    model, sampler, steps, x_T, decode=full)), device)
            return timing

        print(f"batch {batch}:")
        with torch.no_grad():  # warm-up: a short run of each sampler (full runs would double the cost)
            for sampler, _ in SETTINGS[::3]:
                run_sampler(model, sampler, 2, x_T, decode=full)
        times = common.interleaved(names, run, reps, warmup=0)
        with torch.no_grad():
            decode = common.median([common.time_call(lambda: model.decode_first_stage(x_T), device)[
                0 if metric == "wall" else 1] for _ in range(2)])
            with common.cuda_peak(device) as cuda_mem, common.LiveTensorBytes() as tracker:
                run_sampler(model, "dpmpp2m", 2, x_T, decode=True)
        per_batch: dict[str, Any] = {"decode_s": decode, "step_peak_bytes": tracker.peak,
                                     "cuda_peak_bytes": cuda_mem.get("peak"), "settings": {}}
        for sampler, steps in SETTINGS:
            if full:
                seconds = common.median(times[f"{sampler}-{steps}"][metric])
                derived = False
            else:
                per_step = common.median(times[f"{sampler}-probe"][metric]) / calls[f"{sampler}-probe"]
                seconds = steps * per_step + decode
                derived = True
            per_batch["settings"][f"{sampler}-{steps}"] = {"seconds": seconds, "images_per_s": batch / seconds,
                                                          "derived": derived}
        base = per_batch["settings"]["ddim-200"]["images_per_s"]
        for key, res in per_batch["settings"].items():
            res["x_ddim200"] = res["images_per_s"] / base
            rows.append([batch, key, res["seconds"], res["images_per_s"], res["x_ddim200"],
                         "derived" if res["derived"] else "measured", common.mib(per_batch["step_peak_bytes"]),
                         common.mib(per_batch["cuda_peak_bytes"])])
        results["batches"][str(batch)] = per_batch
    print()
    common.print_table(["batch", "sampler-steps", f"{metric} s / batch", "images/s", "x ddim-200", "how",
                        "2-step peak MiB", "cuda peak MiB"], rows)
    accuracy = analytic_accuracy()
    print("\naccuracy on the analytic Gaussian model (RMS error to the exact probability-flow ODE solution):")
    common.print_table(["sampler", "steps", "rms error"], [[r["sampler"], r["steps"], f"{r['rms_error']:.5f}"]
                                                           for r in accuracy])
    results["analytic_accuracy"] = accuracy
    common.write_json("sampling", args, device, {"kind": args.kind, "model_source": source,
                                                 "latent_shape": list(shape), "reps": reps, **results})


if __name__ == "__main__":
    main()
