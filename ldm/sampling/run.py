"""Loading a trained run for sampling: a log directory, a checkpoint inside one, a CompVis model folder
(``model.ckpt`` + ``config.yaml``) or a ``scripts/export.py`` folder (``model.safetensors`` + ``config.yaml``); a
bare state dict or a safetensors file when the config is given. Re-exported by :mod:`ldm.sampling`."""
from __future__ import annotations

import glob
import hashlib
import logging
import os
from typing import Any, Optional, Sequence

import torch

from ldm.checkpoints import load_weights, read_state_dict
from ldm.checkpoints import locate_run as resolve_run
from ldm.util import instantiate_from_config

logger = logging.getLogger("ldm.sampling")  # the messages of ldm.sampling's run loading

COMPVIS_CONFIG = "config.yaml"


def run_config_paths(run_dir: Optional[str]) -> list[str]:
    """The run's ``configs/*-project.yaml`` files (sorted, later ones override earlier ones), else its
    ``configs/*.yaml``, else the ``config.yaml`` of a CompVis model folder or an export."""
    if run_dir is None:
        return []
    paths = sorted(glob.glob(os.path.join(run_dir, "configs", "*-project.yaml")))
    paths = paths or sorted(glob.glob(os.path.join(run_dir, "configs", "*.yaml")))
    flat = os.path.join(run_dir, COMPVIS_CONFIG)
    return paths or ([flat] if os.path.isfile(flat) else [])


def locate_model(path: str) -> tuple[str, Optional[str]]:
    """``(checkpoint, folder with its configs or None)`` for ``-r``: a run directory or a checkpoint in one
    (:func:`ldm.checkpoints.locate_run`), also a checkpoint beside a CompVis/export ``config.yaml``."""
    ckpt_path, run_dir = resolve_run(path)
    if run_dir is None:
        beside = os.path.dirname(os.path.abspath(ckpt_path))
        if os.path.isfile(os.path.join(beside, COMPVIS_CONFIG)):
            run_dir = beside
    return ckpt_path, run_dir


def read_run_config(path: str, config_paths: Sequence[str] = ()) -> tuple[str, Optional[str], list[str], Any]:
    """``(checkpoint, run_dir, config files, merged config)`` of ``-r path`` and ``-b config_paths``, reading
    YAML only (nothing is imported or built), so a command line can check its settings before loading."""
    ckpt_path, run_dir = locate_model(path)
    files = run_config_paths(run_dir) + list(config_paths)
    return ckpt_path, run_dir, files, load_config(files)


def load_config(config_paths: Sequence[str]) -> Any:
    """Merge YAML configs left to right into one OmegaConf node that has a ``model`` section."""
    from omegaconf import OmegaConf

    if not config_paths:
        raise FileNotFoundError("no config: the checkpoint is not inside a run directory with configs/ "
                                "nor beside a config.yaml, so pass the model config with -b CONFIG.yaml")
    for p in config_paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"config file not found: {p}")
    config = OmegaConf.merge(*[OmegaConf.load(p) for p in config_paths])
    if "model" not in config:
        raise ValueError(f"config {list(config_paths)} has no 'model' section (target/params of the LDM)")
    return config


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


ENV_RESOLVER = "oc.env"
_KEEP_ENV_RESOLVER = "ldm_keep_env"  # stands in for oc.env while a config is resolved for writing


def _keep_env_text(*args: Any) -> str:
    return "${" + ENV_RESOLVER + ":" + ",".join(str(a) for a in args) + "}"


