#!/usr/bin/env python
"""Anatomy benchmark v1 (``--phantom v1``): does a model draw better anatomy than the plain LDM?

Without ``--phantom v1`` this command runs benchmark v2 (``bench/anatomy_v2.py``, ``bench/PROTOCOL.md``); v1 is
kept so that its committed results (``bench/ANATOMY_v1.md``, history) can be reproduced:

    python bench/anatomy.py --phantom v1 -o bench/out/anatomy           # baseline + anatomical, 3 seeds
    python bench/anatomy.py --phantom v1 -o bench/out/anatomy --arms shuffled_masks  # an ablation, same run directory
    python bench/anatomy.py --phantom v1 -o /tmp/anatomy_quick --quick               # every stage at toy size (the tests)
    python bench/anatomy.py --phantom v1 -o RUN --report-only                        # report what RUN holds, train nothing

Every arm is trained from the same frozen autoencoder on the same phantom data (same latent scale, data order,
optimiser and number of steps), sampled from start noise shared across arms, and judged by an independent
segmenter trained on the real training split, against the phantom's anatomy rules. Writes
``OUT/anatomy.json``, ``OUT/report.md`` and ``OUT/figures/*.png``. The run directory is resumable: run the same
command again after an interruption and finished stages, checkpoints and evaluations are reused.
Presets: ``cpu`` (default on CPU), ``gpu`` (automatic on CUDA), ``quick``; see ``bench/ANATOMY_v1.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any, Iterator, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

import anatomy_eval as ev  # noqa: E402
import anatomy_models as am  # noqa: E402
from anatomy_report import write_outputs  # noqa: E402
from ldm.cli_flags import THREADS_HELP  # noqa: E402
from ldm.evaluation.segmenter import load_segmenter, save_segmenter, segment, train_segmenter  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.atomic_io import write_json  # noqa: E402
from ldm.checkpoints import load_weights  # noqa: E402
from ldm.training.scripted import scripted_trainer  # noqa: E402
from ldm.util import instantiate_from_config, resolve_device  # noqa: E402

logger = logging.getLogger("anatomy")
NOISE_SEED = 1234  # start noise shared by every arm and training seed


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="run directory (created; reused when it exists)")
    p.add_argument("--arms", default="baseline,anatomical",
                   help=f"comma-separated arms, from: {', '.join(am.ARMS)} (baseline is always trained)")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per arm (preset: 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (preset)")
    p.add_argument("--samples", type=int, default=None, help="samples per trained model (preset: 1000)")
    p.add_argument("--train-slices", "--train_slices", dest="train_slices", type=int, default=None,
                   help="training slices the diffusion models see (default: the whole training split, 2048 in the cpu "
                        "preset; e.g. 64 for a data-scarce run). The autoencoder and the independent segmenter are "
                        "trained on the whole split either way")
    p.add_argument("--mask-ae-steps", "--mask_ae_steps", dest="mask_ae_steps", type=int, default=None,
                   help="training batches of the joint arm's mask autoencoder (default: the preset's autoencoder "
                        "steps, 1000 in the cpu preset)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="anatomy-guidance scale of the anatomical_guided arm")
    p.add_argument("--preset", choices=sorted(am.PRESETS), default=None,
                   help="scale (default: quick with --quick, gpu on CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="toy sizes: every stage in well under a minute")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", default="auto", help=THREADS_HELP + " (decided once at the start here)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.add_argument("--report-only", "--report_only", dest="report_only", action="store_true",
                   help="write anatomy.json, report.md and figures from the evaluations the run directory holds "
                        "(arms whose every seed finished; --arms is ignored), without training or loading any model "
                        "(e.g. a run copied from a GPU machine without its weights)")
    p.add_argument("--note", default=None, help="with --report-only: a caveat printed at the top of the report")
    return p.parse_args(argv)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def _jdump(obj: Any, path: str) -> None:
    write_json(path, obj, indent=1)


class Busy(Exception):
    """Another live process holds the lock (``exclusive(..., wait=False)``)."""


@contextlib.contextmanager
def exclusive(path: str, poll_s: float = 5.0, wait: bool = True) -> Iterator[None]:
    """Hold ``path + '.lock'`` (holding the pid) for the block; wait while a live process holds it, or raise
    ``Busy`` at once with ``wait=False``.

    Several ``anatomy.py`` processes can then share one run directory (e.g. one per arm, one thread each):
    a stage that another process is computing is waited for (or skipped for now) and then reused, never
    computed twice. A lock left by a killed process is removed.
    """
    lock = path + ".lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(lock) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                logger.warning("removing the stale lock %s", lock)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
                continue
            except PermissionError:
                pass
            if not wait:
                raise Busy(lock)
            time.sleep(poll_s)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def _jload(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def resolve_preset(args: argparse.Namespace, device: torch.device) -> am.Preset:
    name = args.preset or ("quick" if args.quick else "gpu" if device.type == "cuda" else "cpu")
    preset = am.PRESETS[name]
    overrides = {k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("samples", args.samples),
                                    ("ldm_train_slices", args.train_slices),
                                    ("mask_ae_steps", getattr(args, "mask_ae_steps", None))) if v is not None}
    for key, value in overrides.items():
        if value < 1:
            raise ValueError(f"--{key.replace('ldm_', '').replace('_', '-')} must be >= 1, got {value}")
    if "samples" in overrides:
        overrides["curve_samples"] = max(1, min(preset.curve_samples, overrides["samples"]))
    if "ldm_train_slices" in overrides:
        if overrides["ldm_train_slices"] > preset.train_slices:
            raise ValueError(f"--train-slices {overrides['ldm_train_slices']} exceeds the preset's training split "
                             f"({preset.train_slices} slices)")
        overrides["tstr_pairs"] = min(preset.tstr_pairs, overrides["ldm_train_slices"])
    return dataclasses.replace(preset, **overrides)


def check_run_dir(out: str, preset: am.Preset, name: str) -> dict[str, Any]:
    """Create ``out`` or check that it was made with the same settings (arms and seeds may grow)."""
    os.makedirs(out, exist_ok=True)
    settings = {k: v for k, v in dataclasses.asdict(preset).items() if k != "seeds"}
    settings["fractions"] = list(settings["fractions"])
    path = os.path.join(out, "run.json")
    if os.path.isfile(path):
        old = _jload(path)["settings"]
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out} holds a run made with other settings ({', '.join(changed)} differ); "
                             "use the same flags to continue it, or another -o for a new run")
    else:
        _jdump({"preset": name, "settings": settings}, path)
    return settings


# ------------------------------------------------------------------------------------------------ stages
def _fit_first_stage(config: dict, lr: float, steps_per_batch: int, preset: am.Preset, train: dict, ckpt: str,
                     device: torch.device, progress: bool) -> torch.nn.Module:
    """Train a first stage for ``preset.ae_steps`` batches (seed 0) with Lightning, save ``ckpt``; eval mode."""
    pl.seed_everything(0, verbose=False)
    model = instantiate_from_config(config)
    model.learning_rate = lr
    loader = DataLoader(am.TensorSlices(train["image"], train["segmentation"]), batch_size=preset.ae_batch,
                        sampler=am.StreamSampler(len(train["image"]), preset.ae_steps * preset.ae_batch, 0),
                        drop_last=True)
    trainer = scripted_trainer(device, steps_per_batch * preset.ae_steps, progress=progress)
    trainer.fit(model, loader)
    trainer.save_checkpoint(ckpt)  # atomic (scripted_trainer)
    return model.eval().to(device)


def train_autoencoder(preset: am.Preset, train: dict, out: str, device: torch.device, progress: bool) -> tuple[str, float]:
    """The shared frozen first stage and the latent scale ``1 / std(z)`` over the training set."""
    ckpt, scale_path = os.path.join(out, "autoencoder.ckpt"), os.path.join(out, "autoencoder.json")
    if os.path.isfile(ckpt) and os.path.isfile(scale_path):
        return ckpt, float(_jload(scale_path)["scale_factor"])
    # two optimisers (autoencoder, discriminator): Lightning counts two steps per batch
    model = _fit_first_stage(am.autoencoder_config(preset), 5e-4, 2, preset, train, ckpt, device, progress)
    torch.manual_seed(0)
    with torch.no_grad():
        z = torch.cat([model.encode(x.to(device)).sample().float().cpu() for x in train["image"].split(256)])
    scale = float(1.0 / z.flatten().std())
    _jdump({"scale_factor": scale, "latent_std": float(z.flatten().std())}, scale_path)
    return ckpt, scale


def train_mask_autoencoder(preset: am.Preset, train: dict, out: str, device: torch.device,
                           progress: bool) -> tuple[str, float]:
    """The joint arm's frozen mask first stage (shipped phantom mask-AE config at this image size) and its latent
    scale ``1 / std`` over the training masks (the same for every seed)."""
    ckpt, scale_path = os.path.join(out, "mask_autoencoder.ckpt"), os.path.join(out, "mask_autoencoder.json")
    if os.path.isfile(ckpt) and os.path.isfile(scale_path):
        info = _jload(scale_path)
        if "validation_reconstruction_dice" not in info:  # a run made before it was measured
            model = instantiate_from_config(am.mask_autoencoder_config(preset))
            load_weights(model, ckpt, strict=True)
            info["validation_reconstruction_dice"] = _mask_reconstruction_dice(model.eval().to(device), preset,
                                                                               device)
            _jdump(info, scale_path)
        return ckpt, float(info["scale_factor"])
    steps = preset.mask_ae_steps or preset.ae_steps
    model = _fit_first_stage(am.mask_autoencoder_config(preset), 1e-3, 1, dataclasses.replace(preset, ae_steps=steps),
                             train, ckpt, device, progress)
    z, rec = _encode_and_reconstruct(model, train["segmentation"], device)
    scale = float(1.0 / z.flatten().std())
    _jdump({"scale_factor": scale, "steps": steps,
            "train_reconstruction_dice": ev.foreground_dice(rec, train["segmentation"]),
            "validation_reconstruction_dice": _mask_reconstruction_dice(model, preset, device)}, scale_path)
    return ckpt, scale


@torch.no_grad()
def _encode_and_reconstruct(model: torch.nn.Module, masks: torch.Tensor, device: torch.device
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask autoencoder's latents (posterior mode, float32) and reconstructed masks of ``masks``, on the CPU."""
    latents, rec = [], []
    for m in masks.split(256):
        z = model.encode_mask(m.to(device))
        latents.append(z.float().cpu())
        rec.append(model.decode_mask(z).cpu())
    return torch.cat(latents), torch.cat(rec)


