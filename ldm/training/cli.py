"""The CompVis command line of ``main.py`` mapped onto Lightning 2.

Pure functions (no model, no Trainer): argument parsing, ``--gpus`` mapping, config merging, run
directory naming, resume resolution, trainer settings and the effective learning rate.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

from ldm.cli_flags import ArgumentParser, add_threads_argument
from ldm.trust import add_trust_argument, check_run_configs, check_run_links, load_yaml
from ldm.util import ConfigError, closest

DEVICE_KEYS = ("gpus", "accelerator", "devices")
LOGDIR_ENV = "LDM_MAIN_LOGDIR"  # run directory handed from rank 0 to the DDP processes it launches

# Trainer arguments that PL 1.x accepted and Lightning 2 removed: old name -> new name (None: dropped).
RENAMED_TRAINER_KEYS: dict[str, Optional[str]] = {
    "distributed_backend": "strategy",
    "replace_sampler_ddp": "use_distributed_sampler",
    "terminate_on_nan": None,  # always on: see NonFiniteLossGuard
    "progress_bar_refresh_rate": None,
    "weights_summary": None,
    "flush_logs_every_n_steps": None,
    "amp_backend": None,
    "amp_level": None,
    "track_grad_norm": None,
    "auto_select_gpus": None,
    "auto_lr_find": None,
    "auto_scale_batch_size": None,
    "move_metrics_to_cpu": None,
    "multiple_trainloader_mode": None,
    "stochastic_weight_avg": None,
    "checkpoint_callback": None,
    "log_gpu_memory": None,
    "prepare_data_per_node": None,
}


# PL 1.x accepted a distributed mode as ``accelerator`` (CompVis saved ``accelerator: ddp``).
PL1_STRATEGY_ACCELERATORS = ("ddp", "ddp_spawn", "ddp_cpu", "dp", "ddp2", "ddp_sharded", "horovod")


class UsageError(ValueError):
    """A mistake on the command line or in a config; ``main.py`` reports it without a traceback."""


# ----------------------------------------------------------------------------------------- parsing
TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


def _str2bool(value: Union[str, bool]) -> bool:
    if isinstance(value, bool):
        return value
    low = value.strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean ({'/'.join(TRUE_WORDS + FALSE_WORDS)}), got {value!r}")


def _int_or_float(value: str) -> Union[int, float]:
    try:
        return int(value)
    except ValueError:
        return float(value)


def _int_or_bool(value: str) -> Union[int, bool]:
    try:
        return int(value)
    except ValueError:
        return _str2bool(value)


def _precision(value: str) -> Union[int, str]:
    return int(value) if value.isdigit() else value


def parse_devices(value: Union[str, int, Sequence[int]], what: str = "--devices") -> Union[int, str, list[int]]:
    """The one reader of device values as users type them (``--gpus``, ``--devices``, configs).

    ``"0,1"``, ``"0,"``, ``"[0, 3]"`` or a list -> GPU ids ``[0, 1]``, ``[0]``, ``[0, 3]`` (``","`` -> ``[]``);
    ``"2"`` or 2 -> a count (``""`` -> 0, ``"-1"`` -> -1 = all); ``"auto"`` -> ``"auto"``. Raises ``UsageError``
    naming ``what`` for anything else.
    """
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().strip("[]").strip()
    if text == "auto":
        return text
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        return int(text) if text else 0
    except ValueError as err:
        raise UsageError(f"{what} {value!r} is not understood: use GPU ids such as 0,1 or 0, or a count such as 2 "
                         f"(-1 for all GPUs)") from err


# Lightning 2 Trainer settings accepted as ``--name value`` (also ``--name-with-dashes``).
TRAINER_FLAGS: dict[str, Callable[[str], Any]] = {
    "accelerator": str, "devices": parse_devices, "num_nodes": int, "strategy": str, "precision": _precision,
    "max_steps": int, "max_epochs": int, "min_steps": int, "min_epochs": int, "max_time": str,
    "accumulate_grad_batches": int, "limit_train_batches": _int_or_float, "limit_val_batches": _int_or_float,
    "limit_test_batches": _int_or_float, "limit_predict_batches": _int_or_float,
    "val_check_interval": _int_or_float, "check_val_every_n_epoch": int, "log_every_n_steps": int,
    "gradient_clip_val": float, "gradient_clip_algorithm": str, "num_sanity_val_steps": int,
    "benchmark": _str2bool, "deterministic": _str2bool, "fast_dev_run": _int_or_bool, "profiler": str,
    "detect_anomaly": _str2bool, "enable_progress_bar": _str2bool, "enable_model_summary": _str2bool,
    "use_distributed_sampler": _str2bool, "sync_batchnorm": _str2bool,
    "reload_dataloaders_every_n_epochs": int,
}


def get_parser() -> argparse.ArgumentParser:
    """The CompVis ``main.py`` flags plus Lightning 2 trainer settings; trailing ``a.b=c`` are overrides."""
    parser = ArgumentParser(
        description="Train or test a model described by CompVis-style YAML configs (Lightning 2).",
        epilog="Trailing arguments of the form a.b.c=value override config entries, e.g. "
               "model.base_learning_rate=1e-5 lightning.trainer.max_steps=1000.",
    )
    parser.add_argument("-n", "--name", type=str, default="", help="postfix for the log directory")
    parser.add_argument("-r", "--resume", type=str, default="",
                        help="resume from a run directory (logs/RUN) or a checkpoint (logs/RUN/checkpoints/x.ckpt)")
    parser.add_argument("--resume_from_checkpoint", type=str, default="",
                        help="start from this checkpoint's full training state but log into a new run directory")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                        help="config files, merged left to right; later ones and overrides win")
    parser.add_argument("-t", "--train", type=_str2bool, const=True, default=False, nargs="?", help="train")
    parser.add_argument("--no-test", type=_str2bool, const=True, default=False, nargs="?", dest="no_test",
                        help="skip testing after training")
    parser.add_argument("-p", "--project", type=str, default="",
                        help="group runs: the run directory becomes LOGDIR/PROJECT/<timestamp>_<name>")
    parser.add_argument("-d", "--debug", type=_str2bool, nargs="?", const=True, default=False,
                        help="debug logging; a fresh run's directory is moved to LOGDIR/debug_runs at the end")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="postfix appended to the run name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory holding the runs")
    parser.add_argument("--scale_lr", type=_str2bool, nargs="?", const=True, default=True,
                        help="learning rate = accumulate_grad_batches * devices * num_nodes * batch_size "
                             "* base_learning_rate (CompVis default: true)")
    add_trust_argument(parser)
    parser.add_argument("--allow-other-run", "--allow_other_run", dest="allow_other_run", action="store_true",
                        help="with -r: resume even from a checkpoint written by another run (its run id differs from "
                             "the run's run.json); by default that is refused")
    parser.add_argument("--gpus", type=str, default=None,
                        help="CompVis/PL1 style: '0,1' = GPUs 0 and 1 (DDP), '0,' = GPU 0, '2' = two GPUs, "
                             "'-1' = all GPUs, '0' = no GPU")
    add_threads_argument(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the diffusion UNet (in place: checkpoints keep their keys); the first "
                             "steps are slow while graphs are captured")
    parser.add_argument("--compile_backend", "--compile-backend", type=str, default="inductor",
                        help="torch.compile backend with --compile (default inductor; aot_eager/eager for debugging)")
    parser.add_argument("--compile_mode", "--compile-mode", type=str, default=None,
                        help="torch.compile mode with --compile (default, reduce-overhead, max-autotune)")
    for name, conv in TRAINER_FLAGS.items():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*flags, dest=name, type=conv, default=None, help=f"Lightning Trainer({name}=...)")
    return parser


_OPTIONAL_BOOL_FLAGS = ("-t", "--train", "--no-test", "-d", "--debug", "--scale_lr")
_BOOL_WORDS = TRUE_WORDS + FALSE_WORDS


def _explicit_bools(argv: Sequence[str]) -> list[str]:
    """``-t`` followed by anything but a boolean word means ``-t true`` (so ``-t a.b=1`` keeps the override)."""
    out: list[str] = []
    for i, token in enumerate(argv):
        out.append(token)
        if token in _OPTIONAL_BOOL_FLAGS:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is None or following.strip().lower() not in _BOOL_WORDS:
                out.append("true")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` (default ``sys.argv[1:]``); the unknown rest must be ``key=value`` overrides."""
    import sys

    parser = get_parser()
    argv = parser.normalize_flags(list(sys.argv[1:] if argv is None else argv))  # --a-b or --a_b
    opt, unknown = parser.parse_known_args(_explicit_bools(argv))
    bad = [u for u in unknown if u.startswith("-") or "=" not in u]
    if bad:
        parser.error(f"unrecognised arguments {bad}: options are listed by --help, config overrides "
                     f"look like a.b.c=value")
    if opt.name and opt.resume:
        parser.error("-n/--name and -r/--resume cannot be used together: -r continues in the run's own "
                     "directory; to start a new run from a checkpoint use -n NAME --resume_from_checkpoint CKPT")
    if opt.resume and opt.resume_from_checkpoint:
        parser.error("-r/--resume and --resume_from_checkpoint are exclusive")
    return opt, unknown


