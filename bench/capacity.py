"""A capacity-matched plain baseline for the anatomy benchmark, and training FLOPs per sample of every arm.

    python bench/capacity.py [--preset quick|cpu|gpu] [--num-classes N] [--json PATH] [--tol 0.05]

The anatomical arm (``AnatomicalUNetModel``: registers, cross-attention after every attended block, register
reads, a mask decoder) has more parameters and more training FLOPs than the plain arm at the same UNet size, so
a difference between the two can be capacity rather than anatomy. :func:`capacity_matched_config` finds a plain
``UNetModel`` (the same ``LatentDiffusion`` settings, only UNet parameters changed) whose trainable parameters
AND training FLOPs per sample are both within ``tol`` of the anatomical arm's, by a deterministic search over
self-attention levels, head width, base width, residual blocks per level and per-level width multipliers (and,
when that grid has no match, the same grid with residual-block resampling, ``resblock_updown``).
:func:`equal_flops_steps` gives the step count that spends another arm's training FLOPs budget.

FLOPs are counted with ``bench/flops.py``'s counter (torch's formulas for matmuls, convolutions and attention,
2 per multiply-add; element-wise ops are not counted). A training sample is the loss from latents plus its
backward (``p_losses``, as ``bench/flops.py`` and ``bench/train_step.py`` measure it); the frozen first-stage
encode is the same for every arm and is reported apart (``encode_flops_per_sample``), not in the training FLOPs.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from flops import count  # noqa: E402

PLAIN_UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
PLAIN_LDM_TARGET = "ldm.models.diffusion.ddpm.LatentDiffusion"
NORM_GROUPS = 32  # ldm.modules.diffusionmodules.util.normalization: GroupNorm(32, channels)
# the grid: model_channels plain + 0..2 x 32, num_res_blocks plain + 0..1, later-level multipliers 1..plain + 2
GRID = {"max_width": 3, "max_extra_res_blocks": 1, "max_mult_extra": 2}
# the only UNet parameters the matched config may change
SEARCHED_UNET_KEYS = ("attention_resolutions", "num_head_channels", "model_channels", "num_res_blocks",
                      "channel_mult", "resblock_updown")


# ------------------------------------------------------------------------------------------------ configs
def _model_section(cfg: dict) -> dict:
    """``{target, params}`` of an LDM config given as that or as ``{"model": {...}}``."""
    if "target" not in cfg and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    if "target" not in cfg or "params" not in cfg:
        raise ValueError("expected a model config {target, params} (as bench/anatomy_models.arm_config returns)")
    return cfg


def buildable(cfg: dict) -> dict:
    """A deep copy of the model config that builds without loading weights: the first stage's (and a joint
    model's mask autoencoder's) ``ckpt_path`` removed, as ``anatomy_models.load_trained`` does."""
    out = copy.deepcopy(_model_section(cfg))
    params = out["params"]
    params.pop("ckpt_path", None)
    for key in ("first_stage_config", "joint_mask_config"):
        sub = params.get(key)
        if isinstance(sub, dict) and isinstance(sub.get("params"), dict):
            sub["params"].pop("ckpt_path", None)
    return out


def unet_params_of(cfg: dict) -> dict:
    return _model_section(cfg)["params"]["unet_config"]["params"]


def set_num_classes(cfg: dict, num_classes: int) -> dict:
    """A copy of an anatomical arm's config with ``num_classes`` anatomical classes.

    Sets the UNet's ``num_anatomical_classes``; a named ``label_set`` whose class count differs is set to
    ``None`` (unnamed classes, generic colours), since the model checks the two agree. Per-class
    ``anatomical_class_weights`` of another length cannot be adapted and raise ``ValueError``.
    """
    from ldm.data.labels import get_label_set

    num_classes = int(num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + organs), got {num_classes}")
    out = copy.deepcopy(_model_section(cfg))
    unet = out["params"]["unet_config"]["params"]
    if "num_anatomical_classes" not in unet:
        raise ValueError("the config's UNet has no num_anatomical_classes (not an anatomical arm)")
    unet["num_anatomical_classes"] = num_classes
    params = out["params"]
    if params.get("label_set") is not None and get_label_set(params["label_set"]).num_classes != num_classes:
        params["label_set"] = None
    weights = params.get("anatomical_class_weights")
    if weights is not None and len(weights) != num_classes:
        raise ValueError(f"anatomical_class_weights has {len(weights)} entries, not {num_classes}: set them for "
                         f"{num_classes} classes (or null) before changing the class count")
    return out


def _num_classes_of(model: torch.nn.Module) -> int:
    return int(getattr(model, "num_anatomical_classes", 0) or 0)


def _uses_anatomy(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "use_anatomy", False))


# ------------------------------------------------------------------------------------------------ counting
def build_model(cfg: dict, device: Any = "cpu", seed: int = 0) -> torch.nn.Module:
    """The LDM of ``cfg`` without any checkpoint, on ``device``, in train mode (same seed -> same weights)."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(buildable(cfg)).to(device)
    model.train()
    return model


