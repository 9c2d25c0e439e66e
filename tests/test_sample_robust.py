"""scripts/sample.py under interruption and bad input: atomic files, sessions recorded as they start, resume redoes
incomplete samples, settings and output folders checked before the model loads; evaluate.py names bad files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from ldm import sample_io
from ldm.util import run_script
from test_sample_run import _digest, load_script, make_run

COMMON = ["-c", "3", "-e", "0.5", "--seed", "5", "--save_masks", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return make_run(str(tmp_path_factory.mktemp("logs")), True, steps=2, name="robust")


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    """Six samples written by one uninterrupted session."""
    out = tmp_path_factory.mktemp("ref") / "s"
    assert load_script("sample").main(["-r", run, "-n", "6", "--batch_size", "3", "-l", str(out), *COMMON]) == 0
    return out


def _all_digests(folder):
    return {sub: _digest(folder / sub) for sub in ("images", "masks", "masks_colour")}


def test_interrupted_session_is_recorded_and_resumed(run, reference, tmp_path, monkeypatch):
    out = tmp_path / "s"
    real_save = sample_io._save_png
    calls = []

    def dying_save(path, array):
        calls.append(path)
        if len(calls) == 12:  # 3 PNGs a sample: sample 3's mask and preview written, its image being written
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(sample_io, "_save_png", dying_save)
    with pytest.raises(KeyboardInterrupt):
        load_script("sample").main(["-r", run, "-n", "6", "--batch_size", "3", "-l", str(out), *COMMON])
    monkeypatch.setattr(sample_io, "_save_png", real_save)

    # Nothing half-written: no empty file, no temporary file; sample 3 has its mask but no image.
    names = {sub: sorted(os.listdir(out / sub)) for sub in ("images", "masks", "masks_colour")}
    assert names["images"] == ["000000.png", "000001.png", "000002.png"]
    assert names["masks"] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert all(os.path.getsize(out / sub / n) > 0 for sub in names for n in names[sub])
    # The session was recorded when it started.
    manifest = json.load(open(out / "samples.json"))
    assert [s["status"] for s in manifest["sessions"]] == ["started"]
    assert manifest["sessions"][0]["start_index"] == 0 and manifest["sessions"][0]["count"] == 6
    complete, incomplete, nxt = sample_io.scan_samples(str(out), sessions=manifest["sessions"])
    assert (complete, incomplete, nxt) == ([0, 1, 2], [3], 4)

    # A killed process leaves a temporary file behind; an old version of the script left a 0-byte PNG.
    (out / "images" / f"{sample_io.TMP_PREFIX}dead-000004.png").write_bytes(b"\x89PNG partial")
    (out / "masks_colour" / "000001.png").write_bytes(b"")

    # The rerun redoes 1 (empty preview) and 3 (no image) first, then adds 2 more: 4 and 5.
    assert load_script("sample").main(["-r", run, "-n", "2", "--batch_size", "3", "-l", str(out), *COMMON]) == 0
    assert _all_digests(out) == _all_digests(reference)
    assert not [n for n in os.listdir(out / "images") if n.startswith(sample_io.TMP_PREFIX)]
    manifest = json.load(open(out / "samples.json"))
    assert [s["status"] for s in manifest["sessions"]] == ["interrupted", "complete"]
    assert manifest["sessions"][1]["redone"] == [1, 3] and manifest["sessions"][1]["start_index"] == 4
    assert manifest["num_samples"] == 6 and manifest["incomplete"] == []


@pytest.mark.parametrize("flags, match", [
    (["-e", "nan"], r"-e \(DDIM eta\) must be a number in \[0, 1\]"),
    (["-e", "1.5"], r"1: DDPM-like\), got 1.5"),
    (["-e", "-0.1"], r"1: DDPM-like\), got -0.1"),
    (["-c", "0"], r"-c \(sampler steps\) must be >= 1"),
    (["--anatomy_guidance", "inf"], "anatomy_guidance must be finite"),
])
def test_bad_settings_refused_before_loading(run, tmp_path, monkeypatch, flags, match):
    sample = load_script("sample")
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("the model was loaded before the settings were checked"))
    with pytest.raises(ValueError, match=match):
        sample.main(["-r", run, "-n", "1", "-l", str(tmp_path / "o"), "--no-progress", *flags])
    assert not (tmp_path / "o").exists()


def test_bad_output_folder_refused_before_loading(run, tmp_path, monkeypatch, capsys):
    sample = load_script("sample")
    monkeypatch.setattr(sample.sampling, "load_model_for_sampling",
                        lambda *a, **k: pytest.fail("the model was loaded before the output folder was checked"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=f"output folder {afile} is a file"):
        sample.main(["-r", run, "-n", "1", "-l", str(afile)])
    with pytest.raises(ValueError, match=f"{afile} is a file"):
        sample.main(["-r", run, "-n", "1", "-l", str(afile / "sub")])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "samples.json").write_text('{"sessions": [')
    with pytest.raises(ValueError, match=f"{bad / 'samples.json'} is not readable JSON"):
        sample.main(["-r", run, "-n", "1", "-l", str(bad)])
    (bad / "samples.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match="is not a samples.json"):
        sample.main(["-r", run, "-n", "1", "-l", str(bad)])
    # Through the command-line wrapper: one line, exit 2.
    assert run_script(sample.main, ["-r", run, "-n", "1", "-e", "nan", "-l", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: -e (DDIM eta)" in err[0]


def test_non_finite_samples_are_an_error_not_black_images(run, tmp_path):
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.startswith("first_stage_model.decoder.conv_out.weight"))
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], float("nan"))
    nan_run = tmp_path / "2026-01-01T00-00-00_nan"
    os.makedirs(nan_run / "checkpoints")
    os.symlink(os.path.join(run, "configs"), nan_run / "configs")
    torch.save(ckpt, nan_run / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match=r"samples \[0, 1\] came out non-finite"):
        load_script("sample").main(["-r", str(nan_run), "-n", "2", "-l", str(tmp_path / "o"), *COMMON])
    assert not (tmp_path / "o" / "images" / "000000.png").exists()


def test_evaluate_names_an_unreadable_sample(reference, tmp_path):
    import shutil

    folder = tmp_path / "s"
    shutil.copytree(reference, folder)
    (folder / "images" / "000002.png").write_bytes(b"")
    evaluate = load_script("evaluate")
    with pytest.raises(ValueError, match=r"000002\.png is empty or not a readable image"):
        evaluate.main(["--samples", str(folder), "--real", str(reference), "-o", str(tmp_path / "r")])
    (folder / "images" / "000002.png").write_bytes((reference / "images" / "000002.png").read_bytes())
    (folder / "masks" / "000004.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"masks/000004\.png is empty or not a readable image"):
        evaluate.main(["--samples", str(folder), "--real", str(reference), "-o", str(tmp_path / "r")])
    (folder / "masks" / "000004.png").unlink()
    real = tmp_path / "real"
    shutil.copytree(reference / "images", real)
    (real / "000001.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"real/000001\.png is empty or not a readable image"):
        evaluate.main(["--samples", str(reference), "--real", str(real), "-o", str(tmp_path / "r")])
    (folder / "samples.json").write_text("{")
    with pytest.raises(ValueError, match="samples.json is not readable JSON"):
        evaluate.main(["--samples", str(folder), "--real", str(reference), "-o", str(tmp_path / "r")])


def test_python_api_gives_the_scripts_images_and_masks(run, reference):
    """``sample_images(..., masks=True)`` reproduces the files of scripts/sample.py for the same settings."""
    import numpy as np
    from PIL import Image

    from ldm import sampling

    model, _ = sampling.load_model_for_sampling(run)
    images, masks = sampling.sample_images(model, 2, ddim_steps=3, eta=0.5, seed=5, start_index=3, masks=True)
    pixels = sampling.to_uint8(images)
    for j, index in enumerate((3, 4)):
        assert np.array_equal(pixels[j], np.asarray(Image.open(reference / "images" / f"{index:06d}.png")))
        assert np.array_equal(masks[j].numpy(), np.asarray(Image.open(reference / "masks" / f"{index:06d}.png")))
    with pytest.raises(ValueError, match=r"-e \(DDIM eta\)"):
        sampling.sample_images(model, 1, eta=float("nan"))
    # draw_batch: the same samples of one batch in memory, with their latents (EMA weights as sample.py uses them)
    with model.ema_scope():
        drawn = sampling.draw_batch(model, [4, 3], seed=5, ddim_steps=3, eta=0.5, masks=True)
    assert torch.equal(drawn["images"][0], images[1]) and torch.equal(drawn["images"][1], images[0])
    assert torch.equal(drawn["masks"][0], masks[1]) and drawn["latents"].shape[0] == 2
    assert torch.allclose(model.decode_first_stage(drawn["latents"][:1]), drawn["images"][:1], atol=1e-5)
    assert sampling.draw_batch(model, [0], seed=5, ddim_steps=3)["masks"] is None
