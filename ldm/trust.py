"""What a config read from a run directory may name as ``target``, and where it may make ``main.py -r`` write.

``instantiate_from_config`` imports and calls any dotted ``target``, so a shared run directory whose
``configs/*.yaml`` names, say, ``os.system`` would run it. Configs read back from a run directory (``main.py -r``,
``scripts/sample.py -r``, ``scripts/inspect_registers.py -r``, ``scripts/mask_ae_dice.py -r``; also the
``config.yaml`` of a CompVis model folder or an export) may therefore only name targets that are

- classes defined under the known prefixes :data:`KNOWN_PREFIXES` (this project's ``ldm`` and ``main``, and the
  torch / torchvision / Lightning modules whose classes configs use) or named in :data:`KNOWN_CLASSES`
  (Lightning's CSV and TensorBoard loggers), or
- anything under a prefix the user trusts: ``LDM_TRUSTED_TARGETS=pkg1,pkg2.mod`` (every entry point), or
  everything in that run with ``--trust-config``.

Anything else is refused with one line naming the config key path, the target and both opt-ins. Prefixes match
on module boundaries (``ldmx.evil`` is not under ``ldm``). The whole tree of every file is checked before anything
is built. Configs the user passes with ``-b/--base`` are the user's own choice and are not checked here.

The allow-list stops code, not writes: an allow-listed class takes any path (``CSVLogger(save_dir=...)``,
``ModelCheckpoint(dirpath=...)``). So on ``main.py -r``, which builds the run's callbacks and loggers, every
path-valued parameter of the saved ``lightning`` section (:data:`PATH_KEYS`, a ``filename`` with a directory part)
must also resolve inside the run directory (:func:`check_run_paths`, symlinks followed); else one line names the
key, the path and the ways out: give the path on the command line (``key=PATH`` overrides are the user's own and are
not checked), or ``--trust-config``, which trusts the run's paths too. The same holds for the run's own folders: a
``checkpoints/`` (or ``configs/``, ``csv/``, ...) that is a symbolic link out of the run is refused on ``main.py -r``
(:func:`check_run_links`), and followed with a warning naming its target under ``--trust-config``.
"""
from __future__ import annotations

import glob
import inspect
import logging
import os
from typing import Any, Iterable, Iterator, Optional, Sequence

from ldm.util import ConfigError, plain_config, resolve_target

logger = logging.getLogger(__name__)

TRUSTED_TARGETS_ENV = "LDM_TRUSTED_TARGETS"
TRUST_FLAG = "--trust-config"

# Classes defined under these modules may be named by a run's config without any opt-in.
KNOWN_PREFIXES: tuple[str, ...] = (
    "ldm", "main",
    "torch.nn", "torch.optim",
    "torchvision.transforms",
    "pytorch_lightning.callbacks", "lightning.pytorch.callbacks",
)
# And these classes: loggers that only write into the run directory (the others talk to servers), and PL 1.x's
# TestTubeLogger, which CompVis configs name and main.py replaces with CSVLogger.
KNOWN_CLASSES: tuple[str, ...] = tuple(f"{pkg}.loggers.{cls}" for pkg in ("pytorch_lightning", "lightning.pytorch")
                                       for cls in ("CSVLogger", "TensorBoardLogger", "TestTubeLogger"))


# Parameters that name where a callback, logger or the trainer writes; ``filename`` only with a directory part.
PATH_KEYS: frozenset[str] = frozenset({"save_dir", "dirpath", "log_dir", "logdir", "path", "filepath", "dir",
                                       "root_dir", "default_root_dir", "output_dir", "out_dir", "weights_save_path"})
FILENAME_KEYS: frozenset[str] = frozenset({"filename"})


class UntrustedTargetError(ValueError):
    """A config read from a run directory names a target outside the allow-list; nothing was built."""


class RunPathError(ValueError):
    """A config read back from a run directory makes a callback or logger write outside that run; nothing was
    built."""


def under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or lies inside it on a module boundary (``ldm.util`` is under ``ldm``, ``ldmx`` not)."""
    return name == prefix or name.startswith(prefix + ".")


def trusted_prefixes(env: Optional[str] = None) -> tuple[str, ...]:
    """The prefixes of ``LDM_TRUSTED_TARGETS`` (comma-separated dotted names); ``ValueError`` for a malformed one."""
    text = os.environ.get(TRUSTED_TARGETS_ENV, "") if env is None else env
    prefixes = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in prefixes if not all(part.isidentifier() for part in p.split("."))]
    if bad:
        raise ValueError(f"{TRUSTED_TARGETS_ENV}={text!r}: {bad} are not dotted module names; give comma-separated "
                         f"prefixes such as mypkg,other.module (or pass {TRUST_FLAG} to trust a whole run)")
    return prefixes


def iter_targets(config: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, value)`` of every ``target`` entry anywhere in a config tree (any value, any depth)."""
    if isinstance(config, dict):
        for k, v in config.items():
            path = f"{key}.{k}" if key else str(k)
            if k == "target":
                yield path, v
            yield from iter_targets(v, path)
    elif isinstance(config, list):
        for i, v in enumerate(config):
            yield from iter_targets(v, f"{key}.{i}" if key else str(i))


