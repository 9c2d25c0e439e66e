#!/usr/bin/env python
r"""Sample images and their masks (predicted by anatomical models, generated with the image by joint models).

Example:
    python scripts/sample.py -r logs/2026-01-01T00-00-00_demo -n 64 --batch_size 16 -c 50 -e 0.0 \
        -l samples/demo --seed 0 --save_masks
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm.cli_flags import ArgumentParser, add_threads_argument  # noqa: E402

import torch  # noqa: E402

from ldm.models.diffusion.samplers import SAMPLERS  # noqa: E402
from ldm.trust import add_trust_argument, check_run  # noqa: E402
from ldm.threads import configure_threads  # noqa: E402
from ldm.util import resolve_device  # noqa: E402

from ldm import sampling  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, metavar="RUN_DIR_OR_CKPT",
                   help="log directory of a run, or a checkpoint (.ckpt, bare state dict, .safetensors)")
    p.add_argument("-b", "--base", nargs="*", default=[], metavar="CONFIG.yaml",
                   help="model config(s), merged over the run's configs/*-project.yaml (needed for a bare checkpoint)")
    p.add_argument("-n", "--n_samples", type=int, default=16,
                   help="number of samples to add; the same command run again after an interruption (Ctrl-C, a full "
                        "disk) finishes that session instead, so the folder ends with the count asked for")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("-c", "--custom_steps", type=int, default=50, help="sampler steps (model calls)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                   help="ddim (CompVis default), dpmpp2m (DPM-Solver++(2M): 20-25 steps match 200-step DDIM; "
                        "deterministic, eta must be 0) or ancestral (the full DDPM loop; -c and -e unused)")
    p.add_argument("-e", "--eta", type=float, default=0.0, help="DDIM eta in [0, 1] (0: deterministic given the seed)")
    p.add_argument("-l", "--logdir", default=None, metavar="OUT_DIR",
                   help="output folder (default: <run>/samples/ddim<c>_eta<e>_seed<seed>); "
                        "re-running continues the numbering")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--vanilla_sample", action="store_true", help="same as --sampler ancestral (CompVis flag)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="sample with the live weights, not EMA")
    p.add_argument("--save_masks", action="store_true",
                   help="anatomical models: also write predicted masks (masks/) and colour previews (masks_colour/); "
                        "joint models (joint_mask_config) always write their generated masks there")
    p.add_argument("--anatomy_guidance", type=float, default=0.0, metavar="S",
                   help="anatomical models: steer every step with the model's own segmentation head along the "
                        "gradient of an anatomical energy (co-occurrence, laterality, position, border; "
                        "README_anatomical.md); 0 (default): off, bit-identical to plain sampling; each guided "
                        "step costs a forward pass with gradients and a backward pass")
    p.add_argument("--autoguide", default=None, metavar="RUN_DIR_OR_CKPT",
                   help="guide every step with a weaker model of the same latent space, e.g. an earlier checkpoint "
                        "of the run (autoguidance, Karras et al. 2024): eps = eps_guide + w (eps_model - eps_guide); "
                        "two model calls per step; its config is found as for -r (or given with -b); with --masks "
                        "the guide reads the same masks (in place of classifier-free guidance)")
    p.add_argument("--autoguide_weight", type=float, default=2.0, metavar="W",
                   help="autoguidance weight w with --autoguide (1: the model alone; default 2.0)")
    p.add_argument("--masks", default=None, metavar="PATH",
                   help="mask-conditioned models (mask_condition): draw images for these label maps instead of "
                        "unconditional samples: a folder of PNG (class ids) / NPY masks, one such file, a NIfTI "
                        "label volume (sliced as the training data; the samples are also written as volumes in its "
                        "geometry), or data:SPLIT[:N], the masks of the run config's data split (the first N); "
                        "pixels with the run's ignore value (255) are unknown, so a partial mask is filled in. Writes images/<mask>_<k>.png, condition_masks/ and from_masks.json into a new "
                        "folder (the same command again finishes an interrupted session there); --format npz/nii "
                        "and --hu as for unconditional samples (a label volume's NIfTI files are its volumes)")
    p.add_argument("--per_mask", type=int, default=1, metavar="K", help="with --masks: images per mask")
    p.add_argument("--guidance_scale", type=float, default=1.0, metavar="S",
                   help="with --masks: classifier-free guidance scale (1: conditional, default; 0: the unconditional "
                        "model, bit for bit; > 1: stronger adherence, two model calls per step)")
    p.add_argument("--mask_from", "--mask-from", dest="mask_from", choices=["latents", "reencoded"], default=None,
                   help="anatomical models: what the segmentation head reads for a sample's mask: the sampled "
                        "latents, or the decoded sample encoded again (encoder latents, as in training; one encoder "
                        "pass more) (default: the run's config, mask_from, itself latents by default)")
    p.add_argument("--format", nargs="+", choices=["png", "nii", "npz"], default=["png"],
                   help="extra formats beside the 8-bit PNGs (always written); nii: NIfTI samples and integer "
                        "masks in the training data's canonical (RAS+) orientation, spacing and position")
    p.add_argument("--reference", default=None, metavar="VOLUME.nii.gz",
                   help="NIfTI volume whose geometry the NIfTI samples take (default: the run's recorded geometry, "
                        "else the first NIfTI of the run's training data, else 1 mm pixels with a note)")
    p.add_argument("--hu", action="store_true",
                   help="CT runs: NIfTI samples in Hounsfield units (the training window inverted); implies "
                        "--format nii")
    p.add_argument("--stack", action="store_true",
                   help="also write every complete sample of the folder as one volume (stack.nii.gz, "
                        "stack_masks.nii.gz) along the slice axis; implies --format nii")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet before sampling (pays off for many samples; the first batch "
                        "is slow while graphs are captured)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend with --compile")
    p.add_argument("--unsafe-load", dest="unsafe_load", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")
    add_trust_argument(p)
    add_threads_argument(p)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_run(args.resume, args.base, args.trust_config)  # a run's config names allow-listed targets only
    device = resolve_device(args.device)
    governor = configure_threads(args.threads, device.type == "cpu")
    # Everything that can be checked without the model is checked before loading it.
    sampling.check_sampling_settings(args.n_samples, args.batch_size, args.custom_steps, args.eta, args.sampler,
                                     args.vanilla_sample, args.anatomy_guidance)
    if args.autoguide is not None:
        check_autoguide(args)
    _, run_dir, _, config = sampling.read_run_config(args.resume, args.base)
    masks = read_condition_masks(args, config) if args.masks is not None else None
    out_dir = args.logdir
    if out_dir is None:
        base = run_dir or os.path.dirname(os.path.abspath(args.resume))
        ancestral = args.vanilla_sample or args.sampler == "ancestral"
        tag = "vanilla" if ancestral else f"{args.sampler}{args.custom_steps}_eta{args.eta:g}"
        tag += f"_guided{args.anatomy_guidance:g}" if args.anatomy_guidance else ""
        tag += f"_autoguided{args.autoguide_weight:g}" if args.autoguide is not None else ""
        tag = f"from_masks_{tag}_g{args.guidance_scale:g}" if masks is not None else tag
        out_dir = os.path.join(base, "samples", f"{tag}_seed{args.seed}")
    if masks is None:
        sampling.check_output_dir(out_dir)
    else:
        from ldm.sampling.masks import check_from_masks_folder

        check_from_masks_folder(out_dir)  # new, or its own interrupted session to finish
    geometry = None
    if "nii" in args.format or args.hu or args.stack:
        from ldm.sample_geometry import resolve_geometry

        # resolve_config: an export's ${oc.env:DATA_ROOT} unset here stays text; its recorded geometry needs no data
        geometry = resolve_geometry(sampling.resolve_config(config), args.reference)
        if args.hu:
            geometry.check_hu()  # a non-CT run is refused here, before loading
    t0 = time.perf_counter()
    model, info = sampling.load_model_for_sampling(args.resume, args.base, args.unsafe_load, device,
                                                   trust_config=args.trust_config)
    if args.compile:
        from ldm.modules.diffusionmodules.compile import compile_unet

        compile_unet(model, backend=args.compile_backend)
    autoguidance = None
    if args.autoguide is not None:
        from ldm.models.diffusion.autoguidance import Autoguidance

        guide, guide_info = sampling.load_model_for_sampling(args.autoguide, args.base, args.unsafe_load, device,
                                                             trust_config=args.trust_config)
        autoguidance = Autoguidance(model, guide, args.autoguide_weight, guide_ema=args.ema and guide_info["has_ema"],
                                    description=f"{guide_info['checkpoint']} (sha256 "
                                                f"{guide_info['checkpoint_sha256'][:16]})")
    info["load_s"] = time.perf_counter() - t0
    if masks is not None:
        return sample_masks(model, info, args, out_dir, masks, autoguidance, geometry)
    if args.mask_from is not None:
        if not hasattr(model, "mask_from") or getattr(model, "is_joint", False):
            print(f"sample.py: error: --mask_from needs an anatomical model with a segmentation head; "
                  f"{args.resume} holds a {type(model).__name__}{' in joint mode' if hasattr(model, 'mask_from') else ''}",
                  file=sys.stderr)
            return 2
        model.mask_from = args.mask_from
    try:
        run = sampling.generate(model, out_dir, args.n_samples, args.batch_size, args.custom_steps, args.eta,
                                args.seed, vanilla=args.vanilla_sample, use_ema=args.ema and info["has_ema"],
                                save_masks=args.save_masks, formats=args.format,
                                colours=sampling.palette_for(model), progress=args.progress, sampler=args.sampler,
                                anatomy_guidance=args.anatomy_guidance, geometry=geometry, hu=args.hu,
                                stack=args.stack, manifest_info=info,
                                on_batch=None if governor is None else governor.step, autoguidance=autoguidance)
    except KeyboardInterrupt as err:
        raise SamplingInterrupted(out_dir) from err
    except OSError as err:  # a write that failed (ldm.atomic_io.WriteError names the file): cli says what remains
        err.out_dir = out_dir  # type: ignore[attr-defined]
        raise
    redone = f"; redid incomplete samples {run['redone']}" if run["redone"] else ""
    resumed = f"finished the interrupted session {run['resumes']}: " if run.get("resumes") else ""
    written = (f"wrote {run['count']} samples ({run['start_index']:06d}..{run['start_index'] + run['count'] - 1:06d})"
               if run["count"] else "wrote no new samples")
    print(f"{resumed}{written} to {out_dir}{redone}; manifest {os.path.join(out_dir, 'samples.json')}")
    return 0


def read_condition_masks(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """``--masks`` read and its settings checked before any model is loaded: ``{"names", "masks"}`` of mask files,
    or ``{"names", "volume", "slicing"}`` of a NIfTI label volume (sliced as the run's training data)."""
    from ldm.sample_geometry import data_slicing
    from ldm.sampling.label_volumes import is_label_volume, read_label_volume
    from ldm.sampling.masks import (check_autoguided_scale, check_from_masks_folder, check_guidance_scale,
                                    is_dataset_masks, read_dataset_masks, read_mask_files)

    check_guidance_scale(args.guidance_scale)
    if args.per_mask < 1:
        raise ValueError(f"--per_mask must be >= 1, got {args.per_mask}")
    if args.n_samples != get_parser().get_default("n_samples"):
        raise ValueError("-n does not apply with --masks (one image per mask and --per_mask); drop -n")
    if args.autoguide is not None:
        check_autoguided_scale(args.guidance_scale)
    clash = [flag for flag, on in (("--anatomy_guidance", args.anatomy_guidance),
                                   ("--vanilla_sample", args.vanilla_sample)) if on]
    if clash:
        raise ValueError(f"--masks does not combine with {', '.join(clash)} yet")
    if args.stack:
        raise ValueError("--stack does not apply with --masks: the samples of a NIfTI label volume are written as "
                         "volumes in its geometry, those of mask files one NIfTI each with --format nii")
    if args.logdir is not None:
        check_from_masks_folder(args.logdir)
    if is_dataset_masks(args.masks):
        names, masks = read_dataset_masks(config, args.masks, args.progress)
        return {"names": names, "masks": masks}
    if is_label_volume(args.masks):
        slicing = data_slicing(sampling.resolve_config(config))
        volume = read_label_volume(args.masks, slicing["slice_axis"], slicing["label_map"])
        return {"names": volume.names, "volume": volume, "slicing": slicing}
    names, masks = read_mask_files(args.masks)
    return {"names": names, "masks": masks}


def sample_masks(model: torch.nn.Module, info: dict, args: argparse.Namespace, out_dir: str,
                 inputs: dict[str, Any], autoguidance: Any = None, geometry: Any = None) -> int:
    """The ``--masks`` session: ``--per_mask`` images for every mask into ``out_dir`` (for a label volume also as
    volumes in its geometry), autoguided with ``--autoguide``; the same command again finishes an interrupted one."""
    from ldm.sampling.label_volumes import fit_label_volume
    from ldm.sampling.masks import masks_complete, model_image_size, write_from_masks

    names, masks, volume = inputs["names"], inputs.get("masks"), None
    if "volume" in inputs:
        slicing = inputs["slicing"]
        size = model_image_size(model)
        if size[0] != size[1]:
            raise ValueError(f"label volumes need a model of square images, this one draws {size[0]}x{size[1]}")
        masks, affine = fit_label_volume(inputs["volume"], size[0], slicing["square"], slicing["spacing"])
        volume = {"affine": affine, "slice_axis": inputs["volume"].slice_axis, "source": inputs["volume"].path,
                  "label_map": slicing["label_map"]}

    try:
        record = write_from_masks(model, out_dir, names, masks, args.per_mask, args.custom_steps, args.eta,
                                  args.seed, args.guidance_scale, args.batch_size, args.sampler,
                                  args.ema and info["has_ema"], args.save_masks, colours=sampling.palette_for(model),
                                  info=info, progress=args.progress, volume=volume, autoguidance=autoguidance,
                                  formats=args.format, geometry=geometry, hu=args.hu)
    except KeyboardInterrupt as err:
        done, total = masks_complete(out_dir)
        raise SamplingInterrupted(out_dir, f"{done} of {total} masks have all their images in {out_dir} "
                                           "(from_masks.json records the session)") from err
    record_path = os.path.join(out_dir, "from_masks.json")
    if record.get("already_complete"):
        print(f"{out_dir} already holds this session, complete; nothing to do (record {record_path})")
        return 0
    resumed = record.get("resumed")
    kept = f" (kept {resumed['kept_masks']} masks of the interrupted session)" if resumed else ""
    print(f"wrote {record['masks'] * record['per_mask']} images for {record['masks']} masks (guidance scale "
          f"{args.guidance_scale:g}) to {out_dir}{kept}; record {record_path}")
    return 0


def check_autoguide(args: argparse.Namespace) -> None:
    """``--autoguide`` settings checked before any model is loaded (ValueError: one line from ``run_script``)."""
    from ldm.models.diffusion.autoguidance import check_autoguidance_weight

    check_autoguidance_weight(args.autoguide_weight)
    if args.anatomy_guidance:
        raise ValueError("--autoguide and --anatomy_guidance steer the same denoiser; use one of them")
    if not os.path.exists(args.autoguide):
        raise FileNotFoundError(f"--autoguide {args.autoguide}: no such run folder or checkpoint")
    check_run(args.autoguide, args.base, args.trust_config)


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sampling session into ``out_dir``; what it wrote is kept (:func:`cli` says so in one line)."""

    def __init__(self, out_dir: str, kept: Optional[str] = None) -> None:
        super().__init__(f"sampling into {out_dir} interrupted")
        self.out_dir = out_dir
        self.kept = kept  # what the folder holds, when the session knows it (sampling from masks)


def stopped_line(out_dir: str, what: str, kept: Optional[str] = None) -> str:
    """One line for a session that stopped before its end: why, what is in the folder (``kept``, else counted from
    ``samples.json``), how to finish."""
    from ldm.sample_io import MANIFEST, read_manifest, scan_samples

    if kept is not None:
        return (f"sample.py: {what}; {kept}. Run the same command again to finish it: the incomplete masks are "
                "redone and the complete ones kept")

    try:
        complete: int | None = len(scan_samples(out_dir, sessions=read_manifest(out_dir).get("sessions", []))[0])
    except (OSError, ValueError):
        complete = None
    kept = f"{complete} complete samples are in {out_dir}" if complete is not None else \
        f"the complete samples in {out_dir} are kept"
    return (f"sample.py: {what}; {kept} ({os.path.join(out_dir, MANIFEST)} records the session). Run the same "
            "command again to finish it: incomplete samples are redone and the folder ends with the count asked for")


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` as a command: Ctrl-C ends with one line and exit status 130, a write that failed (a full disk)
    with one line naming the file and exit status 1; no traceback (``LDM_TRACEBACK=1`` keeps it)."""
    try:
        return main(argv)
    except SamplingInterrupted as stop:
        if os.environ.get("LDM_TRACEBACK"):
            raise
        sys.stderr.write(stopped_line(stop.out_dir, "interrupted (Ctrl-C)", stop.kept) + "\n")
        return 130
    except KeyboardInterrupt:
        if os.environ.get("LDM_TRACEBACK"):
            raise
        sys.stderr.write("sample.py: interrupted (Ctrl-C) before sampling started; no sample was written\n")
        return 130
    except OSError as err:
        if isinstance(err, FileNotFoundError) or os.environ.get("LDM_TRACEBACK"):
            raise  # run_script reports a missing file in one line
        out_dir = getattr(err, "out_dir", None)
        sys.stderr.write((stopped_line(out_dir, f"error: {err}") if out_dir else f"sample.py: error: {err}") + "\n")
        return 1


if __name__ == "__main__":
    from ldm.util import run_script

    sys.exit(run_script(cli))
