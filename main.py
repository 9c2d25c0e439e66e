"""Training entry point with the CompVis latent-diffusion command line, on PyTorch Lightning 2.

    python main.py --base configs/autoencoder/autoencoder_kl_64x64x3.yaml -t --gpus 0,1
    python main.py -r logs/2024-01-01T00-00-00_autoencoder_kl_64x64x3          # continue that run
    python main.py --base CONFIG.yaml -t --accelerator cpu --max_steps 100 lightning.trainer.log_every_n_steps=5

See README.md (training) for all flags; the pieces live in ``ldm.training``.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Any, Optional, Sequence

from ldm.training.cli import (
    LOGDIR_ENV,
    RunPaths,
    UsageError,
    check_resume,
    effective_learning_rate,
    lightning_trainer_kwargs,
    load_configs,
    parse_args,
    resolve_run_id,
    resolve_run_paths,
    trainer_settings,
)

__all__ = ["CUDACallback", "DataModuleFromConfig", "ImageLogger", "LearningRateMonitor", "NonFiniteLossError",
           "SetupCallback", "WrappedDataset", "main", "worker_init_fn"]

# Names CompVis configs use as ``main.X`` targets (main.ImageLogger, main.DataModuleFromConfig,
# main.LearningRateMonitor, ...) are looked up in these modules on first use (PEP 562), so that parsing the
# command line (``main.py --help``) imports neither torch nor Lightning.
_REEXPORT_MODULES = ("ldm.training.callbacks", "ldm.training.data", "pytorch_lightning.callbacks")


def __getattr__(name: str) -> Any:
    import importlib

    if not name.startswith("__"):
        for module in _REEXPORT_MODULES:
            value = getattr(importlib.import_module(module), name, None)
            if value is not None:
                return value
    raise AttributeError(f"module 'main' has no attribute {name!r}")


logger = logging.getLogger("main")

COMPLETE_MARKER = "training_complete.json"  # written into the run directory when training reached its end


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _info(msg: str, level: int = logging.INFO) -> None:
    """Log on global rank 0 only (every DDP process runs this script)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        logger.log(level, msg)


def _model_monitor(model: Any, lightning_config: Any) -> Optional[str]:
    mc = lightning_config.get("modelcheckpoint") or {}
    params = mc.get("params") or {}
    if params.get("monitor"):
        return str(params["monitor"])
    return getattr(model, "monitor", None)


