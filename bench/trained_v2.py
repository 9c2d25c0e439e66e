"""The trained models and the judge of a benchmark-v2 run folder, for the scripts that study them after training
(``sampler_steps_v2.py``, ``autoguidance_v2.py``, ``labelmap_v2.py``), and their ``--quick`` stand-ins."""
from __future__ import annotations

import argparse
import os
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def add_run_arguments(p: argparse.ArgumentParser, arms: Optional[str], seeds: str, quick_help: str) -> None:
    """The flags every study shares: ``--run``, ``--arms`` (not with ``arms=None``: a study that names its arms by
    role), ``--seeds``, ``--device``, ``--quick``, ``-o``."""
    p.add_argument("--run", default=os.path.join(HERE, "out", "v2_cpu"), help="benchmark-v2 run folder")
    if arms is not None:
        p.add_argument("--arms", default=arms)
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("-o", "--out", required=True)


def run_label(run: str, quick: bool) -> str:
    """What a study report says it read: the run folder relative to the repository when it lies inside it, else as
    given (a study started from a git worktree on the main checkout's run), or ``toy models``."""
    if quick:
        return "toy models"
    root = os.path.dirname(HERE)
    path = os.path.abspath(run)
    return os.path.relpath(path, root) if os.path.commonpath([path, root]) == root else run


def write_study(out_dir: str, stem: str, report: dict[str, Any], text: str) -> None:
    """``<stem>.json`` and ``<stem>.md`` of a study into ``out_dir`` (atomic writes), and the text printed."""
    from ldm.atomic_io import write_json, write_text

    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{stem}.json"), report)
    write_text(os.path.join(out_dir, f"{stem}.md"), text)
    print(text)


def study_device(name: str) -> torch.device:
    """The device of a study (``--device``); one thread on the CPU (several studies share a machine)."""
    from ldm.util import resolve_device

    device = resolve_device(name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    return device


def toy_judge(device: torch.device) -> torch.nn.Module:
    """A segmenter trained for two steps on the quick preset's slices (plumbing only)."""
    import anatomy_models as am
    import anatomy_v2 as av2
    from ldm.evaluation.segmenter import train_segmenter

    data = av2.split(av2.PRESETS_V2["quick"], "train")
    return train_segmenter(am.TensorSlices(data["image"], data["segmentation"]), av2.NUM_CLASSES, steps=2,
                           batch_size=8, seed=0, device=device)


def toy_model(arm: str, seed: int, device: torch.device, perturb: float = 0.0) -> torch.nn.Module:
    """An untrained model of ``arm`` at the quick preset (seeded); ``perturb`` > 0 adds that much Gaussian noise to
    its weights and makes them its EMA weights too (a fresh UNet predicts 0: every setting would look alike)."""
    import anatomy_v2 as av2
    from ldm.modules.ema import LitEma
    from ldm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(av2.arm_config(arm, av2.PRESETS_V2["quick"], None, 1.0)).to(device).eval()
    if perturb > 0:
        with torch.no_grad():
            for p in model.model.parameters():
                p.add_(perturb * torch.randn_like(p))
        model.model_ema = LitEma(model.model)  # sampling reads the EMA weights: these ones
    return model


def study_setup(run: str, quick: bool, device: torch.device) -> dict[str, Any]:
    """``{"preset_name", "preset", "judge", "setup"}`` of a study: the run folder's (:func:`run_setup`;
    FileNotFoundError without one), or with ``quick`` the quick preset, a toy judge and no setup."""
    import anatomy_v2 as av2

    if quick:
        return {"preset_name": "quick", "preset": av2.PRESETS_V2["quick"], "judge": toy_judge(device), "setup": None}
    setup = run_setup(run, device)
    return {"preset_name": setup["preset_name"], "preset": setup["preset"], "judge": setup["judge"], "setup": setup}


def run_setup(run: str, device: torch.device) -> dict[str, Any]:
    """``{"preset_name", "preset", "judge", "ae_ckpt", "scale", "setup_id"}`` of a run folder (FileNotFoundError
    without one); ``setup_id`` names its instrument as the benchmark's records do."""
    from downstream import run_first_stage, run_preset
    from ldm.evaluation.segmenter import load_segmenter

    import anatomy_v2 as av2

    name, preset = run_preset(run)
    ae_ckpt, scale = run_first_stage(run)
    return {"preset_name": name, "preset": preset, "judge": load_segmenter(os.path.join(run, "setup", "judge_A.pt"),
                                                                           device)[0],
            "ae_ckpt": ae_ckpt, "scale": scale, "setup_id": av2.setup_identity(os.path.join(run, "setup"), ae_ckpt)}


def trained_model(run: str, setup: dict[str, Any], arm: str, seed: int, step: int,
                  device: torch.device) -> torch.nn.Module:
    """The ``arm`` model of training seed ``seed`` at ``step`` (its checkpoint in the run folder), EMA weights
    included; FileNotFoundError naming the command that trains it when it is missing."""
    import anatomy_models as am
    import anatomy_v2 as av2

    ckpt = os.path.join(run, "arms", arm, f"seed{seed}", f"step{step:06d}.ckpt")
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt} is missing (train it: bench/anatomy.py -o {run} --arms {arm} --seeds {seed})")
    return am.load_trained(av2.arm_config(arm, setup["preset"], setup["ae_ckpt"], setup["scale"]), ckpt, device)


def guide_step(preset: Any) -> int:
    """The step of a run's earliest kept checkpoint (a quarter of the steps): the autoguidance guide."""
    return int(round(preset.steps * min(preset.fractions)))


def with_guide_ema(guide: torch.nn.Module) -> torch.nn.Module:
    """The guide with its EMA weights in place (it is never trained again), as the sampled model uses its own."""
    if getattr(guide, "use_ema", False):
        guide.model_ema.copy_to(guide.model)
    return guide


PER_SEED_DIR = "per_seed"


def cached_result(out_dir: str, name: str, settings: dict[str, Any]) -> Any:
    """The result a study kept as ``<out_dir>/per_seed/<name>.json`` when it was measured with these ``settings``
    (JSON-equal), else ``None`` (absent, or other settings: measured again)."""
    import json

    path = os.path.join(out_dir, PER_SEED_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        kept = json.load(f)
    return kept["result"] if kept.get("settings") == json.loads(json.dumps(settings)) else None


def cache_result(out_dir: str, name: str, settings: dict[str, Any], result: Any) -> None:
    """Keep ``result`` (JSON) as ``<out_dir>/per_seed/<name>.json`` with its settings and the code commit (atomic)."""
    import records as rec
    from ldm.atomic_io import write_json

    os.makedirs(os.path.join(out_dir, PER_SEED_DIR), exist_ok=True)
    write_json(os.path.join(out_dir, PER_SEED_DIR, f"{name}.json"),
               {"settings": settings, "code": rec.code_commit(), "result": result})
