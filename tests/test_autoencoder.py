"""AutoencoderKL / VQModel: CompVis keys and golden numbers, blocks, loading, Lightning-2 training."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.autoencoder import AutoencoderKL, VQModel, VQModelInterface
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Downsample, Encoder, Normalize, Upsample
from ldm.util import instantiate_from_config

COMPAT_AE_ENTRIES = ("kl-f8", "kl-f4", "ae_ctorgan", "ae_breastmri")
TINY_DD = dict(double_z=True, z_channels=2, resolution=16, in_channels=1, out_ch=1, ch=8, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[8], dropout=0.0)


def _tiny_loss(disc_start: int = 0) -> dict:
    return {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
            "params": dict(disc_start=disc_start, perceptual_weight=0.0, disc_in_channels=1, disc_num_layers=2,
                           kl_weight=1e-6, logvar_init=0.0)}


def _tiny_ae(disc_start: int = 0, **kw) -> AutoencoderKL:
    return AutoencoderKL(ddconfig=dict(TINY_DD), lossconfig=_tiny_loss(disc_start), embed_dim=2, **kw)


def _images(n: int, size: int = 16, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image": torch.from_numpy(rng.uniform(-1, 1, (size, size, 1)).astype(np.float32))} for _ in range(n)]


@pytest.mark.parametrize("name", COMPAT_AE_ENTRIES)
def test_compvis_state_dict_keys_and_shapes(compat_dir, name):
    entry = json.loads((compat_dir / "compvis_state_dict_keys.json").read_text())[name]
    assert entry["target"] == "ldm.models.autoencoder.AutoencoderKL"
    with torch.device("meta"):
        model = instantiate_from_config(entry["config"])
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got) == sorted(entry["keys"])
    assert got == entry["keys"]


def test_golden_encode_decode(compat_dir):
    golden = torch.load(compat_dir / "compvis_golden_visible.pt", weights_only=True)
    ae = instantiate_from_config(golden["config"]["params"]["first_stage_config"]).eval()
    prefix = "first_stage_model."
    sd = {k[len(prefix):]: v for k, v in golden["state_dict"].items() if k.startswith(prefix)}
    ae.load_state_dict(sd, strict=True)
    out = golden["outputs"]
    with torch.no_grad():
        posterior = ae.encode(golden["inputs"]["image"])
        decoded = ae.decode(posterior.mean)  # reference: decode_first_stage(mean * 0.5) with scale_factor 0.5
    for name, got in (("posterior_mean", posterior.mean), ("posterior_logvar", posterior.logvar),
                      ("decoded", decoded)):
        ref = out[name]
        assert got.shape == ref.shape, name
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative error {rel:.2e}"


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1, with_conv=True)
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # picks x[2i, 2j]
        assert down(x).flatten().tolist() == [1.0, 3.0, 9.0, 11.0]
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # picks x[2i+2, 2j+2]: zero padding on the far edges
        assert down(x).flatten().tolist() == [11.0, 0.0, 0.0, 0.0]
    pool = Downsample(1, with_conv=False)
    assert pool(x).flatten().tolist() == [3.5, 5.5, 11.5, 13.5]
    up = Upsample(1, with_conv=False)
    assert up(x[..., :2, :2]).flatten().tolist() == [1, 1, 2, 2, 1, 1, 2, 2, 5, 5, 6, 6, 5, 5, 6, 6]


def test_attn_block_matches_explicit_softmax_attention():
    block = AttnBlock(32)
    x = torch.randn(2, 32, 4, 4)
    h = block.norm(x)
    q = block.q(h).flatten(2).transpose(1, 2)
    k = block.k(h).flatten(2)
    v = block.v(h).flatten(2)
    w = torch.softmax(q @ k / math.sqrt(32), dim=-1)
    ref = x + block.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 4, 4))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


def test_normalize_and_ddconfig_errors():
    assert Normalize(64).num_groups == 32 and Normalize(64).eps == 1e-6
    assert Normalize(8).num_groups == 8
    with pytest.raises(ValueError, match="unknown ddconfig keys"):
        Encoder(**TINY_DD, z_chanels=3)
    with pytest.raises(ValueError, match="attn_type"):
        Decoder(**TINY_DD, attn_type="flash")
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(ddconfig={**TINY_DD, "double_z": False}, lossconfig={"target": "torch.nn.Identity"}, embed_dim=2)


def test_encoder_decoder_shapes_and_options():
    enc, dec = Encoder(**TINY_DD), Decoder(**TINY_DD, give_pre_end=True)
    z = enc(torch.randn(2, 1, 16, 16))
    assert z.shape == (2, 4, 8, 8)
    assert dec(z[:, :2]).shape == (2, 8, 16, 16)
    tanh_dec = Decoder(**TINY_DD, tanh_out=True)
    assert tanh_dec(z[:, :2]).abs().max() <= 1.0
    lin = Encoder(**{**TINY_DD, "attn_type": "linear"})
    assert "down.1.attn.0.to_qkv.weight" in lin.state_dict() and lin(torch.randn(1, 1, 16, 16)).shape == (1, 4, 8, 8)


def test_get_input_forward_and_log_images():
    ae = _tiny_ae().eval()
    batch = {"image": torch.rand(3, 16, 16, 1) * 2 - 1}
    x = ae.get_input(batch, "image")
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x[:, 0], batch["image"][..., 0])
    assert ae.get_input({"image": torch.zeros(2, 16, 16, dtype=torch.float64)}, "image").shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="segmentation"):
        ae.get_input(batch, "segmentation")
    with torch.no_grad():
        dec1, post = ae(x, sample_posterior=False)
        dec2, _ = ae(x, sample_posterior=False)
        dec3, _ = ae(x)
    assert torch.equal(dec1, dec2) and not torch.equal(dec1, dec3)
    assert post.mean.shape == (3, 2, 8, 8) and dec1.shape == x.shape
    torch.testing.assert_close(dec1, ae.decode(post.mode()))
    logs = ae.log_images(batch)
    assert set(logs) == {"inputs", "reconstructions", "samples"}
    for v in logs.values():
        assert v.shape == (3, 1, 16, 16) and v.min() >= -1 and v.max() <= 1
    assert set(ae.log_images(batch, only_inputs=True)) == {"inputs"}


def test_configure_optimizers():
    ae = _tiny_ae()
    with pytest.raises(ValueError, match="learning_rate"):
        ae.configure_optimizers()
    ae.learning_rate = 1e-3
    (opt_ae, opt_disc), _ = ae.configure_optimizers()
    assert opt_ae.defaults["lr"] == 1e-3 and opt_ae.defaults["betas"] == (0.5, 0.9)
    assert opt_disc.defaults["betas"] == (0.5, 0.9)
    disc_ids = {id(p) for p in ae.loss.discriminator.parameters()}
    assert {id(p) for g in opt_disc.param_groups for p in g["params"]} == disc_ids
    ae_ids = {id(p) for g in opt_ae.param_groups for p in g["params"]}
    assert not ae_ids & disc_ids and id(ae.loss.logvar) not in ae_ids
    assert len(ae_ids) == len(list(ae.parameters())) - len(disc_ids) - 1
    learn = _tiny_ae(learn_logvar=True)
    learn.learning_rate = 1e-3
    assert id(learn.loss.logvar) in {id(p) for p in learn.configure_optimizers()[0][0].param_groups[0]["params"]}
    frozen = AutoencoderKL(ddconfig=dict(TINY_DD), lossconfig={"target": "torch.nn.Identity"}, embed_dim=2)
    frozen.learning_rate = 1e-3
    with pytest.raises(ValueError, match="LPIPSWithDiscriminator"):
        frozen.configure_optimizers()


def test_init_from_ckpt_ignore_keys_and_wrong_shape(tmp_path, caplog):
    source = _tiny_ae()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = tmp_path / "ae.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)
    with caplog.at_level(logging.WARNING, logger="ldm.util"):
        loaded = _tiny_ae(ckpt_path=str(path), ignore_keys=["decoder", "loss"])
    assert torch.equal(loaded.encoder.conv_in.weight, source.encoder.conv_in.weight)
    assert torch.equal(loaded.quant_conv.weight, source.quant_conv.weight)
    assert not torch.equal(loaded.decoder.conv_in.weight, source.decoder.conv_in.weight)
    assert "missing keys" in caplog.text and "decoder.conv_in.weight" in caplog.text

    other = AutoencoderKL(ddconfig={**TINY_DD, "z_channels": 3}, lossconfig=_tiny_loss(), embed_dim=3)
    bad_path = tmp_path / "other.ckpt"
    torch.save({"state_dict": other.state_dict()}, bad_path)
    with pytest.raises(RuntimeError, match="other shapes.*quant_conv"):
        _tiny_ae(ckpt_path=str(bad_path))
    with pytest.raises(FileNotFoundError):
        _tiny_ae(ckpt_path=str(tmp_path / "absent.ckpt"))


class _Recorder(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._before = ([p.detach().clone() for p in module.loss.discriminator.parameters()],
                        module.encoder.conv_in.weight.detach().clone(), module.batch_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        disc_before, enc_before, step = self._before
        disc_changed = any(not torch.equal(a, b) for a, b in zip(disc_before, module.loss.discriminator.parameters()))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") or "loss" in k}
        self.rows.append(dict(step=step, disc_changed=disc_changed,
                              enc_changed=not torch.equal(enc_before, module.encoder.conv_in.weight),
                              metrics=metrics))


def _trainer(max_batches: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=max_batches,
                      limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


def test_lightning_training_before_and_after_disc_start():
    pl.seed_everything(0, verbose=False)
    disc_start = 3
    model = _tiny_ae(disc_start=disc_start)
    model.learning_rate = 1e-3
    recorder = _Recorder()
    trainer = _trainer(6, [recorder])
    trainer.fit(model, DataLoader(_images(24), batch_size=4), DataLoader(_images(4, seed=1), batch_size=4))
    assert [r["step"] for r in recorder.rows] == list(range(6))
    assert trainer.global_step == 12  # Lightning 2 counts both optimisers' steps
    for row in recorder.rows:
        assert row["enc_changed"]
        assert row["disc_changed"] == (row["step"] >= disc_start), row
        assert row["metrics"]["train/disc_factor"] == (1.0 if row["step"] >= disc_start else 0.0)
        for key in ("aeloss_step", "discloss_step", "train/rec_loss", "train/kl_loss", "train/g_loss"):
            assert math.isfinite(row["metrics"][key]), key
    assert recorder.rows[0]["metrics"]["discloss_step"] == 0.0
    assert recorder.rows[-1]["metrics"]["discloss_step"] > 0.0
    assert model.loss.logvar.item() == 0.0  # not optimised (CompVis), learn_logvar=False
    metrics = trainer.validate(model, DataLoader(_images(4, seed=1), batch_size=4), verbose=False)[0]
    for key in ("val/rec_loss", "val/total_loss", "val/kl_loss", "val/disc_loss", "val/logits_real"):
        assert math.isfinite(metrics[key]), key
    assert metrics["val/d_weight"] == 0.0


VQ_DD = dict(TINY_DD, z_channels=4, double_z=False)


def _tiny_vq(cls=VQModel, **kw):
    loss = {"target": "ldm.modules.losses.VQLPIPSWithDiscriminator",
            "params": dict(disc_start=0, perceptual_weight=0.0, disc_in_channels=1, disc_num_layers=2, n_classes=16)}
    return cls(ddconfig=dict(VQ_DD), lossconfig=loss, n_embed=16, embed_dim=3, **kw)


def test_vqmodel_keys_shapes_and_interface():
    vq = _tiny_vq()
    sd = vq.state_dict()
    assert sd["quantize.embedding.weight"].shape == (16, 3)
    assert sd["quant_conv.weight"].shape == (3, 4, 1, 1) and sd["post_quant_conv.weight"].shape == (4, 3, 1, 1)
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "loss", "quantize", "quant_conv",
                                             "post_quant_conv"}
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    dec, diff, ind = vq(x, return_pred_indices=True)
    assert dec.shape == x.shape and diff.ndim == 0 and ind.numel() == 2 * 8 * 8
    torch.testing.assert_close(vq.decode_code(ind.reshape(2, 8, 8)), vq.decode(vq.encode(x)[0]))
    iface = _tiny_vq(VQModelInterface)
    iface.load_state_dict(sd, strict=True)
    h = iface.encode(x)
    assert h.shape == (2, 3, 8, 8)
    torch.testing.assert_close(iface.decode(h), dec)
    assert not torch.allclose(iface.decode(h, force_not_quantize=True), dec)
    with pytest.raises(ValueError, match="double_z"):
        VQModel(ddconfig=dict(TINY_DD), lossconfig={"target": "torch.nn.Identity"}, n_embed=4, embed_dim=2)
    ema = _tiny_vq(use_ema=True)
    assert any(k.startswith("model_ema.") for k in ema.state_dict())


def test_vqmodel_lightning_steps_with_scheduler():
    pl.seed_everything(0, verbose=False)
    sched = {"target": "ldm.lr_scheduler.LambdaLinearScheduler",
             "params": dict(warm_up_steps=[10], cycle_lengths=[100], f_start=[0.1], f_max=[1.0], f_min=[1.0])}
    vq = _tiny_vq(scheduler_config=sched, lr_g_factor=0.5)
    vq.learning_rate = 1e-3
    trainer = _trainer(2)
    trainer.fit(vq, DataLoader(_images(8), batch_size=4), DataLoader(_images(4, seed=1), batch_size=4))
    assert trainer.global_step == 4
    factor = instantiate_from_config(sched).schedule(2)  # two batches -> each scheduler stepped twice
    assert 0.1 < factor < 1.0
    opt_ae, opt_disc = (o.optimizer for o in vq.optimizers())
    assert opt_ae.param_groups[0]["lr"] == pytest.approx(0.5e-3 * factor)
    assert opt_disc.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    for key in ("train/quant_loss", "train/perplexity", "val/rec_loss", "val/disc_loss"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
