"""bench/unet_speed.py's comparison: the UNet of commit 131d3de, loaded from git history, has the same state-dict keys
and computes the same outputs and gradients as today's UNet (the benchmark's equality check, at a small size)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from bench import unet_speed

ROOT = Path(__file__).resolve().parents[1]


def _has_commit() -> bool:
    try:
        return subprocess.run(["git", "cat-file", "-e", f"{unet_speed.OLD_COMMIT}^{{commit}}"], cwd=ROOT,
                              capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _has_commit(), reason=f"needs git and commit {unet_speed.OLD_COMMIT} in the checkout")
def test_unet_matches_the_131d3de_unet_and_the_old_modules_stay_separate():
    params = {**unet_speed.QUICK_UNET, "image_size": 8}
    old, new = unet_speed.build_pair(params, torch.device("cpu"))
    assert type(old).__module__ == f"{unet_speed.OLD_PREFIX}.ldm.modules.diffusionmodules.openaimodel"
    assert type(old.input_blocks[1][0]).__module__ == type(old).__module__  # old blocks, not today's
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 900])
    diffs = unet_speed.check_equal(old, new, x, t)
    assert diffs["output_max_rel_diff"] < 1e-5 and diffs["grad_max_rel_diff"] < 1e-4, diffs
    assert float(new(x, t).detach().abs().max()) > 0  # the zero-initialised outputs were perturbed: a real comparison
