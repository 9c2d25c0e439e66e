"""Representation alignment to a frozen mask encoder (REPA, issue 29): the encoder learns the real masks, the term
reaches the UNet and the projector but not the encoder, it is learnable, sampling is the plain LDM's, a checkpoint
carries the encoder, a real Lightning run trains it, and each bad setting is refused with what to change."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from ldm.data.phantom import PhantomDataset
from ldm.modules.representation_alignment import (MaskFeatureEncoder, load_mask_encoder, save_mask_encoder,
                                                  train_mask_encoder)
from ldm.training.scripted import scripted_trainer
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, ldm_config, unet_config

CLASSES = 6  # the phantom's
SIZE = 16  # image side; latents 8x8 (f2), the two-level UNet's middle block 4x4
ENCODER = {"patch": 2, "channels": 16, "depth": 1, "feature_dim": 16}


def _masks(n: int = 48, seed: int = 0) -> torch.Tensor:
    ds = PhantomDataset(size=SIZE, num_samples=n, seed=seed)
    return torch.stack([torch.as_tensor(ds[i]["segmentation"]) for i in range(n)]).long().squeeze(-1)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> str:
    model, info = train_mask_encoder(_masks(), CLASSES, steps=300, batch_size=16, lr=3e-3, seed=0, **ENCODER)
    return save_mask_encoder(str(tmp_path_factory.mktemp("enc") / "mask_encoder.pt"), model, info)


def _config(encoder_path=None, **align):
    settings = {"num_classes": CLASSES, "encoder_path": encoder_path, "encoder": dict(ENCODER), "hidden": 32,
                **align}
    return ldm_config(unet=unet_config(two_level=True), use_ema=False, representation_alignment=settings)


def _batches(n: int, seed: int = 1, bs: int = 4):
    ds = PhantomDataset(size=SIZE, num_samples=n * bs, seed=seed)
    return [default_collate([ds[i] for i in range(bs * k, bs * k + bs)]) for k in range(n)]


def test_the_mask_encoder_learns_the_real_masks_and_round_trips(encoder_file, tmp_path):
    masks = _masks(32, seed=5)  # masks it was not trained on
    model, meta = load_mask_encoder(encoder_file)
    assert meta["steps"] == 300 and meta["pixel_accuracy"] > 0.9
    onehot = torch.nn.functional.one_hot(masks, CLASSES).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        feats = model(onehot)
        correct = model.reconstruct(onehot).argmax(1) == masks
    assert feats.shape == (32, 16, SIZE // 2, SIZE // 2)
    foreground = correct[masks > 0].float().mean().item()  # background alone is 92 % of the pixels
    assert foreground > 0.85, foreground
    assert all(not p.requires_grad for p in model.parameters())
    with pytest.raises(FileNotFoundError, match="train one with"):
        load_mask_encoder(str(tmp_path / "none.pt"))
    with pytest.raises(ValueError, match=r"integer masks \[N, H, W\]"):
        train_mask_encoder(masks.float(), CLASSES, steps=1)
    with pytest.raises(ValueError, match="not divisible by the encoder's factor 4"):
        train_mask_encoder(masks[:, :15, :15], CLASSES, steps=1, patch=4)
    with pytest.raises(ValueError, match=r"labels \[6\] outside 0..5"):
        train_mask_encoder(torch.full((2, 8, 8), 6), CLASSES, steps=1, patch=2)
    with pytest.raises(ValueError, match="patch >= 1"):
        MaskFeatureEncoder(CLASSES, patch=0)


def test_the_term_reaches_the_unet_and_projector_not_the_encoder(encoder_file):
    torch.manual_seed(0)
    model = instantiate_from_config(_config(encoder_file)).train()
    loss, logs = model.shared_step(_batches(1)[0])
    assert {"train/diffusion_loss", "train/alignment_loss", "train/loss"} <= set(logs)
    assert torch.allclose(logs["train/loss"], logs["train/diffusion_loss"] + 0.5 * logs["train/alignment_loss"])
    assert 0.0 < float(logs["train/alignment_loss"]) < 2.0
    loss.backward()
    align = model.representation_alignment
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in align.projector.parameters())
    assert all(p.grad is None for p in align.encoder.parameters())
    middle = model.unet.middle_block
    assert sum(float(p.grad.abs().sum()) for p in middle.parameters() if p.grad is not None) > 0
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable for p in align.projector.parameters())
    assert not any(id(p) in trainable for p in align.encoder.parameters())


def test_alignment_is_learnable_and_the_weight_scales_it(encoder_file):
    """A few optimiser steps on one batch at fixed noise lower the alignment loss well below its start; the
    weight multiplies the term in the total loss."""
    torch.manual_seed(0)
    model = instantiate_from_config(_config(encoder_file, weight=2.0)).train()
    batch = _batches(1)[0]
    z, _ = model.get_input(batch, model.first_stage_key)
    masks = model.representation_alignment.batch_masks(batch, model.device)
    t, noise = torch.tensor([10, 200, 500, 900]), torch.randn_like(z)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, logs = model.p_losses(z, None, t, noise, alignment_masks=masks)
        losses.append(float(logs["train/alignment_loss"]))
        assert torch.allclose(logs["train/loss"], logs["train/diffusion_loss"] + 2.0 * logs["train/alignment_loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_sampling_and_the_unet_are_the_plain_ldms(encoder_file):
    torch.manual_seed(0)
    plain = instantiate_from_config(ldm_config(unet=unet_config(two_level=True), use_ema=False))
    torch.manual_seed(0)
    aligned = instantiate_from_config(_config(encoder_file))
    extra = set(aligned.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("representation_alignment.") for k in extra)
    aligned.load_state_dict({**aligned.state_dict(), **plain.state_dict()})
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(aligned.apply_model(x, t), plain.apply_model(x, t))
    # without masks (validation of an unlabelled batch, or a caller that gives none) the loss is the plain one
    z = torch.randn(2, 2, 8, 8)
    noise = torch.randn_like(z)
    with torch.no_grad():
        assert torch.equal(aligned.p_losses(z, None, t, noise)[0], plain.p_losses(z, None, t, noise)[0])


def test_a_lightning_run_trains_it_and_its_checkpoint_carries_the_encoder(encoder_file, tmp_path):
    torch.manual_seed(0)
    model = instantiate_from_config(_config(encoder_file))
    model.learning_rate = 1e-3
    before = copy.deepcopy(model.representation_alignment.projector.state_dict())
    ds = PhantomDataset(size=SIZE, num_samples=16, seed=2)
    trainer = scripted_trainer(torch.device("cpu"), 4, progress=False)
    trainer.fit(model, DataLoader(ds, batch_size=4))
    assert trainer.global_step == 4
    after = model.representation_alignment.projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the projector trained
    ckpt = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(ckpt)
    # on another machine the encoder's file is absent: the checkpoint's weights are the encoder
    elsewhere = instantiate_from_config(_config(str(tmp_path / "not_here.pt")))
    assert float(elsewhere.representation_alignment.encoder_ready) == 0.0
    with pytest.raises(ValueError, match="no trained mask encoder"):
        elsewhere.on_train_start()
    elsewhere.init_from_ckpt(ckpt)
    elsewhere.on_train_start()  # ready now
    saved = load_mask_encoder(encoder_file)[0].state_dict()
    loaded = elsewhere.representation_alignment.encoder.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    # and a fresh run without any encoder is refused before its first step
    fresh = instantiate_from_config(_config(None))
    fresh.learning_rate = 1e-3
    with pytest.raises(ValueError, match="encoder_path"):
        scripted_trainer(torch.device("cpu"), 1, progress=False).fit(fresh, DataLoader(ds, batch_size=4))


def test_bad_settings_are_refused(encoder_file):
    with pytest.raises(ValueError, match="unknown keys \\['weigth'\\]"):
        instantiate_from_config(_config(encoder_file, weigth=1.0))
    with pytest.raises(ValueError, match="'middle' is not a module of the UNet"):
        instantiate_from_config(_config(encoder_file, layer="middle"))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        instantiate_from_config(_config(encoder_file, weight=-1.0))
    with pytest.raises(ValueError, match="takes 6 classes, representation_alignment.num_classes is 4"):
        instantiate_from_config(_config(encoder_file, num_classes=4))
    model = instantiate_from_config(_config(encoder_file))
    batch = _batches(1)[0]
    del batch["segmentation"]
    with pytest.raises(ValueError, match="no key 'segmentation'"):
        model.train().shared_step(batch)  # training needs the masks
    model.eval()
    with torch.no_grad():  # validation data without masks: the plain loss, no alignment term
        _, logs = model.shared_step(batch)
    assert "val/alignment_loss" not in logs and "val/loss_simple" in logs


def test_the_anatomical_model_adds_it_to_its_own_mask_terms(encoder_file):
    """AnatomicalLatentDiffusion: total = diffusion + w * anatomical + weight * alignment, from the same masks."""
    torch.manual_seed(0)
    config = ldm_config(True, unet=unet_config(two_level=True, anatomy=anatomical_params()), use_ema=False,
                        anatomical_warmup_steps=2, representation_alignment={
                            "num_classes": CLASSES, "encoder_path": encoder_file, "hidden": 32, "weight": 0.25})
    model = instantiate_from_config(config).train()
    loss, logs = model.shared_step(_batches(1)[0])
    assert float(logs["train/anatomical_loss"]) > 0 and 0 < float(logs["train/alignment_loss"]) < 2
    expected = (logs["train/diffusion_loss"] + logs["train/weighted_anatomical_loss"]
                + 0.25 * logs["train/alignment_loss"])
    assert torch.allclose(logs["train/loss"], expected) and torch.allclose(loss.detach(), expected)
    loss.backward()
    assert all(p.grad is not None for p in model.representation_alignment.projector.parameters())


def test_an_output_block_can_be_aligned_and_unlabelled_masks_add_nothing(encoder_file):
    torch.manual_seed(0)
    model = instantiate_from_config(_config(encoder_file, layer="output_blocks.0")).train()
    z, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 600])
    masks = _masks(2)
    _, logs = model.p_losses(z, None, t, alignment_masks=masks)
    assert 0.0 < float(logs["train/alignment_loss"]) < 2.0
    unknown = torch.full_like(masks, 255)
    loss, logs = model.p_losses(z, None, t, alignment_masks=unknown)
    assert float(logs["train/alignment_loss"]) == 0.0
    assert os.path.isfile(encoder_file)


def test_the_demo_config_trains_its_encoder_then_through_main_and_samples_without_it(tmp_path, monkeypatch):
    """The user path of README_anatomical.md: scripts/train_mask_encoder.py writes the encoder where the demo REPA
    config points, main.py trains the LDM with it, and sample.py samples the run with the encoder's file gone."""
    import main
    from omegaconf import OmegaConf

    from test_sample_run import load_script

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "latent-diffusion")
    config = os.path.join(configs, "demo_phantom_repa.yaml")
    load = lambda name: OmegaConf.to_container(OmegaConf.load(os.path.join(configs, name)))  # noqa: E731
    repa, plain = load("demo_phantom_repa.yaml"), load("demo_phantom_ldm.yaml")
    align = repa["model"]["params"].pop("representation_alignment")
    assert repa == plain and align["num_classes"] == 6  # the plain demo plus the alignment, nothing else
    monkeypatch.chdir(tmp_path)  # the config's encoder_path is relative (logs/...)
    script = load_script("train_mask_encoder")
    assert script.main(["--config", config, "--steps", "20", "--max_masks", "64", "--threads", "1"]) == 0
    encoder = tmp_path / align["encoder_path"]
    model, meta = load_mask_encoder(str(encoder))
    assert meta["masks"] == 64 and meta["steps"] == 20 and model.hparams["feature_dim"] == 64
    small = ["lightning.trainer.max_steps=2", "lightning.trainer.limit_val_batches=1",
             "lightning.callbacks.image_logger.params.batch_frequency=1000", "data.params.batch_size=4",
             "data.params.train.params.num_samples=8", "data.params.validation.params.num_samples=4",
             "model.params.first_stage_config.params.ckpt_path=null"]
    logs = tmp_path / "runs"
    assert main.main(["--base", config, "-t", "--accelerator", "cpu", "-l", str(logs), "-n", "repa", *small]) == 0
    (run,) = list(logs.iterdir())
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert float(state["representation_alignment.encoder_ready"]) == 1.0
    assert torch.equal(state["representation_alignment.encoder.encoder.0.weight"],
                       model.state_dict()["encoder.0.weight"])
    encoder.unlink()  # sampling needs neither the encoder nor masks
    out = tmp_path / "out"
    assert load_script("sample").main(["-r", str(run), "-n", "2", "-c", "2", "--no-progress", "--device", "cpu",
                                       "-l", str(out)]) == 0
    assert len(os.listdir(out / "images")) == 2
    with pytest.raises(ValueError, match="give --num_classes and -o/--output"):
        script.main(["--config", os.path.join(configs, "demo_phantom_ldm.yaml"), "--steps", "1"])


