"""Shared helpers of the benchmarks in bench/: arguments, devices, model sizes, timing, memory, output.

Every benchmark measures its variants side by side in one process, interleaving repetitions
(variant A, B, C, A, B, C, ...) so that slow drifts of the machine hit every variant alike, reports
median times and ratios against a baseline variant, and writes its table as JSON to bench/out/.
Absolute times are only meaningful on a named GPU; on CPU read the ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

OUT_DIR = os.path.join(ROOT, "bench", "out")
PLAIN_CONFIG = os.path.join("configs", "latent-diffusion", "ctorgan_unconditional_kl.yaml")
ANATOMICAL_CONFIG = os.path.join("configs", "latent-diffusion", "anatomical_ctorgan_kl.yaml")

# CT-Organ size (ldm_ctorgan_uncond of tests/data/compat): 64x64x3 latents of 256x256 images (f4 KL autoencoder).
CTORGAN_UNET = {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 128,
                "attention_resolutions": [32, 16, 8], "num_res_blocks": 2, "channel_mult": [1, 4, 8],
                "num_heads": 8}
CTORGAN_AE = {"embed_dim": 3, "lossconfig": {"target": "torch.nn.Identity"},
              "ddconfig": {"double_z": True, "z_channels": 3, "resolution": 256, "in_channels": 1, "out_ch": 1,
                           "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [],
                           "dropout": 0.0}}
# The register settings of the original implementation (used when the anatomical config is absent).
ANATOMICAL_UNET = {"use_anatomical_registers": True, "num_anatomical_classes": 6, "anatomical_register_dim": 256,
                   "num_registers_per_class": 4, "anatomical_attention_heads": 8,
                   "use_timestep_aware_registers": True}
# --quick: the same architecture family, small enough for ~1-3 minutes on 2 CPU cores.
QUICK_UNET = {"image_size": 16, "in_channels": 3, "out_channels": 3, "model_channels": 32,
              "attention_resolutions": [4], "num_res_blocks": 1, "channel_mult": [1, 2, 4], "num_heads": 4}
QUICK_AE = {"embed_dim": 3, "lossconfig": {"target": "torch.nn.Identity"},
            "ddconfig": {"double_z": True, "z_channels": 3, "resolution": 64, "in_channels": 1, "out_ch": 1,
                         "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "attn_resolutions": [],
                         "dropout": 0.0}}
QUICK_ANATOMICAL = {"use_anatomical_registers": True, "num_anatomical_classes": 6, "anatomical_register_dim": 32,
                    "num_registers_per_class": 2, "anatomical_attention_heads": 4,
                    "use_timestep_aware_registers": True}


# ----------------------------------------------------------------------------------------- arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (~1-3 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (after 1 warm-up)")
    parser.add_argument("--out", default=None, help="JSON output path (default bench/out/<name>[_quick].json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: OMP_NUM_THREADS when "
                        "set, else 1 on CPU, so that process CPU time is not inflated by busy-waiting worker threads)")
    parser.add_argument("--metric", default=None, choices=("wall", "cpu"),
                        help="time used for ratios (default: wall on CUDA, process CPU time on CPU)")
    return parser


def setup(args: argparse.Namespace) -> torch.device:
    """Device, seed and threads: on CPU one thread unless ``--threads`` says otherwise, so that the
    process CPU time the ratios use is not inflated by worker threads busy-waiting."""
    device = resolve_device(args.device)
    configure_threads(args.threads or (1 if device.type == "cpu" else "auto"), device.type == "cpu")
    torch.manual_seed(0)
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------------------- models
def _strip_ckpt(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_ckpt(v) for k, v in node.items() if k != "ckpt_path"}
    if isinstance(node, list):
        return [_strip_ckpt(v) for v in node]
    return node


def _config_params(path: str) -> Optional[dict]:
    """The ``model`` section (as a plain dict, checkpoint paths removed) of a repo config, or None if absent."""
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return None
    from omegaconf import OmegaConf

    return _strip_ckpt(OmegaConf.to_container(OmegaConf.load(full).model, resolve=True))


def model_config(kind: str, quick: bool) -> tuple[dict, str]:
    """``({target, params}, source)`` of the plain or anatomical LDM at CT-Organ size (or the quick size).

    At full size the repo's CT-Organ configs are used when present (UNet and autoencoder shapes as
    trained); otherwise the built-in CT-Organ shapes. ``source`` says which.
    """
    if kind not in ("plain", "anatomical"):
        raise ValueError(f"kind must be 'plain' or 'anatomical', got {kind!r}")
    if not quick:
        cfg = _config_params(PLAIN_CONFIG if kind == "plain" else ANATOMICAL_CONFIG)
        if cfg is not None:
            cfg["params"]["use_ema"] = False
            cfg["params"].pop("scheduler_config", None)
            return cfg, PLAIN_CONFIG if kind == "plain" else ANATOMICAL_CONFIG
    unet = dict(QUICK_UNET if quick else CTORGAN_UNET)
    target = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    ldm_target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    if kind == "anatomical":
        unet.update(QUICK_ANATOMICAL if quick else ANATOMICAL_UNET)
        target = "ldm.modules.diffusionmodules.anatomical_openaimodel.AnatomicalUNetModel"
        ldm_target = "ldm.models.diffusion.anatomical_ddpm.AnatomicalLatentDiffusion"
    params = {"linear_start": 0.0015, "linear_end": 0.0205, "timesteps": 1000, "loss_type": "l1",
              "first_stage_key": "image", "image_size": unet["image_size"], "channels": 3, "use_ema": False,
              "monitor": "val/loss", "cond_stage_config": "__is_unconditional__", "conditioning_key": None,
              "unet_config": {"target": target, "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": QUICK_AE if quick else CTORGAN_AE}}
    if kind == "anatomical":
        params.update({"anatomical_loss_weight": 0.1, "progressive_anatomical_training": True,
                       "anatomical_warmup_steps": 5000})
    return {"target": ldm_target, "params": params}, "built-in " + ("quick" if quick else "CT-Organ") + " shapes"


def build_model(kind: str, quick: bool, device: torch.device, seed: int = 0, **unet_overrides: Any
                ) -> tuple[torch.nn.Module, str]:
    """Instantiate the LDM (same seed -> same weights), move it to ``device``, train mode."""
    from ldm.util import instantiate_from_config

    cfg, source = model_config(kind, quick)
    cfg = copy.deepcopy(cfg)
    cfg["params"]["unet_config"]["params"].update(unet_overrides)
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg).to(device)
    model.train()
    return model, source


def latent_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    unet = model.unet
    return (model.channels, int(unet.image_size), int(unet.image_size))


def image_size_of(model: torch.nn.Module) -> int:
    """Pixel size of the first stage's images (the masks' size)."""
    dd = getattr(model.first_stage_model, "encoder", None)
    res = getattr(dd, "resolution", None)
    if res is None:
        return latent_shape(model)[-1] * 4
    return int(res)


def set_checkpointing(unet: torch.nn.Module, enabled: Any) -> None:
    """Switch gradient checkpointing on or off in place: ``True`` every block (and the UNet's own flag,
    which AnatomicalUNetModel uses for its register attention), ``"registers"`` only the UNet's flag."""
    for module in unet.modules():
        flag = bool(enabled) if (enabled != "registers" or module is unet) else False
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = flag
        if hasattr(module, "checkpoint") and isinstance(getattr(module, "checkpoint"), bool):
            module.checkpoint = flag


