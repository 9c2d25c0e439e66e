"""Medical evaluation metrics against reference values: MS-SSIM diversity, per-case Dice, FID feature choices, LPIPS
linear weights from torchmetrics, and scripts/evaluate.py with the new options."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.evaluation import anatomy, compare, diversity, features, metrics
from ldm.modules.losses import lpips as lpips_mod

ROOT = Path(__file__).resolve().parents[1]
C1 = (0.01 * 2.0) ** 2  # SSIM's luminance constant for data range 2


# ------------------------------------------------------------------------------------------------ MS-SSIM
def test_ms_ssim_of_identical_images_is_one():
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    assert torch.allclose(diversity.ms_ssim(x, x), torch.ones(3), atol=1e-6)


def test_ms_ssim_of_constant_images_matches_the_luminance_closed_form():
    # constant images: every contrast-structure term is 1, so MS-SSIM = l ** beta_last with
    # l = (2 a b + C1) / (a^2 + b^2 + C1) at the coarsest scale
    a, b = torch.full((1, 1, 64, 64), 0.5), torch.full((1, 1, 64, 64), 0.2)
    lum = (2 * 0.5 * 0.2 + C1) / (0.25 + 0.04 + C1)
    assert float(diversity.ms_ssim(a, b, scales=1)) == pytest.approx(lum, rel=1e-5)
    assert diversity.ms_ssim_scales(64, 64) == 3  # 64 px supports three scales
    beta3 = 0.3001 / (0.0448 + 0.2856 + 0.3001)  # the standard exponents truncated to 3 and renormalised
    assert float(diversity.ms_ssim(a, b)) == pytest.approx(lum ** beta3, rel=1e-5)


def test_ms_ssim_scales_follow_image_size():
    assert [diversity.ms_ssim_scales(s, s) for s in (16, 44, 99, 176, 512)] == [2, 3, 4, 5, 5]
    with pytest.raises(ValueError, match="too small"):
        diversity.ms_ssim_scales(8, 8)


def test_diversity_collapsed_set_is_one_and_noise_set_is_low():
    one = torch.rand(1, 1, 64, 64) * 2 - 1
    collapsed = diversity.ms_ssim_diversity(one.repeat(5, 1, 1, 1))
    assert collapsed["ms_ssim"] == pytest.approx(1.0, abs=1e-6) and collapsed["ms_ssim_pairs"] == 10
    noise = diversity.ms_ssim_diversity(torch.rand(6, 1, 64, 64) * 2 - 1)
    assert noise["ms_ssim"] < 0.1 and noise["ms_ssim_pairs"] == 15
    sampled = diversity.ms_ssim_diversity(torch.rand(20, 1, 32, 32) * 2 - 1, num_pairs=7, seed=3)
    assert sampled["ms_ssim_pairs"] == 7
    with pytest.raises(ValueError, match="at least 2"):
        diversity.ms_ssim_diversity(one)
    with pytest.raises(ValueError, match="equal shape"):
        diversity.ms_ssim(one, one[..., :32])


# ---------------------------------------------------------------------------------------------- Dice per case
def _hand_masks():
    pred = np.zeros((2, 4, 4), np.int64)
    target = np.zeros((2, 4, 4), np.int64)
    pred[0, 0, :4] = 1           # case 0: class 1 of 4 px each, 2 px overlap -> Dice 0.5; class 2 absent
    target[0, 0, 2:4] = 1
    target[0, 1, 0:2] = 1
    pred[1, 2:, :] = 1           # case 1: class 1 (8 px) and class 2 (2 px) perfect -> 1, 1
    target[1, 2:, :] = 1
    pred[1, 0, :2] = target[1, 0, :2] = 2
    return pred, target


def test_dice_per_case_on_hand_made_masks():
    pred, target = _hand_masks()
    per_case = anatomy.dice_per_case(pred, target, 3)
    assert per_case[0, 1] == pytest.approx(0.5) and math.isnan(per_case[0, 2])
    assert per_case[1, 1] == pytest.approx(1.0) and per_case[1, 2] == pytest.approx(1.0)
    summary = anatomy.case_dice_summary(per_case)
    # case means: 0.5 (only class 1 present) and 1.0 -> mean 0.75, sd |1 - 0.5| / sqrt(2)
    assert summary["mean"] == pytest.approx(0.75) and summary["std"] == pytest.approx(0.5 / math.sqrt(2))
    assert summary["class1"] == pytest.approx(0.75) and summary["class2"] == pytest.approx(1.0)
    assert math.isnan(summary["class2_std"])  # one case only
    # the pooled Dice of class 1 weights the larger case: 2 * (2 + 8) / (8 + 16)
    pooled = anatomy.dice_per_class(pred, target, 3)
    assert pooled[1] == pytest.approx(20 / 24)
    row = anatomy.mask_metrics(pred, 3, reference=target, class_names=["bg", "a", "b"], prefix="seg_")
    assert row["seg_dice_a"] == pytest.approx(20 / 24) and row["seg_dice_case_a"] == pytest.approx(0.75)
    assert row["seg_dice_case_mean"] == pytest.approx(0.75)
    assert row["seg_dice_case_mean_std"] == pytest.approx(0.5 / math.sqrt(2))
    with pytest.raises(ValueError, match="differ in shape"):
        anatomy.dice_per_case(pred, target[:1], 3)


# ----------------------------------------------------------------------------------------------------- FID
class TinyLinearFeatures(torch.nn.Module):
    """A fixed random linear map of 4x4-pooled pixels (no bias): features of ``a * x + b`` are
    ``a * f(x) + b * W 1``, so FID has a closed form in the statistics of ``f(x)``."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)),
                                         requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)
        return pooled @ self.weight.T


