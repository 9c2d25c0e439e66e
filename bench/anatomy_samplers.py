#!/usr/bin/env python
"""How much of an anatomy-benchmark score is the sampler's? Re-sample one trained model with several samplers.

    python bench/anatomy_samplers.py -o bench/out/anatomy --arm baseline --seed 0 -n 250 \\
        --samplers ddim:25:0,ddim:100:0,ddim:250:1,ancestral
    python bench/anatomy_samplers.py -o bench/out/anatomy --step 500 ...   # a fraction checkpoint of the run

The benchmark samples every model with DDIM, eta 0, at the preset's step count (25 on the CPU). This script
takes a model a benchmark run trained (``OUT/arms/ARM/seedS``, final or fraction checkpoint), draws ``-n``
samples from the benchmark's start noise with each sampler in ``--samplers``, and judges them with the run's
independent segmenter against the same anatomy rules. Every sampler starts from the same start noise (and a
stochastic one draws its step noise per sample), so the comparison with the first sampler is paired: the
difference in pass rate with a paired-bootstrap interval and an exact McNemar test. Also per sampler: the pass
rate with its Wilson interval, each rule's failure rate, the final latents' RMS (the real test latents' RMS is in
the run's calibration) and the sampling time per sample (on this machine; a ratio to the first sampler).

Sampler specs: ``ddim:STEPS:ETA`` (eta 0 deterministic, 1 DDPM-like), ``dpmpp2m:STEPS``, ``ancestral`` (the
full DDPM chain, one model call per training timestep). Writes ``OUT/samplers/ARM_seedS_stepN.json`` and
``.md``; a sampler already measured there with the same ``-n`` is reused.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import anatomy_eval as ev  # noqa: E402
import anatomy_models as am  # noqa: E402
from anatomy import NOISE_SEED, _device_name, _jdump, _jload  # noqa: E402
from ldm.util import resolve_device  # noqa: E402
from anatomy_stats import mcnemar, paired_bootstrap, wilson  # noqa: E402
from ldm.cli_flags import THREADS_HELP  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.evaluation.segmenter import load_segmenter  # noqa: E402
from ldm.models.diffusion.samplers import SAMPLER_SPECS, sampler_spec  # noqa: E402

logger = logging.getLogger("anatomy_samplers")


@dataclasses.dataclass(frozen=True)
class SamplerSetting:
    """A registered sampler (:data:`ldm.models.diffusion.samplers.SAMPLER_SPECS`) with its steps and eta."""

    name: str
    steps: Optional[int]  # None for ancestral (every training timestep)
    eta: float

    @property
    def label(self) -> str:
        spec = SAMPLER_SPECS[self.name]
        if spec.ddpm_loop:
            return self.name
        if spec.takes_eta:
            return f"{self.name}:{self.steps}:{self.eta:g}"
        return f"{self.name}:{self.steps}"


def parse_sampler(text: str) -> SamplerSetting:
    """``ddim:STEPS:ETA``, ``dpmpp2m:STEPS`` or ``ancestral``; ``ValueError`` saying what is wrong otherwise."""
    parts = [p.strip() for p in text.strip().split(":")]
    spec = sampler_spec(parts[0])
    if spec.ddpm_loop:
        if len(parts) != 1:
            raise ValueError(f"sampler {text!r}: {spec.name} takes no steps or eta (it runs every training timestep)")
        return SamplerSetting(spec.name, None, 0.0)
    want = 3 if spec.takes_eta else 2
    if len(parts) != want:
        form = f"{spec.name}:STEPS:ETA" if spec.takes_eta else f"{spec.name}:STEPS"
        raise ValueError(f"sampler {text!r}: write it as {form}")
    try:
        steps = int(parts[1])
        eta = float(parts[2]) if spec.takes_eta else 0.0
    except ValueError:
        raise ValueError(f"sampler {text!r}: steps must be an integer and eta a number") from None
    if steps < 1:
        raise ValueError(f"sampler {text!r}: steps must be >= 1")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"sampler {text!r}: eta must be in [0, 1]")
    return SamplerSetting(spec.name, steps, eta)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="a bench/anatomy.py run directory")
    p.add_argument("--arm", default="baseline", help="arm whose trained model to re-sample")
    p.add_argument("--seed", type=int, default=0, help="training seed of that arm")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the run's final step)")
    p.add_argument("-n", "--samples", type=int, default=250, help="samples per sampler")
    p.add_argument("--samplers", default="ddim:25:0,ddim:250:1,ancestral",
                   help="comma-separated sampler specs; the first is the reference of the paired comparisons")
    p.add_argument("--batch", type=int, default=250, help="samples per sampling batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", default="auto", help=THREADS_HELP + " (decided once at the start here)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def load_run(out: str) -> tuple[am.Preset, dict[str, Any]]:
    """The preset a run directory was made with (its ``run.json``) and its calibration."""
    run_path, cal_path = os.path.join(out, "run.json"), os.path.join(out, "calibration.json")
    for path in (run_path, cal_path, os.path.join(out, "segmenter.pt"), os.path.join(out, "autoencoder.json")):
        if not os.path.isfile(path):
            raise ValueError(f"{out} is not a finished benchmark set-up: {os.path.basename(path)} is missing "
                             "(run bench/anatomy.py -o OUT first)")
    run = _jload(run_path)
    settings = dict(run["settings"])
    settings["fractions"] = tuple(settings["fractions"])
    return dataclasses.replace(am.PRESETS[run["preset"]], **settings), _jload(cal_path)


def checkpoint(out: str, arm: str, seed: int, step: Optional[int], preset: am.Preset) -> tuple[str, int]:
    """The checkpoint of ``arm`` (its trained models' arm), ``seed``, ``step``; ``ValueError`` listing what exists."""
    if arm not in am.ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(am.ARMS)}")
    trained = am.SAME_MODELS.get(arm, arm)
    train_json = os.path.join(out, "arms", trained, f"seed{seed}", "train.json")
    if not os.path.isfile(train_json):
        raise ValueError(f"{out}: arm {trained!r} seed {seed} has not finished training (no {train_json})")
    ckpts = {int(k): v for k, v in _jload(train_json)["checkpoints"].items()}
    step = preset.steps if step is None else step
    if step not in ckpts:
        raise ValueError(f"{out}: arm {trained!r} seed {seed} has no checkpoint at step {step}; "
                         f"steps: {', '.join(str(s) for s in sorted(ckpts))}")
    path = ckpts[step]
    if not os.path.isfile(path):  # a run directory moved since: the checkpoint beside train.json
        path = os.path.join(os.path.dirname(train_json), os.path.basename(path))
    if not os.path.isfile(path):
        raise ValueError(f"{out}: the checkpoint of step {step} ({os.path.basename(path)}) is missing")
    return path, step