def _refusal(key: str, target: Any, source: str, why: str) -> UntrustedTargetError:
    module = target.rsplit(".", 1)[0] if isinstance(target, str) and "." in target else str(target)
    return UntrustedTargetError(
        f"config key {key} in {source} names {target!r}, {why}; a config read from a run directory may only name "
        f"classes under {', '.join(KNOWN_PREFIXES)} and Lightning's CSV/TensorBoard loggers. If you trust this "
        f"run, pass {TRUST_FLAG}; to trust that package everywhere, set {TRUSTED_TARGETS_ENV}={module} "
        "(comma-separated prefixes)")


def check_trusted(config: Any, source: str, extra_prefixes: Sequence[str] = ()) -> None:
    """Refuse (:class:`UntrustedTargetError`) any ``target`` of ``config`` that is not a class under
    :data:`KNOWN_PREFIXES` (also by where the class is defined) or under ``extra_prefixes`` / the environment's.

    Every target string is judged before anything is imported; only targets under the known prefixes are
    imported, to see that they are classes defined there."""
    user = tuple(extra_prefixes) + trusted_prefixes()
    targets = list(iter_targets(plain_config(config)))
    known: list[tuple[str, str]] = []
    for key, target in targets:
        if not isinstance(target, str) or "." not in target:
            continue  # nothing get_obj_from_str would import (it needs a dotted string)
        if any(under(target, p) for p in user):
            continue
        if "${" in target:
            raise _refusal(key, target, source, "an interpolation that is not resolved yet")
        if not any(under(target, p) for p in KNOWN_PREFIXES) and target not in KNOWN_CLASSES:
            raise _refusal(key, target, source, "which is outside the allow-list")
        known.append((key, target))
    for key, target in known:
        try:
            obj = resolve_target(target, key)
        except ConfigError:  # nothing there to run (e.g. PL 1.x's TestTubeLogger): building reports it, if used
            continue
        if not inspect.isclass(obj):
            raise _refusal(key, target, source, f"which is a {type(obj).__name__}, not a class")
        home = getattr(obj, "__module__", "") or ""
        if target not in KNOWN_CLASSES and not any(under(home, p) for p in KNOWN_PREFIXES + user):
            raise _refusal(key, target, source, f"a class defined in {home}, outside the allow-list")


