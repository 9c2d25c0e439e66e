"""Every GPU measurement of the project in one command, for short GPU slots (issue: speed and scale).

    make gpu-check                                  # = python bench/gpu_check.py
    python bench/gpu_check.py [--budget-s 480] [--out bench/out/gpu.json] [--sections a,b,...]
    python bench/gpu_check.py --cpu-dry-run         # the same code paths at toy sizes on the CPU (tests run it)

Sections, in order (each one's failure is recorded and the next one runs); the timed ones run first, on a
quiet GPU:
  env       device, torch/CUDA versions, and the measured dense bf16 matmul peak (8192^3 products)
  train     training step at the CT-Organ config (the configs' UNet, 64x64x3 latents, their per-GPU batch 16):
            plain vs anatomical model x fp32 / bf16-mixed / bf16-mixed + torch.compile (``--compile-kinds``);
            images/s, peak CUDA memory, finite losses, model-FLOP utilisation (FLOPs counted with torch's
            counter, against the measured bf16 peak); fused AdamW
  sampling  DDIM 50 steps vs DPM-Solver++(2M) 20 steps, bf16 autocast, batch 16 and 64, images/s with the
            first-stage decode
  anatomy   the anatomy benchmark v2 (bench/anatomy.py, ``--anatomy-preset``, default ``cpu`` = the scale of
            bench/PROTOCOL.md): one worker process per (arm, development seed) sharing one run directory, started
            here and stopped at the deadline; each finished task is a record (``records/``, to commit under
            bench/records/); then a report over the records and a tarball of
            the run's results (no weights) beside the JSON. It runs in the background while:
  tests     the CUDA-marked tests (``pytest -m gpu``)
  main      main.py end to end with --precision bf16-mixed: the demo phantom autoencoder (50 batches), the
            anatomical demo LDM on it (100 steps, image logging on), then ``-r`` to 130 steps; checks finite
            logged losses, a written last.ckpt and that the resume continued from step 100

Results: ``--out`` (JSON, rewritten after every section) and the same name with ``.md`` (a Markdown table);
a summary is printed at the end. The exit status is 1 when a section failed. ``--budget-s`` bounds the
whole command: sections that no longer fit are recorded as skipped, and the anatomy section stops its
workers at the deadline.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from ldm.checkpoints import read_checkpoint  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

SECTIONS = ("env", "train", "registers", "sampling", "anatomy", "tests", "main")
REGISTER_VARIANTS = ("plain", "shipped", "lean", "lean_low")
TRAIN_MODES = ("fp32", "bf16", "bf16+compile")


class Incomplete(RuntimeError):
    """A section ran correctly but its budget ended first (recorded as "incomplete", not as a failure)."""


class Check:
    """Shared state of one gpu_check run: device, sizes, deadline, results (written after every section)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dry = bool(args.cpu_dry_run)
        self.device = torch.device("cpu") if self.dry else resolve_device("cuda")
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work or os.path.join(os.path.dirname(self.out), "gpu_check_work"))
        self.results: dict[str, Any] = {"command": "python " + " ".join(["bench/gpu_check.py"] + sys.argv[1:]),
                                        "dry_run": self.dry, "budget_s": args.budget_s, "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.out), exist_ok=True)
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, self.out)
        with open(os.path.splitext(self.out)[0] + ".md", "w") as f:
            f.write(markdown(self.results))


# ------------------------------------------------------------------------------------------------- env
def section_env(ck: Check) -> dict[str, Any]:
    dev = ck.device
    info: dict[str, Any] = {"device": common.device_name(dev), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "revision": _revision()}
    try:
        import pytorch_lightning as pl

        info["lightning"] = pl.__version__
    except ImportError:  # pragma: no cover - a dependency
        info["lightning"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update({"capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
                     "memory_gib": round(props.total_memory / 2 ** 30, 1)})
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = q.stdout.strip()
    n, dtype = (512, torch.float32) if ck.dry else (8192, torch.bfloat16)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 3 if ck.dry else 10
    common.sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    common.sync(dev)
    seconds = (time.perf_counter() - t0) / reps
    info["matmul"] = {"n": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps, "seconds": seconds}
    info["peak_tflops"] = 2 * n ** 3 / seconds / 1e12
    ck.results["peak_tflops"] = info["peak_tflops"]
    return info


def _revision() -> Optional[str]:
    """The code measured: a ``REVISION`` file at the root (a snapshot without .git), else ``git describe``."""
    path = os.path.join(common.ROOT, "REVISION")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=common.ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


# ------------------------------------------------------------------------------------------------ tests
def section_tests(ck: Check) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    timeout = max(30.0, min(240.0, ck.left() - 60))
    proc = subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", "\n".join(tail))}
    # exit 5 = nothing collected (no test marked gpu)
    ok = proc.returncode == 0 and counts.get("failed", 0) == 0 and counts.get("error", counts.get("errors", 0)) == 0
    if not ok:
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: " + " | ".join(tail[-5:]))
    if not ck.dry and counts.get("passed", 0) == 0:
        raise RuntimeError("pytest -m gpu ran no test on the GPU: " + " | ".join(tail[-3:]))
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "counts": counts, "tail": tail[-3:]}