def _mask_reconstruction_dice(model: torch.nn.Module, preset: am.Preset, device: torch.device) -> dict[str, Any]:
    """The mask autoencoder's reconstruction Dice on the phantom's validation split (patients of neither the
    training nor the test split; as many slices as the test split)."""
    masks = am.phantom_split(preset, "validation", preset.test_slices)["segmentation"]
    return ev.foreground_dice(_encode_and_reconstruct(model, masks, device)[1], masks)


def independent_segmenter(preset: am.Preset, train: dict, out: str, device: torch.device,
                          progress: bool) -> torch.nn.Module:
    path = os.path.join(out, "segmenter.pt")
    if not os.path.isfile(path):
        model = train_segmenter(am.TensorSlices(train["image"], train["segmentation"]), am.NUM_CLASSES,
                                steps=preset.seg_steps, batch_size=16, seed=0, device=device, progress=progress)
        save_segmenter(path, model, {"trained_on": "phantom train split (real)", "steps": preset.seg_steps})
    return load_segmenter(path, device)[0]


def calibrate(preset: am.Preset, train: dict, test: dict, ae_ckpt: str, seg: torch.nn.Module, seeds: int,
              out: str, device: torch.device, scale_factor: float) -> dict[str, Any]:
    """What real data scores: true masks, segmenter masks, autoencoder reconstructions (the ceiling of any LDM).

    ``train`` is what the diffusion models are trained on (the train-on-real reference and the train-vs-test
    image statistics use it)."""
    path = os.path.join(out, "calibration.json")
    cal = _jload(path) if os.path.isfile(path) else {}
    if "real_pass_rate" not in cal:
        ae = am.load_autoencoder(ae_ckpt, preset, device)
        with torch.no_grad():
            rec = torch.cat([ae.decode(ae.encode(x.to(device)).mode()).clamp(-1, 1).float().cpu()
                             for x in test["image"].split(256)])
        real_j, rec_j = ev.judge(test["image"], seg), ev.judge(rec, seg)
        n = len(test["image"])
        cal = {"n_test": n,
               "true_mask_pass_rate": float(ev.rule_outcomes(test["segmentation"])["plausible"].mean()),
               "real_pass_rate": float(real_j["outcomes"]["plausible"].mean()),
               "reconstructed_pass_rate": float(rec_j["outcomes"]["plausible"].mean()),
               "segmenter_dice": ev.foreground_dice(real_j["seg_masks"], test["segmentation"]),
               "reconstructed_segmenter_dice": ev.foreground_dice(rec_j["seg_masks"], test["segmentation"]),
               "real_rules_failure": {r: float(1 - v.mean()) for r, v in real_j["outcomes"].items() if r != "plausible"},
               "reconstructed_rules_failure": {r: float(1 - v.mean()) for r, v in rec_j["outcomes"].items()
                                               if r != "plausible"},
               "reconstruction_l1": float((rec - test["image"]).abs().mean()),
               "reconstructed_image_stats": ev.image_statistics(rec, test["image"], seg),
               "train_vs_test_image_stats": ev.image_statistics(train["image"][:n], test["image"], seg)}
    if "real_latent_rms" not in cal:  # the same measure as the samples' latent_rms, on the real test slices
        ae = am.load_autoencoder(ae_ckpt, preset, device)
        with torch.no_grad():
            z = torch.cat([ae.encode(x.to(device)).mode().float().cpu() for x in test["image"].split(256)])
        cal["real_latent_rms"] = float(scale_factor * z.pow(2).mean().sqrt())
    cal.setdefault("tstr_real_dice", {})
    for s in range(seeds):
        if str(s) not in cal["tstr_real_dice"]:
            k = preset.tstr_pairs
            cal["tstr_real_dice"][str(s)] = ev.tstr_dice(train["image"][:k], train["segmentation"][:k], test,
                                                         preset.tstr_steps, s, device)
    _jdump(cal, path)
    return cal


