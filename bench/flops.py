"""FLOPs per training sample and per sampling step (torch.utils.flop_counter), so a GPU run can state
its model-FLOP utilisation (MFU).

    python bench/flops.py [--quick] [--device auto|cpu|cuda] [--peak-tflops X] [--train-json PATH]

Counts matmul/convolution/attention FLOPs (2 per multiply-add, as torch's counter does; element-wise
ops are not counted) for: one training sample of the plain and the anatomical LDM (loss from
latents, forward + backward: what bench/train_step.py times), one sampling step (one UNet forward),
the first-stage encode and decode of one image, and the anatomical modules' share of the UNet.
With ``--peak-tflops`` (the accelerator's dense peak for the precision used) and a train_step JSON
from the same device, MFU = FLOPs per sample * batch / median step time / peak.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, flop_registry  # noqa: E402

import common  # noqa: E402

ANATOMICAL_MODULES = ("register_bank", "anatomical_attention", "segmentation_head")


class TotalFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """Total FLOPs with torch's per-op formulas (``flop_registry``) but without FlopCounterMode's module
    tracker, whose backward hooks fail on modules fed a view of a parameter (the register bank)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count(fn: Any, by_module: bool = False) -> tuple[int, dict[str, int]]:
    """Total FLOPs of ``fn()`` and (``by_module``, forward only) FLOPs per module path."""
    if not by_module:
        with TotalFlops() as counter:
            fn()
        return counter.total, {}
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def anatomical_share(per_module: dict[str, int]) -> dict[str, int]:
    """FLOPs of the anatomical parts (and the whole UNet) from the counter's module hierarchy.

    A part called as a module has its own entry; a ModuleDict (``anatomical_attention``) is not called
    itself, so its direct children are summed.
    """
    out = {}
    for part in ANATOMICAL_MODULES + ("diffusion_model",):
        path = next((n[: n.index(part) + len(part)] for n in per_module if f".{part}" in n), None)
        if path is None:
            out[part] = 0
        elif path in per_module:
            out[part] = per_module[path]
        else:
            depth = path.count(".") + 1
            out[part] = sum(v for n, v in per_module.items() if n.startswith(path + ".") and n.count(".") == depth)
    return out


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak TFLOP/s for MFU")
    parser.add_argument("--train-json", default=None, help="bench/out/train_step.json of a run on this device")
    args = parser.parse_args()
    device = common.setup(args)
    results: dict[str, Any] = {}
    rows = []
    for kind in ("plain", "anatomical"):
        model, source = common.build_model(kind, args.quick, device)
        c, h, w = common.latent_shape(model)
        size = common.image_size_of(model)
        z = torch.randn(1, c, h, w, device=device)
        t = torch.full((1,), 500, device=device, dtype=torch.long)
        extra = {}
        if kind == "anatomical":
            extra["anatomy_target"] = torch.randint(0, 6, (1, size, size), device=device)

        def train_sample() -> None:
            loss, _ = model.p_losses(z, None, t, **extra)
            loss.backward()

        train, train_modules = count(train_sample)
        model.zero_grad(set_to_none=True)
        model.eval()
        # grad mode on (forward only): the module tracker fails on parameters passed as inputs under no_grad
        step, step_modules = count(lambda: model.apply_model(z, t, None), by_module=True)
        with torch.no_grad():
            x = torch.randn(1, model.first_stage_model.encoder.in_channels, size, size, device=device)
            encode, _ = count(lambda: model.encode_first_stage(x))
            decode, _ = count(lambda: model.decode_first_stage(z))
        share = anatomical_share(step_modules)
        train_share = {}
        if kind == "anatomical":  # the training forward also runs the segmentation head and the class masses
            model.train()
            _, fwd_modules = count(lambda: model.apply_model_with_anatomy(z, t), by_module=True)
            train_share = anatomical_share(fwd_modules)
        results[kind] = {"model_source": source, "train_flops_per_sample": train, "sampling_step_flops": step,
                         "encode_flops_per_image": encode, "decode_flops_per_image": decode,
                         "unet_params": sum(p.numel() for p in model.model.parameters()),
                         "sampling_step_flops_by_part": share, "training_forward_flops_by_part": train_share}
        rows.append([kind, train / 1e9, step / 1e9, encode / 1e9, decode / 1e9,
                     results[kind]["unet_params"] / 1e6])
        del model
    plain, anat = results["plain"], results["anatomical"]
    results["anatomical_vs_plain"] = {"train": anat["train_flops_per_sample"] / plain["train_flops_per_sample"],
                                      "sampling_step": anat["sampling_step_flops"] / plain["sampling_step_flops"]}
    print(f"flops on {common.device_name(device)} ({'quick' if args.quick else 'CT-Organ'} size); GFLOP per item")
    common.print_table(["model", "train GFLOP/sample", "sampling GFLOP/step", "encode GFLOP/img",
                        "decode GFLOP/img", "UNet params M"], rows)
    print("\nanatomical / plain FLOPs: train {train:.3f}x, sampling step {sampling_step:.3f}x".format(
        **results["anatomical_vs_plain"]))
    for label, key in (("sampling step", "sampling_step_flops_by_part"),
                       ("training forward", "training_forward_flops_by_part")):
        parts = anat[key]
        total = parts["diffusion_model"] or 1
        print(f"anatomical {label} by part (share of the UNet): " + ", ".join(
            f"{k} {v / 1e9:.3f} GFLOP ({v / total:.1%})" for k, v in parts.items()))
    if args.peak_tflops:
        path = args.train_json or os.path.join(common.OUT_DIR, f"train_step{'_quick' if args.quick else ''}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no train_step results at {path}: run bench/train_step.py on this device first "
                                    "or pass --train-json")
        with open(path) as f:
            train_run = json.load(f)
        mfu = {}
        for name, res in train_run["results"].items():
            kind = "plain" if name.startswith("plain") else "anatomical"
            flops = results[kind]["train_flops_per_sample"] * train_run["batch"]
            seconds = res.get("median_wall_s") or res["median_s"]
            mfu[name] = flops / seconds / (args.peak_tflops * 1e12)
            print(f"MFU {name}: {mfu[name]:.1%} ({flops / seconds / 1e12:.1f} TFLOP/s on {train_run['device']})")
        results["mfu"] = {"peak_tflops": args.peak_tflops, "train_json": path, "per_variant": mfu}
    common.write_json("flops", args, device, results)


if __name__ == "__main__":
    main()