# ---------------------------------------------------------------------------------------- devices
@dataclass
class DeviceSpec:
    """Resolved Lightning ``accelerator``/``devices``/``strategy`` plus the process count per node."""

    accelerator: str
    devices: Union[int, str, list[int]]
    strategy: Optional[str]
    num_devices: int
    notes: list[str] = field(default_factory=list)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_cuda_message(what: str) -> str:
    return (f"{what} asks for CUDA GPUs, but this machine has no CUDA device (torch.cuda.is_available() is "
            f"False). To train on CPU drop --gpus (or pass --accelerator cpu, and --devices N with "
            f"--strategy ddp for N CPU processes); in a config use lightning.trainer.accelerator=cpu.")


def parse_gpus(gpus: Union[str, int, Sequence[int]], cuda_count: Optional[int] = None) -> DeviceSpec:
    """Map a PL 1.x ``gpus`` value, as CompVis users type it, onto Lightning 2 settings.

    ``"0,1"`` -> GPUs 0 and 1 with DDP; ``"0,"`` -> GPU 0; ``"2"`` -> two GPUs; ``"-1"`` -> every GPU;
    ``"0"`` (or empty) -> no GPU, i.e. CPU, as PL 1.x read it. Raises ``UsageError`` without CUDA.
    """
    count = _cuda_count() if cuda_count is None else cuda_count
    parsed = parse_devices(gpus, "--gpus")
    if parsed == "auto":
        raise UsageError("--gpus 'auto' is not a PL 1.x value: use --accelerator gpu --devices auto")
    ids: Optional[list[int]] = parsed if isinstance(parsed, list) else None
    number = parsed if isinstance(parsed, int) else None
    if (ids is not None and not ids) or (ids is None and number == 0):  # "0", "", "," : no GPU
        return DeviceSpec("cpu", 1, None, 1, [f"--gpus {gpus!r} means no GPU (as in PL 1.x): training on CPU; "
                                               f"write --gpus 0, to use GPU 0"])
    if count == 0:
        raise UsageError(_no_cuda_message(f"--gpus {gpus}"))
    if ids is not None:
        if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
            raise UsageError(f"--gpus {gpus!r}: GPU ids must be distinct and >= 0")
        if max(ids) >= count:
            raise UsageError(f"--gpus {gpus!r} names GPU {max(ids)}, but only {count} CUDA device(s) are "
                             f"visible (ids 0..{count - 1}); check CUDA_VISIBLE_DEVICES")
        n = len(ids)
        devices: Union[int, list[int]] = ids
    else:
        assert number is not None
        if number < -1:
            raise UsageError(f"--gpus {gpus!r}: a count must be >= 1, or -1 for all GPUs")
        n = count if number == -1 else number
        if n > count:
            raise UsageError(f"--gpus {gpus!r} asks for {n} GPUs, but only {count} CUDA device(s) are visible")
        devices = n
    return DeviceSpec("gpu", devices, "ddp" if n > 1 else None, n)