def evaluate_checkpoint(arm: str, config: dict, ckpt: str, n: int, final: bool, preset: am.Preset, seed: int,
                        ctx: dict, path: str, guidance: float = 0.0) -> dict[str, Any]:
    """Sample ``n`` images from one checkpoint and judge them; cached in ``path`` (.json + .npz)."""
    if os.path.isfile(path + ".json") and os.path.isfile(path + ".npz"):
        return _load_eval(path)
    device, seg = ctx["device"], ctx["seg"]
    model = am.load_trained(config, ckpt, device)
    own = arm in am.MASK_ARMS
    bar = tqdm(total=n, desc=f"{arm} seed {seed} {os.path.basename(path)}", unit="img", disable=not ctx["progress"])
    t0 = time.perf_counter()
    drawn = am.draw_samples(model, n, preset.sampler_steps, NOISE_SEED, 250, device, own, bar.update, guidance)
    sample_s = time.perf_counter() - t0
    bar.close()
    j = ev.judge(drawn["image"], seg, drawn.get("own_mask"))
    info: dict[str, Any] = {"n": n, "ckpt": os.path.basename(ckpt), "sampling_seconds": sample_s, "guidance": guidance,
                            "own_dice": j.get("own_dice"),
                            "latent_rms": float(drawn["latent_rms"].pow(2).mean().sqrt())}
    arrays = {f"seg_{k}": v for k, v in j["outcomes"].items()}
    arrays.update({f"own_{k}": v for k, v in j.get("own_outcomes", {}).items()})
    if final:
        test = ctx["test"]
        info["image_stats"] = ev.image_statistics(drawn["image"], test["image"], seg, ctx["real_features"])
        info["memorisation"] = ev.memorisation(drawn["image"], ctx["train"]["image"], ctx["heldout_nn"])
        if own and arm != "joint":  # a joint model's masks come with its samples; it cannot label an image
            info.update(own_on_real(model, test))
        if own:
            k = min(preset.tstr_pairs, n)
            info["tstr_dice"] = ev.tstr_dice(drawn["image"][:k], drawn["own_mask"][:k], test, preset.tstr_steps,
                                             seed, device)
        arrays["grid_images"] = drawn["image"][:16].numpy()
        arrays["grid_seg_masks"] = j["seg_masks"][:16].numpy()
        if own:
            arrays["grid_own_masks"] = drawn["own_mask"][:16].numpy()
    np.savez_compressed(path + ".npz", **arrays)
    _jdump(info, path + ".json")
    return _load_eval(path)