def test_the_benchmark_arms_are_their_base_arms_plus_the_alignment_and_run_quick(tmp_path):
    """bench/anatomy.py --quick trains plain_repa and lean_stopgrad_repa with an encoder trained once on the run's
    real masks (recorded), counts the alignment's FLOPs in training only, and judges lean_stopgrad_repa's masks."""
    import json
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import anatomy
    import anatomy_v2 as av2

    preset = av2.PRESETS_V2["quick"]
    for arm, base in (("plain_repa", "plain"), ("lean_stopgrad_repa", "lean_stopgrad")):
        cfg, ref = av2.arm_config(arm, preset, "/run/setup/autoencoder.ckpt", 1.0), \
            av2.arm_config(base, preset, "/run/setup/autoencoder.ckpt", 1.0)
        align = cfg["params"].pop("representation_alignment")
        assert cfg == ref and align["encoder_path"] == "/run/setup/mask_encoder.pt" and align["weight"] == 0.5
    out = str(tmp_path / "run")
    assert anatomy.main(["-o", out, "--quick", "--arms", "plain,plain_repa,lean_stopgrad_repa", "--seeds", "0",
                         "--no-progress", "--threads", "1"]) == 0
    records = {a: json.load(open(os.path.join(out, "records", f"{a}_seed0.json")))
               for a in ("plain", "plain_repa", "lean_stopgrad_repa")}
    encoder = records["plain_repa"]["train"]["mask_encoder"]
    assert encoder["steps"] == 10 and encoder["seed"] == 2 and 0 < encoder["pixel_accuracy"] <= 1
    assert records["lean_stopgrad_repa"]["train"]["mask_encoder"]["sha256"] == encoder["sha256"]  # trained once
    plain, repa = records["plain"]["model"], records["plain_repa"]["model"]
    assert 1.0 < repa["train_flops_per_sample"] / plain["train_flops_per_sample"] < 1.3
    assert repa["sample_step_flops_per_sample"] == plain["sample_step_flops_per_sample"]
    assert records["plain_repa"]["train"]["budget_steps"]["flops"] < records["plain_repa"]["train"]["steps"]
    assert "own_mask" in records["lean_stopgrad_repa"]["evals"]["steps/ddim"]
    assert "own_mask" not in records["plain_repa"]["evals"]["steps/ddim"]
    # its pre-registered addendum's report (bench/arm_addendum.py) from these records: complete, partial, refused
    import arm_addendum

    first = records["plain_repa"]

    def addendum_file(name, seeds, repa_sha):
        block = {"addendum": "anatomy-v2-arm", "name": "repa-quick", "version": 1,
                 "base_protocol_hash": first["protocol_hash"], "setup_id": first["setup_id"],
                 "arms": {"plain_repa": repa_sha, "plain": records["plain"]["model"]["config_sha"]},
                 "training_seeds": seeds,
                 "primary": {"contrasts": [["plain_repa", "plain", "flops"]], "samplers": ["ddim", "ddim_eta1"],
                             "alpha": 0.05},
                 "secondary": {"contrasts": [["plain_repa", "plain", "steps"]], "samplers": ["ddim"]}}
        path = tmp_path / name
        path.write_text("# quick addendum\n\n```json\n" + json.dumps(block) + "\n```\n")
        return str(path)

    report_dir = tmp_path / "addendum"
    complete = addendum_file("a.md", [0], first["model"]["config_sha"])
    assert arm_addendum.main(["--addendum", complete, "--records", os.path.join(out, "records"),
                              "-o", str(report_dir)]) == 0
    report = json.load(open(report_dir / "repa_quick.json"))
    assert report["is_claim"] is True and report["seeds"]["plain_repa"] == [0]
    test = report["primary"]["plain_repa - plain (flops, ddim)"]
    expected = (first["evals"]["flops/ddim"]["judges"]["A"]["primary"]["pass_rate"]
                - records["plain"]["evals"]["flops/ddim"]["judges"]["A"]["primary"]["pass_rate"])
    assert test["n"] == 1 and abs(test["diff"] - expected) < 1e-12  # one seed: a difference, no p
    assert "every arm has every seed" in (report_dir / "repa_quick.md").read_text()
    waiting = addendum_file("b.md", [0, 1], first["model"]["config_sha"])
    assert arm_addendum.main(["--addendum", waiting, "--records", os.path.join(out, "records"),
                              "-o", str(tmp_path / "early")]) == 0
    assert not (tmp_path / "early").exists()  # seed 1 is missing: no report unless asked
    assert arm_addendum.main(["--addendum", waiting, "--records", os.path.join(out, "records"),
                              "-o", str(tmp_path / "early"), "--partial-report"]) == 0
    early = (tmp_path / "early" / "repa_quick.md").read_text()
    assert "partial, not a claim: missing plain_repa [1]; plain [1]" in early
    changed = addendum_file("c.md", [0], "0000000000000000")
    assert arm_addendum.main(["--addendum", changed, "--records", os.path.join(out, "records")]) == 2