def autocast(device: torch.device, precision: str):
    """Autocast context for "fp32" (none), "bf16" or "fp16" mixed precision on ``device``."""
    if precision == "fp32":
        return nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, float, float]:
    """``(wall, process CPU, user, system)`` seconds of ``fn()`` (CUDA work synchronised).

    On CPU the system part is mostly page faults on freshly allocated memory (activations)."""
    sync(device)
    start, cpu, times = time.perf_counter(), time.process_time(), os.times()
    fn()
    sync(device)
    end = os.times()
    return (time.perf_counter() - start, time.process_time() - cpu, end.user - times.user,
            end.system - times.system)


def interleaved(variants: Sequence[str], run: Callable[[str], Sequence[float]], reps: int, warmup: int = 1,
                log: Callable[[str], None] = print) -> dict[str, dict[str, list[float]]]:
    """``{variant: {"wall": [s, ...], "cpu": [...], "user": [...], "sys": [...]}}`` (``run`` returns what
    :func:`time_call` returns): ``warmup`` untimed rounds, then ``reps`` rounds of every variant in turn.

    On a CPU shared with other work, wall time measures the load as much as the code; process CPU time
    with ``--threads 1`` (no busy-waiting worker threads) is the robust CPU measure there.
    """
    for _ in range(warmup):
        for name in variants:
            run(name)
    keys = ("wall", "cpu", "user", "sys")
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in keys} for name in variants}
    for rep in range(reps):
        for name in variants:
            for key, value in zip(keys, run(name)):
                times[name][key].append(value)
        log(f"  round {rep + 1}/{reps}: " + ", ".join(
            f"{n} {times[n]['wall'][-1]:.3f}s (cpu {times[n]['cpu'][-1]:.3f}s)" for n in variants))
    return times


def default_metric(device: torch.device) -> str:
    """The time the ratios use: wall on CUDA, process CPU time on CPU (robust to other load)."""
    return "wall" if device.type == "cuda" else "cpu"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# ----------------------------------------------------------------------------------------- memory
class LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of tensor storages created while active that are still alive, and their peak.

    Works on every device (used on CPU, where torch has no allocator statistics): every op's outputs
    are registered by storage (views share it); a storage whose weak reference has expired is freed.
    Tensors created before the mode (parameters, optimiser state) are not counted, so ``peak`` is the
    step's own memory: activations saved for backward, gradients and temporaries.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes = storage.nbytes()
        key = storage.data_ptr()
        if nbytes == 0 or key == 0:
            return
        entry = self._live.get(key)
        if entry is not None and not entry[0].expired():
            return
        self._sweep()
        self._live[key] = (self._ref(storage), nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def live_bytes(self) -> int:
        self._sweep()
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for leaf in torch.utils._pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


@contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict]:
    """Peak CUDA memory allocated inside the block (bytes, in the yielded dict's "peak")."""
    result: dict[str, int] = {}
    if device.type != "cuda":
        yield result
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    yield result
    sync(device)
    result["peak"] = torch.cuda.max_memory_allocated(device)
    result["peak_above_start"] = result["peak"] - base


def mib(nbytes: Optional[float]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


# ----------------------------------------------------------------------------------------- output
def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_json(name: str, args: argparse.Namespace, device: torch.device, payload: dict) -> str:
    path = args.out or os.path.join(OUT_DIR, f"{name}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    record = {"benchmark": name, "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "device": device_name(device), "torch": torch.__version__, "quick": bool(args.quick),
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {os.path.relpath(path, ROOT)}")
    return path