def _count_devices(accelerator: str, devices: Union[int, str, list[int]]) -> int:
    if isinstance(devices, list):
        return len(devices)
    if devices == "auto":
        return max(_cuda_count(), 1) if accelerator in ("gpu", "cuda", "auto") else 1
    if devices == -1:
        return max(_cuda_count(), 1) if accelerator in ("gpu", "cuda", "auto") else (os.cpu_count() or 1)
    return int(devices)


def resolve_devices(trainer_cfg: dict[str, Any], cuda_count: Optional[int] = None) -> DeviceSpec:
    """Turn ``gpus`` / ``accelerator`` / ``devices`` / ``strategy`` of a merged trainer dict into a DeviceSpec.

    Without any of them: one device, ``accelerator="auto"`` (a GPU when there is one, else the CPU).
    """
    strategy = trainer_cfg.get("strategy")
    if trainer_cfg.get("gpus") is not None:
        clash = [k for k in ("accelerator", "devices") if trainer_cfg.get(k) is not None]
        if clash:
            raise UsageError(f"gpus={trainer_cfg['gpus']!r} and {clash} are both set; use either the PL 1.x "
                             f"--gpus or Lightning 2's --accelerator/--devices")
        spec = parse_gpus(trainer_cfg["gpus"], cuda_count)
        spec.strategy = strategy or spec.strategy
        return spec
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    devices = trainer_cfg.get("devices")
    if devices is None:
        devices = 1
    if accelerator in ("gpu", "cuda"):
        count = _cuda_count() if cuda_count is None else cuda_count
        if count == 0:
            raise UsageError(_no_cuda_message(f"accelerator={accelerator}"))
    devices = parse_devices(devices)
    n = _count_devices(accelerator, devices)
    num_nodes = int(trainer_cfg.get("num_nodes") or 1)
    if strategy is None and (n > 1 or num_nodes > 1):
        strategy = "ddp"
    return DeviceSpec(accelerator, devices, strategy, n)