# -------------------------------------------------------------------------------------------- registers
def section_registers(ck: Check) -> dict[str, Any]:
    """``bench/register_cost.py`` at the CT-Organ config (the dry run: its quick size): plain, shipped and lean
    anatomical steps side by side, fp32 eager: FLOPs, kernels, host syncs and wall-time ratios."""
    import register_cost

    if ck.left() < 60:
        raise TimeoutError("less than 60 s left for the register-cost section")
    size, batch = ("quick", 2) if ck.dry else ("ctorgan", _ctorgan_batch())
    res = register_cost.run(size, list(REGISTER_VARIANTS), batch=batch, reps=3 if ck.dry else 5, device=ck.device)
    return {"size": size, "batch": batch, "rows": [{"variant": v, **{k: row[k] for k in (
        "register_layers", "flops_x_plain", "params_x_plain", "kernels", "kernels_x_plain", "host_syncs",
        "median_s", "time_x_plain")}} for v, row in res["variants"].items()]}


# ------------------------------------------------------------------------------------------------ train
def _ctorgan_batch() -> int:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(common.ROOT, common.ANATOMICAL_CONFIG))
    return int(cfg.data.params.batch_size)


def _optimizer(params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # fused AdamW: one kernel per step on CUDA
    return torch.optim.AdamW(params, lr=1e-6, fused=fused) if fused else torch.optim.AdamW(params, lr=1e-6)


def train_flops(model: Any, kind: str, device: torch.device) -> int:
    """FLOPs of one training sample (forward + backward of the LDM loss from latents), torch's op formulas."""
    from flops import TotalFlops

    c, h, w = common.latent_shape(model)
    z = torch.randn(1, c, h, w, device=device)
    t = torch.full((1,), 500, device=device, dtype=torch.long)
    extra = {}
    if kind == "anatomical":
        size = common.image_size_of(model)
        extra["anatomy_target"] = torch.randint(0, 6, (1, size, size), device=device)
    with TotalFlops() as counter:
        loss, _ = model.p_losses(z, None, t, **extra)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.total)