def own_on_real(model: torch.nn.Module, test: dict) -> dict[str, Any]:
    """The head alone: its masks of the real test slices against their true masks (Dice, rule pass rate)."""
    masks = ev.head_masks_on_real(model, test["image"])
    return {"own_dice_real": ev.foreground_dice(masks, test["segmentation"]),
            "own_real_pass_rate": float(ev.rule_outcomes(masks)["plausible"].mean())}


def _backfill_own_on_real(arm: str, config: dict, ckpt: str, path: str, ctx: dict) -> None:
    """Add the head-on-real-slices measure to a final evaluation made before it existed (needs the checkpoint)."""
    if arm not in am.MASK_ARMS or arm == "joint" or not os.path.isfile(path + ".json") or not os.path.isfile(ckpt):
        return
    info = _jload(path + ".json")
    if "own_dice_real" in info:
        return
    info.update(own_on_real(am.load_trained(config, ckpt, ctx["device"]), ctx["test"]))
    _jdump(info, path + ".json")


def _backfill_latent_rms(arm: str, config: dict, ckpt: str, path: str, preset: am.Preset, ctx: dict) -> None:
    """Add the samples' latent spread to a final evaluation made before it was measured: the same samples drawn
    again from the checkpoint (same start noise, same sampler), checked against the stored evaluation (the share
    of samples whose rule outcome is reproduced is kept as ``latent_rms_resampled_agreement``)."""
    if arm not in ctx.get("requested_arms", ()) or not os.path.isfile(path + ".json") or not os.path.isfile(ckpt):
        return
    info = _jload(path + ".json")
    if "latent_rms" in info:
        return
    model = am.load_trained(config, ckpt, ctx["device"])
    drawn = am.draw_samples(model, info["n"], preset.sampler_steps, NOISE_SEED, 250, ctx["device"], False,
                            guidance=float(info.get("guidance") or 0.0))
    with np.load(path + ".npz") as z:
        stored = z["seg_plausible"]
    again = ev.judge(drawn["image"], ctx["seg"])["outcomes"]["plausible"]
    info["latent_rms"] = float(drawn["latent_rms"].pow(2).mean().sqrt())
    info["latent_rms_resampled_agreement"] = float((np.asarray(again) == stored).mean())
    _jdump(info, path + ".json")


