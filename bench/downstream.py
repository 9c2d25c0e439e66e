#!/usr/bin/env python
"""The downstream test users quote: train nnU-Net on synthetic pairs, test it on real slices (issue 30).

    python bench/downstream.py -o bench/downstream_cpu_dev --n 128 --test-n 128 --epochs 5 --iters 40 \\
        --val-iters 2 --seeds 0,1,2 --segmenter-steps 600   # the CPU development run (27 min on one core)
    python bench/downstream.py -o /tmp/q --quick      # every stage at toy size (tests/test_bench_downstream.py)
    python bench/downstream.py -o OUT --device cuda --n 2048 --test-n 512 --epochs 1000 --iters 250 \\
        --val-iters 50 --seeds 0,1,2 --segmenter-steps 1500 --da-workers 8
                              # GPU: nnU-Net's own full schedule (1000 x 250 iterations; hours per model, 12 models)

What it does, on the models of one benchmark run (``--run``, default ``bench/out/v2_cpu``: the frozen autoencoder
and the arms' checkpoints of ``bench/anatomy_v2.py``, training seed ``--arm-seed``):

1. **Pair sets** of ``--n`` image/mask pairs each (phantom v2, label set ``phantom2``, 10 classes):
   ``real`` (the first N slices of the real train split, the split the models were trained on),
   ``synthetic_anatomical`` (N DDIM samples of the anatomical arm with its own masks),
   ``synthetic_plain_seg`` (N DDIM samples of the plain arm, labelled by an *independent* segmenter: the
   benchmark's ``SegmenterUNet`` trained on the real train split with seed ``SEGMENTER_SEED``, which neither
   judge uses; the judges stay the benchmark's instrument) and ``real+synthetic_anatomical`` (2N). Sampling:
   DDIM with the benchmark's steps and eta 0 (``anatomy_v2.samplers``), start noise of indices ``0..N-1`` of
   the protocol's development noise seed (so they are the benchmark's own DDIM samples).
2. Each set is written as an nnU-Net v2 raw dataset by ``ldm/export_dataset.py`` (synthetic sets as sample
   folders of :mod:`ldm.sample_io`, float NPZ images; real slices in the project's ``images/`` + ``masks/``
   layout, float NPY images), planned and preprocessed by nnU-Net (``2d``), and trained with nnU-Net's own
   ``nnUNetTrainer`` (subclass ``nnUNetTrainerDownstream``: ``--epochs``, ``--iters``, ``--val-iters``; fold
   ``all``: every case trains) once per nnU-Net training seed (``--seeds``: torch, numpy and ``random``
   seeded before the trainer is built).
3. nnU-Net's predictor (``nnUNetPredictor``, its default test-time mirroring) segments the first ``--test-n``
   slices of the real test split; Dice per class against their true masks with ``ldm.evaluation.anatomy.
   dice_per_class`` (pixels pooled over the test slices; NaN for a class absent from prediction and truth,
   left out of the foreground mean). Per condition: mean over nnU-Net seeds with a Student-t 95 % interval
   (``anatomy_stats.mean_interval``), and paired seed-level tests against ``real``
   (``anatomy_stats.seed_level_table``, Holm over the three contrasts).

Single process, one thread: ``nnUNet_n_proc_DA=0`` (nnU-Net's single-threaded augmenter), no ``torch.compile``
(``nnUNet_compile=f``), and nnU-Net's fingerprint and preprocessing pools are run as a one-thread pool inside this
process (``_in_process_pools``; the same ``Pool`` interface, nothing spawned). Outputs in ``-o``:
``downstream.json``, ``downstream.md``, ``pairs.png`` (a few pairs of each set, masks overlaid with the
``phantom2`` colours); nnU-Net's raw/preprocessed/results folders go to ``--work`` (default: a temporary folder,
removed at the end).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("downstream")
CONDITIONS = ("real", "synthetic_anatomical", "synthetic_plain_seg", "real+synthetic_anatomical")
DATASET_IDS = {"real": 931, "synthetic_anatomical": 932, "synthetic_plain_seg": 933,
               "real+synthetic_anatomical": 934}
SEGMENTER_SEED = 11  # the independent segmenter; the judges use seeds 0 (A) and 1 (B)
SEGMENTER_WIDTH = 16
LABEL_SET = "phantom2"
TRAINER_NAME = "nnUNetTrainerDownstream"


# ------------------------------------------------------------------------------------------------ arguments
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/downstream.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--out", required=True, help="output folder (downstream.json, downstream.md, pairs.png)")
    p.add_argument("--run", default=os.path.join(ROOT, "bench", "out", "v2_cpu"),
                   help="the benchmark run folder (setup/ and arms/ of bench/anatomy_v2.py)")
    p.add_argument("--arm-seed", "--arm_seed", dest="arm_seed", type=int, default=0,
                   help="training seed of the arms' checkpoints")
    p.add_argument("--n", type=int, default=128, help="pairs per set (the mixed set has 2N)")
    p.add_argument("--test-n", "--test_n", dest="test_n", type=int, default=128, help="real test slices")
    p.add_argument("--epochs", type=int, default=5, help="nnU-Net epochs (nnU-Net's own: 1000)")
    p.add_argument("--iters", type=int, default=40, help="training iterations per epoch (nnU-Net's own: 250)")
    p.add_argument("--val-iters", "--val_iters", dest="val_iters", type=int, default=2,
                   help="validation iterations per epoch (nnU-Net's own: 50)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated nnU-Net training seeds")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help=f"comma-separated, from {', '.join(CONDITIONS)}")
    p.add_argument("--noise-seed", "--noise_seed", dest="noise_seed", type=int, default=None,
                   help="start-noise seed (default: the protocol's development noise seed)")
    p.add_argument("--segmenter-steps", "--segmenter_steps", dest="segmenter_steps", type=int, default=None,
                   help="steps of the independent segmenter (default: the preset's judge steps)")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes on untrained toy models (bench/anatomy_v2's quick preset): end to end in seconds")
    p.add_argument("--work", default=None, help="nnU-Net's raw/preprocessed/results folders (kept); default: a "
                                                "temporary folder removed at the end")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--da-workers", "--da_workers", dest="da_workers", type=int, default=0,
                   help="with --device cuda: nnU-Net's augmentation worker processes (nnUNet_n_proc_DA; on the CPU "
                        "always 0, in this process)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only write -o/downstream.md again from a downstream.json (trains nothing)")
    p.add_argument("--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ models
def _sha256(path: str) -> str:
    """SHA-256 of a file: the benchmark's own (``anatomy_v2._sha256``)."""
    import anatomy_v2 as av2

    return av2._sha256(path)


