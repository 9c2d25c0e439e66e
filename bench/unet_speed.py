"""UNet forward+backward: this project's UNet now vs the UNet of commit 131d3de, side by side in one process.

    python bench/unet_speed.py [--reps 10] [--no-compile] [--backend inductor] [--quick]

The old ``openaimodel.py`` (with the ``attention.py`` and ``diffusionmodules/util.py`` it imported) is read with
``git show 131d3de:PATH`` into temporary modules; both UNets get the same weights (state dicts have the same keys)
and the same inputs, and their outputs and gradients must agree within 1e-4 relative (``check_equal``).
Variants: ``old`` (eager), ``new`` (eager) and ``new+compile`` (``torch.compile``, in place as ``--compile`` does;
the compile time is reported separately and not timed). Mid config: 64 channels, channel_mult 1-2-4, attention at ds 2 and 4, 32x32x3 latents,
batch 4, fp32. On CPU the ratios use process CPU time with one thread (see ``bench/common.py``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (ROOT, base_parser, default_metric, interleaved, median, print_table,  # noqa: E402
                          setup, time_call, write_json)

OLD_COMMIT = "131d3de"
# old module name -> path; imported in this order, each one's ldm.modules.* imports pointed at the old copies
OLD_MODULES = {
    "ldm.modules.diffusionmodules.util": "ldm/modules/diffusionmodules/util.py",
    "ldm.modules.attention": "ldm/modules/attention.py",
    "ldm.modules.diffusionmodules.openaimodel": "ldm/modules/diffusionmodules/openaimodel.py",
}
OLD_PREFIX = "_unet_speed_131d3de"
MID_UNET = {"image_size": 32, "in_channels": 3, "out_channels": 3, "model_channels": 64,
            "attention_resolutions": [2, 4], "num_res_blocks": 2, "channel_mult": [1, 2, 4], "num_heads": 4}
QUICK_UNET = {**MID_UNET, "image_size": 16, "model_channels": 32, "num_res_blocks": 1}
BATCH = 4


def load_old_modules(commit: str = OLD_COMMIT) -> types.ModuleType:
    """The old ``openaimodel`` module (and the old modules it imports), built from ``git show commit:path``."""
    loaded: dict[str, types.ModuleType] = {}
    for name, path in OLD_MODULES.items():
        source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
        for other in loaded:
            source = source.replace(f"from {other} import", f"from {OLD_PREFIX}.{other} import")
        module = types.ModuleType(f"{OLD_PREFIX}.{name}")
        module.__file__ = f"{commit}:{path}"
        sys.modules[module.__name__] = module  # dataclasses and typing resolve names through sys.modules
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        loaded[name] = module
    return loaded["ldm.modules.diffusionmodules.openaimodel"]


def build_pair(params: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(old, new) UNets with identical weights (the zero-initialised output convs perturbed, so that every path
    contributes to the output and the gradients)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    new = UNetModel(**params)
    with torch.no_grad():
        for p in new.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    old = load_old_modules().UNetModel(**params)
    if list(old.state_dict()) != list(new.state_dict()):
        raise RuntimeError("the old and new UNets have different state-dict keys; cannot compare them")
    old.load_state_dict(new.state_dict())
    return old.to(device).train(), new.to(device).train()


def step_fn(unet: Any, x: torch.Tensor, t: torch.Tensor, params: list[torch.nn.Parameter]) -> Callable[[], Any]:
    def step() -> torch.Tensor:
        for p in params:
            p.grad = None
        out = unet(x, t)
        out.square().mean().backward()
        return out
    return step


def check_equal(old: torch.nn.Module, new: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Largest differences of the outputs (relative to the largest output) and of the gradients (relative to the
    largest gradient entry of the model: some gradients are zero in exact arithmetic, e.g. of a bias followed by a
    GroupNorm, and differ only in rounding noise of ~1e-10)."""
    outs = {}
    for name, unet in (("old", old), ("new", new)):
        out = step_fn(unet, x, t, list(unet.parameters()))()
        outs[name] = (out.detach(), {n: p.grad.detach().clone() for n, p in unet.named_parameters()})

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    out_rel = rel(outs["new"][0], outs["old"][0])
    grads_old, grads_new = outs["old"][1], outs["new"][1]
    scale = max(float(g.abs().max()) for g in grads_old.values())
    grad_rel = max(float((grads_new[n] - g).abs().max()) for n, g in grads_old.items()) / max(scale, 1e-12)
    return {"output_max_rel_diff": out_rel, "grad_max_rel_diff": grad_rel}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled variant")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of new+compile")
    args = parser.parse_args(argv)
    device = setup(args)
    params = QUICK_UNET if args.quick else MID_UNET
    reps = args.reps or (3 if args.quick else 10)
    metric = args.metric or default_metric(device)
    old, new = build_pair(params, device)
    size = params["image_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, params["in_channels"], size, size, generator=g).to(device)
    t = torch.randint(0, 1000, (BATCH,), generator=g).to(device)
    equality = check_equal(old, new, x, t)
    print(f"numerics: output max rel diff {equality['output_max_rel_diff']:.2e}, "
          f"gradient max rel diff {equality['grad_max_rel_diff']:.2e}")
    if max(equality.values()) > 1e-4:
        raise RuntimeError(f"old and new UNets disagree beyond 1e-4 relative: {equality}")

    steps = {"old": step_fn(old, x, t, list(old.parameters())), "new": step_fn(new, x, t, list(new.parameters()))}
    compile_s = None
    if args.compile:
        from ldm.modules.diffusionmodules.compile import compile_unet

        import copy
        compiled = copy.deepcopy(new)
        compile_unet(compiled, backend=args.backend)
        start = time.perf_counter()
        out_c = step_fn(compiled, x, t, list(compiled.parameters()))()  # captures forward and backward graphs
        compile_s = time.perf_counter() - start
        out_e = new(x, t)
        equality["compiled_output_max_rel_diff"] = float((out_c - out_e).abs().max() / out_e.abs().max())
        print(f"new+compile ({args.backend}): first step {compile_s:.1f} s (graph capture and code generation); "
              f"output max rel diff to eager {equality['compiled_output_max_rel_diff']:.2e}")
        steps["new+compile"] = step_fn(compiled, x, t, list(compiled.parameters()))

    names = list(steps)
    times = interleaved(names, lambda name: time_call(steps[name], device), reps)
    base = median(times["old"][metric])
    rows, results = [], {}
    for name in names:
        med = median(times[name][metric])
        results[name] = {"median_s": med, "speedup_vs_old": base / med, "wall_median_s": median(times[name]["wall"])}
        rows.append([name, med, base / med])
    print(f"\nUNet forward+backward, batch {BATCH}, {size}x{size}x{params['in_channels']}, fp32, "
          f"time = {metric} (median of {reps})")
    print_table(["variant", f"{metric} s", "speedup vs old"], rows)
    write_json("unet_speed", args, device, {"old_commit": OLD_COMMIT, "unet": params, "batch": BATCH,
                                            "metric": metric, "reps": reps, "backend": args.backend if args.compile
                                            else None, "compile_first_step_s": compile_s, "numerics": equality,
                                            "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
