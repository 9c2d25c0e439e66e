"""The trained models and the judge of a benchmark-v2 run folder, for the scripts that study them after training
(``sampler_steps_v2.py``, ``autoguidance_v2.py``, ``labelmap_v2.py``), and their ``--quick`` stand-ins."""
from __future__ import annotations

import os
from typing import Any

import torch


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


def run_setup(run: str, device: torch.device) -> dict[str, Any]:
    """``{"preset_name", "preset", "judge", "ae_ckpt", "scale"}`` of a run folder (FileNotFoundError without one)."""
    from downstream import run_first_stage, run_preset
    from ldm.evaluation.segmenter import load_segmenter

    name, preset = run_preset(run)
    ae_ckpt, scale = run_first_stage(run)
    return {"preset_name": name, "preset": preset, "judge": load_segmenter(os.path.join(run, "setup", "judge_A.pt"),
                                                                           device)[0],
            "ae_ckpt": ae_ckpt, "scale": scale}


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
