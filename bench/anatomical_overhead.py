"""Where the anatomical training step's overhead comes from when it is not arithmetic: ops (kernel launches),
host-device synchronisations and dtype casts of one training step, plain vs anatomical, side by side.

    python bench/anatomical_overhead.py [--size tiny|ctorgan] [--batch N] [--reps N] [--precision fp32|bf16]
                                         [--device cpu|cuda] [--no-timing] [--top N]

One step = ``p_losses`` from latents (and for the anatomical model an integer mask at image size as
``anatomy_target``), backward. Counted with :class:`OpCounter`, a ``TorchDispatchMode`` that sees every ATen op
the step dispatches (forward and backward): "ops" = all of them, "kernels" = those that are not views (each
launches at least one kernel on a GPU), "syncs" = ops that make the host wait for the device on a GPU
(``aten::_local_scalar_dense`` from ``.item()``/``bool(tensor)``/``float(tensor)``, ``nonzero``, ``unique``,
``bincount``, boolean-mask indexing, copies to the CPU, ``torch.tensor(host values)``, ...). On a GPU each sync drains the launch queue, so the
device idles while the host launches the next kernels; a step full of small kernels and syncs is bound by
the host, whatever its FLOPs. The time ratio (on the CPU: process CPU time, 1 thread; on CUDA: wall time, device
synchronised; interleaved repetitions, medians) is printed beside the counts. On a GPU
(``--device cuda --size ctorgan --batch 16 --precision bf16``) the counter also sees device-to-host copies.

``--size ctorgan``: the repo's CT-Organ configs (``configs/latent-diffusion/ctorgan_unconditional_kl.yaml`` and
``anatomical_ctorgan_kl.yaml``, 64x64x3 latents, 256x256 masks). ``--size tiny`` (default): the same configs
with the UNet narrowed (32 channels, 16x16 latents, 64x64 masks): the same ops, a fraction of the arithmetic.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter
from typing import Any, Callable, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import common  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

# ops that wait for the device on a GPU, whatever their arguments
SYNC_OPS = frozenset({"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.unique", "aten._unique",
                      "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.bincount",
                      "aten.masked_select", "aten.equal", "aten.is_nonzero", "aten.histc"})
_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})

# the narrowed UNet of --size tiny (the configs' structure, a fraction of the width)
TINY_UNET = {"image_size": 16, "model_channels": 32, "num_heads": 4, "anatomical_register_dim": 32,
             "anatomical_attention_dim": 32, "anatomical_attention_heads": 4, "register_read_pool": 4}


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, the ones that synchronise host and device, and dtype casts.

    ``ops``: op name -> calls; ``syncs``: op name -> calls of the synchronising ones (see the module docstring;
    boolean-mask ``index``/``index_put`` count as ``<op>[bool]``, device-to-CPU copies as ``<op>[to cpu]``, tensors
    made from host values (``torch.tensor(x)``, a blocking host-to-device copy on a GPU) as ``<op>[host data]``);
    ``casts``: ``(from dtype, to dtype) -> elements converted`` by ``_to_copy``; ``views``: calls of view ops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()
        self.casts: Counter = Counter()
        self.views = 0
        self.largest: dict[str, int] = {}

    @property
    def kernels(self) -> int:
        """Non-view ops: each launches at least one kernel on a GPU."""
        return sum(self.ops.values()) - self.views

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def _sync_kind(self, name: str, args: tuple, kwargs: dict, out: Any) -> Optional[str]:
        if name in SYNC_OPS:
            return name
        if name in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                return f"{name}[bool]"
        if name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and "output_size" not in kwargs:
            return f"{name}[tensor repeats]"
        if name in ("aten.lift_fresh", "aten.lift_fresh_copy", "aten.lift"):
            # torch.tensor(host values): a blocking copy on a GPU. Conservative on the CPU, where the copy is not
            # seen: a Python scalar assigned through indexing (x[i] = 0.0) is lifted too, but stays on the host
            return f"{name}[host data]"
        if name in ("aten._to_copy", "aten.copy_", "aten.to") and isinstance(out, torch.Tensor):
            src = args[1] if name == "aten.copy_" else args[0]
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and out.device.type == "cpu":
                return f"{name}[to cpu]"
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and out.device.type != "cpu" \
                    and not src.is_pinned():
                return f"{name}[from pageable host memory]"  # waits for the stream on CUDA
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view:
            self.views += 1
        kind = self._sync_kind(name, args, kwargs, out)
        if kind is not None:
            self.syncs[kind] += 1
        if name == "aten._to_copy" and isinstance(out, torch.Tensor) and isinstance(args[0], torch.Tensor) \
                and args[0].dtype != out.dtype:
            self.casts[(str(args[0].dtype).replace("torch.", ""), str(out.dtype).replace("torch.", ""))] += out.numel()
        if isinstance(out, torch.Tensor):
            self.largest[name] = max(self.largest.get(name, 0), out.numel())
        return out


def build(kind: str, size: str, device: torch.device) -> torch.nn.Module:
    """The plain or anatomical CT-Organ LDM (``size="ctorgan"``) or its narrowed copy (``"tiny"``), train mode."""
    from ldm.util import instantiate_from_config

    cfg, _ = common.model_config(kind, quick=False)
    cfg = copy.deepcopy(cfg)
    if size == "tiny":
        unet = cfg["params"]["unet_config"]["params"]
        unet.update({k: v for k, v in TINY_UNET.items() if k in unet or kind == "anatomical"})
        cfg["params"]["image_size"] = unet["image_size"]
        factor = 2 ** (len(cfg["params"]["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
        dd = cfg["params"]["first_stage_config"]["params"]["ddconfig"]
        dd.update({"resolution": unet["image_size"] * factor, "ch": 16})
    elif size != "ctorgan":
        raise ValueError(f"size must be 'tiny' or 'ctorgan', got {size!r}")
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).to(device)
    model.train()
    return model


def make_inputs(model: torch.nn.Module, batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Latents, noise, timesteps and a mask of 8x8 blocks of random classes at image size (as bench/gpu_check.py)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = common.latent_shape(model)
    size = common.image_size_of(model)
    coarse = torch.randint(0, 6, (batch, 8, 8), generator=g)
    return {"z": torch.randn(batch, c, h, w, generator=g).to(device),
            "noise": torch.randn(batch, c, h, w, generator=g).to(device),
            "t": torch.randint(0, 1000, (batch,), generator=g).to(device),
            "mask": coarse.repeat_interleave(size // 8, 1).repeat_interleave(size // 8, 2).to(device)}


def step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str = "fp32") -> torch.Tensor:
    """``p_losses`` (+ the mask for an anatomical model) and backward; gradients are cleared after."""
    extra = {"anatomy_target": inputs["mask"]} if hasattr(model, "anatomical_loss") else {}
    with common.autocast(inputs["z"].device, precision):
        loss, _ = model.p_losses(inputs["z"], None, inputs["t"], noise=inputs["noise"], **extra)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def count(model: torch.nn.Module, inputs: dict[str, torch.Tensor], precision: str = "fp32") -> OpCounter:
    """The ops of one step (after one uncounted warm-up step)."""
    step(model, inputs, precision)
    with OpCounter() as counter:
        step(model, inputs, precision)
    return counter


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "ctorgan"))
    parser.add_argument("--batch", type=int, default=None, help="default: 4 (tiny), 1 (ctorgan)")
    parser.add_argument("--reps", type=int, default=7, help="timed rounds (interleaved, after 1 warm-up)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-timing", action="store_true", help="op counts only")
    parser.add_argument("--top", type=int, default=12, help="ops listed with their extra calls (anat - plain)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/out/anatomical_overhead_<size>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    metric = common.default_metric(device)  # process CPU time on the CPU, wall time on CUDA
    batch = args.batch or (4 if args.size == "tiny" else 1)
    models = {kind: build(kind, args.size, device) for kind in ("plain", "anatomical")}
    inputs = make_inputs(models["anatomical"], batch, device)
    counts = {kind: count(m, inputs, args.precision) for kind, m in models.items()}
    print(f"anatomical_overhead on {common.device_name(device)}: size {args.size}, batch {batch}, {args.precision}, mask "
          f"{list(inputs['mask'].shape[1:])}, latents {list(inputs['z'].shape[1:])}; torch {torch.__version__}")
    rows = [[kind, sum(c.ops.values()), c.kernels, c.total_syncs, sum(c.casts.values())] for kind, c in counts.items()]
    plain, anat = counts["plain"], counts["anatomical"]
    rows.append(["anat / plain", _ratio(sum(anat.ops.values()), sum(plain.ops.values())),
                 _ratio(anat.kernels, plain.kernels), "-", "-"])
    common.print_table(["model", "ops", "kernels (non-view ops)", "host syncs", "cast elements"], rows)
    print("syncs (anatomical):", dict(anat.syncs) or "none", "| plain:", dict(plain.syncs) or "none")
    print("casts (anatomical):", {f"{a}->{b}": n for (a, b), n in anat.casts.items()} or "none")
    extra = Counter(anat.ops)
    extra.subtract(plain.ops)
    print(f"ops with the most extra calls (anatomical - plain), top {args.top}:")
    common.print_table(["op", "extra calls", "largest output (elements)"],
                       [[op, n, anat.largest.get(op, 0)] for op, n in extra.most_common(args.top)])
    result: dict[str, Any] = {
        "size": args.size, "batch": batch, "precision": args.precision,
        "counts": {kind: {"ops": sum(c.ops.values()), "kernels": c.kernels, "syncs": dict(c.syncs),
                          "casts": {f"{a}->{b}": n for (a, b), n in c.casts.items()}, "per_op": dict(c.ops)}
                   for kind, c in counts.items()},
        "kernels_x_plain": anat.kernels / plain.kernels}
    if not args.no_timing:
        runs: dict[str, Callable[[], Any]] = {k: (lambda m=m: step(m, inputs, args.precision)) for k, m in models.items()}
        times = common.interleaved(list(runs), lambda k: common.time_call(runs[k], device), args.reps)
        med = {k: common.median(times[k][metric]) for k in runs}
        per_round = [a / p for a, p in zip(times["anatomical"][metric], times["plain"][metric])]
        print(f"{metric} time per step (median of {args.reps}, {common.device_name(device)}): plain "
              f"{med['plain']:.4f} s, anatomical {med['anatomical']:.4f} s -> anatomical/plain "
              f"{med['anatomical'] / med['plain']:.3f} (per round {min(per_round):.3f}-{max(per_round):.3f})")
        result.update({"metric": metric, "times_s": {k: times[k][metric] for k in runs}, "median_s": med,
                       "time_x_plain": med["anatomical"] / med["plain"], "time_x_plain_per_round": per_round})
    out = args.out or os.path.join(common.OUT_DIR, f"anatomical_overhead_{args.size}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    import json

    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out}")
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


if __name__ == "__main__":
    main()
