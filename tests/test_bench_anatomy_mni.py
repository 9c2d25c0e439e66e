"""The anatomy benchmark's real-data arm (``bench/anatomy_mni.py``): the MNI ICBM152 template nilearn ships, read
through the project's NIfTI dataset, and the ``--quick`` run end to end."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

pytest.importorskip("nilearn", reason="the MNI arm needs nilearn (in the test extra)")
import anatomy_mni as mni  # noqa: E402


def test_tissue_fractions_known_values():
    masks = np.zeros((2, 4, 4), dtype=np.int64)
    masks[0, :2, :] = 1  # 8 grey
    masks[0, 2, :2] = 2  # 2 white
    f = mni.tissue_fractions(masks)
    assert f["tissue"].tolist() == [10 / 16, 0.0]
    assert f["grey_share"][0] == pytest.approx(0.8) and np.isnan(f["grey_share"][1])
    same = mni.tissue_statistics(masks, {"tissue": f["tissue"], "grey_share": f["grey_share"][:1]})
    assert same["w1_tissue_fraction"] == 0.0 and same["w1_grey_share"] == 0.0 and same["no_tissue_share"] == 0.5


def test_template_through_the_nifti_dataset(tmp_path):
    import nibabel as nib

    data = mni.mni_slices(str(tmp_path / "data"), 32)
    label_img = nib.load(str(tmp_path / "data" / "masks" / "mni152.nii.gz"))
    labels = np.asarray(label_img.dataobj)
    assert labels.shape == (197, 233, 189) and set(np.unique(labels)) == {0, 1, 2}
    assert nib.aff2axcodes(label_img.affine) == ("R", "A", "S")
    # the ICBM152 average brain in its 1 mm voxels (larger than a typical adult's): about 1.1 l of grey matter
    # (cortex, cerebellum, deep nuclei) and 0.6 l of white matter; more grey than white, as in every adult brain
    assert 0.9e6 < (labels == 1).sum() < 1.3e6 and 0.5e6 < (labels == 2).sum() < 0.8e6
    n = len(data["image"])
    assert 120 < n < 189  # the axial levels with tissue
    assert data["image"].shape == (n, 1, 32, 32) and data["segmentation"].shape == (n, 32, 32)
    assert data["image"].min() >= -1 and data["image"].max() <= 1
    assert (data["segmentation"].flatten(1).amax(1) > 0).all()  # skip_empty_slices
    assert data["level"].diff().gt(0).all()  # one volume, levels in order
    train, held = mni.split(data)
    assert len(train["image"]) + len(held["image"]) == n and 0.2 < len(held["image"]) / n < 0.3
    assert not set(train["level"].tolist()) & set(held["level"].tolist())
    # the mid-brain axial slice: white matter inside, grey matter around it (more grey than white at the rim)
    mid = data["segmentation"][n // 2]
    assert (mid == 2).sum() > 20 and (mid == 1).sum() > 20
    rim = mid[0:8].flatten()
    assert (rim == 2).sum() <= (rim == 1).sum()


@pytest.mark.slow(28)
def test_quick_run_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "mni")
    assert mni.main(["-o", out, "--quick", "--no-progress"]) == 0
    with open(os.path.join(out, "mni.json")) as f:
        result = json.load(f)
    cal, arms = result["calibration"], result["arms"]
    assert cal["n_train"] + cal["n_held_out"] == cal["n_slices"]
    assert 0.0 < cal["segmenter_dice"]["mean"] <= 1.0 and cal["reconstructed_fid_pixel8"] > 0
    assert set(arms) == {"baseline", "anatomical"}
    quick = mni.am.PRESETS["quick"]
    for arm in arms.values():
        assert arm["n_samples"] == quick.samples * quick.seeds and arm["seeds"] == list(range(quick.seeds))
        assert arm["fid_pixel8"]["lo"] <= arm["fid_pixel8"]["mean"] <= arm["fid_pixel8"]["hi"]
        assert 0.0 <= arm["no_tissue_share"]["mean"] <= 1.0
    assert arms["baseline"]["own_dice_on_reconstructions"] is None
    own = arms["anatomical"]["own_dice_on_reconstructions"]
    assert 0.0 <= own["mean"] <= 1.0 and own["n"] == quick.seeds
    metrics = {c["metric"] for c in result["comparisons"]}
    assert {"fid_pixel8", "w1_tissue_fraction", "memorisation_share"} <= metrics
    # seed-level paired tests, Holm-adjusted over the rows
    for c in result["comparisons"]:
        assert c["seed_test"]["n"] == quick.seeds
        assert c["seed_test"]["diff"] == pytest.approx(c["diff"]["mean"])
        assert c["p_holm"] is None or c["p_holm"] >= c["seed_test"]["p"]
    # the anatomical model has three classes (background, grey, white matter) and no label set
    unet = result["meta"]["configs"]["anatomical"]["params"]["unet_config"]["params"]
    assert unet["num_anatomical_classes"] == 3
    for name in ("samples.png", "tissue.png"):
        assert os.path.getsize(os.path.join(out, "figures", name)) > 5000
    report = open(os.path.join(out, "report.md")).read()
    assert "Calibration" in report and "Own masks" in report and "One brain" in report

    # the same command again reuses the trained models and their evaluations
    ckpt = os.path.join(out, "arms", "anatomical", "seed1", f"step{quick.steps:06d}.ckpt")
    before = os.path.getmtime(ckpt)
    assert mni.main(["-o", out, "--quick", "--no-progress"]) == 0
    assert os.path.getmtime(ckpt) == before
    with open(os.path.join(out, "mni.json")) as f:
        assert json.load(f)["arms"]["anatomical"]["fid_pixel8"] == arms["anatomical"]["fid_pixel8"]
    assert mni.main(["-o", str(tmp_path / "x"), "--quick", "--arms", "joint"]) == 2
    assert "unknown arm" in capsys.readouterr().err


def test_missing_nilearn_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # import nilearn now raises ImportError
    assert mni.main(["-o", str(tmp_path / "m"), "--quick", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "nilearn" in err and "pip install" in err
    assert torch.get_num_threads() >= 1
