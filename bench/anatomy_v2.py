#!/usr/bin/env python
"""Anatomy benchmark v2: does a model draw better anatomy than capacity alone, at equal compute, across seeds?

    python bench/anatomy.py -o RUN                     # development run (dev seeds of bench/PROTOCOL.md), cpu preset
    python bench/anatomy.py -o RUN --claim             # the protocol's claim seeds (never used while developing)
    python bench/anatomy.py -o RUN --arms plain --seeds 0  # one task: one arm, one training seed
    python bench/anatomy.py -o /tmp/q --quick          # every stage at toy size (the tests)
    python bench/anatomy.py --report bench/records/v2_cpu -o REPORT_DIR   # report from committed records

What it does (``bench/ANATOMY.md`` explains it, ``bench/PROTOCOL.md`` fixes the endpoints and the seeds):

1. **Setup, once per run directory** (seed 0, the measuring instrument): phantom v2 splits
   (``ldm/data/phantom_v2.py``: variants, rotation, habitus), one frozen f4 KL autoencoder, the posterior moments
   of every training slice (the encoder never runs inside training), two independent judges (segmenters of two
   widths and seeds trained on the real training split) and their calibration: pass rates of real slices,
   agreement of the judges, and **sensitivity**: the share of corrupted real slices (a mirrored organ, chest over
   pelvis, swapped or deleted or duplicated organs, misplaced kidneys, speckle) each judge flags, at two minimum
   component sizes. Written as a setup record.
2. **Tasks**, one per (arm, training seed): the plain LDM, the capacity-matched plain LDM (``bench/capacity.py``:
   parameters and training FLOPs within 5 % of the anatomical UNet) and the shipped anatomical LDM, each trained
   for the same optimiser steps on the same batches, with checkpoints at a quarter of the steps, at the end, and at
   the step that spends the plain LDM's training FLOPs. Each budget is sampled with DDIM (eta 0) and a stochastic
   sampler (DDIM eta 1) from start noise shared by every arm, judged by both judges, described (presence, area,
   centroid, orientation, components, variant, level) and compared with the real test masks. Each task writes
   one record (``OUT/records/<arm>_seed<k>.json`` + ``.npz``), meant to be committed under ``bench/records/``.
3. **Report** from any set of records with the same protocol hash: seed-level paired tests with Holm correction
   (primary), descriptor distances, variant prevalence, judge sensitivity, capacity ratios, power analysis, cost.

The run directory is resumable: run the same command again and finished stages are reused. Several processes
(one thread each) can share one run directory, e.g. one per arm.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.dirname(HERE), HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import anatomy_models as am  # noqa: E402
import capacity  # noqa: E402
import records as rec  # noqa: E402
from anatomy import Busy, _device_name, _jdump, _jload, exclusive, quiet_training_logs  # noqa: E402
from ldm.atomic_io import save_torch  # noqa: E402
from ldm.checkpoints import read_checkpoint  # noqa: E402
from ldm.cli_flags import THREADS_HELP  # noqa: E402
from ldm.data import phantom_v2 as pv2  # noqa: E402
from ldm.data.anatomy_check_v2 import RULES_V2, check_anatomy_v2  # noqa: E402
from ldm.evaluation.descriptors import anatomy_measures, mask_descriptors  # noqa: E402
from ldm.evaluation.segmenter import load_segmenter, save_segmenter, segment, train_segmenter  # noqa: E402
from ldm.models.latent_cache import posterior_moments  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

logger = logging.getLogger("anatomy_v2")
NUM_CLASSES = pv2.NUM_CLASSES_V2
LABEL_SET = "phantom2"
ARMS_V2: dict[str, str] = {
    "plain": "plain LatentDiffusion + UNetModel (self-attention in the middle block only)",
    "matched": "plain LatentDiffusion + a UNetModel with the anatomical UNet's parameters and training FLOPs "
               "(within 5 %; bench/capacity.py)",
    "anatomical": "the shipped anatomical configuration (registers + segmentation head + anatomical loss), "
                  "10 phantom-v2 classes",
    "registers_no_loss": "the anatomical UNet with anatomical loss weight 0 (registers as extra capacity only)",
    "lean": "the anatomical configuration with the lean register design (bench/register_cost.py 'lean_low': register "
            "width = UNet width, head size 16, register layers once per path at the lowest resolution + the middle "
            "block, pixel-shuffle mask head)",
    "lean_no_loss": "the lean arm with anatomical loss weight 0 (the lean registers as extra capacity only)",
    "matched_lean": "plain LatentDiffusion + a UNetModel with the lean arm's parameters and training FLOPs "
                    "(within 5 %; bench/capacity.py)",
    "lean_v3": "the lean arm with the audit's fixes (issue 29): the mask loss ramped up from 0 over the first 10 % "
               "of training (instead of doubled), uniform over timesteps (instead of alpha_bar weighted), the "
               "alignment loss off, the mask head reading every decoder level (mask_head_levels)",
    "lean_stopgrad": "the lean arm with its mask head behind a stop-gradient and the alignment loss off: the lean "
                     "registers as capacity, the masks from a probe that cannot pull on the denoiser",
    "plain_labelmap": "the plain LDM with the mask as an optional condition (issue 28: mask_condition, dropout 0.1, "
                      "partial 0.3); the benchmark samples it without a mask, bench/labelmap_v2.py from masks",
    "plain_labelmap_nodrop": "plain_labelmap without condition dropout (dropout 0, partial 0.3): the "
                             "mask-conditioned model the issue compares with; its unconditional samples are a reference",
    "plain_labelmap_drop30": "plain_labelmap with condition dropout 0.3 (partial 0.3): more training of the "
                             "unconditional path",
    "plain_labelmap_drop50": "plain_labelmap with condition dropout 0.5 (partial 0.3)",
    "plain_labelmap_detail4": "plain_labelmap with the condition on a 4x finer grid than the latent one, each "
                              "latent cell's 4x4 sub-cells stacked as channels (mask_condition_detail 4): where a "
                              "boundary runs inside a cell, which the cell's class fractions do not say",
    "plain_repa": "the plain LDM trained with representation alignment (REPA, issue 29): its middle block's features "
                  "of the noisy latent projected onto a frozen mask encoder's features of the clean sample's mask "
                  "(an autoencoder of the real training masks, not a judge), weight 0.5; sampled as the plain LDM",
    "lean_stopgrad_repa": "lean_stopgrad (the lean registers as capacity, a stop-gradient mask probe) trained with "
                          "plain_repa's representation alignment: the layout from the alignment, the masks from "
                          "the probe",
}
LABELMAP_CONDITION = {"key": "segmentation", "num_classes": NUM_CLASSES, "ignore_index": 255, "dropout": 0.1,
                      "partial": 0.3}
LABELMAP_DROPOUT = {"plain_labelmap": 0.1, "plain_labelmap_nodrop": 0.0, "plain_labelmap_drop30": 0.3,
                    "plain_labelmap_drop50": 0.5, "plain_labelmap_detail4": 0.1}  # arm -> p
LABELMAP_DETAIL = {"plain_labelmap_detail4": 4}  # arm -> mask_condition_detail (1 otherwise)
# arm -> what it changes in the lean arm's model params (AnatomicalLatentDiffusion) and its UNet's params
LEAN_CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "lean_v3": ({"anatomical_schedule": "ramp", "anatomical_timestep_weighting": "none",
                 "attention_alignment_weight": 0.0}, {"mask_head_levels": "all"}),
    "lean_stopgrad": ({"attention_alignment_weight": 0.0}, {"segmentation_stop_gradient": True}),
}
# arm -> its representation_alignment settings (LatentDiffusion); the encoder is trained once per run folder
REPA_SETTINGS = {"layer": "middle_block", "weight": 0.5, "hidden": 256}  # REPA's weight; U-REPA's layer
REPA_ARMS: dict[str, tuple[str, dict[str, Any]]] = {"plain_repa": ("plain", REPA_SETTINGS),
                                                    "lean_stopgrad_repa": ("lean_stopgrad", REPA_SETTINGS)}
REPA_ENCODER = {"patch": 4, "channels": 32, "depth": 1, "feature_dim": 64}  # MaskFeatureEncoder: on the latent grid
REPA_ENCODER_TRAINING = {"steps": 600, "batch_size": 32, "lr": 2e-3, "seed": 2}  # quick preset: 10 steps
JUDGES = {"A": {"base_channels": 16, "seed": 0}, "B": {"base_channels": 24, "seed": 1}}
MASK_ARMS_V2 = ("anatomical", "registers_no_loss", "lean", "lean_no_loss", "lean_v3", "lean_stopgrad",
                "lean_stopgrad_repa")
MATCH_TARGETS = {"matched": "anatomical", "matched_lean": "lean"}  # capacity-matched plain arm -> the arm it matches
LEAN_VARIANT = "lean_low"  # bench/register_cost.py variant the lean arm trains
CAPACITY_TOL = 0.05  # the protocol's capacity_tolerance


@dataclass(frozen=True)
class PresetV2:
    """Sizes and budgets of one scale (all arms share them); see ``am.Preset`` for the shared fields.

    Args:
        samples: samples per (budget, sampler) at the final and the equal-FLOPs checkpoint.
        curve_samples: DDIM samples at the quarter checkpoint.
        sampler_steps: sampler steps (``None``: the protocol's).
        corrupted: corrupted real slices per corruption kind (judge sensitivity).
    """

    size: int
    train_slices: int
    test_slices: int
    ae_steps: int
    ae_batch: int
    ae_ch: int
    seg_steps: int
    unet: dict = field(default_factory=dict)
    steps: int = 4000
    batch: int = 32
    lr: float = 3e-4
    samples: int = 500
    curve_samples: int = 200
    sampler_steps: Optional[int] = None
    corrupted: int = 200
    fractions: tuple[float, ...] = (0.25, 1.0)
    mask_ae_steps: Optional[int] = None
    ldm_train_slices: Optional[int] = None


PRESETS_V2: dict[str, PresetV2] = {
    "quick": PresetV2(size=32, train_slices=64, test_slices=32, ae_steps=30, ae_batch=8, ae_ch=16, seg_steps=30,
                      unet={"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "num_heads": 4},
                      steps=12, batch=8, samples=12, curve_samples=6, sampler_steps=4, corrupted=8),
    "cpu": PresetV2(size=64, train_slices=2048, test_slices=512, ae_steps=1000, ae_batch=16, ae_ch=32,
                    seg_steps=1500,
                    unet={"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "num_heads": 4}),
    "gpu": PresetV2(size=128, train_slices=8192, test_slices=1024, ae_steps=6000, ae_batch=32, ae_ch=64,
                    seg_steps=4000,
                    unet={"model_channels": 128, "channel_mult": [1, 2, 4], "num_res_blocks": 2, "num_heads": 8},
                    steps=20000, batch=64, lr=1e-4, samples=1000, curve_samples=400),
}


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/anatomy.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="run directory (created; reused when it exists)")
    p.add_argument("--phantom", choices=("v1", "v2"), default="v2", help="v1: the first benchmark (bench/ANATOMY_v1.md)")
    p.add_argument("--arms", default=None, help=f"comma-separated, from {', '.join(ARMS_V2)} (default: the "
                                                "protocol's arms)")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the protocol's "
                                                 "development seeds; --claim: its claim seeds)")
    p.add_argument("--noise-seed", "--noise_seed", dest="noise_seed", type=int, default=None,
                   help="start-noise seed shared by every arm (default: the protocol's development seed)")
    p.add_argument("--claim", action="store_true",
                   help="the protocol's claim seeds and noise seed (bench/PROTOCOL.md); refuses --seeds/--noise-seed "
                        "and toy presets")
    p.add_argument("--preset", choices=sorted(PRESETS_V2), default=None,
                   help="scale (default: quick with --quick, gpu on CUDA, else cpu)")
    p.add_argument("--quick", action="store_true", help="toy sizes: every stage in about a minute")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per model (preset); changes the protocol "
                                                          "hash")
    p.add_argument("--samples", type=int, default=None, help="samples per budget and sampler (preset); changes the "
                                                            "protocol hash")
    p.add_argument("--report", nargs="+", default=None, metavar="DIR",
                   help="write the report into -o from the records in these directories (files or folders); "
                        "trains nothing")
    p.add_argument("--protocol-hash", "--protocol_hash", dest="protocol_hash", default=None,
                   help="with --report: the protocol hash to report when the directories hold several")
    p.add_argument("--new-instrument", "--new_instrument", dest="new_instrument", action="store_true",
                   help="train the autoencoder and judges afresh even where the preset has a committed instrument "
                        "(bench/instruments/v2_<preset>/, otherwise adopted so that records of every session pair)")
    p.add_argument("--save-instrument", "--save_instrument", dest="save_instrument", action="store_true",
                   help="after the setup, copy the run's autoencoder and judges to bench/instruments/v2_<preset>/ "
                        "(to commit) and stop")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", default="auto", help=THREADS_HELP + " (decided once at the start here)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def resolve(args: argparse.Namespace, device: torch.device, protocol: dict[str, Any]
            ) -> tuple[str, PresetV2, list[str], list[int], int, bool]:
    """``(preset name, preset, arms, training seeds, noise seed, claim)`` from the flags and the protocol."""
    name = args.preset or ("quick" if args.quick else "gpu" if device.type == "cuda" else "cpu")
    preset = PRESETS_V2[name]
    for flag, value in (("steps", args.steps), ("samples", args.samples)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    if args.samples is not None:
        preset = dataclasses.replace(preset, samples=args.samples, curve_samples=min(preset.curve_samples,
                                                                                     args.samples))
    arms = [a.strip() for a in (args.arms or ",".join(protocol["arms"])).split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS_V2]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms: {', '.join(ARMS_V2)}")
    claim_seeds, claim_noise = list(protocol["claim_training_seeds"]), int(protocol["claim_noise_seed"])
    if args.claim:
        if args.noise_seed is not None:
            raise ValueError("--claim takes the noise seed from bench/PROTOCOL.md; drop --noise-seed")
        if name == "quick" or args.steps is not None or args.samples is not None:
            raise ValueError("--claim runs the protocol's scale: no --quick, --steps or --samples")
        seeds = claim_seeds if args.seeds is None else _seed_list(args.seeds)
        outside = [s for s in seeds if s not in claim_seeds]
        if outside:
            raise ValueError(f"--claim: seeds {outside} are not claim seeds of the protocol ({claim_seeds})")
        return name, preset, arms, seeds, claim_noise, True
    seeds = list(protocol["dev_training_seeds"]) if args.seeds is None else _seed_list(args.seeds)
    noise = int(protocol["dev_noise_seed"]) if args.noise_seed is None else int(args.noise_seed)
    used = [s for s in seeds if s in claim_seeds] + ([noise] if noise == claim_noise else [])
    if used:
        raise ValueError(f"seeds {used} are claim seeds of bench/PROTOCOL.md: they are used only with --claim")
    if name == "quick" and args.seeds is None:
        seeds = seeds[:2]
    return name, preset, arms, seeds, noise, False


def preset_settings(preset: PresetV2, protocol: dict[str, Any]) -> dict[str, Any]:
    """What the protocol hash covers besides the protocol: the preset, with the sampler steps resolved."""
    settings = dataclasses.asdict(preset)
    settings["samplers"] = samplers(preset, protocol)
    settings["judges"] = JUDGES
    return settings


def samplers(preset: PresetV2, protocol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, spec in protocol["samplers"].items():
        out[key] = {"steps": int(preset.sampler_steps or spec["steps"]), "eta": float(spec["eta"])}
    return out


# ------------------------------------------------------------------------------------------------ models
def _first_stage_from_moments(cfg: dict[str, Any]) -> dict[str, Any]:
    """Replace an arm's first stage by the wrapper that reads precomputed posterior moments; the benchmark's
    measured latent scale is used as is (``scale_by_std`` off: nothing re-estimates it)."""
    ae = cfg["params"]["first_stage_config"]
    cfg["params"]["first_stage_config"] = {"target": "ldm.models.latent_cache.PrecomputedPosteriorFirstStage",
                                           "params": {"autoencoder_config": ae}}
    cfg["params"]["scale_by_std"] = False
    return cfg


def arm_config(arm: str, preset: PresetV2, ae_ckpt: Optional[str], scale_factor: float) -> dict[str, Any]:
    """The ``model:`` config of one v2 arm (see ``ARMS_V2``)."""
    if arm not in ARMS_V2:
        raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS_V2)}")
    if arm == "plain" or arm in LABELMAP_DROPOUT or arm in MATCH_TARGETS:
        cfg = am.baseline_config(preset, ae_ckpt, scale_factor)
        if arm in LABELMAP_DROPOUT:
            cfg["params"]["mask_condition"] = {**LABELMAP_CONDITION, "dropout": LABELMAP_DROPOUT[arm]}
            cfg["params"]["unet_config"]["params"]["mask_condition_classes"] = NUM_CLASSES
            if arm in LABELMAP_DETAIL:
                cfg["params"]["unet_config"]["params"]["mask_condition_detail"] = LABELMAP_DETAIL[arm]
        if arm in MATCH_TARGETS:
            cfg["params"]["unet_config"]["params"] = copy.deepcopy(matched_unet(preset, MATCH_TARGETS[arm])["unet"])
        return _first_stage_from_moments(cfg)
    if arm in REPA_ARMS:
        base, settings = REPA_ARMS[arm]
        cfg = arm_config(base, preset, ae_ckpt, scale_factor)
        cfg["params"]["representation_alignment"] = {
            "num_classes": NUM_CLASSES, "mask_key": "segmentation", "ignore_index": 255, **settings,
            "encoder": dict(REPA_ENCODER), "encoder_path": None if ae_ckpt is None else mask_encoder_path(ae_ckpt)}
        return cfg
    no_loss = arm in ("registers_no_loss", "lean_no_loss")
    cfg = am.arm_config("registers_no_loss" if no_loss else "anatomical", preset, ae_ckpt, scale_factor)
    cfg = capacity.set_num_classes(cfg, NUM_CLASSES)
    if arm in ("lean", "lean_no_loss") or arm in LEAN_CHANGES:
        import register_cost

        unet = cfg["params"]["unet_config"]["params"]
        unet.update(register_cost.lean_overrides(unet, LEAN_VARIANT))
        ldm_changes, unet_changes = LEAN_CHANGES.get(arm, ({}, {}))
        cfg["params"].update(ldm_changes)
        unet.update({k: len(unet["channel_mult"]) if v == "all" else v for k, v in unet_changes.items()})
    cfg["params"]["label_set"] = LABEL_SET
    return _first_stage_from_moments(cfg)


def mask_encoder_path(ae_ckpt: str) -> str:
    """Where a run keeps the REPA arms' mask encoder: beside its autoencoder, in the run's ``setup`` folder."""
    return os.path.join(os.path.dirname(ae_ckpt), "mask_encoder.pt")


def ensure_mask_encoder(ctx: dict[str, Any]) -> dict[str, Any]:
    """The REPA arms' mask encoder of a run: the committed instrument's (``mask_encoder.pt`` beside its judges) when
    the run uses that instrument, so records of any machine share it; else trained once on the run's real training
    masks (a lock keeps two processes from both training it). Returns its meta (training settings and
    reconstruction accuracy, the file's sha256)."""
    from ldm.modules.representation_alignment import load_mask_encoder, save_mask_encoder, train_mask_encoder

    path = mask_encoder_path(ctx["setup"]["ae_ckpt"])
    committed = instrument_dir(ctx["preset_name"])
    source = None if committed is None else os.path.join(committed, "mask_encoder.pt")
    if source is not None and os.path.isfile(source):  # only a run of the committed instrument shares it
        same = _jload(os.path.join(committed, INSTRUMENT_RECORD))["setup_id"] == ctx["setup"]["setup_id"]
        source = source if same else None
    else:
        source = None
    with exclusive(path):
        if not os.path.isfile(path) and source is not None:
            import shutil

            shutil.copyfile(source, path + ".part")
            os.replace(path + ".part", path)
            logger.info("mask encoder: the committed one (%s)", source)
        if not os.path.isfile(path):
            training = {**REPA_ENCODER_TRAINING, **({"steps": 10} if ctx["preset_name"] == "quick" else {})}
            masks = ctx["setup"]["train"]["segmentation"].long()
            model, info = train_mask_encoder(masks, NUM_CLASSES, ignore_index=255, progress=ctx["progress"],
                                             **training, **REPA_ENCODER)
            save_mask_encoder(path, model, {**training, **info})
            logger.info("mask encoder %s: pixel accuracy %.4f after %d steps", path, info["pixel_accuracy"],
                        info["steps"])
    return {**load_mask_encoder(path)[1], "sha256": _sha256(path)}


_MATCHED: dict[str, dict[str, Any]] = {}


def matched_unet(preset: PresetV2, target: str = "anatomical") -> dict[str, Any]:
    """The plain UNet matched to the ``target`` arm's capacity at this preset (``bench/capacity.py``'s search, done
    once per process and target) and the ratios it reaches: ``{"unet": params, "info": {...}}``."""
    key = json.dumps({"target": target, **dataclasses.asdict(preset)}, sort_keys=True)
    if key not in _MATCHED:
        plain = am.baseline_config(preset, None, 1.0)
        cfg, info = capacity.capacity_matched_config(plain, arm_config(target, preset, None, 1.0),
                                                     tol=CAPACITY_TOL)
        _MATCHED[key] = {"unet": cfg["params"]["unet_config"]["params"], "info": info}
    return _MATCHED[key]


# ------------------------------------------------------------------------------------------------ setup
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split(preset: PresetV2, name: str) -> dict[str, Any]:
    n = preset.train_slices if name == "train" else preset.test_slices
    return pv2.phantom_v2_arrays(preset.size, n, seed=0, split=name)


def judge_masks(masks: torch.Tensor | np.ndarray, min_area_frac: float) -> dict[str, Any]:
    """Checker reports of label maps: ``plausible`` and one boolean per rule, inferred variants and levels."""
    reports = [check_anatomy_v2(m, min_area_frac=min_area_frac) for m in np.asarray(masks)]
    out: dict[str, Any] = {"plausible": np.array([r.plausible for r in reports], dtype=bool)}
    for rule in RULES_V2:
        out[rule] = np.array([getattr(r, rule) for r in reports], dtype=bool)
    out["variant"] = [r.variant for r in reports]
    out["level"] = [r.level for r in reports]
    out["reports"] = reports
    return out


def min_sizes(protocol: dict[str, Any]) -> dict[str, float]:
    return {"primary": float(protocol["primary"]["min_area_frac"]),
            "secondary": float(protocol.get("secondary_min_area_frac", 0.004))}


def _judge_summary(outcome: dict[str, Any]) -> dict[str, Any]:
    return {"pass_rate": float(outcome["plausible"].mean()),
            "rule_failure": {r: float(1 - outcome[r].mean()) for r in RULES_V2}}


def _kappa(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Cohen's kappa of two boolean ratings (None when undefined)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return None if pe >= 1.0 else (po - pe) / (1.0 - pe)


def corrupted_split(preset: PresetV2, kind: str) -> dict[str, torch.Tensor]:
    """``preset.corrupted`` corrupted test-split slices of one kind (patients and heights from the test split)."""
    return pv2.corrupted_arrays(preset.size, preset.corrupted, kind, seed=0, split="test")


def sensitivity(preset: PresetV2, judges: dict[str, torch.nn.Module], protocol: dict[str, Any]) -> dict[str, Any]:
    """Per corruption kind: the share of corrupted real slices flagged (not plausible) by the checker on the true
    corrupted mask and by each judge on the corrupted image, at both minimum component sizes."""
    table: dict[str, Any] = {}
    for kind in pv2.CORRUPTIONS:
        data = corrupted_split(preset, kind)
        row: dict[str, Any] = {"n": int(len(data["image"]))}
        seg = {j: segment(m, data["image"], batch_size=128) for j, m in judges.items()}
        for label, frac in min_sizes(protocol).items():
            row[f"true_mask/{label}"] = float(1 - judge_masks(data["segmentation"], frac)["plausible"].mean())
            for j, masks in seg.items():
                row[f"judge_{j}/{label}"] = float(1 - judge_masks(masks, frac)["plausible"].mean())
        table[kind] = row
    return table


def _independent_stages(sdir: str, preset: PresetV2, train: dict, device: torch.device, progress: bool
                        ) -> tuple[str, float]:
    """The autoencoder and the two judges, which do not depend on each other: a process takes whichever stage no
    other process is computing (so workers sharing a run directory build them in parallel), then waits for the
    rest. Returns the autoencoder's checkpoint and latent scale."""
    from anatomy import train_autoencoder

    def judge(name: str) -> None:
        path = os.path.join(sdir, f"judge_{name}.pt")
        if not os.path.isfile(path):
            spec = JUDGES[name]
            model = train_segmenter(am.TensorSlices(train["image"], train["segmentation"]), NUM_CLASSES,
                                    steps=preset.seg_steps, batch_size=16, base_channels=spec["base_channels"],
                                    seed=spec["seed"], device=device, progress=progress)
            save_segmenter(path, model, {"trained_on": "phantom v2 train split (real)", **spec})

    stages = {os.path.join(sdir, "autoencoder"): lambda: train_autoencoder(preset, train, sdir, device, progress)}
    stages.update({os.path.join(sdir, f"judge_{name}.pt"): (lambda n=name: judge(n)) for name in JUDGES})
    for wait in (False, True):  # first every free stage, then wait for the others' stages
        for lock, run in stages.items():
            try:
                with exclusive(lock, wait=wait):
                    run()
            except Busy:
                continue
    with exclusive(os.path.join(sdir, "autoencoder")):
        return train_autoencoder(preset, train, sdir, device, progress)  # finished: reads the checkpoint and scale


INSTRUMENTS = os.path.join(HERE, "instruments")
INSTRUMENT_FILES = ("autoencoder.ckpt", "autoencoder.json", *(f"judge_{j}.pt" for j in ("A", "B")))
INSTRUMENT_RECORD = "INSTRUMENT.json"


def instrument_settings(preset: PresetV2) -> dict[str, Any]:
    """What an instrument is built from: the preset's data, autoencoder and judge settings and the judges' specs."""
    fields = ("size", "train_slices", "test_slices", "ae_steps", "ae_batch", "ae_ch", "seg_steps")
    return json.loads(json.dumps({**{f: getattr(preset, f) for f in fields}, "judges": JUDGES}))


def instrument_dir(preset_name: str, root: Optional[str] = None) -> Optional[str]:
    """The committed instrument of a preset (``bench/instruments/v2_<preset>/``: the autoencoder and the judges a
    claim run spanning sessions and machines shares), or None."""
    path = os.path.join(root or INSTRUMENTS, f"v2_{preset_name}")
    return path if os.path.isfile(os.path.join(path, INSTRUMENT_RECORD)) else None


def adopt_instrument(sdir: str, instrument: str, preset: PresetV2) -> str:
    """Copy a committed instrument into a run's ``setup/`` that has none of its files yet (an existing, complete one
    must be that instrument); returns its setup id. A mismatch is a ValueError: the run folder was built with another
    instrument, whose records would not pair with the committed one's, or the preset now builds another one."""
    import shutil

    record = _jload(os.path.join(instrument, INSTRUMENT_RECORD))
    expected = record["setup_id"]
    built_from = record.get("instrument_settings")
    if built_from is not None and built_from != instrument_settings(preset):
        raise ValueError(f"the committed instrument {expected} ({instrument}) was built with other preset settings "
                         f"({built_from}) than the preset's now ({instrument_settings(preset)}); pass "
                         "--new-instrument (its records will not pair with the committed ones)")
    present = [f for f in INSTRUMENT_FILES if os.path.isfile(os.path.join(sdir, f))]
    if not present:
        os.makedirs(sdir, exist_ok=True)
        for f in INSTRUMENT_FILES:
            shutil.copyfile(os.path.join(instrument, f), os.path.join(sdir, f + ".part"))
            os.replace(os.path.join(sdir, f + ".part"), os.path.join(sdir, f))
        logger.info("using the committed instrument %s (%s)", expected, instrument)
    if len(present) in (0, len(INSTRUMENT_FILES)):
        found = setup_identity(sdir, os.path.join(sdir, "autoencoder.ckpt"))
        if found == expected:
            return found
        raise ValueError(f"{sdir} holds the instrument {found}, not the committed {expected} ({instrument}); use a "
                         "new run folder (it adopts the committed instrument), or --new-instrument to keep this one")
    raise ValueError(f"{sdir} holds only part of an instrument ({', '.join(present)}); remove them, or use a new run "
                     "folder")


def save_instrument(out: str, preset_name: str, preset: PresetV2, protocol_hash: str,
                    root: Optional[str] = None) -> str:
    """Commit-ready copy of a run's instrument as ``<root>/v2_<preset>/`` (``--save-instrument``)."""
    import shutil

    sdir = os.path.join(out, "setup")
    missing = [f for f in INSTRUMENT_FILES if not os.path.isfile(os.path.join(sdir, f))]
    if missing:
        raise ValueError(f"{sdir} lacks {missing}: run the benchmark there first")
    target = os.path.join(root or INSTRUMENTS, f"v2_{preset_name}")
    if os.path.isdir(target):
        raise ValueError(f"{target} exists: an instrument is never replaced (records pair by it); remove it by hand "
                         "only if no record uses it")
    os.makedirs(target)
    for f in INSTRUMENT_FILES:
        shutil.copyfile(os.path.join(sdir, f), os.path.join(target, f))
    setup_id = setup_identity(target, os.path.join(target, "autoencoder.ckpt"))
    _jdump({"setup_id": setup_id, "preset": preset_name, "instrument_settings": instrument_settings(preset),
            "protocol_hash": protocol_hash, "files": list(INSTRUMENT_FILES),
            "from_run": out, "code": rec.code_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           os.path.join(target, INSTRUMENT_RECORD))
    return target


def setup_identity(sdir: str, ae_ckpt: str) -> str:
    """The instrument's id: the hash of the autoencoder's and the judges' checkpoints (records of one id pair up)."""
    return rec.canonical_hash({"autoencoder": _sha256(ae_ckpt),
                               **{f"judge_{j}": _sha256(os.path.join(sdir, f"judge_{j}.pt")) for j in JUDGES}})


def setup(out: str, preset: PresetV2, protocol: dict[str, Any], device: torch.device, progress: bool,
          instrument: Optional[str] = None) -> dict[str, Any]:
    """The shared instrument: data, autoencoder, moments, judges, calibration (cached in ``out/setup``); with
    ``instrument`` (a committed one, :func:`instrument_dir`) its autoencoder and judges instead of training them."""
    sdir = os.path.join(out, "setup")
    os.makedirs(sdir, exist_ok=True)
    if instrument is not None:
        with exclusive(os.path.join(sdir, "instrument")):
            adopt_instrument(sdir, instrument, preset)
    train, test = split(preset, "train"), split(preset, "test")
    ae_ckpt, scale = _independent_stages(sdir, preset, train, device, progress)
    judges = {name: load_segmenter(os.path.join(sdir, f"judge_{name}.pt"), device)[0] for name in JUDGES}
    moments_path = os.path.join(sdir, "moments.pt")
    with exclusive(moments_path):
        if not os.path.isfile(moments_path):
            ae = am.load_autoencoder(ae_ckpt, preset, device)
            save_torch({"moments": posterior_moments(ae, train["image"])}, moments_path)
    moments = read_checkpoint(moments_path)["moments"]
    cal_path = os.path.join(sdir, "calibration.json")
    with exclusive(cal_path):
        cal = _jload(cal_path) if os.path.isfile(cal_path) else calibrate(preset, protocol, train, test, ae_ckpt,
                                                                           scale, judges, device)
        _jdump(cal, cal_path)
    setup_id = setup_identity(sdir, ae_ckpt)
    real_seg = segment(judges["A"], test["image"], batch_size=128)
    grid = os.path.join(sdir, "real_grid.npz")
    if not os.path.isfile(grid):  # the report's figure shows real slices with their true masks first
        np.savez_compressed(grid, images=test["image"][:16].numpy(), masks=test["segmentation"][:16].numpy())
    return {"train": train, "test": test, "ae_ckpt": ae_ckpt, "scale": scale, "judges": judges,
            "moments": moments, "calibration": cal, "setup_id": setup_id, "real_seg_A": real_seg,
            "real_reports_A": judge_masks(real_seg, min_sizes(protocol)["primary"])["reports"]}


def calibrate(preset: PresetV2, protocol: dict[str, Any], train: dict, test: dict, ae_ckpt: str, scale: float,
              judges: dict[str, torch.nn.Module], device: torch.device) -> dict[str, Any]:
    """What real data scores, how the two judges agree, and what each judge detects."""
    ae = am.load_autoencoder(ae_ckpt, preset, device)
    with torch.no_grad():
        recon = torch.cat([ae.decode(ae.encode(x.to(device)).mode()).clamp(-1, 1).float().cpu()
                           for x in test["image"].split(256)])
        z = torch.cat([ae.encode(x.to(device)).mode().float().cpu() for x in test["image"].split(256)])
    cal: dict[str, Any] = {"n_test": int(len(test["image"])), "scale_factor": scale,
                           "real_latent_rms": float(scale * z.pow(2).mean().sqrt()),
                           "test_variants": {v: int(sum(1 for x in test["variant"] if x == v))
                                             for v in sorted(set(test["variant"]))}}
    masks = {(j, what): segment(model, images, batch_size=128) for j, model in judges.items()
             for what, images in (("real", test["image"]), ("reconstructed", recon))}
    for label, frac in min_sizes(protocol).items():
        true = judge_masks(test["segmentation"], frac)
        cal[f"true_masks/{label}"] = _judge_summary(true)
        cal[f"true_masks/{label}"]["variant_recovered"] = float(np.mean(
            [inf == tv for inf, tv in zip(true["variant"], test["variant"]) if inf not in ("unknown",)] or [1.0]))
        for (j, what), seg in masks.items():
            cal[f"judge_{j}/{what}/{label}"] = _judge_summary(judge_masks(seg, frac))
    cal["judge_dice"] = {j: _foreground_dice(masks[(j, "real")], test["segmentation"]) for j in judges}
    a = judge_masks(masks[("A", "real")], min_sizes(protocol)["primary"])["plausible"]
    b = judge_masks(masks[("B", "real")], min_sizes(protocol)["primary"])["plausible"]
    cal["judge_agreement_real"] = {"agree": float((a == b).mean()), "kappa": _kappa(a, b)}
    cal["sensitivity"] = sensitivity(preset, judges, protocol)
    return cal


def _foreground_dice(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    from ldm.evaluation.anatomy import dice_per_class
    per_class = dice_per_class(pred, target, NUM_CLASSES)
    fg = per_class[1:]
    return {"per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "foreground_mean": float(np.nanmean(fg)) if np.isfinite(fg).any() else None}


# ------------------------------------------------------------------------------------------------ tasks
def budgets(arm: str, preset: PresetV2, flops: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Checkpoint step of each budget: ``steps`` (all arms), ``flops`` (the plain LDM's training FLOPs),
    ``quarter`` (a quarter of the steps)."""
    ratio_steps = capacity.equal_flops_steps(preset.steps, flops["plain"]["train_flops_per_sample"],
                                             flops[arm]["train_flops_per_sample"])
    return {"steps": preset.steps, "flops": min(preset.steps, ratio_steps), "quarter": max(1, preset.steps // 4)}


def model_costs(preset: PresetV2, arms: list[str], cache: str) -> dict[str, dict[str, Any]]:
    """Parameters and FLOPs per arm (and the plain arm, the FLOP budget's reference), cached in ``cache``."""
    costs = _jload(cache) if os.path.isfile(cache) else {}
    for arm in dict.fromkeys(["plain", *arms]):
        if arm not in costs:
            costs[arm] = capacity.training_flops_per_sample(arm_config(arm, preset, None, 1.0))
    _jdump(costs, cache)
    return costs


def run_task(arm: str, seed: int, ctx: dict[str, Any]) -> str:
    """Train one arm for one seed, sample every budget with every sampler, judge, write the record."""
    preset, out = ctx["preset"], ctx["out"]
    path = os.path.join(out, "records", f"{arm}_seed{seed}.json")
    if os.path.isfile(path):
        return path
    tdir = os.path.join(out, "arms", arm, f"seed{seed}")
    config = arm_config(arm, preset, ctx["setup"]["ae_ckpt"], ctx["setup"]["scale"])
    steps = budgets(arm, preset, ctx["costs"])
    fractions = tuple(sorted({s / preset.steps for s in steps.values()}))
    data = {"image": ctx["setup"]["moments"], "segmentation": ctx["setup"]["train"]["segmentation"]}
    extra_train = {"mask_encoder": ensure_mask_encoder(ctx)} if arm in REPA_ARMS else {}
    info = am.train_ldm(config, data, dataclasses.replace(preset, fractions=fractions), seed, tdir, ctx["device"],
                        progress=ctx["progress"])
    ckpts = {name: info["checkpoints"][str(s)] for name, s in steps.items()}
    evals, arrays = {}, {}
    for budget, step in steps.items():
        if budget == "flops" and step == preset.steps:
            continue  # the same checkpoint as "steps"
        for sampler, spec in ctx["samplers"].items():
            if budget == "quarter" and sampler != "ddim":
                continue
            n = preset.curve_samples if budget == "quarter" else preset.samples
            key = f"{budget}/{sampler}"
            evals[key], per_sample = evaluate(arm, config, ckpts[budget], step, n, spec, ctx)
            arrays.update({f"{key}/{k}": v for k, v in per_sample.items()})
    if steps["flops"] == preset.steps:
        evals.update({f"flops/{s}": {**evals[f"steps/{s}"], "same_as": f"steps/{s}"} for s in ctx["samplers"]})
    record = {"arm": arm, "arm_described": ARMS_V2[arm], "training_seed": seed, "noise_seed": ctx["noise_seed"],
              "claim": ctx["claim"], "protocol_hash": ctx["protocol_hash"], "protocol": ctx["protocol"],
              "preset": ctx["preset_name"], "settings": ctx["settings"], "setup_id": ctx["setup"]["setup_id"],
              "code": ctx["code"], "device": ctx["device_name"], "torch": torch.__version__,
              "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "model": {**ctx["costs"][arm], "config_sha": rec.canonical_hash(arm_config(arm, preset, None, 1.0))},
              "train": {"steps": preset.steps, "budget_steps": steps, "train_seconds": info["train_seconds"],
                        "resumed_from_step": info.get("resumed_from_step", 0), **extra_train},
              "evals": evals}
    written = rec.write_record(os.path.join(out, "records"), record, arrays)
    logger.info("record %s", written)
    return written


def evaluate(arm: str, config: dict, ckpt: str, step: int, n: int, spec: dict[str, Any], ctx: dict[str, Any]
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Sample ``n`` images from one checkpoint with one sampler; both judges; descriptors and measures."""
    device, protocol = ctx["device"], ctx["protocol"]
    model = am.load_trained(config, ckpt, device)
    own = arm in MASK_ARMS_V2
    t0 = time.perf_counter()
    drawn = am.draw_samples(model, n, spec["steps"], ctx["noise_seed"], 250, device, own,
                            sampler="ddim", eta=spec["eta"])
    seconds = time.perf_counter() - t0
    sizes = min_sizes(protocol)
    info: dict[str, Any] = {"step": step, "n": n, "sampler": spec, "sampling_seconds_per_sample": seconds / n,
                            "sampling_flops_per_sample": ctx["costs"][arm]["sample_step_flops_per_sample"]
                            * spec["steps"],
                            "latent_rms": float(drawn["latent_rms"].pow(2).mean().sqrt()), "judges": {}}
    arrays: dict[str, np.ndarray] = {}
    outcomes, judged = {}, {}
    for j, judge in ctx["setup"]["judges"].items():
        seg = judged[j] = segment(judge, drawn["image"], batch_size=128)
        info["judges"][j] = {}
        for label, frac in sizes.items():
            o = judge_masks(seg, frac)
            outcomes[(j, label)] = o
            info["judges"][j][label] = _judge_summary(o)
            arrays[f"{j}/{label}/plausible"] = o["plausible"]
        if j == "A":
            o = outcomes[("A", "primary")]
            info["measures"] = anatomy_measures(ctx["setup"]["real_seg_A"].numpy(), seg.numpy(), NUM_CLASSES,
                                                real_reports=ctx["setup"]["real_reports_A"],
                                                fake_reports=o["reports"])
            desc = mask_descriptors(seg, NUM_CLASSES)
            arrays.update({f"A/descriptor/{k}": np.asarray(v, dtype=np.float16 if np.asarray(v).dtype.kind == "f"
                                                          else None) for k, v in desc.items()})
            arrays["A/variant"] = np.asarray(o["variant"], dtype="U20")
            arrays["A/level"] = np.asarray(o["level"], dtype="U20")
            for rule in RULES_V2:
                arrays[f"A/primary/rule/{rule}"] = o[rule]
            if own:
                info["own_mask"] = {"dice_vs_judge_A": _foreground_dice(drawn["own_mask"], seg),
                                    "pass_rate": float(judge_masks(drawn["own_mask"], sizes["primary"])
                                                       ["plausible"].mean())}
    a, b = outcomes[("A", "primary")]["plausible"], outcomes[("B", "primary")]["plausible"]
    info["judge_agreement"] = {"agree": float((a == b).mean()), "kappa": _kappa(a, b)}
    grid = os.path.join(os.path.dirname(ckpt), f"grid_{os.path.basename(ckpt)[:-5]}_{spec['eta']:g}.npz")
    np.savez_compressed(grid, images=drawn["image"][:16].numpy(), masks=judged["A"][:16].numpy())
    return info, arrays


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with quiet_training_logs():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    from anatomy_v2_report import write_report
    try:
        protocol = rec.load_protocol()
        if args.report:
            written = write_report(args.out, rec.collect(args.report, args.protocol_hash))
            logger.info("wrote %s", written)
            return 0
        device = resolve_device(args.device)
        configure_threads(args.threads, device.type == "cpu")
        name, preset, arms, seeds, noise, claim = resolve(args, device, protocol)
    except ValueError as err:
        print(f"anatomy.py: error: {err}", file=sys.stderr)
        return 2
    settings = preset_settings(preset, protocol)
    phash = rec.protocol_hash(protocol, settings)
    os.makedirs(args.out, exist_ok=True)
    run_json = os.path.join(args.out, "run.json")
    if os.path.isfile(run_json) and _jload(run_json).get("protocol_hash") != phash:
        print(f"anatomy.py: error: {args.out} holds a run with another protocol hash (other settings or an edited "
              "bench/PROTOCOL.md); use the same flags, or another -o", file=sys.stderr)
        return 2
    _jdump({"protocol_hash": phash, "preset": name, "settings": settings}, run_json)
    logger.info("benchmark v2, preset %s on %s -> %s (protocol %s, %s seeds %s)", name, _device_name(device),
                args.out, phash, "claim" if claim else "development", seeds)
    t0 = time.perf_counter()
    ctx_code = rec.code_commit()  # the code this process runs (files edited while it runs do not change it)
    instrument = None if args.new_instrument else instrument_dir(name)
    try:
        inst = setup(args.out, preset, protocol, device, args.progress, instrument)
    except ValueError as err:
        print(f"anatomy.py: error: {err}", file=sys.stderr)
        return 2
    if args.save_instrument:
        logger.info("wrote the instrument %s", save_instrument(args.out, name, preset, phash))
        return 0
    costs = model_costs(preset, arms, os.path.join(args.out, "setup", "costs.json"))
    setup_record = {"setup_id": inst["setup_id"], "protocol_hash": phash, "preset": name, "settings": settings,
                    "calibration": inst["calibration"], "costs": costs, "device": _device_name(device),
                    "code": ctx_code, "setup_seconds_this_call": time.perf_counter() - t0}
    rec.write_setup(os.path.join(args.out, "records"), setup_record)
    ctx = {"out": args.out, "preset": preset, "preset_name": name, "protocol": protocol, "protocol_hash": phash,
           "settings": settings, "setup": inst, "costs": costs, "samplers": samplers(preset, protocol),
           "noise_seed": noise, "claim": claim, "device": device, "code": ctx_code, "device_name": _device_name(device),
           "progress": args.progress}
    pending = [(arm, seed) for seed in seeds for arm in arms]
    while pending:  # tasks another process is running are skipped for now and picked up when it finishes
        progressed = False
        for task in list(pending):
            try:
                with exclusive(os.path.join(args.out, f"task_{task[0]}_seed{task[1]}"), wait=False):
                    run_task(*task, ctx)
            except Busy:
                continue
            pending.remove(task)
            progressed = True
        if pending and not progressed:
            time.sleep(10)
    written = write_report(args.out, rec.collect([os.path.join(args.out, "records")], phash))
    logger.info("wrote %s", written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
