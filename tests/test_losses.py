"""Autoencoder losses: LPIPS weight lookup, KL/VQ loss numbers, GAN schedule and adaptive weight."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses import lpips as lpips_mod
from ldm.modules.losses.contperceptual import adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.vqperceptual import measure_perplexity

VGG_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    empty = tmp_path / "lpips_empty"
    empty.mkdir()
    monkeypatch.setenv("LDM_LPIPS_DIR", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(lpips_mod, "_torchmetrics_lpips_dir", lambda: None)  # nor torchmetrics' shipped copy
    return empty


def _write_fake_weights(lin_dir: Path, vgg_dir: Path) -> None:
    """Random weights with the real files' keys and shapes (the real ones are never downloaded)."""
    gen = torch.Generator().manual_seed(0)
    vgg = {}
    in_ch = 3
    for idx, out_ch in zip(VGG_CONV_INDICES, VGG_CONV_CHANNELS):
        vgg[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=gen) * math.sqrt(2 / (9 * in_ch))
        vgg[f"features.{idx}.bias"] = torch.zeros(out_ch)
        in_ch = out_ch
    vgg["classifier.0.weight"] = torch.zeros(1)  # ignored: only features.* is used
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen) for i, c in enumerate(lpips_mod.CHANNELS)}
    lin_dir.mkdir(parents=True, exist_ok=True)
    vgg_dir.mkdir(parents=True, exist_ok=True)
    torch.save(lin, lin_dir / "vgg.pth")
    torch.save(vgg, vgg_dir / "vgg16-397923af.pth")


def test_lpips_missing_weights_names_files_and_places(no_weights_anywhere):
    with pytest.raises(FileNotFoundError) as info:
        lpips_mod.LPIPS()
    msg = str(info.value)
    for needed in ("vgg.pth", "vgg16-397923af.pth", "taming", "LDM_LPIPS_DIR", "~/.cache/ldm/lpips",
                   str(no_weights_anywhere), "perceptual_weight: 0"):
        assert needed in msg, needed
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)


def test_lpips_only_vgg_missing_names_only_vgg(no_weights_anywhere):
    torch.save({}, no_weights_anywhere / "vgg.pth")
    with pytest.raises(FileNotFoundError) as info:
        lpips_mod.find_lpips_weights()
    assert "vgg16-397923af.pth" in str(info.value)
    assert "'vgg.pth'" not in str(info.value)


def test_no_lpips_built_without_perceptual_weight(no_weights_anywhere):
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_in_channels=1)
    assert not hasattr(loss, "perceptual_loss")
    assert not any(k.startswith("perceptual_loss") for k in loss.state_dict())


def test_lpips_with_local_files(no_weights_anywhere, tmp_path):
    # linear layers from LDM_LPIPS_DIR, VGG from torch hub's checkpoint dir under TORCH_HOME
    _write_fake_weights(no_weights_anywhere, tmp_path / "torch_home" / "hub" / "checkpoints")
    lin_path, vgg_path = lpips_mod.find_lpips_weights()
    assert lin_path == no_weights_anywhere / "vgg.pth"
    assert vgg_path == tmp_path / "torch_home" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    model = lpips_mod.LPIPS()
    keys = set(model.state_dict())
    assert {"scaling_layer.shift", "scaling_layer.scale", "net.slice1.0.weight", "net.slice2.5.weight",
            "net.slice5.28.bias", "lin0.model.1.weight", "lin4.model.1.weight"} <= keys
    assert len(keys) == 2 + 26 + 5
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    y = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    d_xy = model(x, y)
    assert d_xy.shape == (2, 1, 1, 1)
    assert torch.all(d_xy > 0)
    assert torch.count_nonzero(model(x, x)) == 0
    torch.testing.assert_close(model(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), d_xy)
    torch.testing.assert_close(model(x, y), d_xy)  # deterministic even after .train()
    with pytest.raises(ValueError, match="equal shape"):
        model(x, y[:, :, :16])


def test_d_losses_and_adopt_weight_numbers():
    real = torch.tensor([0.5, 2.0])
    fake = torch.tensor([-2.0, 0.0])
    # hinge: relu(1 - real) = [0.5, 0], relu(1 + fake) = [0, 1]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    expected_vanilla = 0.5 * ((math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-2.0))) / 2
                              + (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected_vanilla, rel=1e-6)
    assert adopt_weight(1.0, 4, threshold=5) == 0.0
    assert adopt_weight(1.0, 5, threshold=5) == 1.0


