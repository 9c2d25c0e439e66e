"""Training-step time and memory: plain LatentDiffusion vs AnatomicalLatentDiffusion (register overhead),
fp32 vs bf16-/fp16-mixed, gradient checkpointing, channels_last and (optionally) torch.compile.

    python bench/train_step.py [--quick] [--device auto|cpu|cuda] [--batch N] [--reps N]
                               [--variants a,b,...] [--compile] [--profile]

One step = the LDM loss from latents (``p_losses``: q_sample, UNet, diffusion loss, and for the
anatomical model its segmentation/alignment loss against a mask), backward, AdamW step. The frozen
first-stage encoding is left out: it is identical for both models and would only dilute the ratios.
Memory: the step's own bytes (activations saved for backward, gradients, temporaries; parameters and
optimiser state excluded), counted per storage with ``common.LiveTensorBytes`` on every device, and
on CUDA also the allocator's peak. "act" is what is alive after the forward pass (what checkpointing
reduces); "step peak" the maximum over forward + backward.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402

# name -> (model kind, precision, checkpointing (True, False or "registers"), channels_last, compiled)
VARIANTS = {
    "plain": ("plain", "fp32", False, False, False),
    "anat": ("anatomical", "fp32", False, False, False),
    "anat+ckpt": ("anatomical", "fp32", True, False, False),
    "anat+regckpt": ("anatomical", "fp32", "registers", False, False),  # only the register attention
    "anat+bf16": ("anatomical", "bf16", False, False, False),
    "anat+fp16": ("anatomical", "fp16", False, False, False),
    "anat+cl": ("anatomical", "fp32", False, True, False),
    "anat+bf16+ckpt": ("anatomical", "bf16", True, False, False),
    "plain+ckpt": ("plain", "fp32", True, False, False),
    "plain+bf16": ("plain", "bf16", False, False, False),
    "anat+compile": ("anatomical", "fp32", False, False, True),
    # register attention 256 wide (anatomical_attention_dim: 256) instead of the level's full width
    "anat256": ("anatomical256", "fp32", False, False, False),
}
# model kinds beyond bench.common's plain/anatomical: (base kind, UNet overrides)
KIND_OVERRIDES = {"anatomical256": ("anatomical", {"anatomical_attention_dim": 256})}
DEFAULT_CPU = ["plain", "anat", "anat+ckpt", "anat+bf16", "anat+cl"]
DEFAULT_CUDA = ["plain", "anat", "anat+ckpt", "anat+bf16", "anat+fp16", "anat+cl", "anat+bf16+ckpt",
                "plain+bf16"]


class Runner:
    """One model per kind (shared by its variants, same seed -> same initial weights), fixed batch."""

    def __init__(self, quick: bool, device: torch.device, batch: int) -> None:
        self.quick, self.device, self.batch = quick, device, batch
        self.models: dict[str, Any] = {}
        self.optims: dict[str, torch.optim.Optimizer] = {}
        self.sources: dict[str, str] = {}
        self.scaler = torch.amp.GradScaler(device.type) if device.type == "cuda" else None
        self.finite: dict[str, bool] = {}
        self.losses: dict[str, list[float]] = {}
        self.compiled: dict[str, Any] = {}
        self.compiled_anatomy: dict[str, Any] = {}

    def model(self, kind: str) -> Any:
        if kind not in self.models:
            base_kind, overrides = KIND_OVERRIDES.get(kind, (kind, {}))
            model, source = common.build_model(base_kind, self.quick, self.device, **overrides)
            self.models[kind], self.sources[kind] = model, source
            self.optims[kind] = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad],
                                                  lr=1e-6)
            if not hasattr(self, "z"):
                self.make_batch(model, self.batch)
        return self.models[kind]

    def make_batch(self, model: Any, batch: int) -> None:
        self.batch = batch
        g = torch.Generator().manual_seed(0)
        c, h, w = common.latent_shape(model)
        self.z = torch.randn(self.batch, c, h, w, generator=g).to(self.device)
        self.noise = torch.randn(self.batch, c, h, w, generator=g).to(self.device)
        self.t = torch.randint(0, 1000, (self.batch,), generator=g).to(self.device)
        size = common.image_size_of(model)
        coarse = torch.randint(0, 6, (self.batch, 8, 8), generator=g)
        self.mask = coarse.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2).to(self.device)

    def _unet_swap(self, model: Any, name: str, compiled: bool) -> Optional[torch.nn.Module]:
        if not compiled:
            return None
        original = model.model.diffusion_model
        if name not in self.compiled:
            self.compiled[name] = torch.compile(original)
            if hasattr(original, "forward_with_anatomy"):
                self.compiled_anatomy[name] = torch.compile(original.forward_with_anatomy)
        if name in self.compiled_anatomy:  # the anatomical training step calls forward_with_anatomy, not forward
            original.forward_with_anatomy = self.compiled_anatomy[name]  # an instance attribute, removed after
        model.model.diffusion_model = self.compiled[name]
        return original

    def step(self, name: str, tracker: Optional[common.LiveTensorBytes] = None, check: bool = False) -> dict[str, Any]:
        """One training step of variant ``name``; ``check`` also tests every gradient for NaN/inf (untimed steps
        only: it costs ~6% of a step)."""
        kind, precision, ckpt, channels_last, compiled = VARIANTS[name]
        model, opt = self.model(kind), self.optims[kind]
        unet = model.model.diffusion_model
        common.set_checkpointing(unet, ckpt)
        z, noise = self.z, self.noise
        if channels_last:
            unet.to(memory_format=torch.channels_last)
            cl = torch.channels_last
            z, noise = z.contiguous(memory_format=cl), noise.contiguous(memory_format=cl)
        original = self._unet_swap(model, name, compiled)
        info: dict[str, Any] = {}
        try:
            extra = {"anatomy_target": self.mask} if kind.startswith("anatomical") else {}
            with common.autocast(self.device, precision):
                loss, _ = model.p_losses(z, None, self.t, noise=noise, **extra)
            if tracker is not None:
                info["act"] = tracker.live_bytes()
            scaler = self.scaler if precision == "fp16" else None
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                if tracker is not None:
                    info["fwd_bwd_peak"] = tracker.peak
                    info["grads"] = sum(p.grad.numel() * p.grad.element_size() for p in model.model.parameters()
                                        if p.grad is not None)
                if check:
                    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in model.model.parameters())
                    self.finite[name] = self.finite.get(name, True) and finite
                opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            self.losses.setdefault(name, []).append(value)
            self.finite[name] = self.finite.get(name, True) and math.isfinite(value)
        finally:
            if original is not None:
                model.model.diffusion_model = original
                original.__dict__.pop("forward_with_anatomy", None)
            if channels_last:
                unet.to(memory_format=torch.contiguous_format)
            common.set_checkpointing(unet, False)
        return info

    def timed(self, name: str) -> tuple[float, ...]:
        return common.time_call(lambda: self.step(name), self.device)

    def memory(self, name: str) -> dict[str, Optional[float]]:
        with common.cuda_peak(self.device) as cuda:
            with common.LiveTensorBytes() as tracker:
                info = self.step(name, tracker, check=True)
        kind = VARIANTS[name][0]
        model, opt = self.models[kind], self.optims[kind]
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if isinstance(v, torch.Tensor))
        total = weights + state + info["fwd_bwd_peak"]
        return {"act_bytes": info["act"], "fwd_bwd_peak_bytes": info["fwd_bwd_peak"], "grad_bytes": info["grads"],
                "step_peak_incl_optimizer_bytes": tracker.peak,
                "weights_bytes": weights, "optimizer_state_bytes": state, "total_peak_bytes": total,
                "cuda_peak_bytes": cuda.get("peak"), "cuda_peak_above_start_bytes": cuda.get("peak_above_start")}


def profile(runner: Runner, names: list[str], rows: int = 25) -> None:
    """Top ops by self time of one step of each variant (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    for name in names:
        runner.step(name)
        with torch_profile(activities=activities) as prof:
            runner.step(name)
        print(f"\n=== profile: {name} ===")
        sort = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 16 on CUDA; "
                        "quick: 2)")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass")
    parser.add_argument("--no-timing", action="store_true", help="memory pass only")
    parser.add_argument("--memory-batch", type=int, default=None, help="batch of the memory pass (default --batch)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of plain vs anat")
    args = parser.parse_args()
    device = common.setup(args)
    cuda = device.type == "cuda"
    names = args.variants.split(",") if args.variants else list(DEFAULT_CUDA if cuda else DEFAULT_CPU)
    if args.compile and "anat+compile" not in names:
        names.append("anat+compile")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    batch = args.batch or (2 if args.quick else (16 if cuda else 1))
    reps = args.reps or (5 if args.quick else 3)
    runner = Runner(args.quick, device, batch)
    for kind in sorted({VARIANTS[n][0] for n in names}):
        runner.model(kind)
    print(f"train_step on {common.device_name(device)}; batch {batch}; latents {list(runner.z.shape[1:])}; "
          f"reps {reps} (+1 warm-up); models: {runner.sources}")
    if args.profile:
        profile(runner, [n for n in ("plain", "anat") if n in names])
    times = ({n: {"wall": [], "cpu": [], "user": [], "sys": []} for n in names} if args.no_timing
             else common.interleaved(names, runner.timed, reps))
    memory_batch = args.memory_batch or batch
    if not args.no_memory:
        runner.make_batch(next(iter(runner.models.values())), memory_batch)
        for kind in runner.models:  # every optimiser has its state before measuring
            runner.step(next(n for n in names if VARIANTS[n][0] == kind))
    memory = {} if args.no_memory else {n: runner.memory(n) for n in names}
    if args.no_memory:
        for n in names:  # one untimed step per variant with the gradient check
            runner.step(n, check=True)
    metric = args.metric or common.default_metric(device)
    med = {n: common.median(times[n][metric]) for n in names}
    med_wall = {n: common.median(times[n]["wall"]) for n in names}
    ref_plain = med.get("plain")
    ref_anat = med.get("anat")
    act_ref = memory.get("anat", {}).get("act_bytes")
    peak_ref = memory.get("anat", {}).get("total_peak_bytes")
    results, rows = {}, []
    for n in names:
        mem = memory.get(n, {})
        res = {"metric": metric, "median_s": med[n], "median_wall_s": med_wall[n],
               "median_cpu_s": common.median(times[n]["cpu"]), "median_user_s": common.median(times[n]["user"]),
               "median_sys_s": common.median(times[n]["sys"]), "times_s": times[n],
               "x_plain": med[n] / ref_plain if ref_plain else None,
               "x_anat": med[n] / ref_anat if ref_anat else None,
               "user_x_plain": (common.median(times[n]["user"]) / common.median(times["plain"]["user"])
                                if "plain" in times and times["plain"]["user"] else None),
               "finite": runner.finite.get(n),
               "losses": runner.losses.get(n), **mem,
               "act_vs_anat": mem["act_bytes"] / act_ref if mem and act_ref else None,
               "total_peak_vs_anat": mem["total_peak_bytes"] / peak_ref if mem and peak_ref else None}
        results[n] = res
        rows.append([n, res["median_s"], med_wall[n], _r(res["x_plain"]), _r(res["x_anat"]), _r(res["user_x_plain"]),
                     common.mib(mem.get("act_bytes")),
                     _r(res["act_vs_anat"]), common.mib(mem.get("fwd_bwd_peak_bytes")),
                     common.mib(mem.get("total_peak_bytes")), _r(res["total_peak_vs_anat"]),
                     common.mib(mem.get("cuda_peak_bytes")), "yes" if res["finite"] else "NO"])
    print()
    print(f"ratios use the median {metric} time")
    common.print_table(["variant", f"median {metric} s", "median wall s", "x plain", "x anat", "user x plain",
                        "act MiB", "act x anat",
                        "fwd+bwd peak MiB", "total peak MiB", "total x anat", "cuda peak MiB", "finite"], rows)
    print(f"memory pass at batch {memory_batch}: act = alive after forward; fwd+bwd peak = step's own peak "
          "(activations + gradients); total = weights + optimiser state + fwd+bwd peak (the optimiser step's "
          "transient, implementation-dependent, is in the JSON as step_peak_incl_optimizer_bytes)")
    params = {k: sum(p.numel() for p in m.model.parameters()) for k, m in runner.models.items()}
    common.write_json("train_step", args, device, {"batch": batch, "memory_batch": memory_batch, "reps": reps,
                                                   "latent_shape": list(runner.z.shape[1:]),
                                                   "model_sources": runner.sources, "unet_params": params,
                                                   "variants": {n: list(VARIANTS[n]) for n in names},
                                                   "results": results})


def _r(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