def trainer_settings(lightning_trainer: Any, opt: argparse.Namespace) -> dict[str, Any]:
    """Merge ``lightning.trainer`` from the configs with trainer flags given on the command line (these win).

    Device flags on the command line replace every device key of the config as a group. Returns the
    user-facing dict (``gpus`` kept as typed), which is what gets saved for a resume.
    """
    cfg: dict[str, Any] = {}
    if lightning_trainer is not None:
        cfg = OmegaConf.to_container(lightning_trainer, resolve=True) if OmegaConf.is_config(lightning_trainer) \
            else dict(lightning_trainer)
    cli = {name: getattr(opt, name) for name in (*TRAINER_FLAGS, "gpus") if getattr(opt, name, None) is not None}
    if any(k in cli for k in DEVICE_KEYS):
        for key in DEVICE_KEYS:
            cfg.pop(key, None)
    cfg.update(cli)
    return cfg


def lightning_trainer_kwargs(settings: dict[str, Any], cuda_count: Optional[int] = None) \
        -> tuple[dict[str, Any], DeviceSpec, list[str]]:
    """Trainer(**kwargs) from the merged settings: PL 1.x names mapped or dropped, devices resolved.

    Returns the kwargs, the device spec and notes (one line per mapping made) to log.
    """
    import inspect

    import pytorch_lightning as pl

    kwargs = dict(settings)
    notes: list[str] = []
    if "resume_from_checkpoint" in kwargs:
        raise UsageError("lightning.trainer.resume_from_checkpoint was removed in Lightning 2: resume with "
                         "-r logs/RUN (or -r path/to/checkpoint.ckpt) instead")
    for old, new in RENAMED_TRAINER_KEYS.items():
        if old in kwargs:
            value = kwargs.pop(old)
            if new is not None:
                kwargs.setdefault(new, value)
                notes.append(f"trainer setting {old}={value!r} (PL 1.x) is now {new}={value!r}")
            else:
                notes.append(f"trainer setting {old}={value!r} (PL 1.x) has no Lightning 2 equivalent; ignored")
    if str(kwargs.get("accelerator")) in PL1_STRATEGY_ACCELERATORS:  # CompVis wrote accelerator: ddp
        old_value = kwargs.pop("accelerator")
        kwargs.setdefault("strategy", "ddp" if old_value == "ddp_cpu" else old_value)
        notes.append(f"trainer setting accelerator={old_value!r} (PL 1.x) is now strategy={kwargs['strategy']!r}")
    spec = resolve_devices(kwargs, cuda_count)
    check_node_launch(int(kwargs.get("num_nodes") or 1))
    kwargs.pop("gpus", None)
    kwargs.update(accelerator=spec.accelerator, devices=spec.devices)
    if spec.strategy is not None:
        kwargs["strategy"] = spec.strategy
    notes.extend(spec.notes)
    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        hint = closest(unknown[0], valid)
        raise UsageError(f"unknown Lightning Trainer setting(s) {unknown} in lightning.trainer or on the command "
                         f"line{f' (did you mean lightning.trainer.{hint}?)' if hint else ''}; valid names: "
                         f"{sorted(valid)}")
    return kwargs, spec, notes


# Set by the launchers that start one process per node (torchrun, srun, mpirun, LSF, or by hand for Lightning).
NODE_LAUNCH_ENV = ("WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "LSB_JOBID",
                   "MASTER_ADDR")