def _kl_loss(**kw) -> LPIPSWithDiscriminator:
    params = dict(disc_start=10, perceptual_weight=0.0, disc_in_channels=1, disc_num_layers=2, logvar_init=0.5,
                  kl_weight=0.01)
    params.update(kw)
    return LPIPSWithDiscriminator(**params)


def _batch():
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    last_layer = torch.nn.Parameter(torch.randn(1, 4, 3, 3, generator=gen))
    feats = torch.randn(2, 4, 16, 16, generator=gen)
    rec = torch.nn.functional.conv2d(feats, last_layer, padding=1)
    post = DiagonalGaussianDistribution(torch.randn(2, 4, 4, 4, generator=gen))
    return x, rec, post, last_layer


def test_kl_loss_value_before_disc_start():
    loss_fn = _kl_loss()
    x, rec, post, last = _batch()
    loss, log = loss_fn(x, rec, post, 0, global_step=3, last_layer=last, split="train")
    nll = ((x - rec).abs() / math.exp(0.5) + 0.5).sum() / 2
    expected = nll + 0.01 * post.kl().sum() / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(log) == {f"train/{k}" for k in ("total_loss", "logvar", "kl_loss", "nll_loss", "rec_loss",
                                              "d_weight", "disc_factor", "g_loss")}
    assert log["train/disc_factor"].item() == 0.0
    assert log["train/logvar"].item() == 0.5
    assert log["train/rec_loss"].item() == pytest.approx((x - rec).abs().mean().item(), rel=1e-6)
    assert log["train/d_weight"].item() > 0  # computed although not applied yet
    d_loss, d_log = loss_fn(x, rec, post, 1, global_step=3, split="train")
    assert d_loss.item() == 0.0
    assert set(d_log) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def test_kl_loss_gan_terms_after_disc_start():
    loss_fn = _kl_loss(disc_weight=0.7)
    x, rec, post, last = _batch()
    loss, log = loss_fn(x, rec, post, 0, global_step=10, last_layer=last)
    nll = ((x - rec).abs() / math.exp(0.5) + 0.5).sum() / 2
    g_loss = -loss_fn.discriminator(rec).mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4) * 0.7
    assert log["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-4)
    expected = nll + 0.01 * post.kl().sum() / 2 + d_weight * g_loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    d_loss, d_log = loss_fn(x, rec, post, 1, global_step=10)
    assert d_loss.item() == pytest.approx(hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(rec)).item(),
                                          rel=1e-5)


def test_kl_loss_in_eval_without_grad_uses_zero_weight():
    loss_fn = _kl_loss().eval()
    x, rec, post, last = _batch()
    with torch.no_grad():
        loss, log = loss_fn(x, rec, post, 0, global_step=100, last_layer=last, split="val")
    assert log["val/d_weight"].item() == 0.0
    assert torch.isfinite(loss)
    loss_fn.train()
    with torch.no_grad(), pytest.raises(ValueError, match="last_layer"):
        loss_fn(x, rec, post, 0, global_step=100, last_layer=last)


def test_kl_loss_config_errors():
    with pytest.raises(ValueError, match="disc_loss"):
        _kl_loss(disc_loss="wasserstein")
    loss_fn = _kl_loss()
    x, rec, post, last = _batch()
    with pytest.raises(ValueError, match="disc_conditional"):
        loss_fn(x, rec, post, 0, global_step=0, last_layer=last, cond=x)
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss_fn(x, rec, post, 2, global_step=0)


def test_vq_loss_value_and_perplexity():
    loss_fn = VQLPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0, disc_in_channels=1, disc_num_layers=2,
                                       codebook_weight=2.0, n_classes=4, pixel_loss="l2")
    x, rec, _, last = _batch()
    qloss = torch.tensor(0.25)
    ind = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss, log = loss_fn(qloss, x, rec, 0, global_step=0, last_layer=last, predicted_indices=ind)
    expected = (x - rec).pow(2).mean() + 2.0 * 0.25
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["train/perplexity"].item() == pytest.approx(4.0, rel=1e-5)
    assert log["train/cluster_usage"].item() == 4
    assert {"train/quant_loss", "train/p_loss", "train/g_loss", "train/d_weight"} <= set(log)
    perplexity, used = measure_perplexity(torch.zeros(10, dtype=torch.long), 8)
    assert perplexity.item() == pytest.approx(1.0) and used.item() == 1
    with pytest.raises(ValueError, match="pixel_loss"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, pixel_loss="l3")
