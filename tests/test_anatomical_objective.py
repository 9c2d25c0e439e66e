"""The anatomical objective as one part (ldm/modules/anatomical_objective.py), the diffusion loss over channel groups
(ldm/models/diffusion/losses.py) and the joint mode's parts called with values (tiny, CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models.diffusion.losses import LossGroup, diffusion_loss, element_loss
from ldm.modules import anatomical_objective as ao
from ldm.util import instantiate_from_config
from test_anatomical_ldm import phantom_batch, tiny_config, tiny_model


def _inputs(seed: int = 0, classes: int = 6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 8, 8, generator=g)
    attention = torch.softmax(torch.randn(2, classes, 4, 4, generator=g), dim=1)
    mask = torch.randint(0, classes, (2, 16, 16), generator=g)
    mask[1, :4] = 255
    return logits, attention, mask


def test_shipped_parameters_name_the_terms():
    assert ao.shipped_terms() == {"segmentation_ce": 1.0, "alignment_majority": 0.5}
    assert ao.shipped_terms("ce_dice", "soft", 0.25) == {"segmentation_ce": 1.0, "segmentation_dice": 1.0,
                                                         "alignment_soft": 0.25}
    with pytest.raises(ValueError, match="segmentation_loss must be one of"):
        ao.shipped_terms("dice")


def test_objective_is_the_weighted_sum_of_its_named_terms():
    logits, attention, mask = _inputs()
    both = ao.AnatomicalObjective(6, terms={"segmentation_ce": 1.0, "alignment_majority": 0.5})
    loss, stats = both(logits, attention, mask)
    ce = ao.segmentation_ce(ao.TermInputs(F.log_softmax(F.interpolate(logits, size=(16, 16), mode="bilinear",
                                                                      align_corners=False), 1),
                                          mask, attention, [], None, None, 6, 255, None))
    assert float(stats["anatomical_seg_ce"]) == pytest.approx(float(ce), rel=1e-6)
    assert float(loss) == pytest.approx(float(ce) + 0.5 * float(stats["anatomical_alignment_ce"]), rel=1e-6)
    # the mask loss without alignment: one term, the alignment average is not needed
    seg_only = ao.AnatomicalObjective(6, terms={"segmentation_ce": 2.0})
    assert not seg_only.needs_average and both.needs_average
    loss_seg, stats_seg = seg_only(logits, None, mask, layer_class_attention={"out.0": attention})
    assert float(loss_seg) == pytest.approx(2.0 * float(ce), rel=1e-6)
    assert "anatomical_alignment_ce" not in stats_seg and "anatomical_dice" in stats_seg


def test_a_new_term_is_one_function_and_one_registry_name(monkeypatch):
    def mean_logit(x: ao.TermInputs) -> torch.Tensor:
        return x.log_probs.exp()[:, 1].mean()

    monkeypatch.setitem(ao.LOSS_TERMS, "foreground_mass", ao.LossTerm(mean_logit, "anatomical_foreground_mass"))
    cfg = tiny_config(anatomical_loss_terms={"segmentation_ce": 1.0, "foreground_mass": 3.0})
    model = instantiate_from_config(cfg)
    model.train()
    torch.manual_seed(1)
    loss, logged = model.shared_step(phantom_batch(2))
    terms = float(logged["train/anatomical_seg_ce"]) + 3.0 * float(logged["train/anatomical_foreground_mass"])
    assert float(logged["train/anatomical_loss"]) == pytest.approx(terms, rel=1e-6)
    assert "train/anatomical_alignment_ce" not in logged
    loss.backward()


def test_the_shipped_terms_named_explicitly_give_the_same_step():
    batch = phantom_batch(2)
    losses = []
    for terms in (None, {"segmentation_ce": 1.0, "alignment_majority": 0.5}):
        model = tiny_model(**({} if terms is None else {"anatomical_loss_terms": terms}))
        model.train()
        torch.manual_seed(3)
        losses.append(model.shared_step(batch)[1])
    assert set(losses[0]) == set(losses[1])
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])


@pytest.mark.parametrize("terms, match", [
    ({}, "is empty"),
    ({"segmentation_focal": 1.0}, "unknown anatomical loss terms"),
    ({"segmentation_ce": -1.0}, "must be >= 0"),
    ({"alignment_soft": 1.0, "alignment_majority": 1.0}, "two alignment terms"),
])
def test_bad_terms_are_value_errors(terms, match):
    with pytest.raises(ValueError, match=match):
        instantiate_from_config(tiny_config(anatomical_loss_terms=terms))


def test_loss_terms_and_the_shipped_term_parameters_together_are_refused():
    """Naming the terms and also choosing them with the shipped parameters would drop the latter silently."""
    with pytest.raises(ValueError, match="names the terms itself"):
        instantiate_from_config(tiny_config(anatomical_loss_terms={"segmentation_ce": 1.0}, alignment_target="soft"))


def test_timestep_weighting_needs_the_schedule():
    logits, attention, mask = _inputs()
    objective = ao.AnatomicalObjective(6, timestep_weighting="alpha_bar")
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        objective(logits, attention, mask, t=torch.tensor([1, 2]))
    abar = torch.linspace(0.99, 0.01, 10)
    weighted, stats = objective(logits, attention, mask, t=torch.tensor([3, 3]), alphas_cumprod=abar)
    unweighted, _ = ao.AnatomicalObjective(6)(logits, attention, mask)
    assert float(weighted) == pytest.approx(float(abar[3]) * float(unweighted), rel=1e-5)
    assert float(stats["anatomical_timestep_weight"]) == pytest.approx(float(abar[3]), rel=1e-6)


def test_loss_weight_schedule_values():
    assert [ao.loss_weight_at(s, 0.1, 10) for s in (0, 9, 15, 20)] == pytest.approx([0.2, 0.2, 0.15, 0.1])
    assert ao.loss_weight_at(10, 0.1, 10, "cosine") == pytest.approx(0.15)
    assert ao.loss_weight_at(3, 0.1, 10, progressive=False) == 0.1
    assert ao.loss_weight_at(3, 0.1, 0) == 0.1


def test_mask_labels_are_checked_on_the_host():
    mask = torch.tensor([[[0, 1], [255, 2]]])
    assert ao.check_mask_labels(mask, 3, 255) is True
    assert ao.check_mask_labels(torch.full((1, 2, 2), 255), 3, 255) is False
    with pytest.raises(ValueError, match=r"labels outside 0..1 .* found \[0, 1, 2\]"):
        ao.check_mask_labels(mask, 2, 255, "segmentation")
    batch = {"segmentation": mask, "has_segmentation": torch.tensor([False])}
    assert torch.equal(ao.batch_masks(batch, "segmentation", 255), torch.full((1, 2, 2), 255))
    assert ao.batch_masks({}, "segmentation", 255) is None


# ---- the diffusion loss over channel groups ----------------------------------------------------------------
def test_diffusion_loss_without_groups_is_the_compvis_loss():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t, logvar, lvlb = torch.tensor([0, 4, 9]), torch.linspace(-0.5, 0.5, 10), torch.linspace(1.0, 2.0, 10)
    loss, log = diffusion_loss(element_loss(pred, target, "l1"), t, logvar, lvlb, l_simple_weight=2.0,
                               original_elbo_weight=0.3, prefix="val")
    simple = (target - pred).abs().mean(dim=(1, 2, 3))
    expected = 2.0 * (simple / logvar[t].exp() + logvar[t]).mean() + 0.3 * (lvlb[t] * simple).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert set(log) == {"val/loss_simple", "val/loss_vlb", "val/loss"}
    with pytest.raises(ValueError, match="loss_type must be"):
        element_loss(pred, target, "huber")


def test_a_loss_group_weights_its_channels_by_sample_and_group():
    g = torch.Generator().manual_seed(1)
    per_element = torch.rand(4, 5, 3, 3, generator=g)
    t, logvar, lvlb = torch.tensor([1, 2, 3, 4]), torch.zeros(10), torch.ones(10)
    present = torch.tensor([True, False, True, False])
    loss, log = diffusion_loss(per_element, t, logvar, lvlb, groups=[LossGroup("mask", 2, present, 0.5)])
    image = per_element[:, :2].mean(dim=(1, 2, 3)).mean()
    mask = per_element[[0, 2], 2:].mean(dim=(1, 2, 3)).mean()
    assert float(loss) == pytest.approx(float(image + 0.5 * mask), rel=1e-6)
    assert float(log["train/mask_loss_simple"]) == pytest.approx(float(mask), rel=1e-6)
    assert float(log["train/mask_fraction"]) == 0.5
    assert float(log["train/loss_simple"]) == pytest.approx(float(image), rel=1e-6)
    nobody = diffusion_loss(per_element, t, logvar, lvlb, groups=[LossGroup("mask", 2, torch.zeros(4, dtype=torch.bool))])
    assert float(nobody[0]) == pytest.approx(float(image), rel=1e-6)  # no labelled example: the group adds 0


def test_the_joint_step_takes_which_examples_are_labelled_as_a_value():
    from test_joint import joint_config, phantom_batch as joint_batch
    model = instantiate_from_config(joint_config())
    model.train()
    z = model.get_input(joint_batch(4), "image")[0]
    t, noise = torch.tensor([3, 30, 60, 90]), torch.randn_like(z)
    fractions = []
    for labelled in (torch.tensor([True] * 4), torch.tensor([True, False, False, False]), None):
        _, log = model.p_losses(z, None, t, noise=noise, labelled=labelled)
        fractions.append(float(log["train/mask_fraction"]))
    assert fractions == [1.0, 0.25, 1.0]  # None: every example has its mask
    assert not hasattr(model, "_joint_present")
