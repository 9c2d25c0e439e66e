"""The anatomical step's exact fixes and the lean register design (issue 27).

Exact fixes: the same numbers as before. Lean options: which blocks get register layers, the pixel-shuffle mask
head, checkpoints of the shipped design still loading, and ``bench/register_cost.py`` (its quick mode) measuring
the variants side by side with real FLOP and kernel counts (no timing is asserted).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ldm.data.phantom import PhantomDataset
from ldm.modules.anatomical_blocks import PixelShuffleMaskHead
from ldm.modules.diffusionmodules.anatomical_openaimodel import AnatomyOutput
from ldm.modules.dice import class_argmax
from ldm.util import instantiate_from_config
from test_anatomical_ldm import tiny_config
from tiny_models import anatomical_params, unet_config

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_class_argmax_is_argmax_with_ties_and_strides():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (4, 5, 7, 6), generator=g).float()  # many ties: the first maximum must win
    assert torch.equal(class_argmax(logits), logits.argmax(1))
    wide = torch.randn(2, 9, 8, 8, generator=g).permute(0, 2, 3, 1)  # a non-contiguous view, class axis last
    assert torch.equal(class_argmax(wide, dim=-1), wide.argmax(-1))
    assert class_argmax(logits).dtype == torch.int64


def three_level_unet(**anatomy):
    """A 3-level UNet with one res block per level (the benchmark's cpu preset shape, narrower)."""
    params = anatomical_params(num_classes=4, register_dim=16, registers_per_class=2, heads=1, **anatomy)
    cfg = unet_config(3, 3, 8, anatomy=params, model_channels=32, channel_mult=[1, 2, 2], attention_resolutions=[])
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


def test_per_level_placement_picks_each_levels_last_block():
    every = three_level_unet()
    assert every.anatomical_attention_keys == ["input_1", "input_3", "input_5", "middle_0", "output_0", "output_1",
                                               "output_2", "output_3", "output_4", "output_5"]
    lean = three_level_unet(register_placement="per_level")
    # the encoder's res block of each level, the middle, and the decoder block whose output is the level's last
    # (output_1 and output_3 end in an upsampler: their features belong to the next level up)
    assert lean.anatomical_attention_keys == ["input_1", "input_3", "input_5", "middle_0", "output_0", "output_2",
                                              "output_5"]
    low = three_level_unet(register_placement="per_level", anatomical_attention_resolutions=[4])
    assert low.anatomical_attention_keys == ["input_5", "middle_0", "output_0"]
    with pytest.raises(ValueError, match="register_placement must be one of"):
        three_level_unet(register_placement="sometimes")
    with pytest.raises(ValueError, match="mask_decoder must be one of"):
        three_level_unet(mask_upsample_factor=2, mask_decoder="deconv")


def test_pixel_shuffle_head_is_local_and_image_sized():
    head = PixelShuffleMaskHead(32, 5, 4)
    features = torch.randn(2, 32, 6, 6, requires_grad=True)
    logits = head(features)
    assert logits.shape == (2, 5, 24, 24)
    # sub-pixel layout: logit (class c, row 4i+a, col 4j+b) is channel c*16 + a*4 + b of the 1x1 conv at cell (i, j)
    inner = head.out(head.trunk(features))
    for c, a, b in ((0, 0, 0), (3, 1, 2), (4, 3, 3)):
        torch.testing.assert_close(logits[:, c, 4 * 2 + a, 4 * 3 + b], inner[:, c * 16 + a * 4 + b, 2, 3])
    # past the trunk's normalisation, the 4x4 logits of latent cell (2, 3) come from that cell's features alone
    head.trunk = torch.nn.Identity()
    head(features)[:, :, 8:12, 12:16].sum().backward()
    touched = features.grad.abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[2, 3] = True
    assert torch.equal(touched, expected)
    with pytest.raises(ValueError, match="power of two >= 2"):
        PixelShuffleMaskHead(32, 5, 3)


def test_lean_unet_trains_masks_at_image_size_and_shipped_checkpoints_load_into_the_default():
    lean = three_level_unet(register_placement="per_level", mask_upsample_factor=4, mask_decoder="pixel_shuffle")
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    anatomy = lean.forward_with_anatomy(x, t)
    assert anatomy.seg_logits.shape == (2, 4, 32, 32)
    assert set(anatomy.layer_class_attention) == set(lean.anatomical_attention_keys)
    assert any(k.startswith("mask_decoder.out.") for k in lean.state_dict())
    # a checkpoint of the shipped (every-block, upsample-conv) design loads into a UNet built with the defaults
    shipped = three_level_unet(mask_upsample_factor=4)
    again = three_level_unet(mask_upsample_factor=4, register_placement="every_block", mask_decoder="upsample_conv")
    loaded = again.load_state_dict(shipped.state_dict(), strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    # and into the lean design it does not: the mask heads differ, which strict loading names
    with pytest.raises(RuntimeError, match="mask_decoder"):
        lean.load_state_dict(shipped.state_dict(), strict=True)


def test_layer_average_of_class_attention_is_lazy_and_exact():
    unet = three_level_unet()
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    anatomy = unet.forward_with_anatomy(x, t)
    assert anatomy._class_attention is None  # nothing averaged until read
    resized = [m if m.shape[-2:] == (8, 8) else F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False)
               for m in anatomy.layer_class_attention.values()]
    torch.testing.assert_close(anatomy.class_attention, torch.stack(resized).mean(0), rtol=0, atol=0)
    torch.testing.assert_close(anatomy.class_attention.sum(1), torch.ones(2, 8, 8))
    with pytest.raises(AttributeError, match="read-only"):
        anatomy.prediction = None
    with pytest.raises(ValueError, match="needs class_attention"):
        AnatomyOutput(anatomy.prediction, anatomy.seg_logits)


def test_dice_statistics_only_on_the_steps_lightning_logs(tmp_path):
    """A real Trainer, 6 steps of 6 batches in one epoch, log_every_n_steps=2: the argmax Dice is computed on the
    three logged steps (2, 4, 6; the last is also the epoch's last batch) and nowhere else, and the loss of every
    step is the one with statistics (they are detached)."""
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_config(use_ema=False))
    model.learning_rate = 1e-4
    calls = []
    original = model.objective.dice_stats

    def counting(pred, mask):
        calls.append(int(model.global_step))
        return original(pred, mask)

    model.objective.dice_stats = counting
    train = DataLoader(PhantomDataset(size=32, num_samples=12, seed=0), batch_size=2)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(tmp_path)),
                         log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, train)
    assert calls == [1, 3, 5]
    assert "train/anatomical_dice" in trainer.callback_metrics
    # outside a trainer (direct calls, evaluation) the statistics are always there
    model.objective.dice_stats = original
    batch = next(iter(train))
    model.eval()
    with torch.no_grad():
        _, logged = model.shared_step(batch)
    assert "val/anatomical_dice" in logged