class TrainBench:
    """One model per kind; a fixed batch; ``run(mode)`` times training steps in that precision/compile mode."""

    def __init__(self, ck: Check, kind: str, batch: int) -> None:
        self.ck, self.kind, self.batch = ck, kind, batch
        dev = ck.device
        self.model, self.source = common.build_model(kind, ck.dry, dev)
        self.unet = self.model.model.diffusion_model
        self.opt = _optimizer([p for p in self.model.model.parameters() if p.requires_grad], dev)
        g = torch.Generator().manual_seed(0)
        c, h, w = common.latent_shape(self.model)
        self.z = torch.randn(batch, c, h, w, generator=g).to(dev)
        self.noise = torch.randn(batch, c, h, w, generator=g).to(dev)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(dev)
        size = common.image_size_of(self.model)
        coarse = torch.randint(0, 6, (batch, 8, 8), generator=g)
        self.mask = coarse.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2).to(dev)
        self.compiled: Optional[tuple[Any, Any]] = None

    def _compile(self) -> tuple[Any, Any]:
        backend = self.ck.args.compile_backend or ("aot_eager" if self.ck.dry else "inductor")
        fwd = torch.compile(self.unet, backend=backend)
        anat = torch.compile(self.unet.forward_with_anatomy, backend=backend) \
            if hasattr(self.unet, "forward_with_anatomy") else None
        return fwd, anat

    def step(self, mode: str) -> float:
        extra = {"anatomy_target": self.mask} if self.kind == "anatomical" else {}
        precision = "fp32" if mode == "fp32" else "bf16"
        swapped = None
        if mode.endswith("+compile"):
            if self.compiled is None:
                self.compiled = self._compile()
            swapped = self.unet
            self.model.model.diffusion_model = self.compiled[0]
            if self.compiled[1] is not None:  # the anatomical training step calls forward_with_anatomy
                self.unet.forward_with_anatomy = self.compiled[1]
        try:
            with common.autocast(self.ck.device, precision):
                loss, _ = self.model.p_losses(self.z, None, self.t, noise=self.noise, **extra)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        finally:
            if swapped is not None:
                self.model.model.diffusion_model = swapped
                swapped.__dict__.pop("forward_with_anatomy", None)
        return loss.detach()

    def run(self, mode: str, warmup: int, steps: int) -> dict[str, Any]:
        dev = self.ck.device
        common.sync(dev)
        t0 = time.perf_counter()
        losses = [self.step(mode) for _ in range(warmup)]
        common.sync(dev)
        warm_s = time.perf_counter() - t0
        with common.cuda_peak(dev) as peak:
            t0 = time.perf_counter()
            losses += [self.step(mode) for _ in range(steps)]
            common.sync(dev)
            seconds = time.perf_counter() - t0
        values = [float(v) for v in losses]
        return {"kind": self.kind, "mode": mode, "batch": self.batch, "steps": steps, "warmup_steps": warmup,
                "warmup_s": warm_s, "step_s": seconds / steps, "images_per_s": self.batch * steps / seconds,
                "peak_mem_gib": peak["peak"] / 2 ** 30 if "peak" in peak else None,
                "losses_finite": all(math.isfinite(v) for v in values), "last_loss": values[-1]}


def section_train(ck: Check) -> dict[str, Any]:
    batch = 2 if ck.dry else _ctorgan_batch()
    warmup, steps = (1, 2) if ck.dry else (2, 8)
    out: dict[str, Any] = {"batch": batch, "timed_steps": steps, "rows": [], "skipped": []}
    peak = ck.results.get("peak_tflops")
    for kind in ("plain", "anatomical"):
        bench = TrainBench(ck, kind, batch)
        flops = train_flops(bench.model, kind, ck.device)
        out[f"{kind}_model"] = {"source": bench.source, "train_gflop_per_sample": flops / 1e9,
                                "unet_params_m": sum(p.numel() for p in bench.unet.parameters()) / 1e6}
        for mode in TRAIN_MODES:
            if mode.endswith("compile") and kind not in ck.args.compile_kinds.split(","):
                out["skipped"].append(f"{kind} {mode}: not in --compile-kinds")
                continue
            need = 150 if mode.endswith("compile") and not ck.dry else 20
            if ck.left() < need + ck.args.reserve_s:
                out["skipped"].append(f"{kind} {mode}: {ck.left():.0f} s left")
                continue
            row = bench.run(mode, warmup, steps)
            row["tflops"] = flops * row["images_per_s"] / 1e12
            row["mfu_vs_bf16_peak"] = row["tflops"] / peak if peak else None
            out["rows"].append(row)
            ck.save()
        del bench
        if ck.device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["kind"]: r["images_per_s"] for r in out["rows"] if r["mode"] == "fp32"}
    for r in out["rows"]:
        r["x_fp32"] = r["images_per_s"] / base[r["kind"]] if r["kind"] in base else None
    plain = {r["mode"]: r["images_per_s"] for r in out["rows"] if r["kind"] == "plain"}
    for r in out["rows"]:
        if r["kind"] == "anatomical" and r["mode"] in plain:
            r["anatomical_step_x_plain"] = plain[r["mode"]] / r["images_per_s"]
    bad = [f"{r['kind']} {r['mode']}" for r in out["rows"] if not r["losses_finite"]]
    if bad:
        raise RuntimeError(f"non-finite training loss in {', '.join(bad)}")
    return out


