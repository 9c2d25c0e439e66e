#!/usr/bin/env python
r"""Export a run for sharing: its EMA weights and resolved config as safetensors + YAML (and a bare state dict).

Example:
    python scripts/export.py -r logs/2026-01-01T00-00-00_demo -o exported/demo

Writes into the output folder:
    model.safetensors   every weight of the model, the EMA weights in place of the live ones (no model_ema.*)
    state_dict.pt       the same as a bare torch state dict (loads with torch.load(weights_only=True))
    config.yaml         the resolved config (${oc.env:VAR} kept as written: no environment value is shared;
                        ckpt_path entries removed, use_ema: false since the EMA weights are
                        baked in, the NIfTI geometry of the training data under geometry:, provenance under export:)
The folder samples like a run: ``python scripts/sample.py -r exported/demo``, or in Python::

    from ldm.sampling import load_model_for_sampling, sample_images
    model, info = load_model_for_sampling("exported/demo")
    images = sample_images(model, 4, ddim_steps=50, seed=0)
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from ldm import sampling  # noqa: E402
from ldm.cli_flags import ArgumentParser  # noqa: E402
from ldm.trust import add_trust_argument, check_run  # noqa: E402

WEIGHTS, STATE_DICT, CONFIG = "model.safetensors", "state_dict.pt", sampling.COMPVIS_CONFIG


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT",
                   help="log directory of a run, or a checkpoint (.ckpt, bare state dict, .safetensors)")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml",
                   help="model config(s), merged over the run's configs (needed for a bare checkpoint)")
    p.add_argument("-o", "--outdir", required=True, help="output folder (created; existing export files are refused)")
    p.add_argument("--no-ema", dest="ema", action="store_false",
                   help="export the live weights instead of the EMA weights")
    p.add_argument("--reference", default=None, metavar="VOLUME.nii.gz",
                   help="NIfTI volume whose geometry NIfTI samples take (default: the first NIfTI of the run's "
                        "training data when it is reachable; recorded under geometry: in config.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --outdir")
    p.add_argument("--unsafe-load", dest="unsafe_load", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")
    add_trust_argument(p)
    return p


def export_run(path: str, out_dir: str, base: list[str] | tuple[str, ...] = (), ema: bool = True,
               reference: str | None = None, overwrite: bool = False, unsafe_load: bool = False,
               trust_config: bool = False) -> dict[str, str]:
    """Write ``model.safetensors``, ``state_dict.pt`` and ``config.yaml`` of the run at ``path`` into ``out_dir``;
    returns their paths."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.atomic_io import atomic_write, save_torch, write_text
    from ldm.sample_geometry import resolve_geometry

    paths = {name: os.path.join(out_dir, name) for name in (WEIGHTS, STATE_DICT, CONFIG)}
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"-o {out_dir} is a file; pass a folder")
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"{out_dir} already holds an export ({', '.join(os.path.basename(p) for p in existing)}); "
                         "pass --overwrite to replace it, or another -o")
    model, info = sampling.load_model_for_sampling(path, base, unsafe_load, torch.device("cpu"),
                                                   trust_config=trust_config)
    use_ema = bool(ema and info["has_ema"])
    if ema and getattr(model, "use_ema", False) and not info["has_ema"]:
        logging.getLogger(__name__).warning("%s has no EMA weights; exporting the live weights", info["checkpoint"])
    from contextlib import nullcontext

    with model.ema_scope("export") if use_ema else nullcontext():
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
                 if not k.startswith("model_ema.")}
    # written with ${oc.env:VAR} unresolved (no environment value in a shared file); resolved only to find the data
    config = sampling.strip_checkpoint_paths(OmegaConf.create(info["config"]), keep_env=True)
    config["model"].setdefault("params", {})["use_ema"] = False
    geometry = resolve_geometry(sampling.strip_checkpoint_paths(OmegaConf.create(info["resolved_config"])), reference)
    if geometry.note is None:
        config["geometry"] = geometry.to_dict()
    config["export"] = {"checkpoint": info["checkpoint"], "checkpoint_sha256": info["checkpoint_sha256"],
                        "weights": "ema" if use_ema else "live", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "torch": str(torch.__version__)}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(paths[WEIGHTS], lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
                 verify=_verify_safetensors)
    save_torch(state, paths[STATE_DICT])
    write_text(paths[CONFIG], OmegaConf.to_yaml(OmegaConf.create(config)))
    return paths


def _verify_safetensors(path: str) -> None:
    """Raise unless ``path`` is a whole safetensors file (safetensors checks the data against its header)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        list(f.keys())


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_run(args.resume, args.base, args.trust_config)  # a run's config names allow-listed targets only
    paths = export_run(args.resume, args.outdir, args.base, args.ema, args.reference, args.overwrite,
                       args.unsafe_load, args.trust_config)
    print(f"exported {args.resume} to {args.outdir}: {', '.join(os.path.basename(p) for p in paths.values())}; "
          f"sample it with: python scripts/sample.py -r {args.outdir}")
    return 0


if __name__ == "__main__":
    from ldm.atomic_io import run_script_reporting_writes

    sys.exit(run_script_reporting_writes(main))