def build_callbacks(paths: RunPaths, opt: argparse.Namespace, config: Any, lightning_config: Any,
                    model: Any, data: Any, trainer_kwargs: dict[str, Any]) -> list[Any]:
    """Default callbacks (CompVis keys, overridable under ``lightning.callbacks``) plus checkpoints."""
    from omegaconf import OmegaConf

    from ldm.training.callbacks import (ConfiguredLearningRate, FaultCheckpoint, LastCheckpoint, MonitoredCheckpoint,
                                        NonFiniteLossGuard, SetupCallback)
    from ldm.util import instantiate_from_config

    defaults = {
        "setup_callback": {"target": "main.SetupCallback", "params": {
            "resume": opt.resume, "now": paths.now, "logdir": paths.logdir, "ckptdir": paths.ckptdir,
            "cfgdir": paths.cfgdir, "config": config, "lightning_config": lightning_config}},
        "image_logger": {"target": "main.ImageLogger",
                         "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
    }
    user = lightning_config.get("callbacks") or OmegaConf.create()
    merged = OmegaConf.merge(OmegaConf.create({k: v for k, v in defaults.items() if k != "setup_callback"}), user)
    callbacks = [SetupCallback(**defaults["setup_callback"]["params"])]
    for key, cfg in merged.items():
        if key == "setup_callback":
            continue
        if cfg.get("target") in ("pytorch_lightning.callbacks.ModelCheckpoint", "main.ModelCheckpoint") and \
                "dirpath" not in (cfg.get("params") or {}):
            cfg = OmegaConf.merge(cfg, {"params": {"dirpath": os.path.join(paths.ckptdir, str(key))}})
        callbacks.append(instantiate_from_config(cfg))

    mc = lightning_config.get("modelcheckpoint") or {}
    mc_params = dict(OmegaConf.to_container(mc.get("params") or OmegaConf.create(), resolve=True))
    last = LastCheckpoint(paths.ckptdir, every_n_train_steps=int(mc_params.pop("every_n_train_steps", 0) or 0))
    callbacks += [last, NonFiniteLossGuard(last), FaultCheckpoint(last), ConfiguredLearningRate()]

    monitor = _model_monitor(model, lightning_config)
    has_val = data is None or not hasattr(data, "has_split") or data.has_split("validation")
    no_val = trainer_kwargs.get("limit_val_batches") == 0 or not has_val
    if monitor and no_val:
        _info(f"model monitor {monitor!r} is not checked: this run has no validation; keeping only "
              f"checkpoints/last.ckpt", logging.WARNING)
    elif monitor:
        mc_params.pop("save_last", None)
        params = {"dirpath": paths.ckptdir, "filename": "{epoch:06}-{step:09}", "verbose": True,
                  "save_top_k": 3, "monitor": monitor, "save_last": False, **mc_params}
        params["monitor"] = monitor
        callbacks.append(MonitoredCheckpoint(**params))
        _info(f"checkpoints: top-{params['save_top_k']} on {monitor!r} plus last.ckpt in {paths.ckptdir}")
    else:
        _info(f"checkpoints: the model declares no monitor; keeping last.ckpt in {paths.ckptdir}")
    return callbacks


def build_loggers(paths: RunPaths, lightning_config: Any) -> list[Any]:
    """CSVLogger in the run directory (TensorBoard too when installed), or ``lightning.logger`` if given."""
    import importlib.util

    from omegaconf import OmegaConf
    from pytorch_lightning.loggers import CSVLogger

    from ldm.util import instantiate_from_config

    cfg = lightning_config.get("logger")
    if cfg:
        if "TestTube" in str(cfg.get("target", "")):
            _info("TestTubeLogger does not exist in Lightning 2; using CSVLogger instead", logging.WARNING)
        else:
            cfg = OmegaConf.merge({"params": {"save_dir": paths.logdir}}, cfg)
            return [instantiate_from_config(cfg)]
    loggers: list[Any] = [CSVLogger(save_dir=paths.logdir, name="csv")]
    if importlib.util.find_spec("tensorboard") is not None:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=paths.logdir, name="tensorboard"))
    return loggers


def _set_learning_rate(model: Any, config: Any, trainer_kwargs: dict[str, Any], num_devices: int,
                       scale_lr: bool) -> None:
    base_lr = config.model.get("base_learning_rate")
    if base_lr is None:
        _info("model.base_learning_rate is not set; the model keeps its own learning rate", logging.WARNING)
        return
    batch_size = int(config.data.params.batch_size) if "data" in config and "params" in config.data \
        and "batch_size" in config.data.params else 1
    lr, how = effective_learning_rate(float(base_lr), batch_size, num_devices,
                                      int(trainer_kwargs.get("num_nodes") or 1),
                                      int(trainer_kwargs.get("accumulate_grad_batches") or 1), scale_lr)
    model.learning_rate = lr
    _info(how)


