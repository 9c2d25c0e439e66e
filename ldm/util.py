"""Small helpers shared by the whole package: config instantiation and parameter counting."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping, Optional

import torch

logger = logging.getLogger(__name__)

# Strings with a special meaning in CompVis configs, kept as such.
FIRST_STAGE_SENTINEL = "__is_first_stage__"
UNCONDITIONAL_SENTINEL = "__is_unconditional__"


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import ``package.module.Name`` and return ``Name``.

    Raises ``ImportError`` naming the path when the module or attribute does not exist.
    """
    if not isinstance(string, str) or "." not in string:
        raise ValueError(f"expected a dotted import path such as 'package.module.Class', got {string!r}")
    module_name, cls_name = string.rsplit(".", 1)
    module = importlib.import_module(module_name)
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, cls_name)
    except AttributeError as err:
        raise ImportError(f"module '{module_name}' has no attribute '{cls_name}' (from target '{string}')") from err


def instantiate_from_config(config: Any, **extra_kwargs: Any) -> Any:
    """Build ``target(**params)`` from a ``{target, params}`` mapping (dict or OmegaConf node).

    The CompVis sentinels ``__is_first_stage__`` and ``__is_unconditional__`` return ``None``.
    ``extra_kwargs`` are merged over ``params``.
    """
    if isinstance(config, str) and config in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL):
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise ValueError(f"expected a config mapping with a 'target' key, got {type(config).__name__}: {config!r}")
    if "target" not in config:
        raise ValueError(
            f"config has no 'target' key, so there is nothing to instantiate; config was: {_short_repr(config)}"
        )
    params = config.get("params", None) or {}
    params = dict(params)
    params.update(extra_kwargs)
    return get_obj_from_str(config["target"])(**params)


def _short_repr(config: Any, limit: int = 300) -> str:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            config = OmegaConf.to_container(config, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    text = repr(config)
    return text if len(text) <= limit else text[:limit] + "..."


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    """Number of parameters of ``model``; logs it in millions when ``verbose``."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1e-6)
    return total


def exists(x: Any) -> bool:
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` if it is not ``None``, else ``d`` (called if callable)."""
    if val is not None:
        return val
    return d() if callable(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def ismap(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def load_state_dict_report(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool,
                           source: str) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``module`` and log missing/unexpected keys; never silent.

    With ``strict=True`` a mismatch raises ``RuntimeError`` naming ``source`` and the first keys.
    Shape mismatches always raise.
    """
    own = module.state_dict()
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise RuntimeError(
            f"checkpoint {source} does not fit this model: {len(bad_shapes)} tensors have other shapes, e.g. "
            + "; ".join(bad_shapes[:5])
            + ". Is the config the one the checkpoint was trained with?"
        )
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(
            f"checkpoint {source} does not match the model: {len(missing)} missing keys "
            f"(e.g. {missing[:5]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:5]})."
        )
    if missing:
        logger.warning("Loading %s: %d missing keys, e.g. %s", source, len(missing), missing[:8])
    if unexpected:
        logger.warning("Loading %s: %d unexpected keys, e.g. %s", source, len(unexpected), unexpected[:8])
    if not missing and not unexpected:
        logger.info("Loaded %s: all %d keys matched.", source, len(state_dict))
    return list(missing), list(unexpected)


UNSAFE_LOAD_ENV = "LDM_UNSAFE_LOAD"


def load_checkpoint_state_dict(path: str, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read a state dict from a Lightning ``.ckpt``, a bare ``torch.save`` state dict or a safetensors file.

    Files are read with ``weights_only=True`` unless the caller or the environment (``LDM_UNSAFE_LOAD=1``, for
    ``ckpt_path`` entries in configs, e.g. checkpoints written by PL 1.x that hold pickled objects) opts out.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file that is not a checkpoint.
    """
    import os

    if os.environ.get(UNSAFE_LOAD_ENV, "") not in ("", "0"):
        weights_only = False

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        hint = ""
        if weights_only and "weights_only" in str(err):
            hint = (f" It needs full unpickling; only for files you trust, set {UNSAFE_LOAD_ENV}=1 "
                    "(or pass --unsafe-load to the scripts that have it).")
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: {str(err)[:300]}.{hint}") from err
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ValueError(f"{path} holds no state dict (got {type(obj).__name__})")
    return dict(obj)


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``torch.device(name)``; without a name the first accelerator torch sees, else the CPU.

    Raises ``ValueError`` when a named accelerator is not available.
    """
    if not name or name == "auto":
        if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, ROCm, MPS, XPU alike
            if torch.accelerator.is_available():
                return torch.accelerator.current_accelerator()
        elif torch.cuda.is_available():
            return torch.device(torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type != "cpu" and getattr(torch, device.type, None) is not None:
        backend = getattr(torch, device.type)
        if hasattr(backend, "is_available") and not backend.is_available():
            raise ValueError(f"device {name!r} was asked for but torch sees no {device.type} device here; "
                             "use --device cpu or leave --device out")
    return device


def run_script(main: Any, argv: Optional[list[str]] = None) -> int:
    """Run a script's ``main(argv)``; a user error (``ValueError``, ``FileNotFoundError``) becomes one
    ``<script>: error: ...`` line on stderr and exit code 2 instead of a traceback (``LDM_TRACEBACK=1`` keeps it)."""
    import os
    import sys

    prog = os.path.basename(sys.argv[0]) or "script"
    try:
        result = main(argv)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("LDM_TRACEBACK"):
            raise
        sys.stderr.write(f"{prog}: error: {err}\n")
        return 2
    return result if isinstance(result, int) else 0