# --------------------------------------------------------------------------------------------- sampling
def section_sampling(ck: Check) -> dict[str, Any]:
    from ldm.models.diffusion.dpm_solver import get_sampler

    model, source = common.build_model("plain", ck.dry, ck.device)
    model.eval()
    batches = (2, 4) if ck.dry else (16, 64)
    settings = (("ddim", 5), ("dpmpp2m", 4)) if ck.dry else (("ddim", 50), ("dpmpp2m", 20))
    # the dry run samples in fp32: a CPU without native bf16 decodes 30x slower under autocast, and the train
    # and main sections already run the bf16 paths
    precision = "fp32" if ck.dry else "bf16"
    shape = common.latent_shape(model)
    rows = []
    for batch in batches:
        for name, steps in settings:
            if ck.left() < 15 + ck.args.reserve_s:
                break
            x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(ck.device)

            def once(n_steps: int) -> tuple[int, torch.Tensor]:
                calls: list[int] = []
                with torch.no_grad(), common.autocast(ck.device, precision):
                    z, _ = get_sampler(name, model).sample(n_steps, batch, tuple(shape), x_T=x_T, eta=0.0,
                                                          verbose=False, callback=calls.append)
                    images = model.decode_first_stage(z)
                return len(calls), images

            once(2)  # warm-up (cuDNN algorithm choice, allocator) with a 2-step run
            with common.cuda_peak(ck.device) as peak:
                common.sync(ck.device)
                t0 = time.perf_counter()
                taken, images = once(steps)
                common.sync(ck.device)
                seconds = time.perf_counter() - t0
            rows.append({"sampler": name, "steps": steps, "steps_taken": taken, "batch": batch, "seconds": seconds,
                         "images_per_s": batch / seconds, "finite": bool(torch.isfinite(images).all()),
                         "image_shape": list(images.shape[1:]),
                         "peak_mem_gib": peak["peak"] / 2 ** 30 if "peak" in peak else None})
            ck.save()
    by = {(r["sampler"], r["batch"]): r["images_per_s"] for r in rows}
    for r in rows:
        ref = by.get(("ddim", r["batch"]))
        r["x_ddim"] = r["images_per_s"] / ref if ref else None
    if not all(r["finite"] for r in rows):
        raise RuntimeError("non-finite sampled images")
    return {"model_source": source, "precision": "bf16 autocast" if precision == "bf16" else precision, "rows": rows}


# -------------------------------------------------------------------------------------------- main.py
def _main_py(ck: Check, args: list[str], log: str, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "main.py"] + args
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-8:]
        raise RuntimeError(f"main.py exited {proc.returncode} ({log}): " + " | ".join(tail))
    return proc


def _latest_run(logdir: str, name: str) -> str:
    runs = sorted(glob.glob(os.path.join(logdir, f"*_{name}")))
    if not runs:
        raise RuntimeError(f"main.py wrote no run named *_{name} under {logdir}")
    return runs[-1]


def _global_step(ckpt: str) -> int:
    return int(read_checkpoint(ckpt)["global_step"])