def check_node_launch(num_nodes: int, environ: Optional[dict[str, str]] = None) -> None:
    """``num_nodes > 1`` outside a multi-node launch would wait forever for the other nodes: a ``UsageError``.

    A multi-node launcher sets one of ``NODE_LAUNCH_ENV``; resuming a multi-node run (whose saved config says
    ``num_nodes: N``) on one machine needs ``--num_nodes 1``.
    """
    environ = os.environ if environ is None else environ
    if num_nodes > 1 and not any(environ.get(key) for key in NODE_LAUNCH_ENV):
        raise UsageError(f"num_nodes={num_nodes}, but this process was not started on {num_nodes} nodes (none of "
                         f"{', '.join(NODE_LAUNCH_ENV)} is set), so it would wait forever for the other nodes. Start "
                         f"one copy per node with torchrun --nnodes {num_nodes} --node_rank R or srun (README, "
                         f"several nodes), or pass --num_nodes 1 to train (or resume a multi-node run) on this machine")


# ----------------------------------------------------------------------------------- learning rate
def effective_learning_rate(base_lr: float, batch_size: int, num_devices: int, num_nodes: int,
                            accumulate_grad_batches: int, scale_lr: bool) -> tuple[float, str]:
    """The learning rate to use and a sentence saying how it was computed (CompVis rule, nodes included)."""
    if scale_lr:
        lr = accumulate_grad_batches * num_devices * num_nodes * batch_size * base_lr
        how = (f"learning rate {lr:.2e} = {accumulate_grad_batches} (accumulate_grad_batches) * {num_devices} "
               f"(devices) * {num_nodes} (num_nodes) * {batch_size} (batch size) * {base_lr:.2e} "
               f"(base_learning_rate); pass --scale_lr false to use base_learning_rate as is")
    else:
        lr = base_lr
        how = f"learning rate {lr:.2e} = base_learning_rate (--scale_lr false)"
    return lr, how


# ---------------------------------------------------------------------------------- configs & dirs
def parse_overrides(items: Sequence[str]) -> DictConfig:
    """``a.b.c=value`` strings -> an OmegaConf tree (values typed as YAML)."""
    try:
        return OmegaConf.from_dotlist(list(items))
    except Exception as err:  # omegaconf raises several grammar errors
        raise UsageError(f"could not parse config overrides {list(items)}: {err}") from err


def load_configs(paths: Sequence[str], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files left to right, then the overrides; then check the result before anything is built.

    An override that sets a device key of ``lightning.trainer`` replaces the configs' device keys. A YAML mistake,
    an override of a key that exists in no config (:func:`~ldm.training.config_check.check_overrides`) and an
    unknown target or parameter anywhere in the tree (:func:`~ldm.training.config_check.check_config_tree`) raise
    ``UsageError`` with one line naming the file or key path and the closest valid name.
    """
    from ldm.training.config_check import check_config_tree, check_overrides

    try:
        configs = [load_yaml(path) for path in paths]
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (given with -b/--base or found in the resumed run's configs/)") from err
    except ConfigError as err:
        raise UsageError(str(err)) from err
    base = OmegaConf.merge(*configs) if configs else OmegaConf.create()
    cli = parse_overrides(overrides)
    cli_trainer = OmegaConf.select(cli, "lightning.trainer")
    if cli_trainer is not None and any(k in cli_trainer for k in DEVICE_KEYS):
        base_trainer = OmegaConf.select(base, "lightning.trainer")
        if base_trainer is not None:
            for key in DEVICE_KEYS:
                base_trainer.pop(key, None)
    try:
        check_overrides(base, overrides)
        merged = OmegaConf.merge(base, cli)
        check_config_tree(merged)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    return merged


def check_resume(ckpt: str, model: Any, training: bool) -> Optional[str]:
    """``main.py``'s check of the checkpoint it resumes from, before Lightning loads it: read with
    ``weights_only=True`` (``LDM_UNSAFE_LOAD=1`` opts out), a Lightning checkpoint, weights that fit ``model``.
    Raises ``UsageError`` (one line) otherwise. Returns the run id the checkpoint carries (None: none)."""
    from ldm.training.config_check import check_resume_checkpoint

    try:
        return check_resume_checkpoint(ckpt, model, training)
    except ValueError as err:
        raise UsageError(f"cannot resume: {err}") from err


def resolve_run_id(paths: "RunPaths", opt: argparse.Namespace, ckpt_run_id: Optional[str]) -> str:
    """The id of this run (:mod:`ldm.training.run_identity`): a fresh run's new one (DDP processes take rank 0's);
    on ``-r`` the run's ``run.json`` id, after checking that the checkpoint carries it (``UsageError`` otherwise,
    unless ``--allow-other-run``)."""
    from ldm.training.run_identity import RUN_ID_ENV, check_same_run, new_run_id, read_run_id

    if opt.resume and paths.ckpt:
        try:
            return check_same_run(paths.ckpt, ckpt_run_id, paths.logdir, read_run_id(paths.logdir),
                                  bool(getattr(opt, "allow_other_run", False)))
        except ValueError as err:
            raise UsageError(f"cannot resume: {err}") from err
    inherited = os.environ.get(RUN_ID_ENV)
    if inherited and _is_launched_child():
        return inherited
    return new_run_id()


@dataclass
class RunPaths:
    """Where a run writes: ``logdir`` and its ``checkpoints/``, ``configs/``; ``ckpt`` to resume from."""

    logdir: str
    nowname: str
    now: str
    ckpt: Optional[str]
    resumed_configs: list[str]

    @property
    def ckptdir(self) -> str:
        return os.path.join(self.logdir, "checkpoints")

    @property
    def cfgdir(self) -> str:
        return os.path.join(self.logdir, "configs")


def timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def run_name(now: str, name: str, base: Sequence[str], postfix: str) -> str:
    """CompVis naming: ``<now>_<name>`` or ``<now>_<first config's stem>``, then the postfix."""
    if name:
        suffix = "_" + name
    elif base:
        suffix = "_" + os.path.splitext(os.path.basename(base[0]))[0]
    else:
        suffix = ""
    return now + suffix + postfix


