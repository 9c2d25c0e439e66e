"""Metric functions on synthetic inputs with known answers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ldm.evaluation import anatomy, metrics, report


def _gauss(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def test_frechet_distance_closed_form():
    # Two 1-d Gaussians: (m1-m2)^2 + (s1-s2)^2
    assert metrics.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) \
        == pytest.approx(4.0 + 1.0)
    # Diagonal 2-d
    fd = metrics.frechet_distance(np.zeros(2), np.diag([1.0, 9.0]), np.ones(2), np.diag([4.0, 1.0]))
    assert fd == pytest.approx(2.0 + 1.0 + 4.0)


def test_fid_identical_zero_shifted_larger():
    feats = _gauss(200, 8)
    assert metrics.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    other = _gauss(200, 8, seed=1)
    small = metrics.fid_from_features(feats, other)
    shifted = metrics.fid_from_features(feats, _gauss(200, 8, shift=2.0, seed=1))
    assert small < 1.0
    assert shifted == pytest.approx(small + 8 * 4.0, rel=0.1)  # mean shift of 2 in 8 dims adds ~32


def test_fid_with_toy_extractor_on_images():
    torch.manual_seed(0)
    real = torch.rand(64, 1, 16, 16) * 2 - 1
    ext = metrics.PixelFeatureExtractor(size=4)
    same = metrics.extract_features(ext, real, batch_size=10)
    assert same.shape == (64, 16)
    assert metrics.fid_from_features(same, same) == pytest.approx(0.0, abs=1e-8)
    shifted = metrics.extract_features(ext, (real + 0.5).clamp(-1, 1))
    assert metrics.fid_from_features(same, shifted) > 1.0


def test_kid_identical_near_zero_shifted_positive():
    a = _gauss(200, 4)
    kid_same, _ = metrics.kid_from_features(a, _gauss(200, 4, seed=5), num_subsets=10, subset_size=100)
    kid_shift, std = metrics.kid_from_features(a, _gauss(200, 4, shift=3.0, seed=2), num_subsets=10, subset_size=100)
    assert abs(kid_same) < 0.2  # same distribution: unbiased estimate scatters around 0
    assert kid_shift > 100.0 and 0.0 <= std < kid_shift
    with pytest.raises(ValueError):
        metrics.kid_from_features(a, np.zeros((5, 3)))


def test_histogram_distance_known_values():
    x = torch.rand(10, 1, 8, 8) * 1.0 - 0.75  # in [-0.75, 0.25]
    assert metrics.histogram_distance(x, x) == 0.0
    assert metrics.histogram_distance(x, x + 0.5) == pytest.approx(0.5, abs=0.04)
    h = metrics.intensity_histogram(x, bins=16)
    assert h.sum() == pytest.approx(1.0)


def test_image_quality_keys():
    x = torch.rand(20, 1, 8, 8) * 2 - 1
    out = metrics.image_quality(x, x, {"pixel": metrics.PixelFeatureExtractor(2)}, kid_subset_size=10)
    assert out["histogram_w1"] == 0.0
    assert out["fid_pixel"] == pytest.approx(0.0, abs=1e-8)
    assert set(out) >= {"kid_pixel", "kid_pixel_std", "intensity_mean"}


def test_inception_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="LDM_INCEPTION_WEIGHTS"):
        metrics.InceptionFeatureExtractor()
    with pytest.raises(FileNotFoundError, match="not found"):
        metrics.InceptionFeatureExtractor(str(tmp_path / "nope.pth"))


def test_anatomy_numbers():
    a = np.zeros((2, 4, 4), dtype=np.int64)
    a[0, :2, :2] = 1  # 4 of 16 pixels
    a[1, :, :] = 2
    fr = anatomy.class_area_fractions(a, 3)
    np.testing.assert_allclose(fr, [[0.75, 0.25, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(anatomy.presence_rate(a, 3), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(anatomy.area_distribution_distance(a, a, 3), 0.0)
    b = a.copy()
    b[0, 0, 0] = 0  # one liver pixel lost: intersection 3, sizes 3 and 4
    dice = anatomy.dice_per_class(b, a, 3)
    assert dice[1] == pytest.approx(2 * 3 / 7)
    assert dice[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        anatomy.class_area_fractions(a, 2)


def test_rule_pass_rate_verdict_forms():
    masks = np.zeros((4, 3, 3), dtype=np.int64)
    masks[1:, 0, 0] = 1
    rate, verdicts = anatomy.rule_pass_rate(masks, lambda m: bool(m.max() > 0))
    assert rate == 0.75 and verdicts == [False, True, True, True]
    assert anatomy.rule_pass_rate(masks, lambda m: (m.max() > 0, ["x"]))[0] == 0.75
    assert anatomy.rule_pass_rate(masks, lambda m: [] if m.max() > 0 else ["no organ"])[0] == 0.75
    assert anatomy.rule_pass_rate(masks, lambda m: {"ok": m.max() > 0})[0] == 0.75


def test_mask_metrics_and_report_files(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 3, size=(6, 8, 8))
    fake = real.copy()
    fake[:, :4] = 0
    res_a = anatomy.mask_metrics(real, 3, real_masks=real, reference=real, class_names=["bg", "liver", "kidney"])
    res_b = anatomy.mask_metrics(fake, 3, real_masks=real, reference=real, class_names=["bg", "liver", "kidney"])
    assert res_a["dice_mean"] == pytest.approx(1.0) and res_a["area_w1_mean"] == 0.0
    assert res_b["dice_mean"] < 0.9 and res_b["area_w1_mean"] > 0.05
    results = {"anatomical": res_a, "baseline": res_b}
    panels = {"anatomical": report.SetPanel(rng.uniform(-1, 1, (4, 8, 8)), real[:4], "predicted masks", 0.5),
              "baseline": report.SetPanel(rng.uniform(-1, 1, (4, 8, 8)))}
    fractions = {"real": anatomy.class_area_fractions(real, 3), "baseline": anatomy.class_area_fractions(fake, 3)}
    paths = report.write_report(str(tmp_path), results, meta={"seed": 1}, panels=panels, area_fractions=fractions,
                                class_names=["bg", "liver", "kidney"])
    for p in paths.values():
        assert os.path.getsize(p) > 0
    data = json.load(open(paths["json"]))
    assert data["results"]["baseline"]["dice_mean"] == pytest.approx(res_b["dice_mean"])
    md = open(paths["markdown"]).read()
    assert f"{res_b['area_w1_mean']:.4g}" in md and "baseline" in md
    table = report.format_table(results)
    assert "dice_mean" in table and f"{res_b['dice_mean']:.4g}" in table


def test_inception_extractor_loads_local_state_dict(tmp_path, monkeypatch):
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(path))
    ext = metrics.InceptionFeatureExtractor()  # path from the environment variable
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    feats = metrics.extract_features(ext, images)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    np.testing.assert_allclose(metrics.extract_features(ext, images), feats)


def test_kid_std_is_nan_when_subsets_are_the_whole_sets():
    import math

    import numpy as np

    from ldm.evaluation import metrics

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 4)), rng.normal(0.5, 1.0, size=(20, 4))
    kid, std = metrics.kid_from_features(a, b, subset_size=1000)
    assert kid > 0 and math.isnan(std)
    kid_sub, std_sub = metrics.kid_from_features(a, b, subset_size=10, num_subsets=50)
    assert std_sub > 0 and abs(kid_sub - kid) < 0.5


def test_overlay_masks_blends_class_colours_and_keeps_background():
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 0, 255]], dtype=np.uint8)
    images = np.zeros((1, 4, 4))  # mid grey: 0.5 in [0, 1]
    masks = np.zeros((1, 2, 2), dtype=np.int64)
    masks[0, 0, 1], masks[0, 1, 0] = 1, 2  # a 2x2 mask on a 4x4 image: resized, nearest
    out = report.overlay_masks(images, masks, palette, alpha=0.5)
    assert out.shape == (1, 4, 4, 3)
    np.testing.assert_allclose(out[0, 0, 0], [0.5, 0.5, 0.5])       # background: the grey image
    np.testing.assert_allclose(out[0, 1, 3], [0.75, 0.25, 0.25])    # class 1: half red
    np.testing.assert_allclose(out[0, 3, 0], [0.25, 0.25, 0.75])    # class 2: half blue
    np.testing.assert_allclose(out[0, 3, 3], [0.5, 0.5, 0.5])


def test_comparison_figure_shows_masks_in_their_colours(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    masks = np.zeros((6, 16, 16), dtype=np.int64)
    masks[:, 4:12, 4:12] = 1
    masks[:3, 2:4, 2:4] = 2
    palette = np.array([[0, 0, 0], [0, 200, 0], [200, 0, 200]], dtype=np.uint8)
    panels = {"real": report.SetPanel(rng.uniform(-1, 1, (6, 16, 16)), masks, "true masks", 1.0),
              "model": report.SetPanel(rng.uniform(-1, 1, (2, 16, 16)), masks[:2], "predicted masks", 0.5)}
    fractions = {"real": anatomy.class_area_fractions(masks, 3), "model": anatomy.class_area_fractions(masks[:2], 3)}
    path = report.comparison_figure(str(tmp_path / "c.png"), panels, fractions, ["bg", "organ", "spot"], palette,
                                    "the masks shown")
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    # green-tinted overlay pixels (class 1 blended over grey) are in the picture; the grey strips alone have none
    greenish = (rgb[..., 1] - np.maximum(rgb[..., 0], rgb[..., 2])) > 40
    assert greenish.sum() > 500
    with pytest.raises(ValueError, match="at least one set"):
        report.comparison_figure(str(tmp_path / "d.png"), {})