def _load_eval(path: str) -> dict[str, Any]:
    info = _jload(path + ".json")
    with np.load(path + ".npz") as z:
        info["arrays"] = {k: z[k] for k in z.files}
    return info


def run_arm_seed(arm: str, seed: int, preset: am.Preset, ctx: dict, baseline_seconds: Optional[float],
                 wait: bool = True) -> dict:
    """Train and evaluate one arm for one seed (or reuse what is on disk); ``Busy`` if another process is on it
    and ``wait`` is false."""
    out = os.path.join(ctx["out"], "arms", arm, f"seed{seed}")
    os.makedirs(out, exist_ok=True)
    if arm == "joint" and "mask_ae" not in ctx:
        with exclusive(os.path.join(ctx["out"], "mask_autoencoder")):
            ctx["mask_ae"] = train_mask_autoencoder(preset, ctx["train"], ctx["out"], ctx["device"], ctx["progress"])
    with exclusive(os.path.join(out, "work"), wait=wait):
        return _run_arm_seed(arm, seed, preset, ctx, baseline_seconds, out)


def run_all(arms: list[str], preset: am.Preset, ctx: dict) -> dict[str, dict[int, dict]]:
    """Every (seed, arm) task, the baselines first (the other arms need their same-seed baseline's training time
    for the equal-wall-clock budget), skipping for now a task another process holds or whose baseline is not
    finished, so processes sharing a run never sit idle while there is work."""
    results: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    pending = [(seed, "baseline") for seed in range(preset.seeds)]
    pending += [(seed, arm) for seed in range(preset.seeds) for arm in arms if arm != "baseline"]
    while pending:
        progressed = False
        for seed, arm in list(pending):
            base = None
            if arm != "baseline":
                if seed not in results["baseline"]:
                    continue
                base = results["baseline"][seed]["train"]["train_seconds"]
            try:
                results[arm][seed] = run_arm_seed(arm, seed, preset, ctx, base, wait=False)
            except Busy:
                continue
            pending.remove((seed, arm))
            progressed = True
            break  # back to the first pending task
        if not progressed:
            time.sleep(10)
    return results