def test_the_pre_registered_addendum_fixes_the_arms_as_the_code_builds_them():
    """bench/PROTOCOL_REPA.md names the config_sha of plain_repa and plain at the cpu preset: the code must still
    build exactly those (an edited arm would be refused by its report)."""
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import anatomy_v2 as av2
    import arm_addendum
    import records as rec

    addendum = arm_addendum.load_arm_addendum(os.path.join(bench, "PROTOCOL_REPA.md"))
    assert addendum["base_protocol_hash"] == "74420cfae902bce0" and addendum["training_seeds"] == [7301, 7302, 7303,
                                                                                                   7304, 7305]
    for arm, sha in addendum["arms"].items():
        if sha is not None:
            assert rec.canonical_hash(av2.arm_config(arm, av2.PRESETS_V2["cpu"], None, 1.0)) == sha, arm


def test_a_run_of_the_committed_instrument_shares_its_committed_mask_encoder(tmp_path, monkeypatch, encoder_file):
    """bench/anatomy_v2.ensure_mask_encoder: the committed instrument's mask_encoder.pt is copied into a run that uses
    that instrument (records of any machine share it, same sha256); a run of another instrument trains its own."""
    import hashlib
    import shutil
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import anatomy_v2 as av2

    root = tmp_path / "instruments" / "v2_quick"
    root.mkdir(parents=True)
    (root / av2.INSTRUMENT_RECORD).write_text('{"setup_id": "committed0000000"}')
    shutil.copyfile(encoder_file, root / "mask_encoder.pt")
    monkeypatch.setattr(av2, "INSTRUMENTS", str(tmp_path / "instruments"))

    def ctx(name, setup_id):
        (tmp_path / name / "setup").mkdir(parents=True)
        return {"preset_name": "quick", "progress": False,
                "setup": {"ae_ckpt": str(tmp_path / name / "setup" / "autoencoder.ckpt"), "setup_id": setup_id,
                          "train": {"segmentation": _masks(16)}}}

    shared = av2.ensure_mask_encoder(ctx("same", "committed0000000"))
    assert shared["sha256"] == hashlib.sha256(open(encoder_file, "rb").read()).hexdigest()
    assert shared["steps"] == 300  # the committed encoder's own training, not the quick preset's 10 steps
    own = av2.ensure_mask_encoder(ctx("other", "another00000000"))
    assert own["steps"] == 10 and own["sha256"] != shared["sha256"]
