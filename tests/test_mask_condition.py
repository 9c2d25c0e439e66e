"""Mask conditioning with condition dropout (issue 28): class fractions of (partial) masks, the zero-exact encoder, a
plain checkpoint loading with only the new keys missing, dropout 1 training exactly the unconditional model, partial
masks, and sampling from masks with classifier-free guidance (0 = unconditional bit for bit)."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import default_collate

from ldm.data.phantom import PhantomDataset
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.mask_condition import MaskCondition, MaskConditionEncoder, mask_fractions
from ldm.sampling import draw_batch
from ldm.sampling.masks import sample_from_masks
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config, unet_params

IGNORE = 255
CONDITION = {"key": "segmentation", "num_classes": 6, "ignore_index": IGNORE}


def test_fractions_of_full_partial_and_unknown_masks():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = 1
    mask[0, 0, 0] = 2
    mask[0, 2:, 2:] = IGNORE  # an undrawn corner
    f = mask_fractions(mask, 3, IGNORE, (2, 2))
    assert f.shape == (1, 3, 2, 2)
    assert torch.allclose(f[0, :, 0, 0], torch.tensor([0.0, 0.75, 0.25]))
    assert torch.allclose(f[0].sum(0), torch.tensor([[1.0, 1.0], [1.0, 0.0]]))  # the unknown cell sums to 0
    assert torch.equal(mask_fractions(torch.full((2, 4, 4), IGNORE), 3, IGNORE, (2, 2)), torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..2"):
        mask_fractions(torch.full((1, 4, 4), 7), 3, IGNORE, (2, 2))
    with pytest.raises(ValueError, match="integer mask"):
        mask_fractions(torch.zeros(1, 4, 4), 3, IGNORE, (2, 2))


def test_zero_maps_add_exactly_zero_and_a_plain_checkpoint_loads():
    enc = MaskConditionEncoder(3, 32)
    with torch.no_grad():
        enc.out.weight.normal_()
    assert torch.equal(enc(torch.zeros(2, 3, 8, 8), (8, 8)), torch.zeros(2, 32, 8, 8))
    torch.manual_seed(0)
    plain = UNetModel(**unet_params(2, 2, 8, two_level=True))
    torch.manual_seed(0)
    cond = UNetModel(**unet_params(2, 2, 8, two_level=True), mask_condition_classes=3)
    # the same base weights (the encoder is drawn from a forked RNG) and only the new keys missing
    ours = cond.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in plain.state_dict().items())
    missing, unexpected = cond.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("mask_condition.") for k in missing)
    with torch.no_grad():
        for p in cond.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 500])
    fractions = torch.rand(2, 3, 8, 8)
    none, zeros = cond(x, t), cond(x, t, mask_condition=torch.zeros_like(fractions))
    assert torch.equal(none, zeros)
    assert (cond(x, t, mask_condition=fractions) - none).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no mask_condition_classes"):
        plain(x, t, mask_condition=fractions)



def test_sub_cell_detail_sees_where_a_boundary_runs_inside_a_latent_cell():
    """mask_condition_detail 4: two masks with the same class fractions in every latent cell but the boundary in
    another place inside the cells give the same condition at detail 1 and different ones at detail 4."""
    left = torch.zeros(1, 32, 32, dtype=torch.long)
    left[0, :, ::4] = 1  # class 1 on the first pixel column of every 4-pixel cell ...
    right = torch.zeros(1, 32, 32, dtype=torch.long)
    right[0, :, 3::4] = 1  # ... or on the last: the same fractions per cell
    coarse, fine = MaskCondition(**CONDITION), MaskCondition(**CONDITION)
    fine.detail = 4
    assert torch.equal(coarse.condition(left, (8, 8))["mask_condition"],
                       coarse.condition(right, (8, 8))["mask_condition"])
    assert fine.condition(left, (8, 8))["mask_condition"].shape == (1, 6, 32, 32)
    torch.manual_seed(0)
    enc1, enc4 = MaskConditionEncoder(6, 16), MaskConditionEncoder(6, 16, detail=4)
    assert enc4.inp.weight.shape == (16, 6 * 16, 1, 1)  # space to depth, then a 1x1 convolution
    with torch.no_grad():
        enc1.out.weight.normal_()
        enc4.out.weight.normal_()
    assert torch.equal(enc4(torch.zeros(2, 6, 32, 32), (8, 8)), torch.zeros(2, 16, 8, 8))  # zeros stay exactly zero
    same = [enc1(coarse.condition(m, (8, 8))["mask_condition"], (8, 8)) for m in (left, right)]
    other = [enc4(fine.condition(m, (8, 8))["mask_condition"], (8, 8)) for m in (left, right)]
    assert torch.equal(same[0], same[1]) and (other[0] - other[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"coarser than the condition grid \(32, 32\)"):
        fine.condition(torch.zeros(1, 16, 16, dtype=torch.long), (8, 8))
    with pytest.raises(ValueError, match="the UNet's encoder needs"):
        enc4(torch.zeros(1, 6, 8, 8), (8, 8))
    # through the model: the condition takes the UNet's detail, trains, and a plain checkpoint still loads
    config = _config({**CONDITION, "dropout": 0.0})
    config["params"]["unet_config"]["params"]["mask_condition_detail"] = 2
    model = _train(config, steps=2)
    assert model.mask_condition.detail == 2 and model.model.diffusion_model.mask_condition.out.weight.abs().sum() > 0
    missing, unexpected = model.load_state_dict(_train(_config(), steps=1).state_dict(), strict=False)
    assert not unexpected and all(k.startswith("model.diffusion_model.mask_condition.") for k in missing)

def test_condition_dropout_and_partial_masks():
    mask = torch.zeros(400, 8, 8, dtype=torch.long)
    mask[:, :4] = 1
    mask[:, 6:, :4] = 2
    mask[:, 6:, 4:] = 3
    none = MaskCondition(**CONDITION, dropout=1.0)
    state = torch.get_rng_state()
    assert none.drop(mask) is None and torch.equal(torch.get_rng_state(), state)  # no random numbers drawn
    assert torch.equal(MaskCondition(**CONDITION, dropout=0.0).drop(mask), mask)
    g = torch.Generator().manual_seed(0)
    dropped = MaskCondition(**CONDITION, dropout=0.3).drop(mask, g)
    rate = float((dropped == IGNORE).flatten(1).all(1).float().mean())
    assert abs(rate - 0.3) < 0.06
    partial = MaskCondition(**CONDITION, dropout=0.0, partial=1.0).drop(mask, g)
    for i in range(len(mask)):
        known = partial[i] != IGNORE
        assert bool(known.any())  # a non-empty subset of the classes is kept ...
        assert torch.equal(partial[i][known], mask[i][known])  # ... unchanged
        kept = set(partial[i][known].unique().tolist())
        for c in {0, 1, 2, 3} - kept:  # every dropped class is unknown everywhere
            assert not bool((partial[i] == c).any())
    shares = (partial != IGNORE).flatten(1).float().mean(1)
    assert float((shares < 1).float().mean()) > 0.8  # most keep only part of the mask
    with pytest.raises(ValueError, match="dropout must be a probability"):
        MaskCondition(**CONDITION, dropout=1.5)
    with pytest.raises(ValueError, match="unknown mask_condition settings"):
        MaskCondition.from_config({**CONDITION, "p": 0.1})


def _config(condition=None, anatomical=False):
    anatomy = anatomical_params(num_classes=6, register_dim=16) if anatomical else None
    unet = unet_config(3, 3, 16, anatomy=anatomy, two_level=True,
                       **({"mask_condition_classes": 6} if condition else {}))
    params = {"timesteps": 100, "loss_type": "l1", "first_stage_key": "image", "image_size": 16, "channels": 3,
              "use_ema": False}
    if condition is not None:
        params["mask_condition"] = condition
    if anatomical:
        params.update(anatomical_loss_weight=0.1, anatomical_warmup_steps=2)
    return ldm_config(anatomical, first_stage=first_stage_config(ch=32, embed_dim=3, resolution=32), unet=unet,
                      **params)


def _batches(n=3):
    ds = PhantomDataset(size=32, num_samples=4 * n, seed=0)
    return [default_collate([ds[i] for i in range(4 * k, 4 * k + 4)]) for k in range(n)]


def _train(config, steps=3):
    torch.manual_seed(0)
    model = instantiate_from_config(config)
    opt = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for batch in _batches(steps):
        loss, _ = model.shared_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_dropout_one_trains_exactly_the_unconditional_model():
    plain = _train(_config())
    never = _train(_config({**CONDITION, "dropout": 1.0}))
    base = plain.state_dict()
    ours = never.state_dict()
    assert set(ours) - set(base) and all(k.startswith("model.diffusion_model.mask_condition.")
                                         for k in set(ours) - set(base))
    for key, value in base.items():
        assert torch.equal(ours[key], value), key


def test_the_condition_reaches_the_loss_and_mismatches_are_refused():
    model = _train(_config({**CONDITION, "dropout": 0.0}), steps=3)
    enc = model.model.diffusion_model.mask_condition
    assert enc.out.weight.abs().sum() > 0  # the zero-initialised projection learned from the masks
    with pytest.raises(ValueError, match="mask_condition_classes is not set"):
        instantiate_from_config(_config(None) | {"params": {**_config(None)["params"], "mask_condition": CONDITION}})
    batch = _batches(1)[0]
    del batch["segmentation"]
    model.train()
    with pytest.raises(ValueError, match=r"reads batch\['segmentation'\]"):
        model.shared_step(batch)


def _perturbed(config):
    torch.manual_seed(0)
    model = instantiate_from_config(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_sampling_from_masks_guidance_and_partial_masks():
    model = _perturbed(_config({**CONDITION, "dropout": 0.1}))
    masks = _batches(1)[0]["segmentation"][:2]
    uncond = draw_batch(model, [0, 1, 2, 3], seed=3, ddim_steps=4)["images"]
    # guidance 0: the unconditional model, bit for bit; sample i is mask i // per_mask from the noise of (seed, i)
    assert torch.equal(sample_from_masks(model, masks, 4, seed=3, guidance_scale=0.0, per_mask=2), uncond)
    cond = sample_from_masks(model, masks, 4, seed=3, per_mask=2, batch_size=3)
    assert cond.shape == uncond.shape and (cond - uncond).abs().max() > 1e-4
    assert torch.equal(cond[:2], sample_from_masks(model, masks[:1], 4, seed=3, per_mask=2))
    guided = sample_from_masks(model, masks, 4, seed=3, guidance_scale=3.0, per_mask=2)
    assert (guided - cond).abs().max() > 1e-4
    liver_only = torch.where(masks == 1, masks, torch.full_like(masks, IGNORE))  # a partial mask
    partial = sample_from_masks(model, liver_only, 4, seed=3)
    assert partial.shape == (2, 1, 32, 32) and torch.isfinite(partial).all()
    with pytest.raises(ValueError, match=r"labels \[9\] outside 0..5"):
        sample_from_masks(model, torch.full((1, 32, 32), 9), 4)
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        sample_from_masks(model, masks, 4, guidance_scale=-1)
    plain = _perturbed(_config())
    with pytest.raises(ValueError, match="needs a mask-conditioned model"):
        sample_from_masks(plain, masks, 4)


def test_autoguided_sampling_from_masks():
    from ldm.models.diffusion.autoguidance import Autoguidance

    config = _config({**CONDITION, "dropout": 0.1})
    model, guide = _perturbed(config), _perturbed(config)
    with torch.no_grad():  # a guide that differs from the model
        for p in guide.model.parameters():
            p.mul_(0.9)
    masks = _batches(1)[0]["segmentation"][:2]
    cond = sample_from_masks(model, masks, 4, seed=3)
    same = sample_from_masks(model, masks, 4, seed=3, autoguidance=Autoguidance(model, guide, 1.0))
    assert torch.equal(same, cond)  # weight 1: the model alone
    steer = Autoguidance(model, guide, 2.5)
    guided = sample_from_masks(model, masks, 4, seed=3, autoguidance=steer)
    assert guided.shape == cond.shape and (guided - cond).abs().max() > 1e-4 and steer.calls == 4  # one per step
    # eps = eps_guide + w (eps_model - eps_guide), both given the mask: the denoiser at one step, by hand
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 50)
    c = model.mask_condition.condition(masks.long(), (16, 16))
    eps, _ = steer.denoiser(c)(x, t)
    e_m, e_g = model.apply_model(x, t, c), guide.apply_model(x, t, c)
    assert torch.allclose(eps, e_g + 2.5 * (e_m - e_g), atol=1e-5)
    with pytest.raises(ValueError, match="takes the place of classifier-free guidance"):
        sample_from_masks(model, masks, 4, guidance_scale=2.0, autoguidance=steer)
    with pytest.raises(ValueError, match="made for another model"):
        sample_from_masks(guide, masks, 4, autoguidance=steer)
    plain = _perturbed(_config())
    with pytest.raises(ValueError, match="needs a mask-conditioned model"):
        sample_from_masks(model, masks, 4, autoguidance=Autoguidance(model, plain, 2.0))


def test_logged_samples_are_unconditional_and_a_row_is_drawn_from_the_inputs_masks():
    model = _perturbed(_config({**CONDITION, "dropout": 0.1}))
    batch = _batches(1)[0]
    kwargs = dict(N=2, ddim_steps=3, ddim_eta=0.0, plot_diffusion_rows=False, plot_progressive_rows=False)
    torch.manual_seed(5)
    log = model.log_images(batch, **kwargs)
    torch.manual_seed(5)  # the same draws again: the encoding, then the two rows' start noises
    model.get_input(batch, "image", return_first_stage_outputs=True, force_c_encode=True, return_original_cond=True,
                    bs=2)
    free, _ = model.sample_log(cond=None, batch_size=2, ddim=True, ddim_steps=3, eta=0.0)
    cond = model.mask_condition.condition(batch["segmentation"][:2].long(), (16, 16))
    given, _ = model.sample_log(cond=cond, batch_size=2, ddim=True, ddim_steps=3, eta=0.0)
    assert torch.allclose(log["samples"], model.decode_first_stage(free))
    assert torch.allclose(log["samples_from_masks"], model.decode_first_stage(given))
    assert (log["samples"] - log["samples_from_masks"]).abs().max() > 1e-4
    plain = _perturbed(_config())
    assert "samples_from_masks" not in plain.log_images(batch, **kwargs)


def test_an_anatomical_model_takes_the_condition_and_predicts_its_masks():
    model = _perturbed(_config({**CONDITION, "dropout": 0.2, "partial": 0.5}, anatomical=True))
    model.train()
    loss, logs = model.shared_step(_batches(1)[0])
    assert torch.isfinite(loss) and "train/anatomical_loss" in logs
    model.eval()
    masks = _batches(1)[0]["segmentation"][:2]
    images, predicted = sample_from_masks(model, masks, 4, seed=0, return_masks=True)
    assert images.shape == (2, 1, 32, 32) and predicted.shape == (2, 32, 32) and predicted.dtype == torch.int64
    log = model.log_images(_batches(1)[0], N=2, ddim_steps=2, plot_diffusion_rows=False, plot_progressive_rows=False)
    assert {"samples", "samples_mask", "samples_from_masks"} <= set(log)
    assert log["samples_from_masks"].shape == log["samples"].shape


@pytest.fixture(scope="module")
def conditioned_run(tmp_path_factory):
    """A main.py-style run of a mask-conditioned anatomical model (a few steps on phantom slices)."""
    import os

    from omegaconf import OmegaConf

    torch.set_num_threads(1)
    config = _config({**CONDITION, "dropout": 0.2, "partial": 0.3}, anatomical=True)
    model = _train(config, steps=3)
    run = tmp_path_factory.mktemp("logs") / "2026-01-01T00-00-00_cond"
    os.makedirs(run / "checkpoints")
    os.makedirs(run / "configs")
    torch.save({"state_dict": model.state_dict(), "global_step": 3, "epoch": 0}, run / "checkpoints" / "last.ckpt")
    OmegaConf.save(OmegaConf.create({"model": {"base_learning_rate": 1e-3, **config}}),
                   run / "configs" / "2026-01-01T00-00-00-project.yaml")
    return str(run)


def _mask_folder(folder):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    masks = _batches(1)[0]["segmentation"][:2].numpy().astype(np.uint8)
    Image.fromarray(masks[0]).save(folder / "a.png")
    liver_only = np.where(masks[1] == 1, masks[1], 255).astype(np.uint8)
    np.save(folder / "b_liver_only.npy", liver_only)
    return masks[0], liver_only


def test_sample_script_draws_images_for_mask_files(conditioned_run, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from test_sample_run import load_script

    full, partial = _mask_folder(tmp_path / "masks")
    sample = load_script("sample")
    common = ["-r", conditioned_run, "-c", "4", "--seed", "2", "--no-progress", "--device", "cpu"]
    out = tmp_path / "out"
    assert sample.main([*common, "--masks", str(tmp_path / "masks"), "--per_mask", "2", "--save_masks",
                        "--batch_size", "3", "-l", str(out)]) == 0
    assert sorted(os.listdir(out / "images")) == ["a_0.png", "a_1.png", "b_liver_only_0.png", "b_liver_only_1.png"]
    assert sorted(os.listdir(out / "masks")) == sorted(os.listdir(out / "images"))
    assert np.array_equal(np.asarray(Image.open(out / "condition_masks" / "a.png")), full)
    assert np.array_equal(np.asarray(Image.open(out / "condition_masks" / "b_liver_only.png")), partial)
    record = json.load(open(out / "from_masks.json"))
    assert record["masks"] == 2 and record["per_mask"] == 2 and record["guidance_scale"] == 1.0
    assert record["files"][1] == {"mask": "b_liver_only", "images": ["b_liver_only_0", "b_liver_only_1"]}
    # guidance 0 is the unconditional model: the images of unconditional samples 0..3 of the same seed
    zero, plain = tmp_path / "zero", tmp_path / "plain"
    assert sample.main([*common, "--masks", str(tmp_path / "masks"), "--per_mask", "2", "--guidance_scale", "0",
                        "-l", str(zero)]) == 0
    assert sample.main([*common, "-n", "4", "--batch_size", "4", "-l", str(plain)]) == 0
    pairs = zip(["a_0", "a_1", "b_liver_only_0", "b_liver_only_1"], ["000000", "000001", "000002", "000003"])
    for ours, theirs in pairs:
        assert (zero / "images" / f"{ours}.png").read_bytes() == (plain / "images" / f"{theirs}.png").read_bytes()
    assert (out / "images" / "a_0.png").read_bytes() != (zero / "images" / "a_0.png").read_bytes()


def test_sample_script_autoguides_sampling_from_masks(conditioned_run, tmp_path):
    import json
    import shutil

    from test_sample_run import load_script

    guide = tmp_path / "2026-01-01T00-00-00_guide"
    shutil.copytree(conditioned_run, guide)
    ckpt = torch.load(guide / "checkpoints" / "last.ckpt", weights_only=False)
    ckpt["state_dict"] = {k: v * 0.9 if k.startswith("model.") and v.is_floating_point() else v
                          for k, v in ckpt["state_dict"].items()}  # a weaker model of the same latent space
    torch.save(ckpt, guide / "checkpoints" / "last.ckpt")
    _mask_folder(tmp_path / "masks")
    sample = load_script("sample")
    common = ["-r", conditioned_run, "-c", "4", "--seed", "2", "--no-progress", "--device", "cpu", "--masks",
              str(tmp_path / "masks")]
    plain, guided = tmp_path / "plain", tmp_path / "guided"
    assert sample.main([*common, "-l", str(plain)]) == 0
    assert sample.main([*common, "--autoguide", str(guide), "--autoguide_weight", "2", "-l", str(guided)]) == 0
    record = json.load(open(guided / "from_masks.json"))
    assert record["autoguidance"]["weight"] == 2.0 and record["autoguidance"]["calls"] == 4  # 4 steps, one batch
    assert "last.ckpt" in record["autoguidance"]["guide"]
    assert json.load(open(plain / "from_masks.json"))["autoguidance"] is None
    assert sorted(os.listdir(guided / "images")) == sorted(os.listdir(plain / "images"))
    assert (guided / "images" / "a_0.png").read_bytes() != (plain / "images" / "a_0.png").read_bytes()


def test_bad_mask_inputs_are_refused_before_loading(conditioned_run, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from test_sample_run import load_script

    sample = load_script("sample")
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("the model was loaded before the masks were checked"))
    (tmp_path / "colour").mkdir()
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 200  # a colour preview (masks_colour/), not class ids; a gray RGB mask would be read
    Image.fromarray(colour).save(tmp_path / "colour" / "c.png")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    for flags, error, match in (
            (["--masks", str(tmp_path / "none")], FileNotFoundError, "no such file or folder"),
            (["--masks", str(tmp_path / "colour")], ValueError, "is a colour image"),
            (["--masks", str(tmp_path / "colour"), "--guidance_scale", "-1"], ValueError, "guidance_scale must be"),
            (["--masks", str(tmp_path / "colour"), "--anatomy_guidance", "1"], ValueError, "does not combine"),
            (["--masks", str(tmp_path / "colour"), "-l", str(tmp_path / "full")], ValueError, "is not empty"),
            (["--masks", str(tmp_path / "colour"), "-n", "3"], ValueError, "-n does not apply with --masks"),
            (["--masks", str(tmp_path / "colour"), "--autoguide", conditioned_run, "--guidance_scale", "2"],
             ValueError, "takes the place of classifier-free guidance")):
        with pytest.raises(error, match=match):
            sample.main(["-r", conditioned_run, "--no-progress", *flags])


def test_masks_of_another_size_are_refused(conditioned_run, tmp_path):
    import numpy as np

    from test_sample_run import load_script

    (tmp_path / "small").mkdir()
    np.save(tmp_path / "small" / "s.npy", np.zeros((2, 16, 16), np.int64))
    with pytest.raises(ValueError, match="the masks are 16x16, the model draws 32x32 images"):
        load_script("sample").main(["-r", conditioned_run, "--masks", str(tmp_path / "small"), "-c", "2",
                                    "--no-progress", "--device", "cpu", "-l", str(tmp_path / "o")])


def _moved_liver(masks, shift=4):
    """The masks with the liver moved ``shift`` pixels to the right; its old place unknown (the model fills it)."""
    new = masks.clone()
    liver = masks == 1
    new[liver] = IGNORE
    moved = torch.roll(liver, shifts=shift, dims=-1)
    new[moved] = 1
    return new


def test_editing_redraws_the_changed_region_and_keeps_the_rest():
    from ldm.sampling.edit import edit_image, kept_latent_cells, kept_region_error

    model = _perturbed(_config({**CONDITION, "dropout": 0.1}))
    batch = _batches(1)[0]
    image, masks = batch["image"][:2].permute(0, 3, 1, 2).float(), batch["segmentation"][:2].long()
    new = _moved_liver(masks)
    out = edit_image(model, image, new, old_mask=masks, ddim_steps=4, seed=1)
    cells = out["kept_cells"]
    assert cells.shape == (2, 1, 16, 16) and set(cells.unique().tolist()) <= {0.0, 1.0}
    assert 0 < float(cells.mean()) < 1
    kept = cells.bool().expand_as(out["latents"])
    assert torch.equal(out["latents"][kept], out["encoded"][kept])  # kept cells: the input's latents exactly
    assert (out["latents"][~kept] - out["encoded"][~kept]).abs().max() > 1e-3  # the rest is redrawn
    assert out["images"].shape == image.shape
    again = edit_image(model, image, new, old_mask=masks, ddim_steps=4, seed=1)
    assert torch.equal(again["images"], out["images"])
    error = kept_region_error(out["images"], image, out["keep"])
    assert error["mae"] >= 0 and error["psnr"] > 0
    # a cell is kept only when all its pixels are, and the margin widens the redrawn region
    keep = torch.ones(1, 8, 8, dtype=torch.bool)
    keep[0, 3, 3] = False
    assert kept_latent_cells(keep, (4, 4), margin=0).sum() == 15
    assert kept_latent_cells(keep, (4, 4), margin=1).sum() == 16 - 9
    with pytest.raises(ValueError, match="changes no pixel"):
        edit_image(model, image, masks, old_mask=masks, ddim_steps=2)
    with pytest.raises(ValueError, match="needs the original mask"):
        edit_image(model, image, new, ddim_steps=2)


def test_edit_script_moves_a_structure_in_a_real_slice(conditioned_run, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from test_sample_run import load_script

    batch = _batches(1)[0]
    i = next(k for k in range(4) if bool((batch["segmentation"][k] == 1).any()))  # a slice with a liver
    image = ((batch["image"][i, ..., 0].numpy() + 1) * 127.5).round().astype(np.uint8)
    mask = batch["segmentation"][i].long()
    Image.fromarray(image).save(tmp_path / "slice.png")
    Image.fromarray(mask.numpy().astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(_moved_liver(mask[None])[0].numpy().astype(np.uint8)).save(tmp_path / "edited.png")
    edit = load_script("edit")
    args = ["-r", conditioned_run, "--image", str(tmp_path / "slice.png"), "--mask", str(tmp_path / "mask.png"),
            "--new_mask", str(tmp_path / "edited.png"), "-c", "3", "--device", "cpu"]
    assert edit.main([*args, "-l", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    written = set(os.listdir(out))
    assert {"edited.png", "input.png", "new_mask.png", "kept.png", "edit_figure.png", "edit.json"} <= written
    record = json.loads((out / "edit.json").read_text())
    assert 0 < record["redrawn_pixel_share"] < 1 and record["kept_region"]["psnr"] > 0
    kept = np.asarray(Image.open(out / "kept.png")) > 0
    assert np.array_equal(np.asarray(Image.open(out / "input.png")), image)
    assert kept.mean() == pytest.approx(1 - record["redrawn_pixel_share"])
    assert np.asarray(Image.open(out / "edit_figure.png")).shape[1] > 4 * 32
    with pytest.raises(ValueError, match="not empty"):
        edit.main([*args, "-l", str(out)])
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="--new_mask is 16x16 but --image is 32x32"):
        edit.main([*args[:6], "--new_mask", str(tmp_path / "small.png"), "-l", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="one of them"):
        edit.main([*args, "--keep", str(tmp_path / "mask.png"), "-l", str(tmp_path / "o3")])


def _label_volume(path, side=32, flip=True):
    """Five phantom masks as a label volume (display slices -> canonical), 1.5 x 1.5 x 2.5 mm, stored LPS-flipped
    (``flip``) so that reading it must reorient."""
    import nibabel as nib
    import numpy as np

    from ldm.data.io import display_slices_to_volume
    from ldm.data.phantom import PhantomDataset

    ds = PhantomDataset(size=side, num_samples=5, seed=4)
    slices = np.stack([np.asarray(ds[i]["segmentation"]) for i in range(5)]).astype(np.uint8)
    data = display_slices_to_volume(slices)
    affine = np.diag([1.5, 1.5, 2.5, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    if flip:  # the same voxels stored with the first two axes reversed
        n = np.array(data.shape[:2], dtype=float) - 1
        flip_m = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip_m[:2, 3] = n
        data, affine = data[::-1, ::-1], affine @ flip_m
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), str(path))
    return slices


def test_sampling_from_a_label_volume_writes_volumes_in_its_geometry(conditioned_run, tmp_path, monkeypatch):
    import json

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from test_sample_run import load_script

    slices = _label_volume(tmp_path / "labels.nii.gz")
    out = tmp_path / "out"
    assert load_script("sample").main(["-r", conditioned_run, "--masks", str(tmp_path / "labels.nii.gz"), "-c", "2",
                                       "--per_mask", "2", "--no-progress", "--device", "cpu", "-l", str(out)]) == 0
    assert sorted(os.listdir(out / "images"))[:3] == ["labels_0000_0.png", "labels_0000_1.png", "labels_0001_0.png"]
    for i in range(5):  # the slices are the volume's display slices, as the training data are sliced
        assert np.array_equal(np.asarray(Image.open(out / "condition_masks" / f"labels_{i:04d}.png")), slices[i])
    source = nib.as_closest_canonical(nib.load(tmp_path / "labels.nii.gz"))
    for name in ("condition_masks.nii.gz", "images_0.nii.gz", "images_1.nii.gz"):
        written = nib.as_closest_canonical(nib.load(out / name))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine, atol=1e-5), name
    cond = nib.as_closest_canonical(nib.load(out / "condition_masks.nii.gz"))
    assert np.array_equal(np.asarray(cond.dataobj), np.asarray(source.dataobj))  # the labels round-trip
    image = np.asarray(nib.load(out / "images_0.nii.gz").dataobj)
    assert image.dtype.kind == "f" and -1.0 <= image.min() <= image.max() <= 1.0
    record = json.loads((out / "from_masks.json").read_text())
    assert record["volumes"]["slice_axis"] == 2 and record["masks"] == 5
    # a volume of another in-plane size is resampled as the training data would be: 40 -> 32 pixels
    _label_volume(tmp_path / "big.nii.gz", side=40, flip=False)
    big = tmp_path / "big_out"
    assert load_script("sample").main(["-r", conditioned_run, "--masks", str(tmp_path / "big.nii.gz"), "-c", "2",
                                       "--no-progress", "--device", "cpu", "-l", str(big)]) == 0
    resampled = nib.load(big / "condition_masks.nii.gz")
    assert resampled.shape == (32, 32, 5)
    assert np.allclose(np.linalg.norm(resampled.affine[:3, :3], axis=0), [1.5 * 40 / 32, 1.5 * 40 / 32, 2.5])
    # exported for nnU-Net as volumes: each images_<k> a 3D case labelled by the label volume, on its grid
    from ldm.export_dataset import export_dataset

    result = export_dataset(str(out), str(tmp_path / "raw"), 512, "Volumes", progress=False)
    assert sorted(result.cases) == ["syn_labels_0", "syn_labels_1"]
    root = tmp_path / "raw" / "Dataset512_Volumes"
    label = nib.load(root / "labelsTr" / "syn_labels_1.nii.gz")
    image = nib.load(root / "imagesTr" / "syn_labels_1_0000.nii.gz")
    drawn_from = nib.load(out / "condition_masks.nii.gz")
    assert label.shape == image.shape == drawn_from.shape == (32, 32, 5)
    assert np.array_equal(np.asarray(label.dataobj), np.asarray(drawn_from.dataobj))
    assert np.allclose(image.affine, drawn_from.affine) and np.allclose(label.affine, drawn_from.affine)
    assert np.allclose(np.asarray(image.dataobj), np.asarray(nib.load(out / "images_1.nii.gz").dataobj))
    sliced = export_dataset(str(out), str(tmp_path / "raw"), 513, "Slices", progress=False, slices=True)
    assert len(sliced.cases) == 10 and "syn_labels_0004_1" in sliced.cases  # 5 slices x 2 draws
    pytest.importorskip("nnunetv2")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(result.dataset_dir, num_processes=1)  # nnU-Net's own checker accepts the volumes


def test_a_raw_label_volume_is_mapped_by_the_training_datasets_label_map(conditioned_run, tmp_path):
    import json

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from test_sample_run import load_script

    run = _run_with_data(conditioned_run, tmp_path, "ctorg", {"train": {
        "target": "ldm.data.medical_images.CTOrganTrain", "params": {"size": 32, "label_map": {9: 2}}}})
    slices = _label_volume(tmp_path / "raw.nii.gz", flip=False)
    raw = slices.copy()
    raw[slices == 2] = 9  # stored as 9, trained as 2 (the config's map)
    raw[:, :2, :2] = 6  # CT-ORG's raw brain id: background for the CT-Organ datasets (their default map)
    volume = nib.load(tmp_path / "raw.nii.gz")
    from ldm.data.io import display_slices_to_volume

    nib.save(nib.Nifti1Image(display_slices_to_volume(raw), volume.affine), str(tmp_path / "raw.nii.gz"))
    out = tmp_path / "out"
    assert load_script("sample").main(["-r", str(run), "--masks", str(tmp_path / "raw.nii.gz"), "-c", "2",
                                       "--no-progress", "--device", "cpu", "-l", str(out)]) == 0
    expected = slices.copy()
    expected[:, :2, :2] = 0
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / "condition_masks" / f"raw_{i:04d}.png")), expected[i])
    assert json.loads((out / "from_masks.json").read_text())["volumes"]["label_map"] == {"6": 0, "9": 2}
    # the run without the dataset's map refuses the stored ids, naming them
    with pytest.raises(ValueError, match=r"labels \[6, 9\] outside 0..5"):
        load_script("sample").main(["-r", conditioned_run, "--masks", str(tmp_path / "raw.nii.gz"), "-c", "2",
                                    "--no-progress", "--device", "cpu", "-l", str(tmp_path / "refused")])


def _run_with_data(conditioned_run, tmp_path, name, splits):
    """A copy of the conditioned run whose config has the data section ``splits`` (``{split: dataset config}``)."""
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / f"2026-01-01T00-00-00_{name}"
    shutil.copytree(conditioned_run, run)
    project = run / "configs" / "2026-01-01T00-00-00-project.yaml"
    config = OmegaConf.load(project)
    config.data = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 2, **splits}}
    OmegaConf.save(config, project)
    return str(run)


def _ct_run(conditioned_run, tmp_path):
    """The conditioned run as a CT-Organ run (its dataset names the CT window the samples are drawn in)."""
    return _run_with_data(conditioned_run, tmp_path, "ct", {"train": {
        "target": "ldm.data.medical_images.CTOrganTrain", "params": {"size": 32}}})


def test_sampling_from_mask_files_writes_npz_nifti_and_hounsfield_units(conditioned_run, tmp_path):
    import json

    import nibabel as nib
    import numpy as np
    from PIL import Image

    from ldm.data.intensity import hu_from_ct
    from ldm.sample_geometry import display_to_canonical
    from test_sample_run import load_script

    full, partial = _mask_folder(tmp_path / "masks")
    sample = load_script("sample")
    common = ["--masks", str(tmp_path / "masks"), "-c", "3", "--seed", "1", "--per_mask", "2", "--save_masks",
              "--no-progress", "--device", "cpu"]
    out = tmp_path / "out"
    assert sample.main(["-r", conditioned_run, *common, "--format", "npz", "nii", "-l", str(out)]) == 0
    names = ["a_0", "a_1", "b_liver_only_0", "b_liver_only_1"]
    assert sorted(os.listdir(out / "images")) == sorted(f"{n}{e}" for n in names for e in (".png", ".npz", ".nii.gz"))
    assert sorted(os.listdir(out / "masks")) == sorted(f"{n}{e}" for n in names for e in (".png", ".nii.gz"))
    for name in names:
        npz = np.load(out / "images" / f"{name}.npz")
        png = np.asarray(Image.open(out / "images" / f"{name}.png")).astype(np.float32)
        assert npz["image"].shape == (32, 32) and np.abs((npz["image"] + 1) * 127.5 - png).max() <= 0.5 + 1e-4
        assert np.array_equal(npz["mask"], np.asarray(Image.open(out / "masks" / f"{name}.png")))
        nifti = np.asarray(nib.load(out / "images" / f"{name}.nii.gz").dataobj)
        assert np.allclose(nifti, display_to_canonical(npz["image"][None]), atol=1e-6)
    for stem, mask in (("a", full), ("b_liver_only", partial)):  # the condition as a label NIfTI, unknown = 255
        cond = np.asarray(nib.load(out / "condition_masks" / f"{stem}.nii.gz").dataobj)
        assert np.array_equal(cond, display_to_canonical(mask[None]))
    record = json.loads((out / "from_masks.json").read_text())
    assert record["formats"] == ["png", "npz", "nii"] and record["status"] == "complete"
    assert record["geometry"]["orientation"] == "RAS" and record["hu"] is False
    # --hu: a CT run's samples in Hounsfield units, the same samples as in [-1, 1] through the window inverted
    with pytest.raises(ValueError, match="--hu needs a CT run"):
        sample.main(["-r", conditioned_run, *common, "--hu", "-l", str(tmp_path / "not_ct")])
    ct = _ct_run(conditioned_run, tmp_path)
    plain, hu = tmp_path / "ct_plain", tmp_path / "ct_hu"
    assert sample.main(["-r", ct, *common, "--format", "npz", "-l", str(plain)]) == 0
    assert sample.main(["-r", ct, *common, "--hu", "-l", str(hu)]) == 0
    hu_record = json.loads((hu / "from_masks.json").read_text())
    assert hu_record["hu"] is True and "nii" in hu_record["formats"]
    level_width = hu_record["geometry"]["intensity"]["window"]
    for name in names:
        unit = display_to_canonical(np.load(plain / "images" / f"{name}.npz")["image"][None])
        written = np.asarray(nib.load(hu / "images" / f"{name}.nii.gz").dataobj)
        assert np.allclose(written, hu_from_ct(unit, level_width), atol=1e-2)
        assert np.abs(written - unit).max() > 10  # HU, not the network's [-1, 1]


def test_sampling_from_masks_finishes_an_interrupted_session(conditioned_run, tmp_path, monkeypatch, capsys):
    import json

    import ldm.sample_io as sample_io
    from test_sample_run import load_script

    _mask_folder(tmp_path / "masks")
    (tmp_path / "masks" / "c.npy").write_bytes((tmp_path / "masks" / "b_liver_only.npy").read_bytes())
    sample = load_script("sample")
    common = ["-r", conditioned_run, "--masks", str(tmp_path / "masks"), "-c", "3", "--seed", "5", "--per_mask",
              "2", "--batch_size", "2", "--save_masks", "--format", "npz", "--no-progress", "--device", "cpu"]
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert sample.main([*common, "-l", str(fresh)]) == 0
    real_save, calls = sample_io.save_samples, []

    def interrupted(*args, **kwargs):  # the second batch (the second mask) is stopped half-way through its files
        calls.append(1)
        if len(calls) == 2:
            real_save(*args, **kwargs)
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sample_io, "save_samples", interrupted)
    assert sample.cli([*common, "-l", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted (Ctrl-C); 1 of 3 masks have all their images" in err and "Run the same command again" in err
    assert json.loads((out / "from_masks.json").read_text())["status"] == "started"
    assert "000000.png" in os.listdir(out / "images")  # the interrupted batch's files, not yet renamed
    monkeypatch.setattr(sample_io, "save_samples", real_save)
    with pytest.raises(ValueError, match="guidance_scale 1.0 there, 2.0 now"):
        sample.main([*common, "--guidance_scale", "2", "-l", str(out)])
    assert sample.main([*common, "-l", str(out)]) == 0
    assert "kept 1 masks of the interrupted session" in capsys.readouterr().out
    record = json.loads((out / "from_masks.json").read_text())
    assert record["status"] == "complete" and record["resumed"] == {"kept_masks": 1, "redone_masks": 2}
    for sub in ("images", "masks", "masks_colour", "condition_masks"):  # the same files as one uninterrupted run
        assert sorted(os.listdir(out / sub)) == sorted(os.listdir(fresh / sub)), sub
        for name in os.listdir(fresh / sub):
            if name.endswith(".png"):
                assert (out / sub / name).read_bytes() == (fresh / sub / name).read_bytes(), name
    assert sample.main([*common, "-l", str(out)]) == 0
    assert "already holds this session, complete; nothing to do" in capsys.readouterr().out


def test_a_label_volume_session_in_hounsfield_units_with_own_masks_and_a_resume(conditioned_run, tmp_path,
                                                                                 monkeypatch):
    import json

    import nibabel as nib
    import numpy as np
    from PIL import Image

    import ldm.sample_io as sample_io
    from ldm.data.intensity import hu_from_ct
    from test_sample_run import load_script

    _label_volume(tmp_path / "labels.nii.gz")
    ct = _ct_run(conditioned_run, tmp_path)
    sample = load_script("sample")
    common = ["-r", ct, "--masks", str(tmp_path / "labels.nii.gz"), "-c", "2", "--save_masks", "--batch_size", "2",
              "--no-progress", "--device", "cpu"]
    plain, hu = tmp_path / "plain", tmp_path / "hu"
    assert sample.main([*common, "-l", str(plain)]) == 0
    real_save, calls = sample_io.save_samples, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(sample_io, "save_samples", interrupted)
    assert sample.cli([*common, "--hu", "-l", str(hu)]) == 130
    from ldm.export_dataset import export_dataset

    with pytest.raises(ValueError, match="has not written its volumes yet.*--slices"):  # unfinished: no volumes
        export_dataset(str(hu), str(tmp_path / "raw"), 514, "Unfinished", progress=False)
    assert not (tmp_path / "raw" / "Dataset514_Unfinished").exists()
    monkeypatch.setattr(sample_io, "save_samples", real_save)
    assert sample.main([*common, "--hu", "-l", str(hu)]) == 0
    record = json.loads((hu / "from_masks.json").read_text())
    assert record["resumed"] == {"kept_masks": 2, "redone_masks": 3} and record["volumes"]["hu"] is True
    assert sorted(record["volumes"]["files"]) == ["condition_masks.nii.gz", "images_0.nii.gz", "masks_0.nii.gz"]
    assert not (hu / ".volume_slices").exists() and not list((hu / "images").glob("*.nii.gz"))
    assert record["geometry"] is None  # a label volume's NIfTI files are its volumes, in its own geometry
    source = nib.load(tmp_path / "labels.nii.gz")
    in_hu = nib.load(hu / "images_0.nii.gz")
    assert np.allclose(in_hu.affine, nib.load(plain / "images_0.nii.gz").affine)
    from ldm.data.medical_images import CTOrganTrain

    expected = hu_from_ct(np.asarray(nib.load(plain / "images_0.nii.gz").dataobj), CTOrganTrain.default_window)
    assert np.allclose(np.asarray(in_hu.dataobj), expected, atol=1e-2)
    own = nib.as_closest_canonical(nib.load(hu / "masks_0.nii.gz"))
    assert own.shape == nib.as_closest_canonical(source).shape
    first = np.asarray(Image.open(hu / "masks" / "labels_0000_0.png"))
    from ldm.data.io import volume_slice_to_display

    assert np.array_equal(volume_slice_to_display(np.asarray(own.dataobj), 0, 2), first)


def test_masks_from_the_runs_own_data_split(conditioned_run, tmp_path, monkeypatch):
    import json

    import numpy as np
    from PIL import Image

    from ldm.data.phantom import PhantomDataset
    from test_sample_run import load_script

    params = {"size": 32, "num_samples": 5, "seed": 3, "split": "validation"}
    run = _run_with_data(conditioned_run, tmp_path, "data", {"validation": {
        "target": "ldm.data.phantom.PhantomDataset", "params": params}})
    sample = load_script("sample")
    out = tmp_path / "out"
    assert sample.main(["-r", str(run), "--masks", "data:validation:3", "-c", "2", "--no-progress", "--device", "cpu",
                        "-l", str(out)]) == 0
    real = PhantomDataset(**params)
    assert sorted(os.listdir(out / "images")) == [f"validation_{i:05d}_0.png" for i in range(3)]
    for i in range(3):  # the validation split's own labelmaps, as the model saw them in training
        written = np.asarray(Image.open(out / "condition_masks" / f"validation_{i:05d}.png"))
        assert np.array_equal(written, real[i]["segmentation"]) and len(np.unique(written)) > 2
    assert json.loads((out / "from_masks.json").read_text())["masks"] == 3
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("the model was loaded before the masks were checked"))
    for spec, match in (("data:train", r"no data split 'train' \(it has validation\)"),
                        ("data:validation:0", "expected data:SPLIT or data:SPLIT:N"),
                        ("data:validation:x", "expected data:SPLIT or data:SPLIT:N")):
        with pytest.raises(ValueError, match=match):
            sample.main(["-r", str(run), "--masks", spec, "--no-progress", "-l", str(tmp_path / "refused")])
    with pytest.raises(ValueError, match="no data section"):
        sample.main(["-r", conditioned_run, "--masks", "data:validation", "--no-progress"])


def test_images_drawn_from_masks_export_as_an_nnunet_dataset_with_the_ignore_label(conditioned_run, tmp_path,
                                                                                   monkeypatch):
    import json

    import nibabel as nib
    import numpy as np

    from ldm.export_dataset import export_dataset
    from test_sample_run import load_script

    full, partial = _mask_folder(tmp_path / "masks")
    out = tmp_path / "drawn"
    assert load_script("sample").main(["-r", conditioned_run, "--masks", str(tmp_path / "masks"), "-c", "2",
                                       "--per_mask", "2", "--format", "nii", "--no-progress", "--device", "cpu",
                                       "-l", str(out)]) == 0
    result = export_dataset(str(out), str(tmp_path / "raw"), 511, "FromMasks", progress=False)
    assert sorted(result.cases) == ["syn_a_0", "syn_a_1", "syn_b_liver_only_0", "syn_b_liver_only_1"]
    dataset = json.loads(open(result.dataset_json).read())
    assert dataset["labels"]["ignore"] == 6 and max(dataset["labels"].values()) == 6  # nnU-Net: ignore is the highest
    for case, stem, mask in (("syn_a_1", "a", full), ("syn_b_liver_only_0", "b_liver_only", partial)):
        label = nib.load(tmp_path / "raw" / "Dataset511_FromMasks" / "labelsTr" / f"{case}.nii.gz")
        condition = nib.load(out / "condition_masks" / f"{stem}.nii.gz")  # the mask the image was drawn from
        expected = np.where(np.asarray(condition.dataobj) == 255, 6, np.asarray(condition.dataobj))
        assert np.array_equal(np.asarray(label.dataobj), expected) and np.allclose(label.affine, condition.affine)
        assert sorted(np.unique(expected).tolist()) == sorted(np.unique(np.where(mask == 255, 6, mask)).tolist())
    image = np.asarray(nib.load(tmp_path / "raw" / "Dataset511_FromMasks" / "imagesTr" / "syn_a_0_0000.nii.gz").dataobj)
    assert np.allclose(image, np.asarray(nib.load(out / "images" / "a_0.nii.gz").dataobj))
    card = json.loads(open(result.card_json).read())
    assert card["mask_source"] == "condition" and card["ignore_label"] == 6
    assert "the labelmap the image was generated from" in card["statement"]
    assert "the labels are the model's" not in card["statement"]
    pytest.importorskip("nnunetv2")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(result.dataset_dir, num_processes=1)  # nnU-Net's own checker accepts it