def run_preset(run_dir: str) -> tuple[str, Any]:
    """The preset of a benchmark run folder, rebuilt from its ``run.json`` settings."""
    import anatomy_v2 as av2

    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--run {run_dir}: no run.json (a run folder of bench/anatomy_v2.py)")
    with open(path) as f:
        run = json.load(f)
    names = {f.name for f in dataclasses.fields(av2.PresetV2)}
    settings = {k: v for k, v in run["settings"].items() if k in names}
    settings["fractions"] = tuple(settings.get("fractions", (0.25, 1.0)))
    return run.get("preset", "?"), av2.PresetV2(**settings)


def run_first_stage(run_dir: str) -> tuple[str, float]:
    """``(autoencoder checkpoint, latent scale)`` of a benchmark run folder's frozen first stage (its ``setup/``)."""
    setup = os.path.join(run_dir, "setup")
    with open(os.path.join(setup, "autoencoder.json")) as f:
        return os.path.join(setup, "autoencoder.ckpt"), float(json.load(f)["scale_factor"])


def load_arms(run_dir: str, preset: Any, arm_seed: int, device: torch.device) -> dict[str, Any]:
    """The plain and anatomical arms at the run's final step (``load_trained`` of the benchmark), with provenance."""
    import anatomy_models as am
    import anatomy_v2 as av2

    ae_ckpt, scale = run_first_stage(run_dir)
    arms = {}
    for arm in ("plain", "anatomical"):
        ckpt = os.path.join(run_dir, "arms", arm, f"seed{arm_seed}", f"step{preset.steps:06d}.ckpt")
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{ckpt} is missing: train the arm first (bench/anatomy.py -o {run_dir} "
                                    f"--arms {arm} --seeds {arm_seed})")
        config = av2.arm_config(arm, preset, ae_ckpt, scale)
        arms[arm] = {"model": am.load_trained(config, ckpt, device), "checkpoint": os.path.abspath(ckpt),
                     "checkpoint_sha256": _sha256(ckpt), "config": config, "step": preset.steps}
    return arms


def toy_arms(preset: Any, device: torch.device) -> dict[str, Any]:
    """Untrained plain and anatomical arms at the quick preset (random weights, seed 0): the plumbing only."""
    import anatomy_v2 as av2
    from ldm.util import instantiate_from_config

    arms = {}
    for arm in ("plain", "anatomical"):
        torch.manual_seed(0)
        config = av2.arm_config(arm, preset, None, 1.0)
        model = instantiate_from_config(config).to(device).eval()
        arms[arm] = {"model": model, "checkpoint": None, "checkpoint_sha256": "untrained-quick-" + arm,
                     "config": config, "step": 0}
    return arms