def test_fid_of_a_set_with_itself_is_zero():
    images = torch.rand(40, 1, 16, 16) * 2 - 1
    f = metrics.extract_features(TinyLinearFeatures(), images)
    assert metrics.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_scaled_and_shifted_gaussians_has_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 1, 16, 16, generator=gen) * 0.3
    a, b = 0.5, 0.4
    ext = TinyLinearFeatures()
    f1 = metrics.extract_features(ext, x)
    f2 = metrics.extract_features(ext, a * x + b)
    mu, cov = metrics.feature_statistics(f1)
    shift = b * ext.weight.sum(dim=1).double().numpy()  # W applied to a constant image of value b
    expected = float(np.sum(((1 - a) * mu - shift) ** 2) + (1 - a) ** 2 * np.trace(cov))
    assert metrics.fid_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_fid_of_shifted_gaussian_populations():
    # iid N(0, s^2) pixels vs N(m, s^2): the population FID is |W (m 1)|^2 (equal covariances)
    gen = torch.Generator().manual_seed(2)
    ext = TinyLinearFeatures()
    x = torch.randn(4000, 1, 16, 16, generator=gen) * 0.5
    y = torch.randn(4000, 1, 16, 16, generator=gen) * 0.5 + 0.2
    expected = float((0.2 * ext.weight.sum(dim=1).double()).pow(2).sum())
    fid = metrics.fid_from_features(metrics.extract_features(ext, x), metrics.extract_features(ext, y))
    assert fid == pytest.approx(expected, rel=0.05)


def test_own_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 1, 16, 16, generator=gen) * 0.4
    y = torch.randn(300, 1, 16, 16, generator=gen) * 0.6 + 0.1
    ext = TinyLinearFeatures()
    tm = FrechetInceptionDistance(feature=ext, normalize=True)
    tm.update(x, real=True)
    tm.update(y, real=False)
    ours = metrics.fid_from_features(metrics.extract_features(ext, x), metrics.extract_features(ext, y))
    assert ours == pytest.approx(float(tm.compute()), rel=1e-4)


def test_real_images_are_quantised_like_png_samples():
    x = torch.tensor([-1.0, -0.9961, 0.0, 0.00391, 1.0]).view(1, 1, 1, 5)
    assert features.to_uint8(x).flatten().tolist() == [0, 0, 128, 128, 255]
    q = features.quantize_8bit(x)
    assert torch.allclose(features.quantize_8bit(q), q)  # idempotent: a PNG sample is unchanged