def trainable_params(model: torch.nn.Module) -> int:
    """Trainable parameters of the diffusion model: the frozen first stage (and a joint model's frozen mask
    autoencoder) have ``requires_grad=False``; the first and conditioning stages are left out in any case."""
    frozen = ("first_stage_model.", "cond_stage_model.")
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and not name.startswith(frozen))


def unet_trainable_params(cfg: dict) -> int:
    """Trainable parameters of the UNet of ``cfg`` alone (built without the first stage: cheap)."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):  # shapes only: no memory, no weight initialisation
        unet = instantiate_from_config(copy.deepcopy(_model_section(cfg)["params"]["unet_config"]))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def _image_size(model: torch.nn.Module) -> int:
    encoder = getattr(model.first_stage_model, "encoder", None)
    res = getattr(encoder, "resolution", None)
    return int(res) if res is not None else int(model.unet.image_size) * 4


def training_flops_per_sample(model_config: dict, batch: int = 2, device: Any = "cpu", seed: int = 0,
                              include_encode: bool = True) -> dict:
    """FLOPs per sample of one training loss from latents plus its backward, of one sampling step (one UNet
    forward) and of the frozen first-stage encode, and the trainable parameters of the diffusion model.

    ``model_config``: an LDM ``{target, params}`` (as ``anatomy_models.arm_config`` returns; its first-stage
    checkpoint path is ignored, nothing is loaded). A random latent batch ``[batch, channels, s, s]`` (the
    model's channels and latent size) and, for an anatomical model, random masks at image size with the
    config's number of classes are fed to ``p_losses`` (the training loss path from latents) under
    ``flops.count``; a mask-conditioned model (``mask_condition``) gets random masks as its condition, one with
    ``representation_alignment`` random masks for its alignment term (its frozen encoder and projector count). Returns ``{"train_flops_per_sample", "sample_step_flops_per_sample",
    "encode_flops_per_sample", "params", "batch"}`` (the encode is left out of the training FLOPs: it is the
    same frozen encoder for every arm; ``include_encode=False`` skips counting it and reports ``None``).
    """
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    batch = int(batch)
    device = torch.device(device)
    model = build_model(model_config, device, seed)
    gen = torch.Generator().manual_seed(seed)
    size = int(model.unet.image_size)
    z = torch.randn(batch, int(model.channels), size, size, generator=gen).to(device)
    t = torch.randint(0, int(model.num_timesteps), (batch,), generator=gen).to(device)
    image = _image_size(model)
    extra, cond = {}, None
    if _uses_anatomy(model):
        extra["anatomy_target"] = torch.randint(0, _num_classes_of(model), (batch, image, image),
                                                generator=gen).to(device)
    if getattr(model, "representation_alignment", None) is not None:  # its encoder and projector run every step
        extra["alignment_masks"] = torch.randint(0, model.representation_alignment.num_classes, (batch, image, image),
                                                 generator=gen).to(device)
    condition = getattr(model, "mask_condition", None)
    if condition is not None:  # a mask-conditioned model is counted with its condition (its encoder runs)
        masks = torch.randint(0, condition.num_classes, (batch, image, image), generator=gen).to(device)
        cond = condition.condition(masks, (size, size))

    def train_sample() -> None:
        loss, _ = model.p_losses(z, cond, t, **extra)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()}")
        loss.backward()

    train, _ = count(train_sample)
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        step, _ = count(lambda: model.apply_model(z, t, cond))
        encode = None
        if include_encode:
            first = model.first_stage_model
            encoder = getattr(first, "encoder", None) or first.autoencoder.encoder  # or the latent-cache wrapper
            x = torch.randn(batch, int(encoder.in_channels), image, image, generator=gen).to(device)
            encode, _ = count(lambda: model.encode_first_stage(x))
    out = {"train_flops_per_sample": train / batch, "sample_step_flops_per_sample": step / batch,
           "encode_flops_per_sample": None if encode is None else encode / batch,
           "params": trainable_params(model), "batch": batch}
    del model
    return out


# ------------------------------------------------------------------------------------------------ matching
def _levels(channel_mult: Sequence[int]) -> list[int]:
    """Downsampling factors (``ds``) of the UNet's levels, the values ``attention_resolutions`` holds."""
    return [2 ** i for i in range(len(channel_mult))]


def _attention_options(channel_mult: Sequence[int], base: Sequence[int]) -> list[list[int]]:
    """Self-attention level sets: the plain arm's first, then more levels, coarsest (cheapest) levels first.
    (The middle block always has self-attention.)"""
    levels = _levels(channel_mult)
    base = sorted(int(r) for r in base if int(r) in levels)
    options = [base]
    for k in range(1, len(levels) + 1):
        for combo in itertools.combinations(sorted(levels, reverse=True), k):
            option = sorted(set(base) | set(combo))
            if option not in options:
                options.append(option)
    return options


def _mult_options(channel_mult: Sequence[int], max_extra: int) -> list[list[int]]:
    """Per-level multipliers: the plain arm's first, then every level after the first anywhere from 1 to
    ``max_extra`` above the plain arm's multiplier, fewest total changes first (``model_channels`` is a multiple
    of 32, so every width stays divisible by GroupNorm's 32 groups). With a wider ``model_channels`` these give
    fractions of the plain widths (e.g. 96 x [1, 1] for 32 x [1, 2]: 3x and 1.5x). The first level keeps its
    multiplier: UNetModel's output conv reads ``model_channels`` channels (as CompVis's does), so a
    ``channel_mult[0]`` other than the plain arm's 1 does not run; the first level widens through
    ``model_channels``."""
    base = [int(m) for m in channel_mult]
    choices = [[base[0]]] + [list(range(1, m + max_extra + 1)) for m in base[1:]]
    options = [list(c) for c in itertools.product(*choices)]
    options.sort(key=lambda c: (sum(abs(m - b) for m, b in zip(c, base)), [abs(m - b) for m, b in zip(c, base)], c))
    return options


def _head_options(plain_unet: dict) -> list[int]:
    head_channels = [int(plain_unet.get("num_head_channels", -1))]
    return head_channels + [c for c in (32, 64) if c not in head_channels]


def _structures(plain_unet: dict, max_width: int, max_extra_res_blocks: int, max_mult_extra: int,
                resblock_updown: bool) -> Iterator[dict]:
    """Grid points without attention levels and head setting, in grid order."""
    mc = int(plain_unet["model_channels"])
    if mc % NORM_GROUPS:
        raise ValueError(f"model_channels {mc} is not a multiple of {NORM_GROUPS} (GroupNorm groups)")
    nrb = int(plain_unet["num_res_blocks"])
    for res_blocks in range(nrb, nrb + max_extra_res_blocks + 1):
        for width in (mc + NORM_GROUPS * k for k in range(max_width)):
            for cm in _mult_options(plain_unet["channel_mult"], max_mult_extra):
                point = {"model_channels": width, "num_res_blocks": res_blocks, "channel_mult": cm}
                if resblock_updown:
                    point["resblock_updown"] = True
                yield point


def search_grid(plain_unet: dict, resblock_updown: bool = False, max_width: int = GRID["max_width"],
                max_extra_res_blocks: int = GRID["max_extra_res_blocks"],
                max_mult_extra: int = GRID["max_mult_extra"]) -> Iterator[dict]:
    """The deterministic grid of UNet overrides around the plain arm's UNet, in search order: residual blocks
    per level (plain, +1), ``model_channels`` (plain, +32, +64), per-level multipliers (:func:`_mult_options`),
    self-attention levels (:func:`_attention_options`), ``num_head_channels`` (plain, 32, 64); with
    ``resblock_updown`` every point also has ``resblock_updown: True`` (residual blocks resample instead of
    convolutions: the search's second stage)."""
    for structure in _structures(plain_unet, max_width, max_extra_res_blocks, max_mult_extra, resblock_updown):
        for attn in _attention_options(plain_unet["channel_mult"], plain_unet.get("attention_resolutions", [])):
            for hc in _head_options(plain_unet):
                yield {"attention_resolutions": attn, "num_head_channels": hc, **copy.deepcopy(structure)}


def _valid_heads(point: dict, base_heads: int) -> bool:
    """Every width divisible by GroupNorm's groups, every self-attended width by the point's heads
    (``num_head_channels``, or the plain arm's ``num_heads``)."""
    mc, mult = point["model_channels"], point["channel_mult"]
    if any((mc * m) % NORM_GROUPS for m in mult) or mc % NORM_GROUPS:
        return False
    attended = {mc * m for m, ds in zip(mult, _levels(mult)) if ds in point["attention_resolutions"]} | {mc * mult[-1]}
    hc = point["num_head_channels"]
    if hc == -1:
        return base_heads > 0 and all(w % base_heads == 0 for w in attended)
    return all(w % hc == 0 for w in attended)


def with_unet(plain_cfg: dict, point: dict) -> dict:
    """``plain_cfg`` (a plain ``UNetModel`` LDM) with the UNet parameters of ``point`` and nothing else changed."""
    cfg = copy.deepcopy(_model_section(plain_cfg))
    unet = cfg["params"]["unet_config"]["params"]
    point = copy.deepcopy(point)
    if point.get("num_head_channels") == -1 and "num_head_channels" not in unet:
        del point["num_head_channels"]  # UNetModel's default: the plain arm's num_heads decide
    unet.update(point)  # num_heads stays: UNetModel ignores it where num_head_channels is set
    return cfg


def attention_params_by_level(unet: torch.nn.Module) -> dict[int, int]:
    """Parameters of the UNet's self-attention blocks per level (``ds``) of its input and output blocks (the middle
    block's is not included): walks the blocks in order, a down/upsampling layer moving to the next level."""
    from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock, Upsample

    out: dict[int, int] = {}

    def walk(blocks: Any, ds: int, resample: tuple, step: Any) -> None:
        for block in blocks:
            for layer in block:
                if isinstance(layer, AttentionBlock):
                    out[ds] = out.get(ds, 0) + sum(p.numel() for p in layer.parameters() if p.requires_grad)
            if any(isinstance(layer, resample) or (isinstance(layer, ResBlock) and layer.updown) for layer in block):
                ds = step(ds)

    walk(unet.input_blocks, 1, (Downsample,), lambda d: d * 2)
    walk(unet.output_blocks, 2 ** (len(unet.channel_mult) - 1), (Upsample,), lambda d: d // 2)
    return out


def _structure_params(plain: dict, structure: dict) -> tuple[int, dict[int, int]]:
    """``(trainable UNet parameters with self-attention at every level, attention parameters per level)`` of a
    structure, from one meta-device build (the parameters of a point are the first minus the levels it leaves
    out: an AttentionBlock's parameters depend on its width, not on its head count)."""
    from ldm.util import instantiate_from_config

    levels = _levels(structure["channel_mult"])
    cfg = with_unet(plain, {**structure, "attention_resolutions": levels, "num_head_channels": NORM_GROUPS})
    with torch.device("meta"):
        unet = instantiate_from_config(cfg["params"]["unet_config"])
    total = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    return total, attention_params_by_level(unet)


def _structure_key(point: dict) -> str:
    """A grid point without its head setting (which changes neither parameters nor FLOPs)."""
    return json.dumps({k: v for k, v in point.items() if k != "num_head_channels"}, sort_keys=True)


def _deviation(params_ratio: float, flops_ratio: float) -> float:
    return max(abs(params_ratio - 1.0), abs(flops_ratio - 1.0))


def capacity_matched_config(plain_cfg: dict, target_cfg: dict, tol: float = 0.05, *, batch: int = 2,
                            device: Any = "cpu", target: Optional[dict] = None, flops_budget: int = 40,
                            log: Any = None) -> tuple[dict, dict]:
    """A plain ``UNetModel`` LDM config (``plain_cfg``'s ``LatentDiffusion`` parameters, only UNet parameters
    changed) whose trainable parameters and training FLOPs per sample are each within ``tol`` (relative) of
    ``target_cfg``'s (the anatomical arm's).

    Deterministic grid search (:func:`search_grid`) in two stages, the second only when the first has no match:
    (1) self-attention levels, ``num_head_channels``, ``model_channels``, ``num_res_blocks`` and per-level
    multipliers; (2) the same with ``resblock_updown: True``. In a stage every point's parameters are counted
    (meta-device builds, no memory); the points within ``tol`` in parameters, closest first (ties: grid order),
    have their training FLOPs per sample counted (:func:`training_flops_per_sample` at ``batch``; one count per
    point up to the head setting, which changes no FLOPs; at most ``flops_budget`` counts, at least 5 so a
    miss can name its closest point); of those within ``tol`` on both, the one whose larger relative deviation
    is smallest (ties: grid order) is returned. ``target``: the target's ``training_flops_per_sample`` result
    at ``batch`` if already counted.

    Returns ``(config, info)``, info: ``params_ratio``, ``flops_ratio`` (matched / target), ``grid_point``
    (the UNet parameters set), ``stage``, ``params``, ``train_flops_per_sample``, the target's, and how many
    points were searched and counted. Raises ``ValueError`` naming the closest point when none is within ``tol``.
    """
    plain = _model_section(plain_cfg)
    if plain["params"]["unet_config"]["target"] != PLAIN_UNET_TARGET:
        raise ValueError(f"plain_cfg's UNet must be {PLAIN_UNET_TARGET}, "
                         f"got {plain['params']['unet_config']['target']}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if int(flops_budget) < 1:
        raise ValueError(f"flops_budget must be >= 1, got {flops_budget}")
    say = log or (lambda msg: None)
    if target is None:
        target = training_flops_per_sample(target_cfg, batch=batch, device=device, include_encode=False)
    t_params, t_flops = float(target["params"]), float(target["train_flops_per_sample"])
    base_unet = plain["params"]["unet_config"]["params"]
    base_heads = int(base_unet.get("num_heads", -1))
    outside = training_param_offset(plain)  # trainable LDM parameters outside the UNet (0 for LatentDiffusion)
    searched, counted_total, closest = 0, 0, None
    stages = [bool(base_unet.get("resblock_updown", False))]
    stages += [True] if not stages[0] else []
    for stage, updown in enumerate(stages, start=1):
        scored, index = [], 0
        for structure in _structures(base_unet, GRID["max_width"], GRID["max_extra_res_blocks"],
                                     GRID["max_mult_extra"], updown):
            total, by_level = _structure_params(plain, structure)
            for attn in _attention_options(base_unet["channel_mult"], base_unet.get("attention_resolutions", [])):
                params = outside + total - sum(n for ds, n in by_level.items() if ds not in attn)
                for hc in _head_options(base_unet):
                    point = {"attention_resolutions": attn, "num_head_channels": hc, **copy.deepcopy(structure)}
                    index += 1
                    if _valid_heads(point, base_heads):
                        scored.append((abs(params / t_params - 1.0), index, point, params))
        scored.sort(key=lambda s: (s[0], s[1]))
        searched += len(scored)
        best, counted = None, {}
        for p_dev, index, point, params in scored:
            key = _structure_key(point)
            if key not in counted:
                if len(counted) >= flops_budget or (p_dev > tol and len(counted) >= 5):
                    continue
                counted[key] = training_flops_per_sample(with_unet(plain, point), batch=batch, device=device,
                                                         include_encode=False)
            res = counted[key]
            if res["params"] != params:
                raise RuntimeError(f"parameter count of {point}: {params} from the per-level count, {res['params']} "
                                   f"built")
            params_ratio, flops_ratio = params / t_params, res["train_flops_per_sample"] / t_flops
            entry = (_deviation(params_ratio, flops_ratio), index, point, params_ratio, flops_ratio, res)
            if closest is None or entry[0] < closest[0]:
                closest = entry
            if p_dev <= tol and abs(flops_ratio - 1) <= tol and (best is None or entry[:2] < best[:2]):
                best = entry
        counted_total += len(counted)
        say(f"capacity search stage {stage} (resblock_updown={updown}): {len(scored)} grid points, training FLOPs "
            f"counted for {len(counted)}; " + ("match" if best else "no match"))
        if best is not None:
            _, index, point, params_ratio, flops_ratio, res = best
            info = {"params_ratio": params_ratio, "flops_ratio": flops_ratio, "grid_point": copy.deepcopy(point),
                    "stage": stage, "grid_index": index, "params": res["params"],
                    "train_flops_per_sample": res["train_flops_per_sample"], "target_params": int(t_params),
                    "target_train_flops_per_sample": t_flops, "tol": tol, "grid_points": searched,
                    "flops_counted": counted_total, "batch": batch}
            return with_unet(plain, point), info
    if closest is None:
        raise ValueError("the capacity grid is empty (no valid UNet widths/heads)")
    raise ValueError(f"no plain UNet in the capacity grid is within {tol:.1%} of the target in both parameters and "
                     f"training FLOPs; closest: {closest[2]} with params ratio {closest[3]:.3f}, FLOPs ratio "
                     f"{closest[4]:.3f} ({searched} points, FLOPs counted for the {counted_total} closest in "
                     f"parameters)")


def training_param_offset(cfg: dict) -> int:
    """Trainable parameters of the LDM outside its UNet (0 for the stock ``LatentDiffusion``)."""
    from ldm.util import instantiate_from_config

    with torch.device("meta"):
        model = instantiate_from_config(buildable(cfg))
    total = trainable_params(model)
    unet = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    del model
    return total - unet


# ------------------------------------------------------------------------------------------------ budgets
def equal_flops_steps(steps: int, reference_flops: float, arm_flops: float) -> int:
    """Optimiser steps that give an arm with ``arm_flops`` training FLOPs per sample the training FLOPs budget of
    ``steps`` steps of the reference arm (same batch): ``steps * reference / arm``, rounded half up, at least 1."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not (reference_flops > 0 and arm_flops > 0) or not (math.isfinite(reference_flops) and math.isfinite(arm_flops)):
        raise ValueError(f"FLOPs must be finite and > 0, got reference {reference_flops}, arm {arm_flops}")
    return max(1, int(math.floor(steps * float(reference_flops) / float(arm_flops) + 0.5)))


# ------------------------------------------------------------------------------------------------ CLI
def arm_configs(preset_name: str, num_classes: int) -> tuple[dict, dict]:
    """``(plain, anatomical)`` benchmark arm configs at ``preset_name``, the anatomical one with ``num_classes``."""
    import anatomy_models

    if preset_name not in anatomy_models.PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; presets: {', '.join(anatomy_models.PRESETS)}")
    preset = anatomy_models.PRESETS[preset_name]
    plain = anatomy_models.arm_config("baseline", preset, None, 1.0)
    anat = set_num_classes(anatomy_models.arm_config("anatomical", preset, None, 1.0), num_classes)
    return plain, anat


def run(preset_name: str, num_classes: int, tol: float = 0.05, batch: int = 2, device: Any = "cpu",
        log: Any = print) -> dict:
    """Counts of the plain, capacity-matched and anatomical arms at a preset (what the CLI prints)."""
    import anatomy_models

    start = time.perf_counter()
    plain_cfg, anat_cfg = arm_configs(preset_name, num_classes)
    counts = {"plain": training_flops_per_sample(plain_cfg, batch=batch, device=device),
              "anatomical": training_flops_per_sample(anat_cfg, batch=batch, device=device)}
    matched_cfg, info = capacity_matched_config(plain_cfg, anat_cfg, tol=tol, device=device,
                                                target=counts["anatomical"], log=log)
    counts["matched"] = training_flops_per_sample(matched_cfg, batch=batch, device=device)
    steps = anatomy_models.PRESETS[preset_name].steps
    ref = {"plain": counts["plain"], "anatomical": counts["anatomical"]}
    arms = {}
    for arm in ("plain", "matched", "anatomical"):
        c = counts[arm]
        arms[arm] = {**c, "ratio_to_plain": {k: c[k] / ref["plain"][k] for k in
                                             ("params", "train_flops_per_sample", "sample_step_flops_per_sample")},
                     "ratio_to_anatomical": {k: c[k] / ref["anatomical"][k] for k in
                                             ("params", "train_flops_per_sample", "sample_step_flops_per_sample")},
                     "equal_flops_steps_vs_anatomical": equal_flops_steps(
                         steps, ref["anatomical"]["train_flops_per_sample"], c["train_flops_per_sample"])}
    return {"preset": preset_name, "num_classes": int(num_classes), "tol": tol, "batch": batch,
            "preset_steps": steps, "arms": arms, "matched_unet": unet_params_of(matched_cfg),
            "matched_search": info, "matched_config": matched_cfg, "seconds": time.perf_counter() - start}


def print_table(result: dict) -> None:
    rows = [["arm", "params", "train GFLOP/sample", "sample-step GFLOP", "params/plain", "train/plain",
             "params/anat", "train/anat", "step/anat", "steps@anat FLOPs"]]
    for arm, r in result["arms"].items():
        rp, ra = r["ratio_to_plain"], r["ratio_to_anatomical"]
        rows.append([arm, f"{r['params']:,}", f"{r['train_flops_per_sample'] / 1e9:.4f}",
                     f"{r['sample_step_flops_per_sample'] / 1e9:.4f}", f"{rp['params']:.3f}",
                     f"{rp['train_flops_per_sample']:.3f}", f"{ra['params']:.3f}",
                     f"{ra['train_flops_per_sample']:.3f}",
                     f"{ra['sample_step_flops_per_sample']:.3f}", str(r["equal_flops_steps_vs_anatomical"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    enc = result["arms"]["plain"]["encode_flops_per_sample"]
    print(f"frozen encoder (same for every arm, not in the training FLOPs): {enc / 1e9:.4f} GFLOP/sample")
    info = result["matched_search"]
    unet = result["matched_unet"]
    changed = ", ".join(f"{k}={v}" for k, v in info["grid_point"].items())
    print(f"capacity-matched UNet (search stage {info['stage']}): {changed}" + (
        f" (num_heads={unet['num_heads']} kept)" if "num_heads" in unet else ""))
    print(f"matched/anatomical: params {info['params_ratio']:.3f}, training FLOPs {info['flops_ratio']:.3f} "
          f"(tol {info['tol']:.0%}; {info['grid_points']} grid points, FLOPs counted for {info['flops_counted']})")
    print(f"steps@anat FLOPs: optimiser steps giving each arm the anatomical arm's training FLOPs of "
          f"{result['preset_steps']} steps (same batch)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import anatomy_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=tuple(anatomy_models.PRESETS),
                        help="benchmark preset whose UNet is counted (default: cpu, the benchmark's default)")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="anatomical classes of the anatomical arm (default 10: the v2 phantom; 6: CT-Organ)")
    parser.add_argument("--tol", type=float, default=0.05, help="relative tolerance of the match (default 0.05)")
    parser.add_argument("--batch", type=int, default=2, help="batch the FLOPs are counted at (per sample reported)")
    parser.add_argument("--device", default="cpu", help="device the counts run on (FLOPs do not depend on it)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default=None, help="write the results (and the matched config) as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    result = run(args.preset, args.num_classes, tol=args.tol, batch=args.batch, device=args.device)
    print(f"capacity at preset {args.preset!r}, {args.num_classes} anatomical classes, FLOPs at batch {args.batch} "
          f"per sample (matmul/conv/attention, 2 per multiply-add; element-wise ops not counted)")
    print_table(result)
    print(f"({result['seconds']:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
        record = {"benchmark": "capacity", "command": "python bench/capacity.py " + " ".join(
            sys.argv[1:] if argv is None else list(argv)), "torch": torch.__version__,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