def _logged_losses(run: str) -> list[float]:
    import csv

    values: list[float] = []
    for path in glob.glob(os.path.join(run, "csv", "*", "metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key and "loss" in key and value not in ("", None):
                        values.append(float(value))
    return values


def section_main(ck: Check) -> dict[str, Any]:
    logdir = os.path.join(ck.work, "main_logs")
    shutil.rmtree(logdir, ignore_errors=True)
    os.makedirs(logdir)
    device_args = ["--accelerator", "cpu"] if ck.dry else ["--gpus", "0,"]
    ae_steps, ldm_steps, resume_steps = (4, 3, 5) if ck.dry else (100, 100, 130)  # AE: two optimiser steps/batch
    common_args = ["-t", "--no-test", "-l", logdir, "--precision", "bf16-mixed"] + device_args
    timeout = max(60.0, ck.left() - ck.args.reserve_s)
    t0 = time.perf_counter()
    _main_py(ck, ["--base", "configs/autoencoder/demo_phantom_kl.yaml", "-n", "gc_ae"] + common_args +
             [f"lightning.trainer.max_steps={ae_steps}", "lightning.callbacks.image_logger.params.batch_frequency=50"],
             os.path.join(ck.work, "main_ae.log"), timeout)
    ae_run = _latest_run(logdir, "gc_ae")
    ae_ckpt = os.path.join(ae_run, "checkpoints", "last.ckpt")
    ae_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _main_py(ck, ["--base", "configs/latent-diffusion/demo_phantom_anatomical.yaml", "-n", "gc_ldm"] + common_args +
             [f"model.params.first_stage_config.params.ckpt_path={ae_ckpt}", f"lightning.trainer.max_steps={ldm_steps}",
              "lightning.callbacks.image_logger.params.batch_frequency=50"],
             os.path.join(ck.work, "main_ldm.log"), max(60.0, ck.left() - ck.args.reserve_s))
    ldm_s = time.perf_counter() - t0
    run = _latest_run(logdir, "gc_ldm")
    last = os.path.join(run, "checkpoints", "last.ckpt")
    if not os.path.isfile(last):
        raise RuntimeError(f"no last.ckpt in {run}")
    step_before = _global_step(last)
    t0 = time.perf_counter()
    _main_py(ck, ["-r", run, "-t", "--no-test", "--precision", "bf16-mixed"] + device_args +
             [f"lightning.trainer.max_steps={resume_steps}"],
             os.path.join(ck.work, "main_resume.log"), max(60.0, ck.left() - ck.args.reserve_s))
    resume_s = time.perf_counter() - t0
    step_after = _global_step(last)
    losses = _logged_losses(run)
    result = {"ae_run_s": ae_s, "ldm_run_s": ldm_s, "resume_run_s": resume_s, "ae_global_step": _global_step(ae_ckpt),
              "ldm_step_before_resume": step_before, "ldm_step_after_resume": step_after,
              "logged_loss_values": len(losses), "losses_finite": all(math.isfinite(v) for v in losses),
              "images_logged": len(glob.glob(os.path.join(run, "images", "**", "*.png"), recursive=True))}
    problems = []
    if step_before != ldm_steps or step_after != resume_steps:
        problems.append(f"global step {step_before} -> {step_after}, expected {ldm_steps} -> {resume_steps}")
    if not losses:
        problems.append("no loss was logged")
    elif not result["losses_finite"]:
        problems.append("a logged loss is not finite")
    if problems:
        raise RuntimeError("; ".join(problems))
    return result


# --------------------------------------------------------------------------------------------- anatomy
def _anatomy_cmd(ck: Check, run_dir: str, arms: list[str], seeds: list[int], threads: int) -> list[str]:
    """One benchmark-v2 worker (``bench/anatomy.py``): the given arms and development seeds, one record each."""
    cmd = [sys.executable, os.path.join("bench", "anatomy.py"), "-o", run_dir, "--arms", ",".join(arms),
           "--seeds", ",".join(str(s) for s in seeds), "--threads", str(threads), "--no-progress"]
    if ck.dry:
        cmd += ["--quick", "--device", "cpu"]
    else:
        cmd += ["--preset", ck.args.anatomy_preset, "--device", "cuda"]
    return cmd


def _anatomy_tasks(ck: Check) -> list[tuple[str, int]]:
    """``(arm, seed)`` per worker: ``--anatomy-arms`` (default: the protocol's arms) x ``--anatomy-seeds``
    (default: the protocol's development seeds; the dry run: the first)."""
    import records

    protocol = records.load_protocol()
    arms = ck.args.anatomy_arms.split(",") if ck.args.anatomy_arms else list(protocol["arms"])
    seeds = ([int(s) for s in ck.args.anatomy_seeds.split(",")] if ck.args.anatomy_seeds else
             list(protocol["dev_training_seeds"])[:1 if ck.dry else None])
    return [(arm, seed) for seed in seeds for arm in arms]


def _finished_tasks(run_dir: str, tasks: list[tuple[str, int]]) -> list[str]:
    return [f"{arm}_seed{seed}" for arm, seed in tasks
            if os.path.isfile(os.path.join(run_dir, "records", f"{arm}_seed{seed}.json"))]


def section_anatomy(ck: Check) -> Callable[[], dict[str, Any]]:
    """Start one worker per (arm, seed) task and return the function that waits for them (until the deadline) and
    reports, so that the sections that are not timed (tests, main.py) run meanwhile. The workers share one run
    directory: the first builds the instrument (autoencoder, judges), the others wait for it."""
    run_dir = os.path.join(ck.work, "anatomy")
    if ck.args.fresh_anatomy:
        shutil.rmtree(run_dir, ignore_errors=True)
    tasks = _anatomy_tasks(ck)
    threads = 1
    budget = ck.left() - ck.args.reserve_s - (20 if ck.dry else 45)  # the report pass needs its own time
    if budget < (20 if ck.dry else 90):
        raise TimeoutError(f"only {ck.left():.0f} s left, not enough for the anatomy benchmark")
    logs = []
    procs = []
    t0 = time.perf_counter()
    for i, (arm, seed) in enumerate(tasks):
        log = open(os.path.join(ck.work, f"anatomy_worker{i}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(_anatomy_cmd(ck, run_dir, [arm], [seed], threads), cwd=common.ROOT,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if i == 0:  # the first worker creates the run directory's settings file; the others then share it
            waited = time.perf_counter()
            while not os.path.isfile(os.path.join(run_dir, "run.json")) and procs[0].poll() is None \
                    and time.perf_counter() - waited < 120:
                time.sleep(0.5)
    return lambda: _finish_anatomy(ck, run_dir, tasks, procs, logs, t0, budget, threads)


def _finish_anatomy(ck: Check, run_dir: str, tasks: list[tuple[str, int]], procs: list[subprocess.Popen],
                    logs: list[Any], t0: float, budget: float, threads: int) -> dict[str, Any]:
    stopped = False
    while any(p.poll() is None for p in procs):
        if time.perf_counter() - t0 > budget:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
            time.sleep(3)
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            stopped = True
            break
        time.sleep(2)
    for log in logs:
        log.close()
    workers_s = time.perf_counter() - t0
    codes = [p.wait() for p in procs]
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        raise RuntimeError("the anatomy workers wrote no run.json: " + _tail(os.path.join(ck.work, "anatomy_worker0.log")))
    for lock in glob.glob(os.path.join(run_dir, "**", "*.lock"), recursive=True):
        os.remove(lock)  # left by killed workers
    done = _finished_tasks(run_dir, tasks)
    result: dict[str, Any] = {"run_dir": os.path.relpath(run_dir, common.ROOT),
                              "tasks": [f"{a}_seed{s}" for a, s in tasks], "workers": len(tasks), "threads_per_worker": threads, "workers_s": workers_s,
                              "stopped_at_budget": stopped, "worker_exit_codes": codes, "finished_tasks": done}
    if done:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.join("bench", "anatomy.py"), "--report",
                               os.path.join(run_dir, "records"), "-o", run_dir], cwd=common.ROOT,
                              capture_output=True, text=True, timeout=max(30.0, ck.left() - 5))
        result["report_s"] = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError("the anatomy report pass failed: " + " | ".join(
                (proc.stdout + proc.stderr).strip().splitlines()[-5:]))
        with open(os.path.join(run_dir, "anatomy_v2.json")) as f:
            result["summary"] = _anatomy_summary(json.load(f))
    result["tarball"] = _tar_results(ck, run_dir)
    if len(done) < len(tasks):
        raise Incomplete(f"{len(done)} of {len(tasks)} benchmark tasks finished in {workers_s:.0f} s (finished: "
                         f"{done}); the run continues with: python bench/gpu_check.py --sections anatomy "
                         f"--work {ck.work}; commit {run_dir}/records under bench/records/")
    return result


def _anatomy_summary(report: dict) -> dict[str, Any]:
    """The headline numbers of anatomy_v2.json: the primary tests and the pass rates per arm."""
    return {"protocol_hash": report.get("protocol_hash"), "primary": report.get("primary"),
            "pass_rates": report.get("pass_rates"), "cost": report.get("cost")}


def _tar_results(ck: Check, run_dir: str) -> str:
    """The run's results without model weights (JSON, NPZ, report, figures), next to ``--out``."""
    path = os.path.splitext(ck.out)[0] + "_anatomy.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in sorted(glob.glob(os.path.join(run_dir, "**", "*"), recursive=True)):
            if os.path.isfile(name) and not name.endswith((".ckpt", ".pt", ".lock", ".tmp")):
                tar.add(name, arcname=os.path.relpath(name, os.path.dirname(run_dir)))
    return os.path.basename(path)


def _tar_logs(ck: Check) -> None:
    """The scratch directory's logs (main.py runs, anatomy workers), beside ``--out``, for a failed section."""
    with tarfile.open(os.path.splitext(ck.out)[0] + "_logs.tar.gz", "w:gz") as tar:
        for name in sorted(glob.glob(os.path.join(ck.work, "*.log"))):
            tar.add(name, arcname=os.path.basename(name))


def _tail(path: str, n: int = 5) -> str:
    try:
        with open(path) as f:
            return " | ".join(f.read().strip().splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


# ---------------------------------------------------------------------------------------------- report
def markdown(res: dict[str, Any]) -> str:
    env = res["sections"].get("env", {}).get("result", {})
    lines = [f"# gpu_check{' (CPU dry run: toy sizes, numbers mean nothing)' if res['dry_run'] else ''}", "",
             f"Device: {env.get('device', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"Lightning {env.get('lightning', '?')}; measured matmul peak "
             f"{res.get('peak_tflops', float('nan')):.1f} TFLOP/s ({env.get('matmul', {}).get('dtype', '?')}).",
             f"Command: `{res['command']}`; {res.get('elapsed_s', 0):.0f} s of a {res['budget_s']:.0f} s budget.", "",
             "| section | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, sec in res["sections"].items():
        lines.append(f"| {name} | {sec['status']} | {sec.get('seconds', 0):.1f} | {sec.get('error', '')[:160]} |")
    train = res["sections"].get("train", {}).get("result")
    if train and train.get("rows"):
        lines += ["", f"Training step, batch {train['batch']} ({train['timed_steps']} timed steps after warm-up):", "",
                  "| model | mode | images/s | x fp32 | anat x plain | TFLOP/s | MFU (bf16 peak) | peak GiB | "
                  "warm-up s | finite |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in train["rows"]:
            lines.append(f"| {r['kind']} | {r['mode']} | {r['images_per_s']:.1f} | {_f(r.get('x_fp32'))} | "
                         f"{_f(r.get('anatomical_step_x_plain'))} | {r['tflops']:.1f} | {_pct(r.get('mfu_vs_bf16_peak'))} "
                         f"| {_f(r.get('peak_mem_gib'))} | {r['warmup_s']:.1f} | {'yes' if r['losses_finite'] else 'NO'} |")
    regs = res["sections"].get("registers", {}).get("result")
    if regs and regs.get("rows"):
        lines += ["", f"Register designs (bench/register_cost.py, {regs['size']} size, batch {regs['batch']}, fp32 eager):",
                  "", "| variant | register layers | FLOPs x plain | kernels | kernels x plain | host syncs | time x plain |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in regs["rows"]:
            lines.append(f"| {r['variant']} | {r['register_layers']} | {r['flops_x_plain']:.3f} | {r['kernels']} | "
                         f"{r['kernels_x_plain']:.2f} | {r['host_syncs']} | {r['time_x_plain']:.2f} |")
    samp = res["sections"].get("sampling", {}).get("result")
    if samp and samp.get("rows"):
        lines += ["", f"Sampling ({samp['precision']}, with the first-stage decode):", "",
                  "| sampler | steps | batch | images/s | x DDIM-50 | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
        for r in samp["rows"]:
            lines.append(f"| {r['sampler']} | {r['steps_taken']} | {r['batch']} | {r['images_per_s']:.1f} | "
                         f"{_f(r.get('x_ddim'))} | {_f(r.get('peak_mem_gib'))} |")
    main_res = res["sections"].get("main", {}).get("result")
    if main_res:
        lines += ["", "main.py (bf16-mixed): autoencoder {ae_run_s:.0f} s, LDM {ldm_run_s:.0f} s, resume "
                  "{resume_run_s:.0f} s; LDM global step {ldm_step_before_resume} -> {ldm_step_after_resume}; "
                  "{logged_loss_values} logged loss values, finite: {losses_finite}; {images_logged} image grids."
                  .format(**main_res)]
    anat = res["sections"].get("anatomy", {}).get("result")
    if anat:
        lines += ["", f"Anatomy benchmark: {anat['workers']} workers for {anat['workers_s']:.0f} s "
                  f"(stopped at the budget: {anat['stopped_at_budget']}); records finished: "
                  f"{', '.join(anat['finished_tasks']) or 'none'}; results in {anat.get('tarball')}."]
    return "\n".join(lines) + "\n"


def _f(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1%}"


# ------------------------------------------------------------------------------------------------ main
def _run_section(ck: Check, name: str, t0: float, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and record the section's status (ok, skipped, incomplete, failed), seconds and result; a
    callable result (work started in the background) is returned unrecorded."""
    try:
        result = fn()
        if callable(result):
            return result
        entry: dict[str, Any] = {"status": "ok", "result": result}
    except TimeoutError as err:
        entry = {"status": "skipped", "error": str(err)}
    except Incomplete as err:
        entry = {"status": "incomplete", "error": str(err)}
    except Exception as err:  # noqa: BLE001 - a failed section is recorded; the next one still runs
        entry = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    ck.results["sections"][name] = entry
    ck.save()
    print(f"   {entry['status']} in {entry['seconds']:.0f} s" + (f": {entry['error']}" if "error" in entry else ""),
          flush=True)
    return None


RUNNERS: dict[str, Callable[[Check], Any]] = {
    "env": section_env, "tests": section_tests, "train": section_train, "registers": section_registers,
    "sampling": section_sampling,
    "main": section_main, "anatomy": section_anatomy}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu-dry-run", "--cpu_dry_run", dest="cpu_dry_run", action="store_true",
                   help="run every section's code path at toy sizes on the CPU")
    p.add_argument("--budget-s", "--budget_s", dest="budget_s", type=float, default=480.0,
                   help="wall-clock budget of the whole command, seconds")
    p.add_argument("--reserve-s", "--reserve_s", dest="reserve_s", type=float, default=10.0,
                   help="seconds kept free at the end of the budget")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    p.add_argument("--out", default=os.path.join(common.OUT_DIR, "gpu.json"),
                   help="JSON results (the Markdown table goes beside it, .md)")
    p.add_argument("--work", default=None, help="scratch directory (default: gpu_check_work beside --out)")
    p.add_argument("--compile-backend", "--compile_backend", dest="compile_backend", default=None,
                   help="torch.compile backend (default: inductor on CUDA, aot_eager in the dry run)")
    p.add_argument("--compile-kinds", "--compile_kinds", dest="compile_kinds", default="anatomical,plain",
                   help="models whose training step is also timed under torch.compile")
    p.add_argument("--anatomy-arms", "--anatomy_arms", dest="anatomy_arms", default=None,
                   help="benchmark-v2 arms, one worker per arm and seed (default: the arms of bench/PROTOCOL.md)")
    p.add_argument("--anatomy-seeds", "--anatomy_seeds", dest="anatomy_seeds", default=None,
                   help="training seeds of the anatomy workers (default: the protocol's development seeds; the dry "
                        "run: the first of them)")
    p.add_argument("--anatomy-preset", "--anatomy_preset", dest="anatomy_preset", default="cpu",
                   help="bench/anatomy.py preset on the GPU (cpu = the scale of bench/PROTOCOL.md)")
    p.add_argument("--fresh-anatomy", "--fresh_anatomy", dest="fresh_anatomy", action="store_true",
                   help="start the anatomy run directory afresh (default: continue it)")
    args = p.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    if args.budget_s <= 0:
        p.error("--budget-s must be positive")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        p.error("no CUDA device here (torch.cuda.is_available() is False); use --cpu-dry-run to test the script")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.cpu_dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    ck = Check(args)
    os.makedirs(ck.work, exist_ok=True)
    wanted = args.sections.split(",")
    torch.manual_seed(0)
    pending: dict[str, tuple[Callable[[], dict[str, Any]], float]] = {}
    for name in SECTIONS:
        if name not in wanted:
            continue
        print(f"== {name} ({ck.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()

        def start(name: str = name) -> Any:
            if ck.left() < args.reserve_s:
                raise TimeoutError(f"budget spent ({ck.left():.0f} s left)")
            return RUNNERS[name](ck)

        started = _run_section(ck, name, t0, start)
        if callable(started):  # started in the background: finished after the other sections
            pending[name] = (started, t0)
            print("   started in the background", flush=True)
    for name, (finish, t0) in pending.items():
        print(f"== {name}: waiting for the background work ({ck.left():.0f} s left)", flush=True)
        _run_section(ck, name, t0, finish)
    _tar_logs(ck)
    print()
    print(markdown(ck.results))
    print(f"wrote {ck.out} and {os.path.splitext(ck.out)[0]}.md")
    return 1 if any(s["status"] == "failed" for s in ck.results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