def _run_arm_seed(arm: str, seed: int, preset: am.Preset, ctx: dict, baseline_seconds: Optional[float],
                  out: str) -> dict:
    if arm in am.SAME_MODELS:  # another arm's trained models (final checkpoint), guided or labelled differently
        trained = run_arm_seed(am.SAME_MODELS[arm], seed, preset, ctx, baseline_seconds)
        config = am.arm_config(arm, preset, ctx["ae_ckpt"], ctx["scale_factor"])
        ckpt = trained["train"]["checkpoints"][str(preset.steps)]
        scale = ctx["guidance"] if arm == "anatomical_guided" else 0.0
        suffix = f"_g{scale:g}" if arm == "anatomical_guided" else ""
        path = os.path.join(out, f"eval_step{preset.steps:06d}{suffix}")
        _backfill_own_on_real(arm, config, ckpt, path, ctx)
        ev_final = evaluate_checkpoint(arm, config, ckpt, preset.samples, True, preset, seed, ctx, path, scale)
        return {"train": trained["train"], "evals": {f"step{preset.steps}": ev_final}}
    config = am.arm_config(arm, preset, ctx["ae_ckpt"], ctx["scale_factor"], ctx.get("mask_ae"))
    data = ctx["train"]
    if arm == "shuffled_masks":
        data = {"image": data["image"], "segmentation": data["segmentation"][am.derangement(len(data["image"]), 99)]}
    info = am.train_ldm(config, data, preset, seed, out, ctx["device"],
                        equal_time_s=None if arm == "baseline" else baseline_seconds, progress=ctx["progress"])
    evals = {}
    for step, ckpt in info["checkpoints"].items():
        final = int(step) == preset.steps
        if final:
            _backfill_own_on_real(arm, config, ckpt, os.path.join(out, f"eval_step{int(step):06d}"), ctx)
            _backfill_latent_rms(arm, config, ckpt, os.path.join(out, f"eval_step{int(step):06d}"), preset, ctx)
        evals[f"step{int(step)}"] = evaluate_checkpoint(arm, config, ckpt, preset.samples if final else
                                                        preset.curve_samples, final, preset, seed, ctx,
                                                        os.path.join(out, f"eval_step{int(step):06d}"))
    if arm != "baseline":
        eq = info["equal_time"]
        if int(eq["step"]) == preset.steps and eq["path"] == info["checkpoints"][str(preset.steps)]:
            evals["equal_time"] = evals[f"step{preset.steps}"]
        else:
            evals["equal_time"] = evaluate_checkpoint(arm, config, eq["path"], preset.samples, False, preset, seed,
                                                      ctx, os.path.join(out, "eval_equal_time"))
    return {"train": info, "evals": evals}


def main(argv: Optional[list[str]] = None) -> int:
    """Benchmark v2 (``bench/anatomy_v2.py``) by default; ``--phantom v1`` runs the first benchmark (this file)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    phantom, rest = _phantom_flag(argv)
    if phantom == "v2":
        import anatomy_v2
        return anatomy_v2.main(argv)
    if phantom != "v1":
        print(f"anatomy.py: error: --phantom takes v1 or v2, got {phantom!r}", file=sys.stderr)
        return 2
    args = parse_args(rest)
    with quiet_training_logs():
        return _main(args, rest)


def _phantom_flag(argv: list[str]) -> tuple[str, list[str]]:
    """The ``--phantom`` value (default v2) and the arguments without it."""
    phantom, rest, i = "v2", [], 0
    while i < len(argv):
        if argv[i] == "--phantom" and i + 1 < len(argv):
            phantom, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--phantom="):
            phantom = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return phantom, rest


@contextlib.contextmanager
def quiet_training_logs() -> Iterator[None]:
    """INFO logging with timestamps; Lightning's and ldm's loggers at WARNING and the many-training-runs warnings
    silenced for the duration (called in-process by the tests: the caller's logging is restored after)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    noisy = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "ldm")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for pattern in (".*no logger configured.*", ".*no `val_dataloader`.*", ".*module\\(s\\) in eval mode.*",
                            ".*LeafSpec.*", ".*does not have many workers.*"):
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for log, level in zip(noisy, levels):
            log.setLevel(level)


