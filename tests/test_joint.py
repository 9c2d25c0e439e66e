"""Joint image + mask generation: the mask autoencoder, the joint mode of AnatomicalLatentDiffusion, sampling
through ldm.sampling / scripts/sample.py, and every ValueError of the new code."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import default_collate

from ldm import sampling
from ldm.data.phantom import PhantomDataset
from ldm.models.mask_autoencoder import MaskAutoencoderKL, masks_from_batch, one_hot_mask
from ldm.util import instantiate_from_config
from test_sample_run import load_script
from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config

NUM_CLASSES = 6


def mask_ae_params(**overrides) -> dict:
    """A 6-class f2 mask autoencoder for 16 px masks (2 latent channels, like the tiny image first stage)."""
    params = {"num_classes": NUM_CLASSES, "embed_dim": 2,
              "ddconfig": {"double_z": True, "z_channels": 2, "resolution": 16, "ch": 8, "ch_mult": [1, 2],
                           "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}
    params.update(overrides)
    return params


def mask_ae_config(**overrides) -> dict:
    return {"target": "ldm.models.mask_autoencoder.MaskAutoencoderKL", "params": mask_ae_params(**overrides)}


def joint_config(registers: bool = False, **overrides) -> dict:
    """Tiny joint AnatomicalLatentDiffusion: 2 image + 2 mask latent channels (8x8), optionally with registers."""
    anatomy = anatomical_params() if registers else None
    params = {"timesteps": 100, "channels": 4, "joint_mask_config": mask_ae_config(), "use_ema": False,
              "label_set": "ctorgan"}
    params.update(overrides)
    return ldm_config(True, first_stage=first_stage_config(ch=8), unet=unet_config(4, 4, anatomy=anatomy), **params)


def phantom_batch(n: int = 4, has=None) -> dict:
    ds = PhantomDataset(size=16, num_samples=n, seed=0)
    batch = default_collate([ds[i] for i in range(n)])
    if has is not None:
        batch["has_segmentation"] = torch.as_tensor(has, dtype=torch.bool)
    return batch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


# ---------------------------------------------------------------------------------------- mask autoencoder
def test_mask_autoencoder_shapes_and_ignore_index():
    ae = MaskAutoencoderKL(**mask_ae_params())
    mask = phantom_batch()["segmentation"]
    mask[0, :4] = 255
    onehot = ae.one_hot(mask)
    assert onehot.shape == (4, NUM_CLASSES, 16, 16)
    assert torch.all(onehot[0, :, :4] == 0) and torch.all(onehot[1].sum(0) == 1)
    posterior = ae.encode(onehot)
    assert posterior.mode().shape == (4, 2, 8, 8) and ae.encode_mask(mask).shape == (4, 2, 8, 8)
    logits = ae.decode(posterior.mode())
    assert logits.shape == (4, NUM_CLASSES, 16, 16) and ae.decode_mask(posterior.mode()).dtype == torch.int64
    loss, _ = ae.reconstruction_loss(logits, mask)
    changed = logits.clone()
    changed[0, :, :4] = torch.randn_like(changed[0, :, :4]) * 10  # ignored pixels do not count
    assert torch.allclose(ae.reconstruction_loss(changed, mask)[0], loss)
    none = torch.full_like(mask, 255)
    zero, _ = ae.reconstruction_loss(logits.detach().requires_grad_(), none)
    assert zero.item() == 0.0 and zero.requires_grad


def test_mask_autoencoder_training_reduces_the_loss_and_unlabelled_examples_are_ignored():
    ae = MaskAutoencoderKL(**mask_ae_params(), kl_weight=1e-6)
    ae.learning_rate = 2e-3
    opt = ae.configure_optimizers()
    batch = phantom_batch(8)
    losses = []
    for _ in range(15):
        loss, log, _, _ = ae.shared_step(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(log["train/rec_loss"]))
    assert losses[-1] < 0.8 * losses[0]
    unlabelled = phantom_batch(2, has=[False, False])
    assert float(ae.shared_step(unlabelled, "train")[1]["train/rec_loss"]) == 0.0
    val = ae.validation_step(phantom_batch(4), 0)
    assert {"val/rec_loss", "val/dice", "val/dice_0"} <= set(val)
    images = ae.log_images(phantom_batch(2))
    assert images["reconstructions"].shape == (2, 3, 16, 16) and images["inputs"].min() >= -1


def test_mask_autoencoder_learning_rate_schedule_in_a_lightning_run(tmp_path):
    """``scheduler_config``: the learning rate follows ``base * schedule(step)`` per optimiser step."""
    import pytorch_lightning as pl

    sched = {"target": "ldm.lr_scheduler.LambdaWarmUpCosineScheduler",
             "params": {"warm_up_steps": 1, "lr_min": 0.1, "lr_max": 1.0, "lr_start": 0.5, "max_decay_steps": 5}}
    ae = MaskAutoencoderKL(**mask_ae_params(), scheduler_config=sched)
    ae.learning_rate = 1e-3
    loader = torch.utils.data.DataLoader(PhantomDataset(size=16, num_samples=8, seed=0), batch_size=2)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(ae, loader)
    # warm-up 0.5 -> 1.0 over one step, then cosine from 1.0 (step 1) to 0.1 (step 5): at step 3 halfway
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.55)
    constant = MaskAutoencoderKL(**mask_ae_params())
    constant.learning_rate = 1e-3
    assert isinstance(constant.configure_optimizers(), torch.optim.Adam)
    with pytest.raises(ValueError, match="has no schedule"):
        MaskAutoencoderKL(**mask_ae_params(), scheduler_config={"target": "torch.nn.Identity"})


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": 1}, "num_classes must be >= 2"),
    ({"embed_dim": 0}, "embed_dim must be >= 1"),
    ({"kl_weight": -1.0}, "kl_weight and dice_weight"),
    ({"ignore_index": 3}, "ignore_index 3 is a class id"),
    ({"class_weights": [1.0, 2.0]}, "class_weights must be 6 values"),
    ({"label_set": "breastmri"}, "breastmri"),
])
def test_mask_autoencoder_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskAutoencoderKL(**{**mask_ae_params(), **kwargs})


def test_mask_autoencoder_ddconfig_and_input_errors():
    base = mask_ae_params()
    with pytest.raises(ValueError, match="double_z: true"):
        MaskAutoencoderKL(**{**base, "ddconfig": {**base["ddconfig"], "double_z": False}})
    with pytest.raises(ValueError, match="ddconfig.in_channels is 1"):
        MaskAutoencoderKL(**{**base, "ddconfig": {**base["ddconfig"], "in_channels": 1}})
    ae = MaskAutoencoderKL(**base)
    with pytest.raises(ValueError, match="outside 0..5"):
        one_hot_mask(torch.full((1, 4, 4), 7), NUM_CLASSES)
    with pytest.raises(ValueError, match="one-hot masks"):
        ae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no key 'segmentation'"):
        masks_from_batch({"image": torch.zeros(1)}, "segmentation", 255)
    with pytest.raises(ValueError, match="integer class ids"):
        masks_from_batch({"segmentation": torch.zeros(1, 4, 4)}, "segmentation", 255)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        masks_from_batch({"segmentation": torch.zeros(4, 4, dtype=torch.long)}, "segmentation", 255)
    with pytest.raises(ValueError, match="learning_rate is not set"):
        ae.configure_optimizers()


# ---------------------------------------------------------------------------------------- joint training
@pytest.mark.parametrize("registers", [False, True])
def test_joint_model_trains_with_and_without_masks(registers):
    model = instantiate_from_config(joint_config(registers))
    assert model.is_joint and model.channels == 4
    model.train()
    loss, logged = model.shared_step(phantom_batch())
    loss.backward()
    assert torch.isfinite(loss) and float(logged["train/mask_loss_simple"]) > 0
    assert all(p.grad is None for p in model.joint_mask.parameters())  # the mask first stage stays frozen
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    if registers:
        assert "train/anatomical_loss" in logged
    model.zero_grad()
    loss, logged = model.shared_step(phantom_batch(has=[False] * 4))
    assert float(logged["train/mask_loss_simple"]) == 0.0 and float(logged["train/mask_fraction"]) == 0.0
    loss.backward()
    assert torch.isfinite(loss)


def test_joint_mask_loss_uses_labelled_examples_only():
    model = instantiate_from_config(joint_config())
    model.train()
    batch = phantom_batch(has=[True, False, True, False])
    other = {**batch, "segmentation": batch["segmentation"].clone()}
    other["segmentation"][1] = 0  # an unlabelled example's (unused) mask changes nothing
    torch.manual_seed(1)
    first = model.shared_step(batch)[1]
    torch.manual_seed(1)
    second = model.shared_step(other)[1]
    assert float(first["train/loss"]) == float(second["train/loss"])
    assert float(first["train/mask_fraction"]) == 0.5


def test_joint_q_sample_gives_unlabelled_examples_pure_noise_in_the_mask_channels():
    model = instantiate_from_config(joint_config())
    z = model.get_input(phantom_batch(2), "image")[0]
    assert z.shape == (2, 4, 8, 8) and torch.all(z[:, 2:].abs().sum((1, 2, 3)) > 0)
    noise, t = torch.randn_like(z), torch.tensor([5, 5])
    plain = model.q_sample(z, t, noise)
    x_t = model.joint_mask.hide_unlabelled(plain, noise, torch.tensor([True, False]))
    assert torch.equal(x_t[0], plain[0]) and torch.equal(x_t[1, :2], plain[1, :2])
    assert torch.equal(x_t[1, 2:], noise[1, 2:])


def test_mask_scale_by_std_waits_for_a_labelled_batch_and_is_kept_in_the_checkpoint():
    model = instantiate_from_config(joint_config(mask_scale_by_std=True))
    model.on_train_batch_start(phantom_batch(has=[False] * 4), 0)
    assert float(model.joint_mask.scale_factor) == 1.0
    model.on_train_batch_start(phantom_batch(), 0)
    scale = float(model.joint_mask.scale_factor)
    z = model.joint_mask.raw_latents(phantom_batch()["segmentation"])
    assert scale == pytest.approx(1.0 / float(z.double().std()), rel=1e-4)
    state = model.state_dict()
    assert "joint_mask.scale_factor" in state and any(k.startswith("joint_mask.autoencoder.") for k in state)
    fresh = instantiate_from_config(joint_config(mask_scale_by_std=True))
    fresh.load_state_dict(state)
    fresh.on_train_batch_start(phantom_batch(2), 0)
    assert float(fresh.joint_mask.scale_factor) == pytest.approx(scale)


def test_mask_scale_by_std_zero_spread_is_a_value_error(monkeypatch):
    model = instantiate_from_config(joint_config(mask_scale_by_std=True))
    monkeypatch.setattr(model.joint_mask, "raw_latents", lambda mask: torch.ones(len(mask), 2, 8, 8))
    with pytest.raises(ValueError, match="zero spread"):
        model.on_train_batch_start(phantom_batch(), 0)


def test_joint_checkpoint_loads_through_ckpt_path(tmp_path):
    model = instantiate_from_config(joint_config())
    path = str(tmp_path / "joint.ckpt")
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = instantiate_from_config(joint_config(ckpt_path=path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("registers", [False, True])
def test_joint_sampling_returns_image_and_mask_of_the_same_size(registers):
    model = instantiate_from_config(joint_config(registers)).eval()
    x_T = sampling.initial_noise(sampling.latent_shape(model), 0, [0, 1])
    out = model.sample_images_and_masks(x_T, ddim_steps=3)
    assert out["images"].shape == (2, 1, 16, 16) and out["masks"].shape == (2, 16, 16)
    assert out["masks"].dtype == torch.int64 and 0 <= int(out["masks"].min()) and int(out["masks"].max()) < NUM_CLASSES
    assert out["mask_source"] == "joint"
    assert torch.equal(sampling.predict_masks(model, out["latents"], (16, 16)), out["masks"])
    assert torch.equal(model.decode_first_stage(out["latents"]), out["images"])
    if registers:
        assert out["head_masks"].shape == (2, 16, 16)
    logged = model.log_images(phantom_batch(2), N=2, ddim_steps=2, plot_progressive_rows=False)
    assert logged["samples_mask"].shape == (2, 3, 16, 16) and logged["inputs_mask"].shape == (2, 3, 16, 16)


def test_joint_sampling_value_errors():
    model = instantiate_from_config(joint_config()).eval()
    with pytest.raises(ValueError, match="joint noise"):
        model.sample_images_and_masks(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="4 channels"):
        model.joint_mask.split(torch.randn(1, 3, 8, 8))
    plain = instantiate_from_config(ldm_config(True, unet=unet_config(), label_set="ctorgan"))
    assert not plain.is_joint
    with pytest.raises(ValueError, match="needs a joint model"):
        plain.sample_images_and_masks(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="needs a joint model"):
        plain.joint_mask_logits(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="has no 'segmentation' masks"):
        model.get_input({"image": torch.zeros(1, 16, 16, 1)}, "image")
    with pytest.raises(ValueError, match="has no 'segmentation' masks"):
        instantiate_from_config(joint_config(mask_scale_by_std=True)).on_train_batch_start(
            {"image": torch.zeros(1, 16, 16, 1)}, 0)


# ---------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("overrides, match", [
    ({"channels": 2}, r"'channels': 2"),
    ({"joint_mask_loss_weight": -1.0}, "joint_mask_loss_weight must be >= 0"),
    ({"mask_scale_factor": 0.0}, "mask_scale_factor must be > 0"),
    ({"joint_mask_config": {"target": "torch.nn.Identity"}}, "has no 'encode_mask'"),
    ({"label_set": "breastmri"}, "breastmri"),
])
def test_joint_config_value_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        instantiate_from_config(joint_config(**overrides))


def test_joint_mode_needs_a_first_stage_with_embed_dim():
    config = joint_config()
    config["params"]["first_stage_config"] = {"target": "ldm.models.autoencoder.IdentityFirstStage"}
    with pytest.raises(ValueError, match="first stage with embed_dim"):
        instantiate_from_config(config)


def test_joint_unet_channels_and_classes_must_match():
    config = joint_config()
    config["params"]["unet_config"] = unet_config(2, 2)
    config["params"]["channels"] = 4
    with pytest.raises(ValueError, match="unet_config in_channels"):
        instantiate_from_config(config)
    config = joint_config(registers=True, label_set=None)
    config["params"]["unet_config"]["params"]["num_anatomical_classes"] = 4
    with pytest.raises(ValueError, match="num_anatomical_classes=4 but the mask autoencoder num_classes=6"):
        instantiate_from_config(config)


# ---------------------------------------------------------------------------------------- scripts
def make_joint_run(root: str, registers: bool) -> str:
    config = {"model": {"base_learning_rate": 1e-3, **joint_config(registers, use_ema=True)}}
    model = instantiate_from_config(config["model"])
    opt = torch.optim.Adam([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(2):
        loss, _ = model.shared_step(phantom_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.model_ema(model.model)
    run_dir = os.path.join(root, f"2026-01-01T00-00-00_joint{int(registers)}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    os.makedirs(os.path.join(run_dir, "configs"))
    torch.save({"state_dict": model.state_dict(), "global_step": 2}, os.path.join(run_dir, "checkpoints", "last.ckpt"))
    OmegaConf.save(OmegaConf.create(config), os.path.join(run_dir, "configs", "2026-01-01T00-00-00-project.yaml"))
    return run_dir


@pytest.mark.parametrize("registers", [False, True])
def test_joint_checkpoint_samples_through_sample_py(tmp_path, registers):
    run = make_joint_run(str(tmp_path), registers)
    out = tmp_path / "samples"
    sample = load_script("sample")
    args = ["-r", run, "-n", "3", "--batch_size", "2", "-c", "3", "-l", str(out), "--no-progress", "--device", "cpu"]
    assert sample.main(args) == 0
    names = sorted(os.listdir(out / "masks"))
    assert names == sorted(os.listdir(out / "images")) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(out / "masks_colour")) == names
    for name in names:
        image, mask = np.asarray(Image.open(out / "images" / name)), np.asarray(Image.open(out / "masks" / name))
        assert image.shape == mask.shape == (16, 16) and mask.max() < NUM_CLASSES
    manifest = json.loads((out / "samples.json").read_text())
    assert manifest["mask_source"] == "joint" and manifest["masks_generated_jointly"] is True
    assert manifest["sessions"][0]["mask_source"] == "joint"
    if not registers:
        evaluate = load_script("evaluate")
        report = tmp_path / "report"
        assert evaluate.main(["--samples", f"joint={out}", "--real", str(out), "--rules", "phantom", "-o", str(report),
                              "--kid_subset_size", "2", "--grid", "2", "--device", "cpu"]) == 0
        meta = json.loads((report / "report.json").read_text())
        assert "joint" in json.dumps(meta) and '"mask_source": "joint"' in json.dumps(meta)
    if registers:
        inspect = load_script("inspect_registers")
        assert inspect.main(["-r", run, "-l", str(tmp_path / "registers"), "-n", "2", "-c", "2",
                             "--device", "cpu"]) == 0


# ---------------------------------------------------------------------------------------- configs and main.py
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
JOINT_ONLY = {"joint_mask_config", "mask_scale_by_std", "joint_mask_loss_weight", "channels"}


@pytest.mark.parametrize("joint, anatomical, mask_ae", [
    ("anatomical_joint_ctorgan_kl.yaml", "anatomical_ctorgan_kl.yaml", "mask_ae_ctorgan.yaml"),
    ("anatomical_joint_breastmri_kl.yaml", "anatomical_breastmri_kl.yaml", "mask_ae_breastmri.yaml"),
    ("demo_phantom_joint.yaml", "demo_phantom_anatomical.yaml", "mask_ae_phantom.yaml"),
])
def test_joint_configs_equal_the_anatomical_ones_plus_the_joint_mode(joint, anatomical, mask_ae):
    load = lambda *p: OmegaConf.to_container(OmegaConf.load(os.path.join(CONFIGS, *p)))  # noqa: E731
    cfg, base, ae = load("latent-diffusion", joint), load("latent-diffusion", anatomical), load("autoencoder", mask_ae)
    assert cfg["data"] == base["data"] and cfg["lightning"] == base["lightning"]
    params, base_params = cfg["model"]["params"], base["model"]["params"]
    # mask_from picks what the segmentation head reads; a joint model's masks are its generated ones
    other = JOINT_ONLY | {"unet_config", "mask_from"}
    assert "mask_from" not in params
    assert {k: v for k, v in params.items() if k not in other} == {k: v for k, v in base_params.items() if k not in other}
    mask_params = dict(params["joint_mask_config"]["params"])
    assert params["joint_mask_config"]["target"] == ae["model"]["target"]
    for key in ("num_classes", "embed_dim", "ddconfig"):
        assert mask_params[key] == ae["model"]["params"][key], key  # the mask AE checkpoint loads strictly
    channels = base_params["channels"] + mask_params["embed_dim"]
    unet = params["unet_config"]["params"]
    assert params["channels"] == unet["in_channels"] == unet["out_channels"] == channels
    assert {k: v for k, v in unet.items() if "channels" not in k} == \
        {k: v for k, v in base_params["unet_config"]["params"].items() if "channels" not in k}
    assert mask_params["num_classes"] == unet["num_anatomical_classes"]
    assert ae["model"]["params"]["ddconfig"]["ch_mult"].__len__() == \
        params["first_stage_config"]["params"]["ddconfig"]["ch_mult"].__len__()  # same spatial factor


@pytest.fixture
def _keep_sigusr1():
    import signal

    previous = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
    yield
    if previous is not None:
        signal.signal(signal.SIGUSR1, previous)


SMALL_RUN = ["lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=1",
             "lightning.trainer.log_every_n_steps=1", "lightning.callbacks.image_logger.params.batch_frequency=1",
             "lightning.callbacks.image_logger.params.max_images=2", "data.params.batch_size=4",
             "data.params.train.params.num_samples=8", "data.params.validation.params.num_samples=4"]


def test_mask_autoencoder_and_demo_joint_config_train_through_main(tmp_path, _keep_sigusr1):
    """Two steps of the phantom mask autoencoder, then two of the joint demo on top of it, through main.py."""
    import main

    logs = tmp_path / "logs"
    assert main.main(["--base", os.path.join(CONFIGS, "autoencoder", "mask_ae_phantom.yaml"), "-t", "--accelerator",
                      "cpu", "-l", str(logs), "-n", "mask_ae", *SMALL_RUN]) == 0
    (ae_run,) = list(logs.iterdir())
    ae_ckpt = ae_run / "checkpoints" / "last.ckpt"
    metrics = next(ae_run.glob("csv/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"val/rec_loss", "val/dice", "train/ce"} <= set(metrics)
    dice_script = load_script("mask_ae_dice")
    assert dice_script.main(["-r", str(ae_run), "--num_samples", "4", "-o", str(tmp_path / "dice.json"),
                             "--device", "cpu"]) == 0
    dice = json.loads((tmp_path / "dice.json").read_text())
    assert dice["num_masks"] == 4 and all(0.0 <= v <= 1.0 for v in dice["dice"].values())
    with pytest.raises(ValueError, match="no data.params.nosuch"):
        dice_script.main(["-r", str(ae_run), "--split", "nosuch", "--device", "cpu"])
    assert main.main(["--base", os.path.join(CONFIGS, "latent-diffusion", "demo_phantom_joint.yaml"), "-t",
                      "--accelerator", "cpu", "-l", str(logs), "-n", "joint",
                      "model.params.first_stage_config.params.ckpt_path=null",
                      f"model.params.joint_mask_config.params.ckpt_path={ae_ckpt}",
                      "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2", *SMALL_RUN]) == 0
    (run,) = [p for p in logs.iterdir() if p.name.endswith("_joint")]
    with pytest.raises(ValueError, match="not a mask autoencoder"):
        dice_script.main(["-r", str(run), "--device", "cpu"])
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    ae_state = torch.load(ae_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in ae_state.items():  # the frozen mask autoencoder is carried unchanged
        assert torch.equal(state[f"joint_mask.autoencoder.{key}"], value), key
    assert float(state["joint_mask.scale_factor"]) != 1.0  # mask_scale_by_std ran
    metrics = next(run.glob("csv/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/mask_loss_simple_step", "val/loss_simple", "val/diffusion_loss"} <= set(metrics)
    images = {p.name.split("_gs-")[0] for p in run.glob("images/train/*.png")}
    assert {"samples", "samples_mask", "inputs_mask"} <= images, images


from test_training_faults import STUB_PYTHON  # noqa: E402 - the stand-in for python main.py the script tests share


def test_train_script_trains_the_mask_autoencoder_when_absent(tmp_path):
    import subprocess

    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    root = os.path.dirname(CONFIGS)
    env = {**os.environ, "PYTHON": str(stub), "LOGDIR": str(tmp_path / "logs"), "CALLS": str(tmp_path / "calls")}
    for _ in range(2):  # the second run finds both autoencoders
        subprocess.run([os.path.join(root, "train_anatomical_ldm.sh"), "demo_joint"], env=env, check=True,
                       capture_output=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 4
    assert "configs/autoencoder/demo_phantom_kl.yaml" in calls[0] and "mask_ae_phantom.yaml" in calls[1]
    for ldm_call in (calls[2], calls[3]):
        assert "demo_phantom_joint.yaml" in ldm_call
        assert f"model.params.joint_mask_config.params.ckpt_path={tmp_path}/logs/mask_ae_phantom/checkpoints/last.ckpt" \
            in ldm_call
    assert os.path.islink(tmp_path / "logs" / "mask_ae_phantom")
    out = subprocess.run([os.path.join(root, "train_anatomical_ldm.sh"), "demo"], env=env, check=True,
                         capture_output=True, text=True)
    assert "joint_mask_config" not in (tmp_path / "calls").read_text().splitlines()[-1] and "mask" not in out.stdout
