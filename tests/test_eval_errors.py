"""Every user-error path of the sampling/evaluation library raises a clear ValueError/FileNotFoundError."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import sampling
from ldm.evaluation import anatomy, compare, metrics, report, segmenter


@pytest.mark.parametrize("call, exc, match", [
    (lambda: metrics.feature_statistics(np.zeros((1, 3))), ValueError, r"N >= 2"),
    (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), ValueError, "dimensions differ"),
    (lambda: metrics.kid_from_features(np.zeros((1, 2)), np.zeros((5, 2))), ValueError, "at least 2"),
    (lambda: metrics.histogram_distance(np.zeros(0), np.zeros(3)), ValueError, "empty"),
    (lambda: metrics.extract_features(metrics.PixelFeatureExtractor(), []), ValueError, "no images"),
    (lambda: anatomy.class_area_fractions(np.zeros((2, 2, 2, 2)), 3), ValueError, r"\[N, H, W\]"),
    (lambda: anatomy.dice_per_class(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)), 2), ValueError, "differ in shape"),
    (lambda: anatomy.rule_pass_rate(np.zeros((0, 2, 2)), bool), ValueError, "no masks"),
    (lambda: anatomy.rule_pass_rate(np.zeros((1, 2, 2)), lambda m: 3.5), ValueError, "verdict"),
    (lambda: report.image_grid(np.zeros((0, 4, 4))), ValueError, r"\[N, H, W\]"),
    (lambda: segmenter.SegmenterUNet(num_classes=1), ValueError, "num_classes"),
    (lambda: segmenter.train_segmenter([], 3), ValueError, "empty"),
    (lambda: compare.load_dataset_arrays([]), ValueError, "empty"),
    (lambda: sampling.resolve_run("/nonexistent/run"), FileNotFoundError, "neither a run directory"),
    (lambda: sampling.load_config([]), FileNotFoundError, "-b CONFIG.yaml"),
    (lambda: sampling.load_config(["/nonexistent.yaml"]), FileNotFoundError, "config file not found"),
])
def test_user_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_run_dir_without_checkpoint_and_config_without_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt"):
        sampling.resolve_run(str(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {}\n")
    with pytest.raises(ValueError, match="no 'model' section"):
        sampling.load_config([str(cfg)])


def test_segmenter_needs_masks_and_same_size_images(tmp_path):
    item = {"image": np.zeros((8, 8, 1), np.float32), "segmentation": np.full((8, 8), 255),
            "has_segmentation": False, "file_path_": "a", "relative_file_path_": "a"}
    with pytest.raises(ValueError, match="has_segmentation"):
        segmenter.train_segmenter([item] * 4, 3, steps=2, batch_size=2)
    from PIL import Image

    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="different sizes"):
        compare.load_sample_set(str(tmp_path))


def test_noise_is_per_sample():
    a = sampling.initial_noise((2, 4, 4), 5, [0, 1, 2])
    b = sampling.initial_noise((2, 4, 4), 5, [2])
    torch.testing.assert_close(a[2:], b)
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(sampling.initial_noise((2, 4, 4), 6, [0])[0], a[0])
    assert sampling.sample_seed(0, 1) != sampling.sample_seed(1, 0)