def independent_segmenter(train: dict[str, Any], steps: int, device: torch.device, progress: bool) -> torch.nn.Module:
    """The segmenter that labels the plain arm's samples: the benchmark's ``train_segmenter`` on the real train
    split, seed ``SEGMENTER_SEED`` (not a judge's seed)."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import train_segmenter

    return train_segmenter(am.TensorSlices(train["image"], train["segmentation"]), av2.NUM_CLASSES, steps=steps,
                           batch_size=16, base_channels=SEGMENTER_WIDTH, seed=SEGMENTER_SEED, device=device,
                           progress=progress)


# ------------------------------------------------------------------------------------------------ pair sets
def write_sample_folder(folder: str, images: torch.Tensor, masks: torch.Tensor, arm: dict[str, Any],
                        sampler: dict[str, Any], noise_seed: int, mask_source: str) -> str:
    """Pairs as a sample folder of ``scripts/sample.py`` (``ldm.sample_io``: float NPZ + PNG, masks, manifest), the
    input ``ldm.export_dataset.export_dataset`` reads."""
    from ldm.data.labels import get_label_set
    from ldm.sample_io import begin_session, end_session, save_samples

    info = {"checkpoint": arm["checkpoint"], "checkpoint_sha256": arm["checkpoint_sha256"],
            "config": {"model": arm["config"], "label_set": LABEL_SET}, "config_files": []}
    run = {"id": uuid.uuid4().hex[:12], "seed": noise_seed, "sampler": "ddim", "ddim_steps": sampler["steps"],
           "eta": sampler["eta"], "vanilla_sample": False, "anatomy_guidance": 0.0, "ema": True,
           "start_index": 0, "count": int(images.shape[0]), "masks": True, "mask_source": mask_source,
           "formats": ["png", "npz"], "hu": False, "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(folder, exist_ok=True)
    begin_session(folder, info, run)
    save_samples(folder, 0, images, masks, formats=("png", "npz"), colours=get_label_set(LABEL_SET))
    end_session(folder, run)
    return folder


def write_real_folder(folder: str, images: torch.Tensor, masks: torch.Tensor) -> str:
    """Real slices in the project's data layout (``images/*.npy`` float [-1, 1], ``masks/*.png``)."""
    from PIL import Image

    from ldm.atomic_io import atomic_write

    for sub in ("images", "masks"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for i in range(images.shape[0]):
        image = images[i, 0].numpy().astype(np.float32)
        mask = masks[i].numpy().astype(np.uint8)
        atomic_write(os.path.join(folder, "images", f"{i:06d}.npy"), lambda tmp, a=image: _save_npy(tmp, a))
        atomic_write(os.path.join(folder, "masks", f"{i:06d}.png"),
                     lambda tmp, m=mask: Image.fromarray(m).save(tmp, format="PNG"))
    return folder


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def export_real_only(real_dir: str, raw_dir: str, dataset_id: int, name: str, images_sub: str = "imagesTr",
                     labels_sub: str = "labelsTr") -> list[str]:
    """Real pairs only, with the export's lower-level functions (``real_cases``, ``read_case``, ``write_nifti``,
    ``nnunet_labels``; ``export_dataset`` itself needs a sample folder): a raw dataset (``imagesTr``) or the test
    images with their labels (``images_sub="imagesTs"``, ``labels_sub="labelsTs"``). Returns the case names."""
    from ldm.atomic_io import write_json
    from ldm.data.labels import get_label_set
    from ldm.export_dataset import FILE_ENDING, dataset_folder_name, nnunet_labels, read_case, real_cases, write_nifti

    folder = os.path.join(raw_dir, dataset_folder_name(dataset_id, name))
    cases, _ = real_cases(real_dir)
    for sub in (images_sub, labels_sub):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for case in cases:
        image, mask, affine, _ = read_case(case)
        write_nifti(os.path.join(folder, images_sub, f"{case.name}_0000{FILE_ENDING}"), image, affine)
        write_nifti(os.path.join(folder, labels_sub, f"{case.name}{FILE_ENDING}"), mask.astype(np.uint8), affine)
    if images_sub == "imagesTr":
        write_json(os.path.join(folder, "dataset.json"),
                   {"name": os.path.basename(folder), "description": "real phantom v2 slices",
                    "channel_names": {"0": "zscore"}, "labels": nnunet_labels(get_label_set(LABEL_SET)),
                    "numTraining": len(cases), "file_ending": FILE_ENDING})
    return [c.name for c in cases]


def export_condition(condition: str, folders: dict[str, str], raw_dir: str) -> dict[str, Any]:
    """Write one condition's nnU-Net raw dataset; returns its folder and case counts."""
    from ldm.export_dataset import dataset_folder_name, export_dataset

    dataset_id, name = DATASET_IDS[condition], condition.replace("+", "-")
    if condition == "real":
        cases = export_real_only(folders["real"], raw_dir, dataset_id, name)
        return {"dataset": dataset_folder_name(dataset_id, name), "num_synthetic": 0, "num_real": len(cases)}
    sample_dir = folders["synthetic_plain_seg" if condition == "synthetic_plain_seg" else "synthetic_anatomical"]
    real = folders["real"] if condition.startswith("real+") else None
    res = export_dataset(sample_dir, raw_dir, dataset_id, name, real_dir=real, label_set=LABEL_SET,
                         channel_name="zscore", progress=False)
    return {"dataset": os.path.basename(res.dataset_dir), "num_synthetic": res.num_synthetic,
            "num_real": res.num_real}


# ------------------------------------------------------------------------------------------------ nnU-Net
@contextlib.contextmanager
def nnunet_environment(work: str, augmentation_workers: int = 0) -> Iterator[dict[str, str]]:
    """nnU-Net's folders under ``work`` and its single-process switches (``nnUNet_n_proc_DA`` =
    ``augmentation_workers``, 0: in this process; no ``torch.compile``), for the duration of the block."""
    paths = {"nnUNet_raw": os.path.join(work, "raw"), "nnUNet_preprocessed": os.path.join(work, "preprocessed"),
             "nnUNet_results": os.path.join(work, "results")}
    settings = {**paths, "nnUNet_n_proc_DA": str(int(augmentation_workers)), "nnUNet_compile": "f",
                "nnUNet_def_n_proc": "1"}
    old = {k: os.environ.get(k) for k in settings}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    os.environ.update(settings)
    try:
        yield paths
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _ThreadContext:
    """A stand-in for ``multiprocessing.get_context("spawn")`` whose ``Pool`` is a thread pool in this process."""

    @staticmethod
    def Pool(processes: Optional[int] = None, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 (multiprocessing API)
        return _one_thread_pool(processes)


class _InProcessMultiprocessing:
    """The ``multiprocessing`` module as nnU-Net's fingerprint and preprocessing modules see it (get_context only)."""

    @staticmethod
    def get_context(method: Optional[str] = None) -> _ThreadContext:
        return _ThreadContext()


def _one_thread_pool(processes: Optional[int] = None, *args: Any, **kwargs: Any) -> Any:
    """``multiprocessing.Pool``'s interface, as one worker thread of this process."""
    from multiprocessing.pool import ThreadPool

    return ThreadPool(1)


@contextlib.contextmanager
def _in_process_pools() -> Iterator[None]:
    """Run nnU-Net's per-case work (dataset integrity check, fingerprint, preprocessing, file lists) in one thread
    of this process: those modules call ``multiprocessing.get_context("spawn").Pool(n)`` or ``Pool(n)``; here that
    is a one-thread ``ThreadPool`` (the same ``starmap``/``starmap_async``/``_pool`` interface), so nothing is
    spawned or forked and one core is used. SimpleITK (nnU-Net's image reader) is held to one thread as well."""
    import SimpleITK as sitk
    from nnunetv2.experiment_planning import verify_dataset_integrity as vd
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor as fe
    from nnunetv2.preprocessing.preprocessors import default_preprocessor as dp
    from nnunetv2.utilities import utils as nu

    modules = (fe, dp, vd)
    saved = [m.multiprocessing for m in modules]
    saved_pool, saved_threads = nu.Pool, sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    for m in modules:
        m.multiprocessing = _InProcessMultiprocessing()
    nu.Pool = _one_thread_pool
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        for m, original in zip(modules, saved):
            m.multiprocessing = original
        nu.Pool = saved_pool
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(saved_threads)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """nnU-Net prints a lot (and draws its own progress bars); keep it (returned) instead of on the console."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def plan_and_preprocess(dataset_id: int, intensity_voxels: Optional[int] = None) -> dict[str, Any]:
    """nnU-Net's fingerprint, experiment planning and ``2d`` preprocessing of one raw dataset; the 2d plan.
    ``intensity_voxels``: foreground voxels the fingerprint samples for its intensity statistics (nnU-Net's
    default 10^8 when None; the quick mode takes fewer, a fixed cost of seconds per dataset otherwise)."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset, plan_experiments,
                                                                      preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    threads, workers = torch.get_num_threads(), os.environ.get("nnUNet_n_proc_DA", "0")
    os.environ["nnUNet_n_proc_DA"] = "1"  # the planner sets torch's threads to this while it sizes networks
    try:
        with _in_process_pools(), _quiet():
            extractor = DatasetFingerprintExtractor
            if intensity_voxels is not None:
                class _Fewer(DatasetFingerprintExtractor):
                    def __init__(self, *args: Any, **kwargs: Any) -> None:
                        super().__init__(*args, **kwargs)
                        self.num_foreground_voxels_for_intensitystats = int(intensity_voxels)

                extractor = _Fewer
            extract_fingerprint_dataset(dataset_id, extractor, num_processes=1, check_dataset_integrity=True,
                                        clean=True, verbose=False)
            plan_experiments([dataset_id])
            preprocess([dataset_id], configurations=("2d",), num_processes=(1,), verbose=False)
    finally:
        os.environ["nnUNet_n_proc_DA"] = workers
        torch.set_num_threads(threads)
    name = maybe_convert_to_dataset_name(dataset_id)
    with open(os.path.join(str(nnUNet_preprocessed), name, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    c2d = plans["configurations"]["2d"]
    return {"dataset": name, "patch_size": c2d["patch_size"], "batch_size": c2d["batch_size"],
            "spacing": c2d["spacing"], "transpose_forward": plans.get("transpose_forward"),
            "normalization": c2d.get("normalization_schemes")}


def _trainer_class() -> type:
    """``nnUNetTrainerDownstream``: nnU-Net's ``nnUNetTrainer`` with a short schedule (class attributes)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainerDownstream(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
        """nnU-Net's default trainer; only the schedule differs (``EPOCHS`` x ``ITERS`` training iterations,
        ``VAL_ITERS`` validation iterations per epoch), set by :func:`train_nnunet`."""

        EPOCHS, ITERS, VAL_ITERS = 1000, 250, 50

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = self.EPOCHS
            self.num_iterations_per_epoch = self.ITERS
            self.num_val_iterations_per_epoch = self.VAL_ITERS

    return nnUNetTrainerDownstream


def train_nnunet(dataset_id: int, seed: int, epochs: int, iters: int, val_iters: int, device: torch.device) -> Any:
    """Train nnU-Net's 2d trainer on every case (fold ``all``) of one preprocessed dataset, seeded; the trainer."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset_id)
    base = os.path.join(str(nnUNet_preprocessed), name)
    with open(os.path.join(base, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(base, "dataset.json")) as f:
        dataset_json = json.load(f)
    plans["continue_training"] = False  # what nnU-Net's run_training adds before building a trainer
    cls = _trainer_class()
    cls.EPOCHS, cls.ITERS, cls.VAL_ITERS = int(epochs), int(iters), int(val_iters)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with _quiet():
        trainer = cls(plans=plans, configuration="2d", fold="all", dataset_json=dataset_json, device=device)
        trainer.output_folder = os.path.join(trainer.output_folder_base + f"__seed{seed}", "fold_all")
        trainer.output_folder_base = os.path.dirname(trainer.output_folder)
        os.makedirs(trainer.output_folder, exist_ok=True)
        trainer.disable_checkpointing = True  # the trained network predicts from memory; no 90 MB checkpoints
        trainer.run_training()
    return trainer


def predict_nnunet(trainer: Any, images_dir: str, out_dir: str, device: torch.device) -> None:
    """nnU-Net's predictor with the trained network (``manual_initialization``, as nnU-Net's own validation does)
    on every ``*_0000.nii.gz`` of ``images_dir``, one case after another (no worker processes)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    with _quiet():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager,
                                    [trainer.network.state_dict()], trainer.dataset_json,
                                    trainer.__class__.__name__, trainer.inference_allowed_mirroring_axes)
    os.makedirs(out_dir, exist_ok=True)
    with _in_process_pools(), _quiet():
        predictor.predict_from_files_sequential(images_dir, out_dir, save_probabilities=False, overwrite=True)


def read_label_volumes(folder: str, cases: list[str]) -> np.ndarray:
    """Label NIfTIs ``<case>.nii.gz`` of ``folder`` as one ``[N, X, Y]`` int64 array (their single slice)."""
    import nibabel as nib

    out = []
    for case in cases:
        path = os.path.join(folder, case + ".nii.gz")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"nnU-Net wrote no prediction for {case} ({path})")
        out.append(np.asarray(nib.load(path).dataobj)[..., 0].astype(np.int64))
    return np.stack(out)


def dice(pred: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Dice per class (pixels pooled over the test slices, NaN -> None for a class absent from both) and the
    foreground mean of the defined classes (``ldm.evaluation.anatomy.dice_per_class``)."""
    import anatomy_v2 as av2
    from ldm.evaluation.anatomy import dice_per_class

    per_class = dice_per_class(pred, truth, av2.NUM_CLASSES)
    fg = per_class[1:]
    return {"per_class": [None if np.isnan(v) else float(v) for v in per_class],
            "foreground_mean": float(np.nanmean(fg)) if np.isfinite(fg).any() else None}


# ------------------------------------------------------------------------------------------------ report
def summarise(results: dict[str, dict[int, dict[str, Any]]], class_names: list[str]) -> dict[str, Any]:
    """Per condition: seed-level mean and t interval of the foreground mean and of each class; paired contrasts
    of each synthetic condition against ``real`` over the shared nnU-Net seeds."""
    from anatomy_stats import mean_interval, seed_level_table

    summary: dict[str, Any] = {}
    for condition, per_seed in results.items():
        seeds = sorted(per_seed)
        summary[condition] = {
            "seeds": seeds,
            "foreground_mean": mean_interval([per_seed[s]["dice"]["foreground_mean"] for s in seeds]),
            "per_class": {name: mean_interval([per_seed[s]["dice"]["per_class"][k] for s in seeds])
                          for k, name in enumerate(class_names)}}
    values = {c: {s: r["dice"]["foreground_mean"] for s, r in per_seed.items()} for c, per_seed in results.items()}
    contrasts = [(c, "real") for c in results if c != "real"] if "real" in results else []
    rows = seed_level_table(values, contrasts) if contrasts else []
    return {"conditions": summary, "contrasts_vs_real": rows}


def _fmt(iv: dict[str, Any]) -> str:
    if iv.get("mean") is None:
        return "-"
    if iv.get("lo") is None:
        return f"{iv['mean']:.3f}"
    return f"{iv['mean']:.3f} [{iv['lo']:.3f}, {iv['hi']:.3f}]"


def _num(value: Any) -> str:
    return "not recorded" if value is None else f"{float(value):.3f}"


def markdown(report: dict[str, Any]) -> str:
    s, cfg = report["summary"], report["config"]
    names = report["class_names"]
    lines = [f"# Downstream test: nnU-Net trained on pair sets, tested on real slices ({report['mode']})", ""]
    if report["mode"] == "quick":
        lines += ["**Quick mode: untrained toy models and a few nnU-Net iterations. The numbers test the plumbing "
                  "and mean nothing.**", ""]
    else:
        lines += [f"**Development run, not a claim**: the arms are the development seed {cfg['arm_seed']} models "
                  f"of `{cfg['run']}` (one training seed each), nnU-Net trains for {cfg['epochs']} x {cfg['iters']} "
                  f"iterations (nnU-Net's own schedule is 1000 x 250), and the intervals are over nnU-Net training "
                  f"seeds only: they say nothing about the spread over LDM training seeds.", ""]
    lines += [f"Pairs per set N = {cfg['n']} (`real+synthetic_anatomical`: 2N), real test slices {cfg['test_n']}, "
              f"nnU-Net seeds {cfg['seeds']}, sampler DDIM {cfg['sampler']['steps']} steps eta "
              f"{cfg['sampler']['eta']:g}, noise seed {cfg['noise_seed']}, independent segmenter seed "
              f"{cfg['segmenter']['seed']}, {cfg['segmenter']['steps']} steps (foreground Dice on the real test "
              f"slices {report['segmenter_test_dice']:.3f}). "
              f"Dice: pixels pooled over the test slices, a class absent from prediction and truth left out; "
              f"mean over nnU-Net seeds [95 % t interval].", "",
              "| condition | training cases | nnU-Net batch | foreground Dice | per seed | " + " | ".join(names[1:])
              + " |", "|---|---|---|---|---|" + "---|" * (len(names) - 1)]
    for c, row in s["conditions"].items():
        cells = [_fmt(row["per_class"][n]) for n in names[1:]]
        per_seed = ", ".join(f"{report['results'][c][str(k)]['dice']['foreground_mean']:.3f}" for k in row["seeds"])
        data = report["datasets"][c]
        lines.append(f"| {c} | {data['num_cases']} | {data['plan']['batch_size']} | "
                     f"**{_fmt(row['foreground_mean'])}** | {per_seed} | " + " | ".join(cells) + " |")
    real = s["conditions"].get("real")
    if real and report["mode"] != "quick":
        missed = [n for n in names[1:] if (real["per_class"][n].get("mean") or 0.0) < 0.05]
        iters = cfg["epochs"] * cfg["iters"]
        lines += ["", f"nnU-Net saw {iters} training iterations per model (batch sizes from its own plans: 5 % of "
                      f"the dataset's voxels, so the 2N set trains on about twice the samples)."
                  + (f" **Undertrained**: trained on real pairs it still scores below 0.05 on "
                     f"{len(missed)} of {len(names) - 1} classes ({', '.join(missed)}), so the comparison covers "
                     "the large structures it learns first, not segmentation quality at convergence."
                     if missed else "")]
    if s["contrasts_vs_real"]:
        lines += ["", "Paired over nnU-Net seeds (foreground Dice, condition - real; Holm over the contrasts):", "",
                  "| contrast | difference [95 % CI] | p | p (Holm) |", "|---|---|---|---|"]
        for r in s["contrasts_vs_real"]:
            ci = f"[{r['lo']:+.3f}, {r['hi']:+.3f}]" if r.get("lo") is not None else ""
            p = "-" if r.get("p") is None else f"{r['p']:.3g}"
            ph = "-" if r.get("p_holm") is None else f"{r['p_holm']:.3g}"
            diff = "-" if r.get("diff") is None else f"{r['diff']:+.3f}"
            lines.append(f"| {r['contrast']} | {diff} {ci} | {p} | {ph} |")
    own = report.get("label_agreement")
    lines += ["", "## Beside the benchmark", "",
              f"- The benchmark's v2 records (`bench/records/v2_cpu_dev/*.json`) hold no train-on-synthetic measure; "
              f"the nearest is the anatomical arm's own-mask foreground Dice against judge A (steps/ddim): "
              f"{_num(report['benchmark'].get('own_mask_dice_vs_judge_A'))}.",
              f"- Own masks of the anatomical samples against the independent segmenter on the same images: "
              f"foreground Dice {own['foreground_mean']:.3f}." if own and own.get("foreground_mean") is not None
              else "- Own-mask agreement: not computed.",
              f"- Wall time {report['seconds']['total']:.0f} s ({report['device']}).", "",
              "## What it does not say", "",
              "- One LDM per arm (development seed): a different LDM seed may give other numbers.",
              "- Short nnU-Net schedules favour easy training sets; the ranking at nnU-Net's full schedule may differ.",
              "- Phantom data: the test says whether the pairs teach a segmenter phantom anatomy, not patient anatomy.",
              ""]
    return "\n".join(lines)


def figure(path: str, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], k: int = 6) -> None:
    """A grid: ``k`` pairs of each set, image in grey with its mask overlaid (``phantom2`` colours), and the masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ldm.atomic_io import atomic_write
    from ldm.data.labels import colourise, get_label_set

    labels = get_label_set(LABEL_SET)
    rows = list(sets)
    k = min(k, *(len(v[0]) for v in sets.values()))
    fig, axes = plt.subplots(len(rows), k, figsize=(1.5 * k, 1.55 * len(rows) + 0.4), squeeze=False)
    for r, name in enumerate(rows):
        images, masks = sets[name]
        for j in range(k):
            grey = (images[j, 0].numpy() + 1.0) / 2.0
            rgb = np.repeat(grey[..., None], 3, axis=2)
            colour = colourise(masks[j].numpy(), labels).astype(np.float32) / 255.0
            fg = (masks[j].numpy() > 0)[..., None]
            ax = axes[r, j]
            ax.imshow(np.where(fg, 0.55 * rgb + 0.45 * colour, rgb), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle("pair sets, masks overlaid (phantom2 colours); real+synthetic_anatomical = rows 1 + 2",
                 fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def benchmark_numbers(arm_seed: int) -> dict[str, Any]:
    """What the committed v2 development records say that is nearest to a downstream test."""
    path = os.path.join(ROOT, "bench", "records", "v2_cpu_dev", f"anatomical_seed{arm_seed}.json")
    if not os.path.isfile(path):
        return {"records": None}
    with open(path) as f:
        record = json.load(f)
    own = (record.get("evals", {}).get("steps/ddim", {}).get("own_mask") or {}).get("dice_vs_judge_A") or {}
    return {"records": os.path.relpath(path, ROOT), "train_on_synthetic": None,
            "own_mask_dice_vs_judge_A": own.get("foreground_mean")}


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.render:
        from ldm.atomic_io import write_text

        with open(args.render) as f:
            report = json.load(f)
        os.makedirs(args.out, exist_ok=True)
        write_text(os.path.join(args.out, "downstream.md"), markdown(report))
        return 0
    from anatomy_v2 import _seed_list

    try:
        seeds = _seed_list(args.seeds)
        conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
        unknown = [c for c in conditions if c not in CONDITIONS]
        if unknown:
            raise ValueError(f"unknown condition(s) {unknown}; conditions: {', '.join(CONDITIONS)}")
        for flag in ("n", "test_n", "epochs", "iters", "val_iters"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    except ValueError as err:
        print(f"downstream.py: error: {err}", file=sys.stderr)
        return 2
    from anatomy import _device_name, quiet_training_logs
    from ldm.util import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    work = args.work or tempfile.mkdtemp(prefix="downstream-")
    try:
        with quiet_training_logs():
            return _run(args, seeds, conditions, device, _device_name(device), work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, seeds: list[int], conditions: list[str], device: torch.device, device_name: str,
         work: str) -> int:
    import anatomy_models as am
    import anatomy_v2 as av2
    import records as rec
    from tqdm import tqdm

    from ldm.atomic_io import write_json, write_text
    from ldm.data.labels import get_label_set
    from ldm.evaluation.segmenter import segment

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    protocol = rec.load_protocol()
    if args.quick:  # toy sizes whatever the other flags say: 8 pairs, 1 epoch of 2 iterations, 2 seeds
        preset_name, preset = "quick", av2.PRESETS_V2["quick"]
        n, test_n = min(args.n, 8), min(args.test_n, 8)
        args.epochs, args.iters, args.val_iters = 1, min(args.iters, 2), 1
        seeds = seeds[:2]
    else:
        preset_name, preset = run_preset(args.run)
        n, test_n = args.n, args.test_n
    if n > preset.train_slices or test_n > preset.test_slices:
        raise ValueError(f"--n {n} / --test-n {test_n} exceed the preset's {preset.train_slices} train / "
                         f"{preset.test_slices} test slices")
    sampler = {"steps": int(av2.samplers(preset, protocol)["ddim"]["steps"]), "eta": 0.0}
    noise_seed = int(protocol["dev_noise_seed"] if args.noise_seed is None else args.noise_seed)
    train, test = av2.split(preset, "train"), av2.split(preset, "test")
    arms = toy_arms(preset, device) if args.quick else load_arms(args.run, preset, args.arm_seed, device)
    seconds["setup"] = time.perf_counter() - t0
    logger.info("setup %.1f s", seconds["setup"])

    t = time.perf_counter()
    seg_steps = args.segmenter_steps or preset.seg_steps
    segmenter = independent_segmenter(train, seg_steps, device, args.progress)
    segmenter_test_dice = dice(segment(segmenter, test["image"][:test_n], batch_size=128).numpy(),
                               test["segmentation"][:test_n].numpy())["foreground_mean"]
    seconds["segmenter"] = time.perf_counter() - t
    logger.info("independent segmenter %.1f s, test Dice %.3f", seconds["segmenter"], segmenter_test_dice)

    t = time.perf_counter()
    anat = am.draw_samples(arms["anatomical"]["model"], n, sampler["steps"], noise_seed, 64, device, True,
                           sampler="ddim", eta=0.0)
    plain = am.draw_samples(arms["plain"]["model"], n, sampler["steps"], noise_seed, 64, device, False,
                            sampler="ddim", eta=0.0)
    plain_masks = segment(segmenter, plain["image"], batch_size=128)
    anat_by_segmenter = segment(segmenter, anat["image"], batch_size=128)
    seconds["sampling"] = time.perf_counter() - t
    logger.info("sampling %.1f s", seconds["sampling"])
    sets = {"real": (train["image"][:n], train["segmentation"][:n]),
            "synthetic_anatomical": (anat["image"], anat["own_mask"]),
            "synthetic_plain_seg": (plain["image"], plain_masks)}

    t = time.perf_counter()
    raw_root = os.path.join(work, "raw")
    folders = {"real": write_real_folder(os.path.join(work, "pairs", "real"), *sets["real"]),
               "synthetic_anatomical": write_sample_folder(
                   os.path.join(work, "pairs", "synthetic_anatomical"), *sets["synthetic_anatomical"],
                   arms["anatomical"], sampler, noise_seed, "segmentation_head"),
               "synthetic_plain_seg": write_sample_folder(
                   os.path.join(work, "pairs", "synthetic_plain_seg"), *sets["synthetic_plain_seg"], arms["plain"],
                   sampler, noise_seed, f"an independent segmenter (SegmenterUNet width {SEGMENTER_WIDTH}, seed "
                                        f"{SEGMENTER_SEED}, trained on the real phantom v2 train split)")}
    test_folder = write_real_folder(os.path.join(work, "pairs", "test"), test["image"][:test_n],
                                    test["segmentation"][:test_n])
    results: dict[str, dict[int, dict[str, Any]]] = {}
    datasets: dict[str, Any] = {}
    with nnunet_environment(work, args.da_workers if device.type == "cuda" else 0):
        test_cases = export_real_only(test_folder, os.path.join(work, "test"), 999, "test", "imagesTs", "labelsTs")
        test_dir = os.path.join(work, "test", "Dataset999_test")
        truth = read_label_volumes(os.path.join(test_dir, "labelsTs"), test_cases)
        for condition in conditions:
            datasets[condition] = export_condition(condition, folders, raw_root)
            datasets[condition]["num_cases"] = datasets[condition]["num_synthetic"] + datasets[condition]["num_real"]
            datasets[condition]["plan"] = plan_and_preprocess(DATASET_IDS[condition],
                                                              10 ** 5 if args.quick else None)
        seconds["export_and_preprocess"] = time.perf_counter() - t
        logger.info("export, plans, preprocessing %.1f s", seconds["export_and_preprocess"])
        t = time.perf_counter()
        bar = tqdm(total=len(conditions) * len(seeds), desc="nnU-Net conditions x seeds", disable=not args.progress)
        for condition in conditions:
            results[condition] = {}
            for seed in seeds:
                bar.set_postfix(condition=condition, seed=seed)
                ts = time.perf_counter()
                trainer = train_nnunet(DATASET_IDS[condition], seed, args.epochs, args.iters, args.val_iters,
                                       device)
                tt = time.perf_counter() - ts
                pred_dir = os.path.join(work, "predictions", f"{condition.replace('+', '-')}_seed{seed}")
                predict_nnunet(trainer, os.path.join(test_dir, "imagesTs"), pred_dir, device)
                pred = read_label_volumes(pred_dir, test_cases)
                results[condition][seed] = {"dice": dice(pred, truth), "train_seconds": tt,
                                            "predict_seconds": time.perf_counter() - ts - tt,
                                            "num_training_cases": len(trainer.dataset_class(
                                                trainer.preprocessed_dataset_folder).identifiers),
                                            "num_predictions": int(pred.shape[0]),
                                            "final_train_loss": _last(trainer, "train_losses"),
                                            "final_pseudo_dice": _last(trainer, "ema_fg_dice")}
                logger.info("%s seed %d: train %.1f s, predict %.1f s, foreground Dice %.3f", condition, seed, tt,
                            results[condition][seed]["predict_seconds"],
                            results[condition][seed]["dice"]["foreground_mean"] or float("nan"))
                del trainer
                write_json(os.path.join(work, "results_partial.json"),
                           {c: {str(k): v for k, v in r.items()} for c, r in results.items()})
                bar.update(1)
        bar.close()
        seconds["nnunet"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    class_names = list(get_label_set(LABEL_SET).classes)
    report = {
        "mode": "quick" if args.quick else "development", "claim": False, "preset": preset_name,
        "device": device_name, "torch": torch.__version__, "nnunetv2": _version("nnunetv2"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"run": None if args.quick else os.path.relpath(os.path.abspath(args.run), ROOT),
                   "arm_seed": args.arm_seed, "n": n, "test_n": test_n, "epochs": args.epochs, "iters": args.iters,
                   "val_iters": args.val_iters, "seeds": seeds, "conditions": conditions, "sampler": sampler,
                   "noise_seed": noise_seed, "fold": "all", "trainer": TRAINER_NAME + " (nnUNetTrainer subclass)",
                   "configuration": "2d",
                   "segmenter": {"seed": SEGMENTER_SEED, "base_channels": SEGMENTER_WIDTH, "steps": seg_steps,
                                 "trained_on": f"real phantom v2 train split ({preset.train_slices} slices)"},
                   "dice_convention": "ldm.evaluation.anatomy.dice_per_class: pixels pooled over the test slices; "
                                      "a class absent from prediction and truth is NaN (null), left out of the "
                                      "foreground mean (classes 1..9)"},
        "arms": {a: {"checkpoint": None if v["checkpoint"] is None else os.path.relpath(v["checkpoint"], ROOT),
                     "checkpoint_sha256": v["checkpoint_sha256"], "step": v["step"]} for a, v in arms.items()},
        "class_names": class_names, "segmenter_test_dice": segmenter_test_dice,
        "label_agreement": dice(anat["own_mask"].numpy(), anat_by_segmenter.numpy()),
        "datasets": datasets, "results": {c: {str(s): r for s, r in v.items()} for c, v in results.items()},
        "summary": summarise(results, class_names), "benchmark": benchmark_numbers(args.arm_seed),
        "seconds": seconds}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "downstream.json"), report, indent=1, default=str)
    write_text(os.path.join(args.out, "downstream.md"), markdown(report))
    figure(os.path.join(args.out, "pairs.png"), sets)
    logger.info("wrote %s (%.0f s)", os.path.join(args.out, "downstream.json"), seconds["total"])
    return 0


def _last(trainer: Any, key: str) -> Optional[float]:
    try:
        values = trainer.logger.get_value(key, None) or []
    except (AttributeError, KeyError, TypeError):
        return None
    return float(values[-1]) if values else None


def _version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 (a missing package's metadata)
        return None


if __name__ == "__main__":
    sys.exit(main())