def resolve_resume(resume: str) -> tuple[str, str]:
    """``-r`` value -> (run directory, checkpoint path), found by :func:`ldm.checkpoints.locate_run`: the run's
    ``checkpoints/last.ckpt``, or a checkpoint file inside a run's ``checkpoints/`` folder."""
    if not os.path.exists(resume):
        raise FileNotFoundError(f"cannot resume: {resume} does not exist. Pass a run directory (logs/RUN) or a "
                                f"checkpoint inside it (logs/RUN/checkpoints/last.ckpt)")
    from ldm.checkpoints import locate_run  # imports torch: not needed before parsing (main.py --help stays fast)

    ckpt, logdir = locate_run(resume, names=("last.ckpt",))
    if os.path.isfile(resume) and "checkpoints" not in Path(resume).parts[:-1]:
        raise UsageError(f"cannot resume from {resume}: the checkpoint is not inside a run's checkpoints/ folder, "
                         f"so the run directory is unknown. Use -n NAME --resume_from_checkpoint {resume} to "
                         f"start a new run from it")
    return logdir, ckpt


def _is_launched_child() -> bool:
    """True in a process started by Lightning's DDP launcher (or any launcher) for a rank other than 0."""
    for key in ("LOCAL_RANK", "RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.isdigit() and int(value) > 0:
            return True
    return False


def resolve_run_paths(opt: argparse.Namespace, now: Optional[str] = None) -> RunPaths:
    """The run directory and checkpoint for ``opt``; DDP children reuse the directory rank 0 chose."""
    now = now or timestamp()
    if opt.resume:
        logdir, ckpt = resolve_resume(opt.resume)
        configs = sorted(glob.glob(os.path.join(logdir, "configs", "*.yaml")))
        if not configs and not opt.base:
            raise FileNotFoundError(f"cannot resume {logdir}: no configs/*.yaml in it and no --base given")
        try:  # what the run saved may only name allow-listed targets (ldm.trust); -b configs are the user's own
            check_run_configs(configs, trust_all=bool(getattr(opt, "trust_config", False)))
            check_run_links(logdir, trust_all=bool(getattr(opt, "trust_config", False)))
        except ValueError as err:
            raise UsageError(str(err)) from err
        return RunPaths(logdir, os.path.basename(os.path.normpath(logdir)), now, ckpt, configs)
    inherited = os.environ.get(LOGDIR_ENV)
    if inherited and _is_launched_child():
        return RunPaths(inherited, os.path.basename(inherited), now, opt.resume_from_checkpoint or None, [])
    nowname = run_name(now, opt.name, opt.base, opt.postfix)
    root = os.path.join(opt.logdir, opt.project) if opt.project else opt.logdir
    logdir = os.path.join(root, nowname)
    candidate, k = logdir, 1
    while os.path.exists(candidate):  # two runs started in the same second
        candidate, k = f"{logdir}-{k}", k + 1
    ckpt = opt.resume_from_checkpoint or None
    if ckpt and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume_from_checkpoint {ckpt}: no such file")
    return RunPaths(candidate, os.path.basename(candidate), now, ckpt, [])
