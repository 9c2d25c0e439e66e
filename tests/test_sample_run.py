"""scripts/sample.py on tiny runs trained in the test: determinism, resumption, checkpoint formats, refusal."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import sampling
from ldm.data.phantom import PhantomDataset
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.util import instantiate_from_config
from tiny_models import anatomical_params, first_stage_config, ldm_config, unet_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def load_script(name: str):
    """Import scripts/<name>.py under a private module name (no clash with installed packages)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(anatomical: bool) -> dict:
    anatomy = anatomical_params(use_anatomical_registers=True, use_timestep_aware_registers=True) if anatomical \
        else None
    params = {"timesteps": 100, "loss_type": "l2", "first_stage_key": "image", "cond_stage_key": "image",
              "conditioning_key": None, "scale_factor": 1.0, "monitor": "val/loss", "use_ema": True}
    if anatomical:
        params.update({"anatomical_mask_key": "segmentation", "anatomical_loss_weight": 1.0})
    model = ldm_config(anatomical, first_stage=first_stage_config(ch=8),
                       unet=unet_config(anatomy=anatomy, two_level=True), **params)
    return {"model": {"base_learning_rate": 1e-3, **model}}


def make_run(root: str, anatomical: bool, steps: int = 3, name: str = "run") -> str:
    """Train a tiny model for a few steps on phantom slices; write a main.py-style log dir; return its path."""
    torch.manual_seed(0)
    config = tiny_config(anatomical)
    model = instantiate_from_config(config["model"])
    loader = torch.utils.data.DataLoader(PhantomDataset(size=16, num_samples=8, seed=0), batch_size=4)
    opt = torch.optim.Adam([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step, batch in zip(range(steps), iter(lambda: iter(loader), None).__next__()):
        loss, _ = model.shared_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if model.use_ema:
            model.model_ema(model.model)
    run_dir = os.path.join(root, f"2026-01-01T00-00-00_{name}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    os.makedirs(os.path.join(run_dir, "configs"))
    torch.save({"state_dict": model.state_dict(), "global_step": steps, "epoch": 0},
               os.path.join(run_dir, "checkpoints", "last.ckpt"))
    OmegaConf.save(OmegaConf.create(config), os.path.join(run_dir, "configs", "2026-01-01T00-00-00-project.yaml"))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("logs"))
    return {"anatomical": make_run(root, True, name="anat"), "baseline": make_run(root, False, name="base")}


def _sample(args):
    sample = load_script("sample")

    return sample.main([*args, "--no-progress", "--device", "cpu"])


def _digest(folder):
    files = sorted(os.listdir(folder))
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in files}


def test_anatomical_sampling_deterministic_resumable_with_masks(runs, tmp_path):
    run = runs["anatomical"]
    common = ["-r", run, "-c", "4", "-e", "0.5", "--seed", "7", "--save_masks"]
    assert _sample([*common, "-n", "5", "--batch_size", "5", "-l", str(tmp_path / "a")]) == 0
    # Same seed, other batch size, split over two invocations (resumption): same bytes.
    _sample([*common, "-n", "2", "--batch_size", "1", "-l", str(tmp_path / "b")])
    _sample([*common, "-n", "3", "--batch_size", "2", "-l", str(tmp_path / "b")])
    for sub in ("images", "masks", "masks_colour"):
        da, db = _digest(tmp_path / "a" / sub), _digest(tmp_path / "b" / sub)
        assert list(da) == [f"{i:06d}.png" for i in range(5)]
        assert da == db, sub
    # Another seed gives other images.
    _sample(["-r", run, "-c", "4", "-e", "0.5", "--seed", "8", "-n", "2", "--batch_size", "2",
             "-l", str(tmp_path / "c")])
    assert _digest(tmp_path / "c" / "images")["000000.png"] != _digest(tmp_path / "a" / "images")["000000.png"]

    img = np.asarray(Image.open(tmp_path / "a" / "images" / "000000.png"))
    mask = np.asarray(Image.open(tmp_path / "a" / "masks" / "000000.png"))
    colour = np.asarray(Image.open(tmp_path / "a" / "masks_colour" / "000000.png"))
    assert img.dtype == np.uint8 and img.shape == (16, 16) and img.std() > 0
    assert mask.shape == (16, 16) and mask.max() < 6 and colour.shape == (16, 16, 3)

    manifest = json.load(open(tmp_path / "b" / "samples.json"))
    ckpt = os.path.join(run, "checkpoints", "last.ckpt")
    assert manifest["checkpoint_sha256"] == hashlib.sha256(open(ckpt, "rb").read()).hexdigest()
    assert manifest["seed"] == 7 and manifest["ddim_steps"] == 4 and manifest["eta"] == 0.5
    assert manifest["num_samples"] == 5 and [s["start_index"] for s in manifest["sessions"]] == [0, 2]
    assert manifest["config"]["model"]["target"].endswith("AnatomicalLatentDiffusion")
    assert manifest["sessions"][0]["ema"] is True and manifest["sessions"][0]["timings"]["per_sample_s"] > 0


def test_ddim_trajectory_per_sample_noise_through_sampler(runs):
    model, _ = sampling.load_model_for_sampling(runs["baseline"])
    shape = sampling.latent_shape(model)
    x_T = sampling.initial_noise(shape, 0, [0, 1, 2])
    seen = []
    z = sampling.ddim_trajectory(model, x_T, 4, 0.5, sampling.SampleNoise(0, [0, 1, 2]),
                                 callback=lambda i, t, x_t: seen.append((i, t, x_t)))
    assert [(i, t) for i, t, _ in seen] == [(0, 76), (1, 51), (2, 26), (3, 1)] and torch.equal(seen[0][2], x_T)
    # sample 2 alone (its own x_T and step noise) is sample 2 of the batch of three
    alone = sampling.ddim_trajectory(model, x_T[2:], 4, 0.5, sampling.SampleNoise(0, [2]))
    torch.testing.assert_close(alone, z[2:], atol=1e-5, rtol=1e-5)
    ref, _ = DDIMSampler(model).sample(4, 3, shape, eta=0.5, x_T=x_T, verbose=False,
                                       noise_fn=sampling.SampleNoise(0, [0, 1, 2]))
    assert torch.equal(z, ref)
    deterministic = sampling.ddim_trajectory(model, x_T, 4, 0.0)
    assert (deterministic - z).abs().max() > 0.1  # the step noise is used
    with pytest.raises(ValueError, match="needs a SampleNoise"):
        sampling.ddim_trajectory(model, x_T, 4, 0.5)
    with pytest.raises(ValueError, match="made for 2 samples"):
        sampling.SampleNoise(0, [0, 1])(x_T, 0)
    reused = sampling.SampleNoise(0, [0, 1, 2])
    reused(x_T, 0)
    with pytest.raises(ValueError, match="new SampleNoise"):
        reused(x_T, 0)


def test_baseline_sampling_formats_and_state_dict_files(runs, tmp_path):
    run = runs["baseline"]
    assert _sample(["-r", run, "-n", "2", "--batch_size", "2", "-c", "3", "-l", str(tmp_path / "png"),
                    "--format", "npz", "nii"]) == 0
    files = sorted(os.listdir(tmp_path / "png" / "images"))
    assert files == ["000000.nii.gz", "000000.npz", "000000.png", "000001.nii.gz", "000001.npz", "000001.png"]
    npz = np.load(tmp_path / "png" / "images" / "000000.npz")
    assert npz["image"].shape == (16, 16) and -1.0 <= npz["image"].min() and "mask" not in npz
    with pytest.raises(ValueError, match="--save_masks needs an anatomical model"):
        _sample(["-r", run, "-n", "1", "-c", "2", "-l", str(tmp_path / "x"), "--save_masks"])

    # A bare state dict and a safetensors file, with the config given by -b, give the same bytes.
    from safetensors.torch import save_file

    sd = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    cfg = os.path.join(run, "configs", "2026-01-01T00-00-00-project.yaml")
    torch.save(sd, tmp_path / "bare.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    for name in ("bare.pt", "w.safetensors"):
        out = tmp_path / name.replace(".", "_")
        _sample(["-r", str(tmp_path / name), "-b", cfg, "-n", "2", "--batch_size", "2", "-c", "3", "-l", str(out)])
        assert _digest(out / "images") == {k: v for k, v in _digest(tmp_path / "png" / "images").items()
                                           if k.endswith(".png")}
    # Ancestral DDPM sampling (100 steps in this tiny model): same seed and batch size, same bytes.
    for name in ("v1", "v2"):
        _sample(["-r", run, "-n", "2", "--batch_size", "2", "--vanilla_sample", "--seed", "3",
                 "-l", str(tmp_path / name)])
    assert _digest(tmp_path / "v1" / "images") == _digest(tmp_path / "v2" / "images")
    assert json.load(open(tmp_path / "v1" / "samples.json"))["vanilla_sample"] is True
    with pytest.raises(FileNotFoundError, match="-b CONFIG.yaml"):
        _sample(["-r", str(tmp_path / "bare.pt"), "-n", "1", "-l", str(tmp_path / "y")])


class _Custom:
    """A pickled custom object: needs full unpickling."""

    def __init__(self):
        self.value = 3


def test_unsafe_checkpoint_refused(runs, tmp_path):
    run = runs["baseline"]
    sd = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)["state_dict"]
    bad_dir = tmp_path / "2026-01-01T00-00-00_bad"
    os.makedirs(bad_dir / "checkpoints")
    os.symlink(os.path.join(run, "configs"), bad_dir / "configs")
    torch.save({"state_dict": sd, "extra": _Custom()}, bad_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(ValueError, match="--unsafe-load"):
        _sample(["-r", str(bad_dir), "-n", "1", "-c", "2", "-l", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    # Opting in loads it (the class is importable here).
    assert _sample(["-r", str(bad_dir), "-n", "1", "-c", "2", "-l", str(tmp_path / "o"), "--unsafe-load"]) == 0
    assert os.path.isfile(tmp_path / "o" / "images" / "000000.png")


def test_dpm_solver_sampler_through_script(runs, tmp_path):
    """--sampler dpmpp2m: deterministic across batch sizes, recorded in samples.json, differs from DDIM,
    and refuses eta (it has no step noise)."""
    run = runs["anatomical"]
    common = ["-r", run, "-c", "5", "--seed", "3", "--sampler", "dpmpp2m"]
    assert _sample([*common, "-n", "3", "--batch_size", "3", "-l", str(tmp_path / "a")]) == 0
    assert _sample([*common, "-n", "3", "--batch_size", "1", "-l", str(tmp_path / "b")]) == 0
    assert _digest(tmp_path / "a" / "images") == _digest(tmp_path / "b" / "images")
    manifest = json.load(open(tmp_path / "a" / "samples.json"))
    assert manifest["sampler"] == "dpmpp2m" and manifest["ddim_steps"] == 5
    _sample(["-r", run, "-c", "5", "--seed", "3", "-n", "3", "--batch_size", "3", "-l", str(tmp_path / "ddim")])
    assert _digest(tmp_path / "ddim" / "images") != _digest(tmp_path / "a" / "images")
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        _sample([*common, "-e", "0.5", "-n", "1", "-l", str(tmp_path / "c")])


def test_mask_from_reencoded_through_script(runs, tmp_path, capsys):
    """``--mask_from reencoded``: the same images, masks from the decoded samples encoded again (as
    ``mask_from: reencoded`` in the config would give), recorded in samples.json; refused for a plain LDM."""
    run = runs["anatomical"]
    common = ["-r", run, "-c", "3", "--seed", "3", "-n", "3", "--batch_size", "3", "--save_masks", "--format", "npz"]
    assert _sample([*common, "-l", str(tmp_path / "lat")]) == 0
    assert _sample([*common, "-l", str(tmp_path / "re"), "--mask_from", "reencoded"]) == 0
    pngs = lambda d: {k: v for k, v in _digest(d).items() if k.endswith(".png")}  # noqa: E731
    assert pngs(tmp_path / "lat" / "images") == pngs(tmp_path / "re" / "images")
    assert any(not np.array_equal(np.load(tmp_path / "lat" / "images" / f"{i:06d}.npz")["mask"],
                                  np.load(tmp_path / "re" / "images" / f"{i:06d}.npz")["mask"]) for i in range(3))
    from ldm.sampling import load_model_for_sampling

    model, _ = load_model_for_sampling(run, device=torch.device("cpu"))
    assert model.mask_from == "latents"  # the run's config: the head reads what it is given
    saved = [np.load(tmp_path / "re" / "images" / f"{i:06d}.npz") for i in range(3)]
    images = torch.stack([torch.from_numpy(z["image"]).float() for z in saved])[:, None]
    with torch.no_grad(), model.ema_scope():
        latent = model.scale_factor * model.encode_first_stage(images).mode()
        expected = model.predict_masks(latent, images.shape[-2:]).numpy()
    # the saved image is the decoded sample (float32 in the npz): the mask is the head on its encoding
    assert np.array_equal(np.stack([z["mask"] for z in saved]), expected)
    manifest = json.load(open(tmp_path / "re" / "samples.json"))
    assert manifest["mask_from"] == "reencoded" and manifest["sessions"][0]["mask_from"] == "reencoded"
    assert json.load(open(tmp_path / "lat" / "samples.json"))["mask_from"] == "latents"
    assert _sample(["-r", runs["baseline"], "-n", "1", "-c", "2", "-l", str(tmp_path / "x"),
                    "--mask_from", "reencoded"]) == 2
    assert "--mask_from needs an anatomical model" in capsys.readouterr().err
