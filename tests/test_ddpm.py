"""DDPM / LatentDiffusion: schedule buffers, q_sample, losses, conditioning routing, scale_by_std,
EMA, frozen first stage, checkpoint loading errors, a Lightning fit and log_images (tiny, CPU)."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.diffusion.ddpm import DDPM, DiffusionWrapper, LatentDiffusion
from tiny_models import first_stage_config, ldm_params, unet_config

FIRST_STAGE = first_stage_config()


def tiny_ldm(**overrides) -> LatentDiffusion:
    params = dict(timesteps=20, log_every_t=5, loss_type="l2", first_stage_key="image", monitor="val/loss")
    params.update(overrides)
    return LatentDiffusion(**ldm_params(**params))


def batch(n: int = 2, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, size, size, 1, generator=g) * 2 - 1}


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_buffers_values():
    model = tiny_ldm(timesteps=1000)
    b = np.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000) ** 2
    assert model.betas[0].item() == pytest.approx(0.0015, rel=1e-6)
    assert model.betas[-1].item() == pytest.approx(0.0205, rel=1e-6)
    assert model.betas[500].item() == pytest.approx(b[500], rel=1e-6)
    for t in (0, 10, 500, 999):
        a_t = math.prod(1.0 - b[: t + 1])
        assert model.alphas_cumprod[t].item() == pytest.approx(a_t, rel=1e-5)
        assert model.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 - a_t), rel=1e-5)
    assert model.alphas_cumprod[999].item() == pytest.approx(9.6911e-05, rel=1e-3)  # stored value for this schedule
    assert model.alphas_cumprod_prev[0].item() == 1.0
    assert model.alphas_cumprod_prev[7].item() == pytest.approx(model.alphas_cumprod[6].item())
    assert model.posterior_variance[0].item() == 0.0
    t = 300
    expected_var = b[t] * (1 - math.prod(1 - b[:t])) / (1 - math.prod(1 - b[: t + 1]))
    assert model.posterior_variance[t].item() == pytest.approx(expected_var, rel=1e-5)
    assert model.lvlb_weights[0].item() == model.lvlb_weights[1].item()
    assert torch.isfinite(model.lvlb_weights).all()
    sd = model.state_dict()
    assert "lvlb_weights" not in sd and "logvar" not in sd and "scale_factor" not in sd
    assert "posterior_mean_coef2" in sd and "log_one_minus_alphas_cumprod" in sd


def test_q_sample_closed_form():
    model = tiny_ldm(timesteps=1000)
    x0 = torch.randn(3, 2, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 499, 999])
    b = np.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000) ** 2
    out = model.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        a = math.prod(1 - b[: ti + 1])
        assert torch.allclose(out[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-5)


def test_cosine_and_given_betas():
    model = tiny_ldm(beta_schedule="cosine", timesteps=50)
    assert float(model.betas[-1]) == pytest.approx(0.999) and float(model.betas[0]) < 0.01
    model = tiny_ldm(given_betas=[0.1, 0.2, 0.3], timesteps=3)
    assert model.num_timesteps == 3
    assert model.alphas_cumprod.tolist() == pytest.approx([0.9, 0.72, 0.504])


# ---------------------------------------------------------------------------------------------- losses
def _fixed_output_model(monkeypatch, model, value):
    monkeypatch.setattr(model, "apply_model", lambda x, t, c, **kw: torch.full_like(x, value))


@pytest.mark.parametrize("loss_type,param", [("l1", "eps"), ("l2", "eps"), ("l2", "x0")])
def test_p_losses_numbers(monkeypatch, loss_type, param):
    model = tiny_ldm(loss_type=loss_type, parameterization=param, original_elbo_weight=0.5, l_simple_weight=2.0)
    model.eval()
    _fixed_output_model(monkeypatch, model, 0.25)
    x = torch.randn(2, 2, 8, 8)
    noise = torch.randn_like(x)
    t = torch.tensor([3, 15])
    loss, d = model.p_losses(x, None, t, noise=noise)
    target = noise if param == "eps" else x
    err = (0.25 - target).abs() if loss_type == "l1" else (0.25 - target) ** 2
    per_sample = err.mean(dim=(1, 2, 3))
    vlb = (model.lvlb_weights[t] * per_sample).mean()
    assert set(d) == {"val/loss_simple", "val/loss_vlb", "val/loss"}
    assert d["val/loss_simple"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert d["val/loss_vlb"].item() == pytest.approx(vlb.item(), rel=1e-5)
    assert loss.item() == pytest.approx(2.0 * per_sample.mean().item() + 0.5 * vlb.item(), rel=1e-5)


def test_learn_logvar(monkeypatch):
    model = tiny_ldm(learn_logvar=True, logvar_init=0.5)
    assert "logvar" in model.state_dict() and isinstance(model.logvar, torch.nn.Parameter)
    _fixed_output_model(monkeypatch, model, 0.0)
    model.train()
    x, noise, t = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8), torch.tensor([1, 2])
    loss, d = model.p_losses(x, None, t, noise=noise)
    simple = (noise ** 2).mean(dim=(1, 2, 3))
    expected = (simple / math.exp(0.5) + 0.5).mean()
    assert "train/loss_gamma" in d and d["train/loss_gamma"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    model.learning_rate = 1e-3
    params = model.configure_optimizers().param_groups[0]["params"]
    assert any(p is model.logvar for p in params)


def test_bad_params_raise():
    with pytest.raises(ValueError, match="parameterization"):
        tiny_ldm(parameterization="v")
    with pytest.raises(ValueError, match="loss_type"):
        tiny_ldm(loss_type="huber")
    with pytest.raises(ValueError, match="beta_schedule"):
        tiny_ldm(beta_schedule="nope")
    with pytest.raises(ValueError, match="num_timesteps_cond"):
        tiny_ldm(num_timesteps_cond=50)
    with pytest.raises(ValueError, match="use_positional_encodings"):
        tiny_ldm(use_positional_encodings=True)


# ---------------------------------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("key", [None, "None", "crossattn", "concat"])
def test_unconditional_sentinel_wins(key):
    model = tiny_ldm(conditioning_key=key)
    assert model.model.conditioning_key is None and model.cond_stage_model is None
    z, c = model.get_input(batch(), "image")
    assert z.shape == (2, 2, 8, 8) and c is None
    with pytest.raises(ValueError, match="unconditional"):
        model.get_learned_conditioning(torch.zeros(1))


def test_string_none_with_real_cond_stage_raises():
    with pytest.raises(ValueError, match="conditioning_key"):
        tiny_ldm(cond_stage_config="__is_first_stage__", conditioning_key="None")


def test_concat_with_first_stage_conditioning():
    model = tiny_ldm(cond_stage_config="__is_first_stage__", conditioning_key=None, concat_mode=True,
                     cond_stage_key="cond", unet_config=unet_config(in_channels=4))
    assert model.model.conditioning_key == "concat"
    assert model.cond_stage_model is model.first_stage_model
    data = batch()
    data["cond"] = batch(seed=3)["image"]
    z, c = model.get_input(data, "image")
    expected_c = model.first_stage_model.encode(DDPM.get_input(model, data, "cond")).mode()
    assert torch.allclose(c, expected_c, atol=1e-6)
    loss, d = model.shared_step(data)
    assert torch.isfinite(loss) and set(d) == {"train/loss_simple", "train/loss_vlb", "train/loss"}


class _Recorder(torch.nn.Module):
    def forward(self, x, t, **kwargs):
        self.seen = (x, kwargs)
        return x[:, :2]


@pytest.mark.parametrize("key", ["concat", "crossattn", "hybrid", "adm"])
def test_diffusion_wrapper_routing(key):
    wrapper = DiffusionWrapper(unet_config(), key)
    wrapper.diffusion_model = _Recorder()
    x, t = torch.zeros(2, 2, 4, 4), torch.zeros(2, dtype=torch.long)
    cc, ca = torch.ones(2, 3, 4, 4), torch.ones(2, 5, 7)
    wrapper(x, t, c_concat=[cc], c_crossattn=[ca], extra=1)
    seen_x, kwargs = wrapper.diffusion_model.seen
    assert seen_x.shape[1] == (5 if key in ("concat", "hybrid") else 2)
    assert kwargs["extra"] == 1
    if key in ("crossattn", "hybrid"):
        assert kwargs["context"] is not None and kwargs["context"].shape == (2, 5, 7)
    if key == "adm":
        assert kwargs["y"] is ca
    with pytest.raises(ValueError, match="needs"):
        wrapper(x, t)
    with pytest.raises(ValueError, match="conditioning_key"):
        DiffusionWrapper(unet_config(), "film")


# ---------------------------------------------------------------------------------------------- first stage
def test_first_stage_frozen_and_surface():
    model = tiny_ldm(scale_factor=0.5)
    model.train()
    assert model.training and not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
    model.learning_rate = 1e-4
    opt_params = {id(p) for p in model.configure_optimizers().param_groups[0]["params"]}
    assert opt_params == {id(p) for p in model.model.parameters()}
    x = batch()["image"].permute(0, 3, 1, 2)
    post = model.encode_first_stage(x)
    z = model.get_first_stage_encoding(post.mean)
    assert torch.allclose(z, 0.5 * post.mean)
    dec = model.decode_first_stage(z)
    assert torch.allclose(dec, model.first_stage_model.decode(post.mean), atol=1e-6)


# ---------------------------------------------------------------------------------------------- scale_by_std
def test_scale_by_std_first_batch_saved_and_restored(tmp_path):
    model = tiny_ldm(scale_by_std=True)
    assert float(model.scale_factor) == 1.0
    data = batch(n=4)
    torch.manual_seed(7)
    model.on_train_batch_start(data, 0)
    torch.manual_seed(7)
    z = model.first_stage_model.encode(data["image"].permute(0, 3, 1, 2)).sample()
    expected = 1.0 / z.flatten().std()
    assert float(model.scale_factor) == pytest.approx(float(expected), rel=1e-5)
    assert float(model.scale_factor) != 1.0
    sd = model.state_dict()
    assert float(sd["scale_factor"]) == pytest.approx(float(expected), rel=1e-6)
    # a second call (another batch, still step 0) does not recompute
    model.on_train_batch_start(batch(n=4, seed=9), 0)
    assert float(model.scale_factor) == pytest.approx(float(expected), rel=1e-6)
    # restored through load_state_dict and through ckpt_path: kept, not recomputed
    restored = tiny_ldm(scale_by_std=True)
    restored.load_state_dict(sd)
    restored.on_train_batch_start(batch(n=4, seed=5), 0)
    assert float(restored.scale_factor) == pytest.approx(float(expected), rel=1e-6)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, path)
    from_ckpt = tiny_ldm(scale_by_std=True, ckpt_path=str(path))
    from_ckpt.on_train_batch_start(batch(n=4, seed=5), 0)
    assert float(from_ckpt.scale_factor) == pytest.approx(float(expected), rel=1e-6)
    assert torch.equal(from_ckpt.model.diffusion_model.out[-1].weight, model.model.diffusion_model.out[-1].weight)


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_keys_and_scope():
    model = tiny_ldm()
    sd = model.state_dict()
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    assert "model_ema.decay" in sd and "model_ema.num_updates" in sd
    n_params = sum(1 for _ in model.model.parameters())
    assert sum(k.startswith("model_ema.") for k in sd) == n_params + 2
    w = model.model.diffusion_model.input_blocks[0][0].weight
    live = w.detach().clone()
    with torch.no_grad():
        model.model_ema.get_buffer("diffusion_modelinput_blocks00weight").fill_(0.123)
    with model.ema_scope("test"):
        assert torch.all(w == 0.123)
    assert torch.equal(w, live)
    no_ema = tiny_ldm(use_ema=False)
    assert not any(k.startswith("model_ema") for k in no_ema.state_dict())
    with no_ema.ema_scope():
        pass


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_errors_name_the_file(tmp_path, caplog):
    model = tiny_ldm()
    good = model.state_dict()
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.ckpt"):
        tiny_ldm(ckpt_path=str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        tiny_ldm(ckpt_path=str(tmp_path / "missing.ckpt"))

    target = tiny_ldm()
    before = target.model.diffusion_model.out[-1].weight.detach().clone()
    wrong = dict(good)
    wrong["model.diffusion_model.out.2.weight"] = torch.zeros(3, 32, 3, 3)
    first_conv = "model.diffusion_model.input_blocks.0.0.weight"
    wrong[first_conv] = torch.full_like(good[first_conv], 9.0)
    path = tmp_path / "wrong_shape.ckpt"
    torch.save({"state_dict": wrong}, path)
    with pytest.raises(ValueError, match="wrong_shape.ckpt"):
        target.init_from_ckpt(str(path))
    assert not torch.any(target.model.diffusion_model.input_blocks[0][0].weight == 9.0)  # no half-load

    extra = dict(good)
    extra["model.diffusion_model.surprise.weight"] = torch.zeros(1)
    path = tmp_path / "extra_keys.ckpt"
    torch.save({"state_dict": extra}, path)
    with pytest.raises(ValueError, match="extra_keys.ckpt.*surprise"):
        target.init_from_ckpt(str(path))
    assert torch.equal(target.model.diffusion_model.out[-1].weight, before)
    # ignore_keys skips them
    target.init_from_ckpt(str(path), ignore_keys=["model.diffusion_model.surprise"])
    assert torch.equal(target.model.diffusion_model.out[-1].weight, model.model.diffusion_model.out[-1].weight)

    # missing keys (e.g. a plug-in added to the model) load the rest and are reported
    partial = {k: v for k, v in good.items() if not k.startswith("model.diffusion_model.out.")}
    path = tmp_path / "partial.ckpt"
    torch.save(partial, path)
    with caplog.at_level(logging.WARNING):
        missing = tiny_ldm().init_from_ckpt(str(path))
    assert missing and all(k.startswith("model.diffusion_model.out.") for k in missing)
    assert "missing keys" in caplog.text


def test_only_model_and_no_ema(tmp_path):
    src = tiny_ldm()
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = tiny_ldm(use_ema=False, ckpt_path=str(path))  # model_ema.* dropped, no error
    assert torch.equal(dst.model.diffusion_model.out[-1].weight, src.model.diffusion_model.out[-1].weight)
    dst2 = tiny_ldm(load_only_unet=True, ckpt_path=str(path))
    assert torch.equal(dst2.model.diffusion_model.out[-1].weight, src.model.diffusion_model.out[-1].weight)


# ---------------------------------------------------------------------------------------------- sampling, logging
def test_ancestral_sample_and_log_images():
    model = tiny_ldm()
    model.eval()
    samples, inter = model.sample(None, batch_size=2, return_intermediates=True, verbose=False)
    assert samples.shape == (2, 2, 8, 8) and torch.isfinite(samples).all()
    assert len(inter) == 6  # x_T, then steps 19, 15, 10, 5, 0
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = model.sample(None, batch_size=1, verbose=False, generator=g1)
    b = model.sample(None, batch_size=1, verbose=False, generator=g2)
    assert torch.equal(a, b)
    log = model.log_images(batch(n=3), N=3, n_row=2, ddim_steps=4, plot_denoise_rows=True, split="train")
    assert set(log) == {"inputs", "reconstruction", "diffusion_row", "samples", "denoise_row", "progressive_row"}
    assert log["samples"].shape == (3, 1, 16, 16)
    assert log["inputs"].shape == (3, 1, 16, 16)
    for v in log.values():
        assert torch.isfinite(v).all()
    log = model.log_images(batch(), N=2, sample=False, ddim_steps=None, plot_progressive_rows=False,
                           return_keys=["inputs"])
    assert set(log) == {"inputs"}


def test_pixel_ddpm_runs():
    model = DDPM(unet_config=unet_config(in_channels=1, out_channels=1, image_size=16), timesteps=10, image_size=16,
                 channels=1, log_every_t=5)
    loss, d = model.shared_step(batch())
    assert torch.isfinite(loss) and "train/loss" in d
    log = model.log_images(batch(), N=2)
    assert log["samples"].shape == (2, 1, 16, 16)


# ---------------------------------------------------------------------------------------------- Lightning
class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 8):
        self.data = batch(n=n, seed=11)["image"].numpy()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"image": self.data[i]}


def test_lightning_fit_logs_compvis_keys(tmp_path):
    model = tiny_ldm(scale_by_std=True, scheduler_config={
        "target": "ldm.lr_scheduler.LambdaLinearScheduler",
        "params": {"warm_up_steps": [10], "f_min": [1.0], "f_max": [1.0], "f_start": [0.1],
                   "cycle_lengths": [1000]}})
    model.learning_rate = 1e-3
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=1,
                         logger=pl.loggers.CSVLogger(str(tmp_path)), default_root_dir=str(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=3)
    before = model.model_ema.get_buffer("diffusion_modelinput_blocks00weight").clone()
    trainer.fit(model, DataLoader(_Images(), batch_size=2), DataLoader(_Images(4), batch_size=2))
    metrics = trainer.callback_metrics
    for key in ("train/loss_simple", "train/loss_vlb", "train/loss", "global_step", "lr_abs",
                "val/loss", "val/loss_simple", "val/loss_ema", "val/loss_simple_ema", "val/loss_vlb_ema"):
        assert key in metrics, key
    assert float(metrics["lr_abs"]) == pytest.approx(1e-3 * (0.1 + 0.9 * 2 / 10), rel=1e-5)  # lr at step 2
    assert int(model.model_ema.num_updates) == 3
    assert not torch.equal(before, model.model_ema.get_buffer("diffusion_modelinput_blocks00weight"))
    assert float(model.scale_factor) != 1.0
    assert not model.first_stage_model.training


def test_crossattn_end_to_end_with_guidance():
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm(cond_stage_config={"target": "torch.nn.Identity"}, conditioning_key="crossattn",
                     cond_stage_key="caption",
                     unet_config=unet_config(attention_resolutions=[1], use_spatial_transformer=True, context_dim=16))
    assert model.model.conditioning_key == "crossattn" and not model.cond_stage_model.training
    data = batch()
    data["caption"] = torch.randn(2, 4, 16)
    z, c = model.get_input(data, "image")
    assert torch.equal(c, data["caption"])
    loss, _ = model.shared_step(data)
    loss.backward()
    grads = [p.grad for p in model.model.parameters() if p.grad is not None]
    assert grads and not any(p.grad is not None for p in model.first_stage_model.parameters())
    model.eval()
    sampler = DDIMSampler(model)
    samples, _ = sampler.sample(3, 2, (2, 8, 8), c, verbose=False, unconditional_guidance_scale=2.0,
                                unconditional_conditioning=torch.zeros_like(c))
    assert samples.shape == (2, 2, 8, 8) and torch.isfinite(samples).all()


def test_shortened_cond_schedule_buffer():
    model = tiny_ldm(num_timesteps_cond=5, timesteps=20)
    assert model.shorter_cond_schedule
    assert model.cond_ids.tolist() == [0, 5, 10, 14, 19] + [19] * 15
    assert "cond_ids" not in model.state_dict()  # CompVis checkpoints do not hold it


def test_vq_first_stage_surface():
    vq = {"target": "ldm.models.autoencoder.VQModelInterface",
          "params": {"embed_dim": 2, "n_embed": 16, "lossconfig": {"target": "torch.nn.Identity"},
                     "ddconfig": dict(FIRST_STAGE["params"]["ddconfig"], double_z=False)}}
    model = tiny_ldm(first_stage_config=vq, scale_factor=2.0)
    z, _ = model.get_input(batch(), "image")
    h = model.first_stage_model.encode(batch()["image"].permute(0, 3, 1, 2))
    assert torch.allclose(z, 2.0 * h, atol=1e-5)  # a VQ encoder returns a tensor: used as is
    quantized = model.decode_first_stage(z)
    assert torch.allclose(quantized, model.first_stage_model.decode(h), atol=1e-5)
    raw = model.decode_first_stage(z, force_not_quantize=True)
    assert torch.allclose(raw, model.first_stage_model.decode(h, force_not_quantize=True), atol=1e-5)


class _Opaque:
    """A pickled object in a checkpoint (as PL 1.x checkpoints hold), refused by weights_only loading."""

    def __init__(self) -> None:
        self.value = 1


def test_unsafe_checkpoint_needs_explicit_opt_in(tmp_path, monkeypatch):
    from ldm.util import load_checkpoint_state_dict

    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": _Opaque()}, path)
    monkeypatch.delenv("LDM_UNSAFE_LOAD", raising=False)
    with pytest.raises(ValueError, match="LDM_UNSAFE_LOAD=1"):
        load_checkpoint_state_dict(str(path))
    monkeypatch.setenv("LDM_UNSAFE_LOAD", "1")
    sd = load_checkpoint_state_dict(str(path))
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.ones(2))
