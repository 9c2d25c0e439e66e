"""torch.compile: no graph breaks in the UNet and the anatomical hook path, compiled == eager, and ``--compile`` on
main.py / scripts/sample.py (checkpoints keep their CompVis keys).

The tests compile with the ``eager`` backend (dynamo graph capture, then the captured graph run by PyTorch): what the
project's code controls is whether dynamo captures one graph; inductor's C++ code generation takes minutes on the
2-core CPU runner (``bench/unet_speed.py`` measures it).
"""
from __future__ import annotations

import copy
import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main
from ldm.models.diffusion.anatomical_ddpm import AnatomicalLatentDiffusion
from ldm.modules.diffusionmodules.compile import compile_unet
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.util import instantiate_from_config
from tiny_models import ANATOMICAL_LDM_TARGET, ANATOMICAL_UNET_TARGET, anatomical_params, unet_config

ROOT = Path(__file__).resolve().parents[1]
TINY_LDM = str(ROOT / "configs" / "tests" / "tiny_ldm.yaml")
TINY_AE = str(ROOT / "configs" / "tests" / "tiny_autoencoder.yaml")
# tiny_ldm.yaml as an anatomical LDM (6 phantom classes, registers that read the features, image-size mask decoder)
ANATOMICAL_OVERRIDES = [
    f"model.target={ANATOMICAL_LDM_TARGET}", f"model.params.unet_config.target={ANATOMICAL_UNET_TARGET}",
    "model.params.anatomical_mask_key=segmentation", "model.params.anatomical_warmup_steps=0",
    "model.params.unet_config.params.num_anatomical_classes=6",
    "model.params.unet_config.params.anatomical_register_dim=16",
    "model.params.unet_config.params.num_registers_per_class=2",
    "model.params.unet_config.params.anatomical_attention_heads=2",
    "model.params.unet_config.params.register_update=read",
    "model.params.unet_config.params.mask_upsample_factor=4",
]


def _anatomical_unet(**extra) -> UNetModel:
    torch.manual_seed(0)
    cfg = unet_config(two_level=True, anatomy=anatomical_params(register_update="read", mask_upsample_factor=2),
                      **extra)
    unet = instantiate_from_config(cfg)
    with torch.no_grad():  # move the zero-initialised outputs away from zero, so every path matters
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 2, 8, 8, generator=g), torch.tensor([3, 71])


@pytest.mark.parametrize("kind", ["plain", "anatomical"])
def test_unet_and_anatomy_paths_compile_without_graph_breaks(kind):
    if kind == "plain":
        torch.manual_seed(0)
        unet = instantiate_from_config(unet_config(two_level=True))
    else:
        unet = _anatomical_unet(use_checkpoint=True)  # training mode: the checkpointed block and register calls
    x, t = _inputs()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(unet)(x, t)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    if kind != "plain":
        torch._dynamo.reset()
        explained = torch._dynamo.explain(unet.forward_with_anatomy)(x, t)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        assert explained.graph_count == 1
    torch._dynamo.reset()


