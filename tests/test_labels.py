"""The label-set registry (ldm/data/labels.py), its one colouriser, and the label set of an anatomical model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data import labels
from ldm.data.anatomy_check import check_phantom_anatomy
from ldm.data.labels import (BREASTMRI, CTORGAN, EXTRA_COLOURS, IGNORE_COLOUR, INVALID_COLOUR, LABEL_SETS, LabelSet,
                             colourise, generic_label_set, get_label_set, get_rule_checker, label_set_of)
from ldm.models.diffusion.anatomical_ddpm import colourise_labels
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, ldm_config, unet_config


@pytest.mark.parametrize("name, expected", [("ctorgan", CTORGAN), ("CT-Organ", CTORGAN), ("breastmri", BREASTMRI),
                                            ("Breast_MRI", BREASTMRI)])
def test_lookup_by_name(name, expected):
    assert get_label_set(name) is expected


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown label set 'brain'.*ctorgan, breastmri"):
        get_label_set("brain")


def test_label_sets_hold_names_ids_colours_and_checker():
    assert set(LABEL_SETS) == {"ctorgan", "breastmri", "phantom2"}
    from ldm.data.anatomy_check_v2 import check_anatomy_v2

    phantom2 = get_label_set("phantom2")
    assert phantom2.num_classes == 10 and phantom2.ids["spleen"] == 2 and phantom2.classes[9] == "pelvis"
    assert phantom2.load_rule_checker() is check_anatomy_v2 and get_rule_checker("phantom2") is check_anatomy_v2
    assert CTORGAN.num_classes == 6 and CTORGAN.ids["kidneys"] == 4 and CTORGAN.classes[5] == "bone"
    assert BREASTMRI.num_classes == 4 and BREASTMRI.ids["vessels"] == 3
    assert CTORGAN.load_rule_checker() is check_phantom_anatomy and BREASTMRI.load_rule_checker() is None
    assert get_rule_checker("phantom") is check_phantom_anatomy and get_rule_checker("none") is None
    assert get_rule_checker("ldm.data.anatomy_check.check_phantom_anatomy") is check_phantom_anatomy
    with pytest.raises(ValueError, match="2 classes but 1 colours"):
        LabelSet("bad", ("a", "b"), ((0, 0, 0),))


def test_palette_extends_past_the_set_with_extra_colours():
    pal = BREASTMRI.palette(6)
    assert pal.dtype == np.uint8 and pal.shape == (6, 3)
    assert [tuple(c) for c in pal[:4]] == list(BREASTMRI.colours) and tuple(pal[4]) == EXTRA_COLOURS[0]
    assert BREASTMRI.palette().shape == (4, 3)
    generic = generic_label_set(8)
    assert generic.classes[7] == "class7" and generic.colours[:6] == CTORGAN.colours


def test_colourise_out_of_range_ids_are_magenta_and_ignore_is_grey():
    mask = np.array([[0, 3, 4], [255, -1, 6]])
    rgb = colourise(mask, BREASTMRI)
    assert tuple(rgb[0, 1]) == BREASTMRI.colours[3]
    assert all(tuple(rgb[i, j]) == INVALID_COLOUR for i, j in ((0, 2), (1, 1), (1, 2)))  # 4, -1, 6: not in 0..3
    assert tuple(rgb[1, 0]) == IGNORE_COLOUR
    # ignore index 7 instead: 255 is then an invalid id
    rgb7 = colourise(np.array([7, 255]), CTORGAN, ignore_index=7)
    assert tuple(rgb7[0]) == IGNORE_COLOUR and tuple(rgb7[1]) == INVALID_COLOUR


def test_model_previews_use_the_same_colouriser():
    mask = torch.tensor([[[0, 1], [255, 9]]])
    preview = colourise_labels(mask, CTORGAN)  # [1, 3, 2, 2] in [-1, 1]
    as_uint8 = ((preview[0].permute(1, 2, 0) + 1.0) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(as_uint8, colourise(mask[0], CTORGAN))


def _anatomical_ldm(**params) -> torch.nn.Module:
    unet = unet_config(anatomy=anatomical_params(num_classes=4))
    return instantiate_from_config(ldm_config(True, unet=unet, use_ema=False, **params))


def test_anatomical_model_takes_its_label_set_from_the_config():
    model = _anatomical_ldm(label_set="breastmri")
    assert model.label_set is BREASTMRI and label_set_of(model) is BREASTMRI
    with pytest.raises(ValueError, match="label_set 'ctorgan' has 6"):
        _anatomical_ldm(label_set="ctorgan")
    with pytest.raises(ValueError, match="valid names"):
        _anatomical_ldm(label_set="nope")
    # without a label set: unnamed classes, not a guess from the class count
    unnamed = _anatomical_ldm()
    assert unnamed.label_set.name == "generic" and unnamed.label_set.classes[0] == "class0"
    assert labels.label_set_of(object(), 3).num_classes == 3