def _check_complete(config: Any) -> None:
    """Mandatory values (``???``) and interpolations (``${oc.env:VAR}``) must resolve before anything is built."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    missing = sorted(OmegaConf.missing_keys(config))
    if missing:
        raise UsageError(f"the config leaves {missing} to be set (???): pass them as overrides, e.g. {missing[0]}=...")
    try:
        OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise UsageError(f"the config does not resolve: {err}. Set the environment variable or pass an "
                         f"override for that key") from err


def _adapt_to_manual_optimisation(model: Any, trainer_kwargs: dict[str, Any]) -> None:
    """Models that optimise manually (AutoencoderKL: generator and discriminator steps) cannot use Lightning's
    gradient accumulation (CompVis autoencoder configs ask for 2) and leave parameters without gradient in each
    backward, which plain DDP rejects."""
    manual = getattr(model, "automatic_optimization", True) is False
    accumulate = int(trainer_kwargs.get("accumulate_grad_batches") or 1)
    if manual and accumulate > 1:
        trainer_kwargs.pop("accumulate_grad_batches")
        _info(f"accumulate_grad_batches={accumulate} ignored: {type(model).__name__} optimises manually and Lightning 2 "
              f"cannot accumulate for it; each batch is one step (raise data.params.batch_size for a larger batch)",
              logging.WARNING)
    if trainer_kwargs.get("strategy") == "ddp" and (manual or getattr(model, "ddp_find_unused_parameters", False)):
        trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
        _info("strategy ddp_find_unused_parameters_true (the model optimises manually with several optimisers)")


def run(opt: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Build everything from ``opt`` and the overrides, then train and/or test. Returns an exit code."""
    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf
    from pytorch_lightning.utilities.model_helpers import is_overridden

    from ldm.threads import configure_threads
    from ldm.threads import describe as describe_threads
    from ldm.training.callbacks import FaultCheckpoint
    from ldm.training.checkpoint_io import with_atomic_checkpoint_io
    from ldm.training.config_check import load_kwargs
    from ldm.training.data import DataModuleFromConfig
    from ldm.training.fit_checks import check_data_for_model
    from ldm.training.run_identity import RUN_ID_ENV, RunIdentity
    from ldm.util import instantiate_from_config

    paths = resolve_run_paths(opt)
    os.environ[LOGDIR_ENV] = paths.logdir  # DDP processes launched by this one log into the same run
    base = paths.resumed_configs + list(opt.base)
    config = load_configs(base, overrides)
    lightning_config = config.pop("lightning", OmegaConf.create())
    if "model" not in config:
        raise UsageError(f"no 'model' section in the configs {base}")
    _check_complete(config)
    settings = trainer_settings(lightning_config.get("trainer"), opt)
    lightning_config.trainer = settings
    trainer_kwargs, spec, notes = lightning_trainer_kwargs(settings)
    for note in notes:
        _info(note)
    if paths.ckpt:
        _info(f"resuming from {paths.ckpt} into {paths.logdir}")

    on_cpu = spec.accelerator == "cpu" or (spec.accelerator == "auto" and not torch.cuda.is_available())
    try:
        governor = configure_threads(opt.threads, on_cpu)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _info(describe_threads(governor))
    pl.seed_everything(opt.seed, workers=True)
    try:
        model = instantiate_from_config(config.model)
        data = instantiate_from_config(config.data) if "data" in config else None
        if isinstance(data, DataModuleFromConfig):
            data.setup()  # build the datasets now: a missing root or a bad file stops here, before any training
    except ValueError as err:
        raise UsageError(f"could not build the model or the data from the config: {err}") from err
    try:  # data that the model would train on without a word, though wrongly (ldm.training.fit_checks)
        check_data_for_model(model, data, training=bool(opt.train))
    except ValueError as err:
        raise UsageError(f"the data does not fit the model: {err}") from err
    ckpt_run_id = None
    if paths.ckpt:  # weights_only, a Lightning checkpoint, weights that fit: one line instead of Lightning's traceback
        ckpt_run_id = check_resume(paths.ckpt, model, training=bool(opt.train))
    run_id = resolve_run_id(paths, opt, ckpt_run_id)  # -r: the checkpoint must be this run's (or --allow-other-run)
    os.environ[RUN_ID_ENV] = run_id  # DDP processes launched by this one keep it
    if opt.compile:
        from ldm.modules.diffusionmodules.compile import compile_unet

        try:
            compile_unet(model, backend=opt.compile_backend, mode=opt.compile_mode)
        except ValueError as err:
            raise UsageError(str(err)) from err
    _adapt_to_manual_optimisation(model, trainer_kwargs)
    _set_learning_rate(model, config, trainer_kwargs, spec.num_devices, opt.scale_lr)

    callbacks = build_callbacks(paths, opt, config, lightning_config, model, data, trainer_kwargs)
    callbacks.append(RunIdentity(run_id, paths.logdir))
    # every checkpoint staged beside its target, fsynced, renamed (not through $TMPDIR): ldm.training.checkpoint_io
    trainer_kwargs["plugins"] = with_atomic_checkpoint_io(trainer_kwargs.get("plugins"))
    if governor is not None:
        from ldm.training.callbacks import ThreadGovernorCallback

        callbacks.append(ThreadGovernorCallback(governor))
    trainer = pl.Trainer(**trainer_kwargs, callbacks=callbacks, logger=build_loggers(paths, lightning_config),
                         default_root_dir=paths.logdir)
    _info(f"trainer: accelerator={spec.accelerator} devices={spec.devices} strategy={trainer_kwargs.get('strategy')}"
          f" num_nodes={trainer_kwargs.get('num_nodes', 1)}")
    fault = next(cb for cb in callbacks if isinstance(cb, FaultCheckpoint))
    try:
        if opt.train:
            if trainer.is_global_zero:
                _remove_marker(paths.logdir)  # a resumed run is complete again only when it reaches its end
            try:
                trainer.fit(model, data, ckpt_path=paths.ckpt, **load_kwargs(trainer.fit))
            except SystemExit:  # Lightning ends SIGTERM and Ctrl-C with SystemExit (SIGTERM with status 0)
                if fault.stop_signal is None:
                    raise
            if fault.stop_signal is not None:
                return _interrupted(fault, paths)
            if trainer.is_global_zero:
                _write_marker(paths.logdir, trainer)
        test_ok = data is None or not hasattr(data, "has_split") or data.has_split("test")
        if not opt.no_test and not trainer.interrupted:
            if test_ok and is_overridden("test_step", model):
                trainer.test(model, data, ckpt_path=None if opt.train else paths.ckpt, **load_kwargs(trainer.test))
            else:
                _info("no test split or no test_step: skipping the test stage")
    finally:
        if opt.debug and not opt.resume and trainer.is_global_zero and os.path.isdir(paths.logdir):
            target = os.path.join(os.path.dirname(paths.logdir), "debug_runs", paths.nowname)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(paths.logdir, target)
            logger.info("debug run moved to %s", target)
    return 0


