"""Independent segmenter training and the evaluate.py report on synthetic folders."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from ldm import sampling
from ldm.evaluation import anatomy, compare, segmenter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_sample_run import load_script  # noqa: E402


class SquaresDataset(torch.utils.data.Dataset):
    """Dark 16x16 images with a bright square (class 1) and a mid-grey bar (class 2); contract layout."""

    def __init__(self, n: int = 24, seed: int = 0, size: int = 16) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            mask = np.zeros((size, size), dtype=np.int64)
            r, c = rng.integers(1, size - 6, size=2)
            mask[r:r + 5, c:c + 5] = 1
            mask[:, 0:2] = 2
            image = np.where(mask == 1, 0.8, np.where(mask == 2, 0.0, -0.8)).astype(np.float32)
            image += rng.normal(0, 0.05, image.shape).astype(np.float32)
            self.items.append({"image": image[..., None], "segmentation": mask, "has_segmentation": True,
                               "file_path_": f"s{i}", "relative_file_path_": f"s{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


@pytest.fixture(scope="module")
def trained_segmenter():
    torch.set_num_threads(1)
    return segmenter.train_segmenter(SquaresDataset(24), num_classes=3, steps=60, batch_size=8, base_channels=8,
                                     depth=2, lr=5e-3)


def test_segmenter_learns_and_roundtrips(tmp_path, trained_segmenter):
    model = trained_segmenter
    images, masks = compare.load_dataset_arrays(SquaresDataset(8, seed=1))
    pred = segmenter.segment(model, images)
    dice = anatomy.dice_per_class(pred, masks, 3)
    assert dice[1] > 0.8 and dice[2] > 0.8, dice
    path = segmenter.save_segmenter(str(tmp_path / "seg.pt"), model, {"steps": 40})
    loaded, meta = segmenter.load_segmenter(path)
    assert meta["steps"] == 40
    assert torch.equal(segmenter.segment(loaded, images), pred)
    with pytest.raises(FileNotFoundError, match="train_segmenter"):
        segmenter.load_segmenter(str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a segmenter checkpoint"):
        segmenter.load_segmenter(str(tmp_path / "other.pt"))


def test_evaluate_script_writes_report_with_numbers(tmp_path, monkeypatch, trained_segmenter):
    real = SquaresDataset(12, seed=3)
    images, masks = compare.load_dataset_arrays(real)
    # "anatomical": exactly the real images and masks; "baseline": images shifted brighter, no masks.
    sampling.save_samples(str(tmp_path / "anat"), 0, images, masks)
    sampling.save_samples(str(tmp_path / "base"), 0, (images + 0.4).clamp(-1, 1))
    sampling.save_samples(str(tmp_path / "real"), 0, images, masks)
    segmenter.save_segmenter(str(tmp_path / "seg.pt"), trained_segmenter)
    evaluate = load_script("evaluate")

    monkeypatch.delenv("LDM_INCEPTION_WEIGHTS", raising=False)
    out = tmp_path / "report"
    rc = evaluate.main(["--samples", f"anatomical={tmp_path / 'anat'}", f"baseline={tmp_path / 'base'}",
                        "--real", str(tmp_path / "real"), "--num_classes", "3", "--class_names", "bg", "sq", "bar",
                        "--segmenter", str(tmp_path / "seg.pt"), "--rules", "none", "--kid_subset_size", "6",
                        "-o", str(out)])
    assert rc == 0
    for name in ("report.md", "report.json", "comparison.png"):
        assert (out / name).stat().st_size > 0
    data = json.load(open(out / "report.json"))["results"]
    anat, base = data["anatomical"], data["baseline"]
    # Identical to real (up to 8-bit rounding): ~zero distances, perfect own-mask statistics.
    assert anat["histogram_w1"] < 0.01 and anat["fid_pixel"] < 1e-3
    assert anat["model_area_w1_mean"] == 0.0 and anat["model_presence_sq"] == 1.0
    assert base["histogram_w1"] == pytest.approx(0.4, abs=0.05) and base["fid_pixel"] > 0.5
    assert "model_presence_sq" not in base and "seg_presence_sq" in base
    assert anat["seg_dice_mean"] > 0.8  # segmenter agrees with the model's own masks
    md = open(out / "report.md").read()
    assert f"{base['fid_pixel']:.4g}" in md and f"{anat['seg_dice_mean']:.4g}" in md


def test_copy_paste_moves_structures_with_their_labels():
    """Copy-paste augmentation: pasted pixels take the source class and the source intensities together, the
    inputs stay as they were, probability 0 changes nothing, and the same generator seed gives the same batch."""
    g = torch.Generator().manual_seed(0)
    image = torch.zeros(4, 1, 16, 16)
    mask = torch.zeros(4, 16, 16, dtype=torch.long)
    for b in range(4):  # one square organ per example, class b % 2 + 1, intensity 0.5 or 0.9
        c = b % 2 + 1
        mask[b, 2 + b:6 + b, 3:7] = c
        image[b, 0][mask[b] == c] = 0.5 if c == 1 else 0.9
    before = (image.clone(), mask.clone())
    same = segmenter.copy_paste(image, mask, torch.Generator().manual_seed(1), prob=0.0)
    assert torch.equal(same[0], image) and torch.equal(same[1], mask)
    out_image, out_mask = segmenter.copy_paste(image, mask, g, prob=1.0, max_pastes=3)
    assert torch.equal(image, before[0]) and torch.equal(mask, before[1])
    changed = out_mask != mask
    assert changed.any()  # every example received at least one structure (it may land on its own organ)
    for c, value in ((1, 0.5), (2, 0.9)):
        assert torch.all(out_image[:, 0][out_mask == c] == value)  # labels and intensities moved together
    assert set(out_mask.unique().tolist()) <= {0, 1, 2}
    again = segmenter.copy_paste(image, mask, torch.Generator().manual_seed(0), prob=1.0, max_pastes=3)
    assert torch.equal(again[0], out_image) and torch.equal(again[1], out_mask)
    # an offset moves without wrapping around
    shifted = segmenter._shifted(torch.arange(16.0).reshape(4, 4), 1, -2)
    assert shifted[0].tolist() == [0, 0, 0, 0] and shifted[1].tolist() == [2, 3, 0, 0]