def _main(args: argparse.Namespace, argv: Optional[list[str]]) -> int:
    try:
        device = resolve_device(args.device)
        configure_threads(args.threads, device.type == "cpu")
        arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in am.ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; arms: {', '.join(am.ARMS)}")
        arms = ["baseline"] + [a for a in arms if a != "baseline"]
        if args.report_only:
            args.preset = args.preset or _saved_preset(args.out)
        preset = resolve_preset(args, device)
        name = args.preset or ("quick" if args.quick else "gpu" if device.type == "cuda" else "cpu")
        settings = check_run_dir(args.out, preset, name)
        if args.report_only:
            return report_only(args, preset, settings)
    except ValueError as err:
        print(f"anatomy.py: error: {err}", file=sys.stderr)
        return 2
    started = time.time()
    logger.info("preset %s on %s -> %s", name, _device_name(device), args.out)
    train, test = am.phantom_split(preset, "train"), am.phantom_split(preset, "test")
    # what the diffusion models see: the whole training split, or a data-scarce subset of it
    ldm_train = train if preset.ldm_train_slices is None else am.phantom_split(preset, "train",
                                                                               preset.ldm_train_slices)
    t0 = time.perf_counter()
    with exclusive(os.path.join(args.out, "autoencoder")):
        ae_ckpt, scale = train_autoencoder(preset, train, args.out, device, args.progress)
    with exclusive(os.path.join(args.out, "segmenter")):
        seg = independent_segmenter(preset, train, args.out, device, args.progress)
    with exclusive(os.path.join(args.out, "calibration")):
        cal = calibrate(preset, ldm_train, test, ae_ckpt, seg, preset.seeds, args.out, device, scale)
    setup_s = time.perf_counter() - t0
    ctx = {"out": args.out, "device": device, "seg": seg, "train": ldm_train, "test": test, "ae_ckpt": ae_ckpt,
           "scale_factor": scale, "progress": args.progress, "guidance": args.guidance,
           "real_features": ev.segmenter_features(seg, test["image"]),
           "heldout_nn": ev.pixel_nn_distances(test["image"], ldm_train["image"]), "requested_arms": arms}
    results = run_all(arms, preset, ctx)
    results.update(_other_finished_arms(args.out, arms, preset, ctx, results))
    results = {arm: results[arm] for arm in ["baseline"] + list(am.ARMS) if arm in results}  # the report's order
    meta = {"command": "python bench/anatomy.py --phantom v1 " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": name, "settings": settings, "seeds": list(range(preset.seeds)), "noise_seed": NOISE_SEED,
            "device": _device_name(device), "torch": torch.__version__, "lightning": pl.__version__,
            "python": platform.python_version(), "wall_seconds_this_call": time.time() - started,
            "setup_seconds_this_call": setup_s, "scale_factor": scale, "guidance_scale": args.guidance,
            "mask_autoencoder": (_jload(os.path.join(args.out, "mask_autoencoder.json"))
                                 if os.path.isfile(os.path.join(args.out, "mask_autoencoder.json")) else None),
            "arms_described": {a: am.ARMS[a] for a in results},
            "configs": {a: am.arm_config(a, preset, "<autoencoder.ckpt>", scale,
                                         ("<mask_autoencoder.ckpt>", ctx["mask_ae"][1]) if "mask_ae" in ctx else None)
                        for a in results}}
    write_outputs(args.out, cal, results, preset, meta)
    logger.info("wrote %s and %s", os.path.join(args.out, "anatomy.json"), os.path.join(args.out, "report.md"))
    return 0


def _saved_preset(out: str) -> str:
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        raise ValueError(f"--report-only: {out} holds no benchmark run (no run.json)")
    return _jload(path)["preset"]