def test_register_cost_quick_measures_the_variants(tmp_path):
    sys.path.insert(0, BENCH)
    import register_cost

    out = str(tmp_path / "rc.json")
    result = register_cost.main(["--quick", "-o", out])
    rows = result["variants"]
    assert list(rows) == list(register_cost.VARIANTS)
    assert rows["plain"]["flops_x_plain"] == 1.0 and rows["plain"]["register_layers"] == 0
    # the lean design cuts FLOPs and kernels against the shipped one, each step of it
    flops = [rows[v]["flops_x_plain"] for v in ("shipped", "width", "width+level", "lean", "lean_low")]
    assert flops == sorted(flops, reverse=True) and flops[-1] < 1.25 < flops[0]
    assert rows["lean_low"]["kernels"] < rows["lean"]["kernels"] < rows["shipped"]["kernels"]
    assert rows["lean_low"]["register_layers"] < rows["lean"]["register_layers"] < rows["shipped"]["register_layers"]
    assert all(row["host_syncs"] == 0 for row in rows.values())
    assert all(row["time_x_plain"] > 0 for row in rows.values())
    assert json.load(open(out))["size"] == "quick"
    assert "| lean_low |" in open(str(tmp_path / "rc.md")).read()


def test_benchmark_lean_arm_is_the_anatomical_arm_with_the_lean_overrides():
    sys.path.insert(0, BENCH)
    import anatomy_v2 as v2
    import register_cost

    preset = v2.PRESETS_V2["quick"]
    anat = v2.arm_config("anatomical", preset, None, 1.0)
    lean = v2.arm_config("lean", preset, None, 1.0)
    a, b = anat["params"]["unet_config"]["params"], lean["params"]["unet_config"]["params"]
    changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert changed == set(register_cost.lean_overrides(a, v2.LEAN_VARIANT))
    assert b["register_placement"] == "per_level" and b["mask_decoder"] == "pixel_shuffle"
    assert b["anatomical_register_dim"] == b["model_channels"] == 32 and b["anatomical_attention_heads"] == 2
    assert {k: v for k, v in anat["params"].items() if k != "unet_config"} == \
        {k: v for k, v in lean["params"].items() if k != "unet_config"}  # same loss, schedule and data
    assert "lean" in v2.MASK_ARMS_V2  # judged on its own masks too