def load_yaml(path: str) -> Any:
    """``OmegaConf.load(path)``; a missing file raises ``FileNotFoundError``, a YAML mistake :class:`ConfigError`
    with one line naming the file, line and column."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's ScannerError/ParserError, omegaconf's grammar errors
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from err


def run_config_files(run_dir: Optional[str], checkpoint: Optional[str] = None) -> list[str]:
    """Every config an entry point may read back from a run: ``configs/*.yaml`` of the run directory, and the
    ``config.yaml`` of a CompVis model folder or an export (in the folder, or beside the checkpoint)."""
    folders = [d for d in (run_dir, os.path.dirname(os.path.abspath(checkpoint)) if checkpoint else None) if d]
    found: list[str] = []
    for folder in folders:
        found += sorted(glob.glob(os.path.join(folder, "configs", "*.yaml")))
        flat = os.path.join(folder, "config.yaml")
        if os.path.isfile(flat):
            found.append(flat)
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


# ------------------------------------------------------------------------------------------ paths
def run_dir_of(config_path: str) -> str:
    """The run directory of a saved config: ``RUN/configs/x.yaml`` -> ``RUN``; the folder of a CompVis model's or
    an export's ``config.yaml``."""
    folder = os.path.dirname(os.path.abspath(config_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "configs" else folder


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` (relative: to the working directory) resolves, symlinks followed, into ``folder``."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def iter_path_params(config: Any, key: str = "") -> Iterator[tuple[str, str, Any, dict]]:
    """``(key path, name, value, the dict holding it)`` of every :data:`PATH_KEYS` or :data:`FILENAME_KEYS` entry
    of a config tree (any depth, lists too)."""
    if isinstance(config, dict):
        for k, v in config.items():
            path = f"{key}.{k}" if key else str(k)
            if k in PATH_KEYS or k in FILENAME_KEYS:
                yield path, str(k), v, config
            yield from iter_path_params(v, path)
    elif isinstance(config, list):
        for i, v in enumerate(config):
            yield from iter_path_params(v, f"{key}.{i}" if key else str(i))


def _written_path(name: str, value: str, node: dict, run_dir: str) -> Optional[str]:
    """Where the parameter ``name: value`` makes a callback or logger write; None for a file name without a directory
    part. A ``filename`` is joined to its ``dirpath`` (default the run's ``checkpoints/``, as main.py does)."""
    if name in FILENAME_KEYS:
        if not os.path.isabs(value) and "/" not in value and os.sep not in value:
            return None
        base = node.get("dirpath") if isinstance(node.get("dirpath"), str) else os.path.join(run_dir, "checkpoints")
        return os.path.join(base, value)
    return value


def check_run_paths(config: Any, run_dir: str, source: str) -> None:
    """Refuse (:class:`RunPathError`) a path-valued parameter (:data:`PATH_KEYS`, a ``filename`` with a directory
    part) anywhere in the ``lightning`` section of ``config`` (callbacks, loggers, checkpointing, trainer) that does not
    resolve inside ``run_dir``: relative paths resolve against the working directory, as Lightning resolves them, and
    symlinks are followed. ``source`` is the config file, named in the error."""
    plain = plain_config(config)
    lightning = plain.get("lightning") if isinstance(plain, dict) else None
    for key, name, value, node in iter_path_params(lightning, "lightning"):
        if value is None or isinstance(value, (bool, int, float, dict, list)):  # a subtree: walked into
            continue
        text = str(value)
        if "${" in text:
            why = "an interpolation that does not resolve here, so where it writes cannot be checked"
        elif "://" in text:
            why = "a URL, outside the run directory"
        else:
            target = _written_path(name, text, node, run_dir)
            target = None if target is None else os.path.expanduser(target)  # Lightning expands ~
            if target is None or is_inside(target, run_dir):
                continue
            why = f"which resolves to {os.path.realpath(target)}, outside the run directory {run_dir}"
        raise RunPathError(
            f"config key {key} in run config {source} is {text!r}, {why}: a config read back from a run may only "
            f"write inside its run. To write there anyway, remove the key from {source} and give it on the command "
            f"line ({key}=PATH; command-line overrides are your own and are not checked); if you trust this run, "
            f"pass {TRUST_FLAG}")


def check_run_configs(paths: Iterable[str], trust_all: bool = False, check_paths: bool = True) -> None:
    """Load every config file a run saved and check its targets (:func:`check_trusted`) and, with ``check_paths``
    (``main.py -r``, which builds the run's callbacks and loggers), that they write inside the run
    (:func:`check_run_paths`), before anything is built; with ``trust_all`` (``--trust-config``) only the YAML is
    checked."""
    paths = list(paths)
    loaded = [(p, load_yaml(p)) for p in paths]
    if trust_all:
        if paths:
            logger.warning("%s: trusting every target and path in %s", TRUST_FLAG, run_dir_of(paths[0]))
        return
    for path, config in loaded:
        check_trusted(config, f"run config {path}")
    if check_paths:
        for path, config in loaded:
            check_run_paths(config, run_dir_of(path), path)


# Folders of a run directory that ``main.py -r`` writes into (checkpoints, saved configs, logger and image folders).
RUN_WRITE_FOLDERS: tuple[str, ...] = ("checkpoints", "configs", "csv", "tensorboard", "images")


def check_run_links(run_dir: str, trust_all: bool = False) -> None:
    """Refuse (:class:`RunPathError`) a folder of :data:`RUN_WRITE_FOLDERS` in ``run_dir`` that is a symbolic link
    resolving outside the run directory: ``main.py -r`` would follow it and write the run's checkpoints (or configs,
    logs) there, the way a path in a shared config would. With ``trust_all`` (``--trust-config``, for a link you made
    yourself, e.g. checkpoints on another disk) it is followed with one warning naming where it leads."""
    for name in RUN_WRITE_FOLDERS:
        path = os.path.join(run_dir, name)
        if not os.path.islink(path) or is_inside(path, run_dir):
            continue
        target = os.path.realpath(path)
        if trust_all:
            logger.warning("%s: %s is a symbolic link to %s, outside the run directory; writing there", TRUST_FLAG,
                           path, target)
            continue
        raise RunPathError(
            f"{path} is a symbolic link to {target}, outside the run directory {run_dir}: resuming would write the "
            f"run's {name} there. If you made the link (e.g. {name} on another disk), pass {TRUST_FLAG}; otherwise "
            "replace the link by a folder")


def check_run(resume: str, base: Sequence[str] = (), trust_all: bool = False) -> None:
    """For the scripts' ``-r RUN_DIR_OR_CKPT [-b CONFIG ...]``: check the configs read back with the checkpoint
    (:func:`run_config_files`) as :func:`check_run_configs` does, and that every ``-b`` file is valid YAML. Paths
    are not checked: the scripts build the run's model only, never its callbacks or loggers."""
    from ldm.checkpoints import locate_run

    checkpoint, run_dir = locate_run(resume)
    check_run_configs(run_config_files(run_dir, checkpoint), trust_all, check_paths=False)
    for path in base or ():  # None: no -b files
        load_yaml(path)


def add_trust_argument(parser: Any) -> None:
    """The ``--trust-config`` flag of every entry point that reads a run directory."""
    parser.add_argument(TRUST_FLAG, dest="trust_config", action="store_true",
                        help="trust every target named by the run directory's configs and every path they write to "
                             "(only for runs you trust; by default they may name classes of ldm, main, torch.nn and "
                             "Lightning only; "
                             f"{TRUSTED_TARGETS_ENV}=pkg1,pkg2.mod trusts more prefixes everywhere)")