def _fake_fid_inception_weights(path: Path) -> None:
    """A state dict with the keys and shapes of the FID Inception file (random values; the real file is never
    downloaded): the network built without loading any weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_fid_inception_needs_a_local_file(monkeypatch, tmp_path):
    monkeypatch.delenv(features.FID_INCEPTION_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=features.FID_INCEPTION_FILE):
        features.FIDInceptionExtractor()
    with pytest.raises(FileNotFoundError, match="not found"):
        features.FIDInceptionExtractor(str(tmp_path / "missing.pth"))


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None, reason="torch-fidelity not installed")
def test_fid_inception_loads_a_local_file_and_replicates_grey(tmp_path):
    path = tmp_path / features.FID_INCEPTION_FILE
    _fake_fid_inception_weights(path)
    ext = features.FIDInceptionExtractor(str(path))
    grey = features.quantize_8bit(torch.rand(2, 1, 32, 32) * 2 - 1)  # as read from 8-bit PNGs
    f_grey = ext(grey)
    assert f_grey.shape == (2, 2048) and torch.isfinite(f_grey).all()
    assert torch.allclose(f_grey, ext(grey.repeat(1, 3, 1, 1)))
    assert torch.equal(f_grey, ext(grey + 0.001))  # the same 8-bit image: 0.001 < half a grey level
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        features.FIDInceptionExtractor(str(bad))


class TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))  # spatial output: averaged by the extractor


def _export_tiny(path: Path, size: int = 16) -> TinyConvNet:
    net = TinyConvNet().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(net, (torch.rand(2, 3, size, size),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return net


def test_medical_features_from_an_exported_network(tmp_path):
    net = _export_tiny(tmp_path / "tiny.pt2")
    ext = features.MedicalFeatureExtractor(str(tmp_path / "tiny.pt2"), size=16, normalize="symmetric")
    images = torch.rand(3, 1, 24, 24) * 2 - 1
    resized = torch.nn.functional.interpolate((images.repeat(1, 3, 1, 1) + 1) / 2, size=(16, 16), mode="bilinear",
                                              align_corners=False, antialias=True) * 2 - 1
    expected = net(resized).mean(dim=(2, 3))
    assert torch.allclose(ext(images), expected, atol=1e-5)
    with pytest.raises(ValueError, match="normalize"):
        features.MedicalFeatureExtractor(str(tmp_path / "tiny.pt2"), normalize="zscore")
    with pytest.raises(FileNotFoundError, match="not found"):
        features.MedicalFeatureExtractor(str(tmp_path / "none.pth"))


def test_medical_features_from_a_resnet50_state_dict(tmp_path):
    from torchvision.models import resnet50

    net = resnet50(weights=None).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "radimagenet.pth")
    ext = features.MedicalFeatureExtractor(str(tmp_path / "radimagenet.pth"), size=32)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    x = (images.repeat(1, 3, 1, 1) + 1) / 2
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    net.fc = torch.nn.Identity()
    assert torch.allclose(ext(images), net(x), atol=1e-4)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="ResNet-50"):
        features.MedicalFeatureExtractor(str(tmp_path / "other.pth"))


# ----------------------------------------------------------------------------------------------------- LPIPS
def test_lpips_linear_weights_come_from_torchmetrics(tmp_path, monkeypatch):
    shipped = lpips_mod._torchmetrics_lpips_dir()
    assert shipped is not None and (shipped / "vgg.pth").is_file()  # torchmetrics comes with pytorch-lightning
    empty = tmp_path / "lpips"
    empty.mkdir()
    monkeypatch.setenv("LDM_LPIPS_DIR", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as info:  # only the VGG backbone is asked for
        lpips_mod.find_lpips_weights()
    assert "vgg16-397923af.pth" in str(info.value) and "'vgg.pth'" not in str(info.value)
    from torchvision.models import vgg16

    with torch.device("meta"):
        keys = vgg16(weights=None).state_dict()
    vgg = {k: torch.randn(v.shape) * 0.05 for k, v in keys.items() if k.startswith("features.")}
    torch.save(vgg, empty / "vgg16-397923af.pth")
    lin_path, _ = lpips_mod.find_lpips_weights()
    assert lin_path == shipped / "vgg.pth"
    model = lpips_mod.LPIPS()
    reference = torch.load(shipped / "vgg.pth", map_location="cpu", weights_only=True)
    assert torch.equal(model.lin0.model[1].weight, reference["lin0.model.1.weight"])
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert float(model(x, x)) == pytest.approx(0.0, abs=1e-7)


# -------------------------------------------------------------------------------------------- evaluate.py
def _write_pngs(folder: Path, images: np.ndarray, masks: np.ndarray | None = None) -> None:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    if masks is not None:
        (folder / "masks").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / "images" / f"{i:03d}.png")
        if masks is not None:
            Image.fromarray(masks[i].astype(np.uint8)).save(folder / "masks" / f"{i:03d}.png")


def test_evaluate_script_reports_diversity_and_medical_fid(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (5, 24, 24), dtype=np.uint8)
    masks = (real > 128).astype(np.uint8)
    _write_pngs(tmp_path / "real", real, masks)
    _write_pngs(tmp_path / "same", real.copy(), masks)  # a "model" that reproduces the real set
    _export_tiny(tmp_path / "tiny.pt2")
    out = tmp_path / "report"
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    # the wiring of --fid_inception (the network itself is tested above): a linear stand-in, given the path
    weights = tmp_path / features.FID_INCEPTION_FILE
    monkeypatch.setattr(evaluate.features, "FIDInceptionExtractor",
                        lambda path: TinyLinearFeatures() if path == str(weights) else None)
    extra = ["--fid-inception", str(weights)]
    code = evaluate.main(["--samples", f"same={tmp_path / 'same'}", "--real", str(tmp_path / "real"),
                          "--label-set", "ctorgan", "--num_classes", "2", "--medical_features",
                          f"tiny={tmp_path / 'tiny.pt2'}", "--feature-size", "16", "--ms-ssim-pairs", "10",
                          "--device", "cpu", *extra, "-o", str(out)])
    assert code == 0
    results = json.loads((out / "report.json").read_text())["results"]
    assert results["same"]["fid_tiny"] == pytest.approx(0.0, abs=1e-6)
    assert results["same"]["fid_tf_inception"] == pytest.approx(0.0, abs=1e-6)
    assert results["same"]["ms_ssim"] == pytest.approx(results["real"]["ms_ssim"], abs=1e-9)
    assert results["same"]["ms_ssim_pairs"] == 10


def test_evaluate_sets_quantises_real_images():
    real = {"images": torch.rand(4, 1, 16, 16) * 2 - 1, "masks": None}
    png_like = {"s": {"images": features.quantize_8bit(real["images"]), "masks": None}}
    results = compare.evaluate_sets(png_like, real, 2, {"tiny": TinyLinearFeatures()}, ms_ssim_pairs=3).results
    assert results["s"]["fid_tiny"] == pytest.approx(0.0, abs=1e-9)
    assert results["s"]["histogram_w1"] == pytest.approx(0.0, abs=1e-12)
    assert results["real"]["ms_ssim_pairs"] == 3
