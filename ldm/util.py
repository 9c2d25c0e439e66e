"""Small helpers shared by the whole package: config instantiation and parameter counting."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoints import read_state_dict

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


# The checkpoint reader lives in ldm.checkpoints; the old name stays importable from here.
load_checkpoint_state_dict = read_state_dict


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