def load_finished(out: str, preset: am.Preset) -> dict[str, dict[int, dict]]:
    """Every arm whose ``preset.seeds`` seeds all hold their final evaluation, read from disk (no model needed):
    ``{arm: {seed: {"train": ..., "evals": {"step<N>": ..., "equal_time": ...}}}}``, as ``run_all`` returns."""
    results: dict[str, dict[int, dict]] = {}
    for arm in sorted(os.listdir(os.path.join(out, "arms"))) if os.path.isdir(os.path.join(out, "arms")) else []:
        if arm not in am.ARMS:
            continue
        per_seed = {}
        for seed in range(preset.seeds):
            d = os.path.join(out, "arms", arm, f"seed{seed}")
            finals = sorted(glob.glob(os.path.join(d, f"eval_step{preset.steps:06d}*.json")))
            trained = os.path.join(out, "arms", am.SAME_MODELS.get(arm, arm), f"seed{seed}",
                                   "train.json")
            if not finals or not os.path.isfile(trained):
                break
            evals = {}
            for path in glob.glob(os.path.join(d, "eval_step*.json")):
                step = int(os.path.basename(path)[len("eval_step"):len("eval_step") + 6])
                evals[f"step{step}"] = _load_eval(path[:-len(".json")])
            equal = os.path.join(d, "eval_equal_time")
            if os.path.isfile(equal + ".json"):
                evals["equal_time"] = _load_eval(equal)
            elif arm != "baseline" and arm not in am.SAME_MODELS:  # its equal-time checkpoint was the final one
                evals["equal_time"] = evals[f"step{preset.steps}"]
            per_seed[seed] = {"train": _jload(trained), "evals": evals}
        if len(per_seed) == preset.seeds:
            results[arm] = per_seed
    results = {arm: results[arm] for arm in ["baseline"] + list(am.ARMS) if arm in results}  # the report's order
    if "baseline" not in results:
        raise ValueError(f"{out}: the baseline has not finished every seed; nothing to compare")
    return results


def report_only(args: argparse.Namespace, preset: am.Preset, settings: dict[str, Any]) -> int:
    """``--report-only``: the outputs from what the run directory holds."""
    out = args.out
    results = load_finished(out, preset)
    cal_path = os.path.join(out, "calibration.json")
    if not os.path.isfile(cal_path):
        raise ValueError(f"--report-only: {cal_path} is missing (the run's setup did not finish)")
    old = os.path.join(out, "anatomy.json")
    unknown = "not recorded (the run's anatomy.json was missing)"
    meta = _jload(old)["meta"] if os.path.isfile(old) else {
        "command": unknown, "preset": args.preset, "settings": settings, "seeds": list(range(preset.seeds)),
        "noise_seed": NOISE_SEED, "device": unknown, "torch": unknown, "lightning": unknown}
    scale_path = os.path.join(out, "autoencoder.json")
    if os.path.isfile(scale_path):
        meta["scale_factor"] = float(_jload(scale_path)["scale_factor"])
    mask_path = os.path.join(out, "mask_autoencoder.json")
    meta["mask_autoencoder"] = _jload(mask_path) if os.path.isfile(mask_path) else None
    meta["report_command"] = "python bench/anatomy.py " + " ".join(sys.argv[1:])
    meta["arms_described"] = {a: am.ARMS[a] for a in results}
    if args.note:
        meta["note"] = args.note
    write_outputs(out, _jload(cal_path), results, preset, meta)
    logger.info("wrote %s and %s for arms %s", os.path.join(out, "anatomy.json"), os.path.join(out, "report.md"),
                ", ".join(results))
    return 0


def _other_finished_arms(out: str, arms: list[str], preset: am.Preset, ctx: dict,
                         results: dict) -> dict[str, dict[int, dict]]:
    """Arms finished by earlier calls with the same run directory (e.g. ablations run separately)."""
    extra: dict[str, dict[int, dict]] = {}
    arms_dir = os.path.join(out, "arms")
    for arm in sorted(os.listdir(arms_dir)) if os.path.isdir(arms_dir) else []:
        if arm in arms or arm not in am.ARMS:
            continue
        seeds_done = [s for s in range(preset.seeds)
                      if glob.glob(os.path.join(arms_dir, arm, f"seed{s}", f"eval_step{preset.steps:06d}*.json"))]
        if len(seeds_done) == preset.seeds:
            extra[arm] = {s: run_arm_seed(arm, s, preset, ctx, results["baseline"][s]["train"]["train_seconds"])
                          for s in seeds_done}
    return extra


if __name__ == "__main__":
    sys.exit(main())