def measure(model: torch.nn.Module, spec: SamplerSetting, n: int, batch: int, seg: torch.nn.Module,
            device: torch.device, progress: bool) -> dict[str, Any]:
    """``n`` samples with ``spec`` judged by ``seg``: outcomes per rule, latent RMS, seconds."""
    bar = tqdm(total=n, desc=spec.label, unit="img", disable=not progress)
    t0 = time.perf_counter()
    drawn = am.draw_samples(model, n, spec.steps or 1, NOISE_SEED, batch, device, False, bar.update,
                            sampler=spec.name, eta=spec.eta)
    seconds = time.perf_counter() - t0
    bar.close()
    judged = ev.judge(drawn["image"], seg)
    return {"sampler": spec.label, "n": n, "sampling_seconds": seconds,
            "outcomes": {k: np.asarray(v, dtype=bool).tolist() for k, v in judged["outcomes"].items()},
            "latent_rms": drawn["latent_rms"].tolist()}


def summarise(results: list[dict[str, Any]], real_latent_rms: Optional[float]) -> list[dict[str, Any]]:
    """Per sampler: pass rate (Wilson 95 %), rule failure rates, latent RMS, time ratio; paired against the first."""
    ref = results[0]
    ref_pass = np.asarray(ref["outcomes"]["plausible"], dtype=bool)
    rows = []
    for r in results:
        passed = np.asarray(r["outcomes"]["plausible"], dtype=bool)
        rms = np.asarray(r["latent_rms"], dtype=np.float64)
        row = {"sampler": r["sampler"], "n": r["n"], "pass_rate": float(passed.mean()),
               "pass_interval": list(wilson(int(passed.sum()), passed.size)),
               "rule_failure": {k: float(1 - np.mean(v)) for k, v in r["outcomes"].items() if k != "plausible"},
               "latent_rms_mean": float(np.sqrt(np.mean(rms ** 2))), "latent_rms_median": float(np.median(rms)),
               "real_latent_rms": real_latent_rms,
               "seconds_per_sample": r["sampling_seconds"] / r["n"],
               "time_ratio": r["sampling_seconds"] / ref["sampling_seconds"]}
        if r is not ref:
            diff, (lo, hi) = paired_bootstrap(passed[None].astype(float), ref_pass[None].astype(float))
            row["vs_first"] = {"difference": diff, "interval": [lo, hi], "mcnemar": mcnemar(passed, ref_pass)}
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# Samplers on one trained model: {meta['arm']}, seed {meta['seed']}, step {meta['step']}", "",
             f"`{meta['command']}`", "",
             f"Run `{meta['run']}` (preset {meta['preset']}); {meta['n']} samples per sampler from the benchmark's "
             f"start noise (seed {NOISE_SEED}), judged by the run's independent segmenter. Real test latents' RMS: "
             f"{meta['real_latent_rms']:.2f}. Device: {meta['device']}.", "",
             f"| sampler | pass rate [95 % CI] | vs {rows[0]['sampler']} [95 % CI], McNemar p | latent RMS (median) "
             "| time per sample (ratio) |", "|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["pass_interval"]
        vs = "reference"
        if "vs_first" in r:
            v = r["vs_first"]
            vs = (f"{100 * v['difference']:+.1f} pts [{100 * v['interval'][0]:+.1f}, {100 * v['interval'][1]:+.1f}], "
                  f"p = {v['mcnemar']['p_value']:.2g}")
        lines.append(f"| {r['sampler']} | {100 * r['pass_rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] | {vs} | "
                     f"{r['latent_rms_mean']:.2f} ({r['latent_rms_median']:.2f}) | "
                     f"{r['seconds_per_sample']:.3g} s ({r['time_ratio']:.2f}x) |")
    rules = list(rows[0]["rule_failure"])
    lines += ["", "Failure rate per rule:", "", "| sampler | " + " | ".join(rules) + " |",
              "|---|" + "---|" * len(rules)]
    for r in rows:
        lines.append(f"| {r['sampler']} | " + " | ".join(f"{100 * r['rule_failure'][k]:.1f} %" for k in rules) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    args = parse_args(argv)
    try:
        specs = [parse_sampler(s) for s in args.samplers.split(",") if s.strip()]
        if not specs:
            raise ValueError("--samplers names no sampler")
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--samplers names a sampler twice: {', '.join(labels)}")
        if args.samples < 1 or args.batch < 1:
            raise ValueError(f"-n and --batch must be >= 1, got {args.samples} and {args.batch}")
        preset, cal = load_run(args.out)
        ckpt, step = checkpoint(args.out, args.arm, args.seed, args.step, preset)
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"anatomy_samplers.py: error: {err}", file=sys.stderr)
        return 2
    configure_threads(args.threads, device.type == "cpu")
    trained = am.SAME_MODELS.get(args.arm, args.arm)
    scale = float(_jload(os.path.join(args.out, "autoencoder.json"))["scale_factor"])
    mask_ae = None
    if trained == "joint":
        info = _jload(os.path.join(args.out, "mask_autoencoder.json"))
        mask_ae = (os.path.join(args.out, "mask_autoencoder.ckpt"), float(info["scale_factor"]))
    config = am.arm_config(trained, preset, os.path.join(args.out, "autoencoder.ckpt"), scale, mask_ae)
    model = am.load_trained(config, ckpt, device)
    seg = load_segmenter(os.path.join(args.out, "segmenter.pt"), device)[0]
    dest = os.path.join(args.out, "samplers")
    os.makedirs(dest, exist_ok=True)
    base = os.path.join(dest, f"{trained}_seed{args.seed}_step{step:06d}")
    cache = _jload(base + ".json")["results"] if os.path.isfile(base + ".json") else []
    known = {(r["sampler"], r["n"]): r for r in cache}
    results = []
    for spec in specs:
        r = known.get((spec.label, args.samples))
        if r is None:
            logger.info("sampling %d with %s", args.samples, spec.label)
            r = measure(model, spec, args.samples, args.batch, seg, device, args.progress)
            known[(spec.label, args.samples)] = r
            _jdump({"results": list(known.values())}, base + ".json")  # kept even if a later sampler fails
        results.append(r)
    rows = summarise(results, cal.get("real_latent_rms"))
    meta = {"command": "python bench/anatomy_samplers.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "run": args.out, "preset": _jload(os.path.join(args.out, "run.json"))["preset"], "arm": trained,
            "seed": args.seed, "step": step, "n": args.samples, "device": _device_name(device),
            "real_latent_rms": float(cal.get("real_latent_rms", float("nan")))}
    _jdump({"meta": meta, "summary": rows, "results": list(known.values())}, base + ".json")
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    logger.info("wrote %s.json and %s.md", base, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
