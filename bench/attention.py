"""Attention implementations side by side on the shapes the CT-Organ configs produce.

    python bench/attention.py [--quick] [--device auto|cpu|cuda] [--batch N] [--backward]

Shapes (batch B, heads h, queries N, keys M, head dim d) come from the CT-Organ UNets: the middle
block's self-attention (16x16 tokens, 1024 channels, 8 heads) and the register cross-attention at
every level (64x64 / 32x32 / 16x16 queries of 128 / 512 / 1024 channels, 6 classes x 4 registers =
24 keys, 8 heads). Implementations:
- ``math``: explicit ``softmax(q k^T / sqrt(d)) v`` (what CompVis's legacy attention does);
- ``sdpa``: ``F.scaled_dot_product_attention`` with torch's own kernel choice;
- ``sdpa-<backend>``: SDPA restricted to one backend (flash, efficient, cudnn on CUDA; flash and math
  on CPU) where it supports the shape;
- ``anat-layer-sdpa`` vs ``anat-layer-mass``: the whole AnatomicalCrossAttention layer without and
  with the per-class attention mass (training asks for the mass, which forms the N x M matrix).
Times are medians of interleaved repetitions; ratios are against ``math`` (or ``anat-layer-sdpa``).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

# name -> (spatial side, channels, heads, keys (None: self-attention))
CTORGAN_SHAPES = {
    "middle self-attn 16x16x1024": (16, 1024, 8, None),
    "register attn 64x64x128": (64, 128, 8, 24),
    "register attn 32x32x512": (32, 512, 8, 24),
    "register attn 16x16x1024": (16, 1024, 8, 24),
}
QUICK_SHAPES = {
    "middle self-attn 4x4x128": (4, 128, 4, None),
    "register attn 16x16x32": (16, 32, 4, 12),
    "register attn 8x8x64": (8, 64, 4, 12),
}


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    return attn @ v


def _sdpa_backend(name: str) -> Optional[Any]:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(name)


def implementations(device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    from torch.nn.attention import sdpa_kernel

    impls: dict[str, Callable[..., torch.Tensor]] = {"math": _math, "sdpa": F.scaled_dot_product_attention}
    backends = ("flash", "efficient", "cudnn") if device.type == "cuda" else ("flash", "math")
    for backend in backends:
        def run(q, k, v, _b=_sdpa_backend(backend)):  # noqa: ANN001
            with sdpa_kernel(_b):
                return F.scaled_dot_product_attention(q, k, v)
        impls[f"sdpa-{backend}"] = run
    return impls


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (default: forward)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"),
                        help="default: fp32 on CPU, bf16 on CUDA")
    args = parser.parse_args()
    device = common.setup(args)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or
                                                                                  ("bf16" if cuda else "fp32")]
    batch = args.batch or (16 if cuda else 2)
    reps = args.reps or 5
    metric = args.metric or common.default_metric(device)
    shapes = QUICK_SHAPES if args.quick else CTORGAN_SHAPES
    print(f"attention on {common.device_name(device)}; batch {batch}; dtype {dtype}; "
          f"{'forward+backward' if args.backward else 'forward'}; reps {reps}; metric {metric}")
    from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomicalCrossAttention

    results: dict[str, Any] = {}
    rows = []
    g = torch.Generator().manual_seed(0)
    for label, (side, channels, heads, keys) in shapes.items():
        n = side * side
        m = n if keys is None else keys
        d = channels // heads
        q = torch.randn(batch, heads, n, d, generator=g).to(device, dtype).requires_grad_(args.backward)
        k = torch.randn(batch, heads, m, d, generator=g).to(device, dtype).requires_grad_(args.backward)
        v = torch.randn(batch, heads, m, d, generator=g).to(device, dtype).requires_grad_(args.backward)
        impls = implementations(device)
        reference = _math(q.float(), k.float(), v.float()).detach()
        usable: dict[str, Callable[[], Any]] = {}
        errors: dict[str, float] = {}
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    out = fn(q, k, v)
                errors[name] = float((out.float() - reference).abs().max())
            except RuntimeError as exc:  # backend does not support this shape/dtype/device
                results.setdefault(label, {})[name] = {"unsupported": str(exc).splitlines()[0][:200]}
                continue
            usable[name] = _make_call(fn, (q, k, v), args.backward)
        if keys is not None:
            layer = AnatomicalCrossAttention(channels, 256 if not args.quick else 32, heads=heads,
                                             position_dim=None).to(device, dtype)
            x = torch.randn(batch, channels, side, side, generator=g).to(device, dtype).requires_grad_(args.backward)
            regs = torch.randn(batch, keys, layer.to_k.in_features, generator=g).to(device, dtype)
            member = torch.eye(keys // 4 if not args.quick else keys // 2, device=device, dtype=dtype)
            member = member.repeat_interleave(keys // member.shape[0], dim=0)  # [keys, classes]
            usable["anat-layer-sdpa"] = _make_call(lambda x_, r_: layer(x_, r_)[0], (x, regs), args.backward)
            usable["anat-layer-mass"] = _make_call(lambda x_, r_: layer(x_, r_, None, member)[0], (x, regs),
                                                   args.backward)
        print(f"{label}: B={batch} h={heads} N={n} M={m} d={d}")
        iters = {name: _calibrate(call, device) for name, call in usable.items()}

        def timed(name: str) -> tuple[float, ...]:
            measured = common.time_call(lambda: [usable[name]() for _ in range(iters[name])], device)
            return tuple(value / iters[name] for value in measured)

        times = common.interleaved(list(usable), timed, reps)
        mem = {}
        for name, call in usable.items():
            with common.cuda_peak(device) as cuda_mem, common.LiveTensorBytes() as tracker:
                call()
            mem[name] = (tracker.peak, cuda_mem.get("peak_above_start"))
        base = common.median(times["math"][metric])
        layer_base = common.median(times["anat-layer-sdpa"][metric]) if "anat-layer-sdpa" in times else None
        for name in usable:
            med = common.median(times[name][metric])
            ref = layer_base if name.startswith("anat-layer") else base
            res = {"median_s": med, "ratio": med / ref, "max_abs_err_vs_math": errors.get(name),
                   "peak_bytes": mem[name][0], "cuda_peak_bytes": mem[name][1], "shape": [batch, heads, n, m, d]}
            results.setdefault(label, {})[name] = res
            rows.append([label, name, med * 1e3, f"{res['ratio']:.3f}", common.mib(mem[name][0]),
                         common.mib(mem[name][1]), "-" if errors.get(name) is None else f"{errors[name]:.1e}"])
    print()
    common.print_table(["shape", "implementation", f"median {metric} ms", "x math (layer: x sdpa)", "peak MiB",
                        "cuda peak MiB", "max err"], rows)
    common.write_json("attention", args, device, {"batch": batch, "dtype": str(dtype), "backward": args.backward,
                                                  "metric": metric, "reps": reps, "results": results})


def _calibrate(call: Callable[[], Any], device: torch.device, target_s: float = 0.2) -> int:
    """Calls per measurement so that one lasts ~``target_s`` (CPU time is counted in coarse ticks)."""
    call()
    once = max(common.time_call(call, device)[0], 1e-6)
    return max(1, min(1000, round(target_s / once)))


def _make_call(fn: Callable[..., torch.Tensor], inputs: tuple, backward: bool) -> Callable[[], Any]:
    def call() -> None:
        if backward:
            fn(*inputs).float().square().mean().backward()
        else:
            with torch.no_grad():
                fn(*inputs)
    return call


if __name__ == "__main__":
    main()