def test_compiled_anatomical_unet_matches_eager_outputs_and_gradients():
    eager = _anatomical_unet()
    compiled = copy.deepcopy(eager)
    assert compile_unet(compiled, backend="eager") is compiled
    keys = list(eager.state_dict())
    assert list(compiled.state_dict()) == keys  # compiled in place: no _orig_mod. prefix
    x, t = _inputs()
    torch.testing.assert_close(compiled(x, t), eager(x, t), rtol=1e-5, atol=1e-6)
    out_c, out_e = compiled.forward_with_anatomy(x, t), eager.forward_with_anatomy(x, t)
    assert "_compiled_forward_with_anatomy" in compiled.__dict__  # the anatomy path runs compiled too
    for field in ("prediction", "seg_logits", "class_attention", "registers"):
        torch.testing.assert_close(getattr(out_c, field), getattr(out_e, field), rtol=1e-5, atol=1e-6, msg=field)
    assert list(out_c.layer_class_attention) == list(out_e.layer_class_attention)
    twin = copy.deepcopy(compiled)  # a copy of a compiled model runs its own weights, not the original's
    with torch.no_grad():
        twin.mask_decoder.out.bias.add_(1.0)
    torch.testing.assert_close(twin.forward_with_anatomy(x, t).seg_logits, out_e.seg_logits + 1.0, rtol=1e-5,
                               atol=1e-5)
    for out, model in ((out_c, compiled), (out_e, eager)):
        (out.prediction.square().mean() + out.seg_logits.logsumexp(1).mean()).backward()
    grads_e = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0 or grads_e[name].grad is None, name
        torch.testing.assert_close(p.grad, grads_e[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


def test_compile_unet_refuses_a_model_without_unet():
    with pytest.raises(ValueError, match="has none"):
        compile_unet(torch.nn.Linear(2, 2))


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {os.path.relpath(p, folder): np.asarray(Image.open(p), dtype=np.int16)
            for p in sorted(glob.glob(str(folder / "**" / "*.png"), recursive=True))}


@pytest.mark.slow(20)
def test_compiled_training_run_checkpoint_loads_into_an_eager_model_and_samples_compiled(tmp_path, caplog):
    caplog.set_level("INFO")
    caplog.set_level("INFO", logger="ldm")  # whatever level an earlier in-process tool left on the package logger
    logs = tmp_path / "logs"
    code = main.main(["--base", TINY_LDM, "-t", "-l", str(logs), "--accelerator", "cpu", "--compile",
                      "--compile_backend", "eager", "--max_steps", "2",
                      "lightning.callbacks.image_logger.params.batch_frequency=100", *ANATOMICAL_OVERRIDES])
    torch._dynamo.reset()
    assert code == 0
    assert "AnatomicalUNetModel compiled in place (backend=eager" in caplog.text
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    state = ckpt["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    config = main.load_configs([TINY_LDM], ANATOMICAL_OVERRIDES)
    eager = instantiate_from_config(config.model)
    assert isinstance(eager, AnatomicalLatentDiffusion)
    assert list(state) == list(eager.state_dict())  # identical keys, identical order
    eager.load_state_dict(state, strict=True)
    assert "model.diffusion_model.register_read.output_0.to_q.weight" in state

    sample = _load_script("sample")
    common = ["-r", str(run), "-n", "2", "--batch_size", "2", "-c", "3", "--seed", "5", "--save_masks",
              "--no-progress", "--device", "cpu"]
    assert sample.main([*common, "-l", str(tmp_path / "eager")]) == 0
    assert sample.main([*common, "-l", str(tmp_path / "compiled"), "--compile", "--compile_backend", "eager"]) == 0
    torch._dynamo.reset()
    eager_png, compiled_png = _pngs(tmp_path / "eager"), _pngs(tmp_path / "compiled")
    assert sorted(eager_png) == sorted(compiled_png) and any(k.startswith("masks") for k in eager_png)
    for name, image in eager_png.items():
        assert np.abs(image - compiled_png[name]).max() <= 1, name


def test_compile_flag_on_an_autoencoder_is_a_usage_error(tmp_path, capsys):
    code = main.main(["--base", TINY_AE, "-t", "-l", str(tmp_path / "logs"), "--accelerator", "cpu", "--compile"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: --compile compiles the diffusion UNet, but AutoencoderKL has none")


def test_anatomical_losses_read_nothing_back_to_the_host():
    """No data-dependent Python branch (a device synchronisation on CUDA, a graph break under torch.compile), and
    still exactly 0 with a graph when nothing is labelled."""
    from ldm.modules.anatomical_losses import soft_alignment_loss, soft_class_targets, soft_dice_loss

    g = torch.Generator().manual_seed(0)
    mask = torch.randint(0, 4, (2, 8, 8), generator=g)
    mask[0] = 255  # one sample without labels
    probs = torch.randn(2, 4, 8, 8, generator=g).softmax(1).requires_grad_()
    attention = torch.randn(2, 4, 4, 4, generator=g).softmax(1).requires_grad_()
    target, labelled = soft_class_targets(mask, (4, 4), 4, 255)
    weights = torch.tensor([0.3, 0.9])
    torch._dynamo.reset()
    for fn, args in ((soft_dice_loss, (probs, mask, 255, weights)),
                     (soft_alignment_loss, (attention, target, labelled, weights))):
        explained = torch._dynamo.explain(fn)(*args)
        assert explained.graph_break_count == 0 and explained.graph_count == 1, fn.__name__
    torch._dynamo.reset()
    unlabelled = torch.full_like(mask, 255)
    none_target, none_labelled = soft_class_targets(unlabelled, (4, 4), 4, 255)
    for loss in (soft_dice_loss(probs, unlabelled, 255), soft_alignment_loss(attention, none_target, none_labelled)):
        assert loss.item() == 0.0 and loss.requires_grad
    # the unlabelled sample is left out of the Dice mean: the loss is the labelled sample's alone
    alone = soft_dice_loss(probs[1:], mask[1:], 255, weights[1:])
    torch.testing.assert_close(soft_dice_loss(probs, mask, 255, weights), alone, rtol=0, atol=0)


@pytest.mark.parametrize("design", ["shipped", "lean"])
def test_whole_anatomical_training_loss_is_one_graph(design):
    """``p_losses`` (q_sample, the UNet with its register layers and mask head, the diffusion loss and the anatomical
    loss: CE + soft Dice, soft alignment, alpha_bar weighting, Dice statistics) captured by dynamo as one graph."""
    from test_anatomical_ldm import tiny_config

    cfg = tiny_config(use_ema=False, alignment_target="soft", segmentation_loss="ce_dice",
                      anatomical_timestep_weighting="alpha_bar")
    if design == "lean":
        cfg["params"]["unet_config"]["params"].update(register_placement="per_level", mask_decoder="pixel_shuffle",
                                                      mask_upsample_factor=2)
    torch.manual_seed(0)
    model = instantiate_from_config(cfg).train()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, model.channels, model.image_size, model.image_size, generator=g)
    size = 2 * model.image_size  # the tiny first stage's factor
    mask = torch.randint(0, 6, (2, size, size), generator=g)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda z, t, n, m: model.p_losses(z, None, t, noise=n, anatomy_target=m)[0])(
        z, torch.tensor([3, 500]), torch.randn(z.shape, generator=g), mask)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