def _remove_marker(logdir: str) -> None:
    try:
        os.remove(os.path.join(logdir, COMPLETE_MARKER))
    except FileNotFoundError:
        pass


def _write_marker(logdir: str, trainer: Any) -> None:
    """Mark the run complete: training reached its end (max_steps, max_epochs or a stopping callback)."""
    import time

    from ldm.atomic_io import write_json

    path = os.path.join(logdir, COMPLETE_MARKER)
    write_json(path, {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                      "checkpoint": os.path.join("checkpoints", "last.ckpt"),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=None)
    _info(f"training complete at global step {trainer.global_step}: marked in {path}")


def _interrupted(fault: FaultCheckpoint, paths: RunPaths) -> int:
    """Exit status 128 + signal number for a run stopped by a signal (last.ckpt saved, no completion marker)."""
    assert fault.stop_signal is not None
    last = fault.last
    if last.has_file:
        _info(f"training interrupted by {fault.stop_signal.name}: {last.path} holds global step {last.last_saved_step}"
              f"; continue with: python main.py -r {paths.logdir} -t", logging.WARNING)
    else:
        _info(f"training interrupted by {fault.stop_signal.name} before a step was saved; no new checkpoint was "
              f"written", logging.WARNING)
    return 128 + int(fault.stop_signal)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train/test; user errors exit with code 2 and one message, a file
    that could not be written (a full disk: :class:`ldm.atomic_io.WriteError`, naming it and what remains) with
    code 1 and one message."""
    from ldm.atomic_io import WriteError

    opt, overrides = parse_args(argv)
    _configure_logging(opt.debug)
    try:
        return run(opt, overrides)
    except (UsageError, FileNotFoundError) as err:
        sys.stderr.write(f"main.py: error: {err}\n")
        return 2
    except WriteError as err:
        if os.environ.get("LDM_TRACEBACK"):
            raise
        sys.stderr.write(f"main.py: error: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