def shareable_config(config: Any) -> Any:
    """A plain copy of a config (node) with every interpolation resolved except ``${oc.env:VAR}``, which stays as
    that text (also inside values built from it, ``${oc.env:ROOT}/train`` stays so): what is written into shared
    outputs (``samples.json``, an export's ``config.yaml``), so that no environment value (a path, a secret) leaks
    into them. The ``${oc.env:...}`` text resolves again where the output is read."""
    import warnings

    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(config, resolve=False) if OmegaConf.is_config(config) else config

    def swap(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        if isinstance(node, str):
            return node.replace("${" + ENV_RESOLVER + ":", "${" + _KEEP_ENV_RESOLVER + ":")
        return node

    if not OmegaConf.has_resolver(_KEEP_ENV_RESOLVER):
        with warnings.catch_warnings():  # register_new_resolver is the portable name across omegaconf 2.x
            warnings.simplefilter("ignore")
            OmegaConf.register_new_resolver(_KEEP_ENV_RESOLVER, _keep_env_text)
    return OmegaConf.to_container(OmegaConf.create(swap(raw)), resolve=True)


def resolve_config(config: Any) -> Any:
    """A plain, fully resolved copy of a config; where an interpolation cannot be resolved here (an export's
    ``${oc.env:DATA_ROOT}`` on a machine without that variable) it stays as its text (:func:`shareable_config`), so
    what does not need it (the model, a recorded geometry) still works."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
    except OmegaConfBaseException:
        return shareable_config(config)


def strip_checkpoint_paths(model_config: Any, keep_env: bool = False) -> Any:
    """Plain copy of a config (node) without ``ckpt_path`` entries: the checkpoint already holds every weight.
    Resolved; with ``keep_env`` ``${oc.env:VAR}`` stays unresolved (:func:`shareable_config`), for writing."""
    from omegaconf import OmegaConf

    cfg = shareable_config(model_config) if keep_env else OmegaConf.to_container(model_config, resolve=True)

    def strip(node: Any) -> None:
        if isinstance(node, dict):
            params = node.get("params")
            if isinstance(params, dict) and params.get("ckpt_path"):
                params["ckpt_path"] = None
            for value in node.values():
                strip(value)
        elif isinstance(node, list):
            for value in node:
                strip(value)

    strip(cfg)
    return cfg


def sampling_extra_key(key: str) -> bool:
    """Checkpoint keys a model built for sampling may lack without the checkpoint being another model's: the EMA
    copy (``model_ema.*``, when the config samples without EMA, ``use_ema: false``) and the training losses of a
    first or conditioning stage (``loss.*``, ``first_stage_model.loss.*``, ``cond_stage_model.loss.*``: the LPIPS
    and discriminator weights of an autoencoder trained with them, which a sampling config replaces by
    ``torch.nn.Identity``, as CompVis LDM configs do). Any other unknown key is an error."""
    return key.startswith(("model_ema.", "loss.", "first_stage_model.loss.", "cond_stage_model.loss."))


def load_model_for_sampling(path: str, config_paths: Sequence[str] = (), unsafe_load: bool = False,
                            device: Optional[torch.device] = None, trust_config: bool = False
                            ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build the run's model from its config, load the checkpoint, move to ``device``, eval mode.

    The configs the run saved may only name allow-listed targets (``ldm.trust``), as on the command line;
    ``trust_config=True`` is the ``--trust-config`` opt-in. Keys of the checkpoint that the model does not have
    are an error naming the file and the first keys (:class:`~ldm.checkpoints.CheckpointMismatchError`), except
    the EMA copy and training-loss weights (:func:`sampling_extra_key`), which are dropped with one log line.
    Returns ``(model, info)`` with ``checkpoint``, ``checkpoint_sha256``, ``config`` (a plain dict with
    ``${oc.env:...}`` left unresolved: it is written into shared outputs), ``resolved_config`` (everything resolved,
    for building things; never written), ``config_files`` and ``has_ema``.
    """
    from ldm.checkpoints import CheckpointMismatchError
    from ldm.trust import check_run

    check_run(path, config_paths, trust_config)  # before anything named by the run is imported or built
    ckpt_path, _, files, config = read_run_config(path, config_paths)
    state_dict = read_state_dict(ckpt_path, weights_only=not unsafe_load)
    model = instantiate_from_config(strip_checkpoint_paths(config.model))
    own = model.state_dict()
    unknown = [k for k in state_dict if k not in own]
    foreign = [k for k in unknown if not sampling_extra_key(k)]
    if foreign:
        raise CheckpointMismatchError(
            f"checkpoint {ckpt_path} has {len(foreign)} keys this model does not have (e.g. {foreign[:5]}): it was "
            f"trained with another config than {[os.path.basename(p) for p in files]}; sample it with its own config "
            "(-b CONFIG.yaml)")
    if unknown:
        logger.info("%s: %d keys this sampling model does not use are not loaded (EMA copy or training losses, "
                    "e.g. %s)", ckpt_path, len(unknown), unknown[:3])
        state_dict = {k: v for k, v in state_dict.items() if k in own}
    missing, _ = load_weights(model, state_dict, source=ckpt_path,
                              required=lambda key: not key.startswith("model_ema."))
    has_ema = bool(getattr(model, "use_ema", False)) and not any(k.startswith("model_ema.") for k in missing)
    if getattr(model, "use_ema", False) and not has_ema:
        logger.warning("%s has no EMA weights; sampling with the live weights.", ckpt_path)
    model.eval()
    if device is not None:
        model.to(device)
    info = {"checkpoint": os.path.abspath(ckpt_path), "checkpoint_sha256": sha256_file(ckpt_path),
            "config": shareable_config(config), "resolved_config": resolve_config(config),
            "config_files": [os.path.abspath(p) for p in files], "has_ema": has_ema}
    return model, info


def is_anatomical(model: torch.nn.Module) -> bool:
    """Whether the model predicts masks (an AnatomicalLatentDiffusion whose UNet has registers on)."""
    return bool(getattr(model, "use_anatomy", False))


def is_joint(model: torch.nn.Module) -> bool:
    """Whether the model generates each sample's mask with the image (joint mode, ``joint_mask_config``)."""
    return bool(getattr(model, "is_joint", False))
