"""Small helpers shared by the whole package: config instantiation and checking, parameter counting."""
from __future__ import annotations

import math

import difflib
import importlib
import inspect
import logging
import pkgutil
import re
import sys
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, not here, so that command-line help (main.py --help) needs no torch.
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

    The whole tree is checked first (:func:`check_config`): an unknown target or parameter anywhere in it raises
    :class:`ConfigError` naming the key path before anything is built. The CompVis sentinels
    ``__is_first_stage__`` and ``__is_unconditional__`` return ``None``. ``extra_kwargs`` are merged over ``params``.
    """
    if isinstance(config, str) and config in (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL):
        return None
    if not isinstance(config, Mapping) and not hasattr(config, "keys"):
        raise ValueError(f"expected a config mapping with a 'target' key, got {type(config).__name__}: {config!r}")
    if "target" not in config:
        raise ValueError(
            f"config has no 'target' key, so there is nothing to instantiate; config was: {_short_repr(config)}"
        )
    root = _node_key(config)
    check_config(config, root)
    params = config.get("params", None) or {}
    params = dict(params)
    params.update(extra_kwargs)
    return resolve_target(config["target"], _join(root, "target"))(**params)


# ------------------------------------------------------------------------------------------ config checking
class ConfigError(ValueError):
    """A config that cannot be built (unknown module, class or parameter; a malformed node). The message is one
    line naming the config key path and, where one is close, the name that was probably meant."""


TARGET_NODE_KEYS = ("target", "params", "base_learning_rate")  # base_learning_rate: CompVis's model section
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")


def _join(prefix: str, *parts: Any) -> str:
    return ".".join(str(p) for p in (prefix, *parts) if str(p) != "")


def _node_key(config: Any) -> str:
    """The dotted key of an OmegaConf node inside its root config (``model`` for ``config.model``), else ``""``."""
    try:
        from omegaconf import DictConfig

        if isinstance(config, DictConfig):
            return str(config._get_full_key(None) or "")
    except Exception:  # a private OmegaConf helper: no key path is better than a failure
        pass
    return ""


def closest(name: str, candidates: Any) -> Optional[str]:
    """The candidate closest to ``name`` (difflib), or ``None`` when none is close."""
    close = difflib.get_close_matches(str(name), sorted({str(c) for c in candidates}), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, candidates: Any, fmt: str = "{!r}") -> str:
    """`` (did you mean X?)`` for the closest candidate, or ``""``."""
    found = closest(name, candidates)
    return f" (did you mean {fmt.format(found)}?)" if found else ""


def plain_config(config: Any) -> Any:
    """``config`` as plain dicts/lists (OmegaConf nodes converted, interpolations resolved where they resolve)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return config
    if OmegaConf.is_config(config):
        try:
            return OmegaConf.to_container(config, resolve=True)
        except Exception:  # an interpolation that does not resolve yet: check what is written
            return OmegaConf.to_container(config, resolve=False)
    if isinstance(config, Mapping):
        return {k: plain_config(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [plain_config(v) for v in config]
    return config


def iter_target_nodes(config: Any, key: str = "") -> Iterator[tuple[str, Mapping]]:
    """``(key path, node)`` for every ``{target: dotted.path, ...}`` mapping in a plain config tree, outermost first."""
    if isinstance(config, Mapping):
        target = config.get("target")
        if isinstance(target, str) and _DOTTED.match(target):
            yield key, config
        for k, v in config.items():
            yield from iter_target_nodes(v, _join(key, k))
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            yield from iter_target_nodes(v, _join(key, i))


def _module_candidates(parent: Optional[str]) -> list[str]:
    if parent is None:
        return [m.name for m in pkgutil.iter_modules()]
    try:
        module = importlib.import_module(parent)
    except Exception:
        return []
    names = [n for n in dir(module) if not n.startswith("_")]
    if hasattr(module, "__path__"):
        names += [m.name for m in pkgutil.iter_modules(module.__path__)]
    return names


def resolve_target(target: Any, key: str = "target") -> Any:
    """Import a config's dotted ``target`` and return the object; :class:`ConfigError` naming ``key`` (and the
    closest existing name) when the module or the name does not exist."""
    if not isinstance(target, str) or not _DOTTED.match(target):
        raise ConfigError(f"config key {key}: expected a dotted import path such as 'package.module.Class', "
                          f"got {target!r}")
    module_name, attr = target.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(f"config key {key}: importing {module_name} for target {target} failed: {err} "
                              f"(a package that module needs is not installed)") from err
        parent, _, last = missing.rpartition(".")
        found = closest(last, _module_candidates(parent or None))
        hint = f" (did you mean {_join(parent, found) + target[len(missing):]}?)" if found else ""
        raise ConfigError(f"config key {key}: target {target} names module {missing}, which does not exist{hint}") \
            from err
    except ImportError as err:
        raise ConfigError(f"config key {key}: importing {module_name} for target {target} failed: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        names = [n for n in [*dir(module), *getattr(module, "__all__", ())] if not n.startswith("_")]  # lazy too
        raise ConfigError(f"config key {key}: module {module_name} has no {attr!r} (target {target})"
                          f"{did_you_mean(attr, names, module_name + '.{}')}") from err


def accepted_parameters(obj: Any) -> Optional[list[str]]:
    """Keyword parameters ``obj(**params)`` accepts, following ``**kwargs`` up a class's bases; ``None`` when
    they cannot be known (a callable that takes any keyword, a C extension)."""
    owners = [k for k in obj.__mro__ if "__init__" in k.__dict__] if inspect.isclass(obj) else [obj]
    names: list[str] = []
    followed = False  # reached through another class's **kwargs
    for owner in owners:
        torch_module = getattr(sys.modules.get("torch"), "nn", None)  # imported already if owner is a Module
        if owner is object or (torch_module is not None and owner is torch_module.Module):
            # reached with **kwargs still open: whatever the class does with them
            return None
        try:
            sig = inspect.signature(owner.__dict__["__init__"] if inspect.isclass(owner) else owner)
        except (TypeError, ValueError):
            return None
        params = list(sig.parameters.values())
        if inspect.isclass(owner) and params:
            params = params[1:]  # self
        own = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            if followed and not own:  # **kwargs led to a mixin that takes nothing: where they go is unknown
                return None
            return sorted(set(names + own))
        names += own
        followed = True
    return None


def check_config(config: Any, key: str = "") -> None:
    """Check every ``{target, params}`` node of ``config`` before anything is built: each target imports, each
    parameter is one the target accepts, each node holds only ``target``/``params``. Raises :class:`ConfigError`
    with one line naming the key path (prefixed with ``key``), the valid parameters and the closest name."""
    for path, node in iter_target_nodes(plain_config(config), key):
        target = node["target"]
        stray = [k for k in node if k not in TARGET_NODE_KEYS]
        if stray:
            name = str(stray[0])
            raise ConfigError(f"config key {_join(path, name)}: a {{target, params}} node takes only "
                              f"{', '.join(TARGET_NODE_KEYS)}; parameters of {target} go under "
                              f"{_join(path, 'params', name)}{did_you_mean(name, TARGET_NODE_KEYS)}")
        obj = resolve_target(target, _join(path, "target"))
        params = node.get("params")
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise ConfigError(f"config key {_join(path, 'params')}: expected a mapping of parameters of {target}, "
                              f"got {type(params).__name__}: {_short_repr(params, 80)}")
        accepted = accepted_parameters(obj)
        if accepted is None:
            continue
        unknown = [str(k) for k in params if k not in accepted]
        if unknown:
            raise ConfigError(f"config key {_join(path, 'params', unknown[0])}: {target} has no parameter "
                              f"{unknown[0]!r}{did_you_mean(unknown[0], accepted)}; valid parameters: "
                              f"{', '.join(accepted)}")


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
    import torch

    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def __getattr__(name: str) -> Any:
    """``load_checkpoint_state_dict``: the checkpoint reader lives in ldm.checkpoints; the old name stays
    importable from here (resolved on first use, PEP 562)."""
    if name == "load_checkpoint_state_dict":
        from ldm.checkpoints import read_state_dict

        return read_state_dict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def nonnegative_number(value: Any, name: str, hint: str = "") -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0 (``hint`` follows the
    rule in the message, e.g. ``" (0: off)"``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and >= 0{hint}, got {value!r}")
    return number


def resolve_device(name: Optional[str] = None) -> torch.device:
    """``torch.device(name)``; without a name the first accelerator torch sees, else the CPU.

    Raises ``ValueError`` when a named accelerator is not available.
    """
    import torch

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
