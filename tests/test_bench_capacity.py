"""bench/capacity.py: the capacity-matched plain baseline, training FLOPs per sample, equal-FLOPs step counts, CLI."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import capacity  # noqa: E402
from ldm.models.diffusion.anatomical_ddpm import AnatomicalLatentDiffusion  # noqa: E402
from ldm.models.diffusion.ddpm import LatentDiffusion  # noqa: E402

TOL = 0.05


@pytest.fixture(scope="module")
def quick10(tmp_path_factory):
    """The CLI at the quick preset with 10 classes (in this process: its counts serve the other tests too), and
    the plain and 10-class anatomical arm configs."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("capacity") / "capacity.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = capacity.main(["--preset", "quick", "--num-classes", "10", "--json", str(path)])
    torch.set_num_threads(1)
    plain_cfg, anat_cfg = capacity.arm_configs("quick", 10)
    return {"result": result, "stdout": out.getvalue(), "json": path, "plain_cfg": plain_cfg, "anat_cfg": anat_cfg,
            "plain": result["arms"]["plain"], "anat": result["arms"]["anatomical"],
            "matched_cfg": result["matched_config"], "info": result["matched_search"]}


def _ratios(a: dict, b: dict) -> tuple[float, float]:
    return a["params"] / b["params"], a["train_flops_per_sample"] / b["train_flops_per_sample"]


def test_ten_class_arm_builds_and_drops_the_six_class_label_set(quick10):
    cfg = quick10["anat_cfg"]
    assert cfg["params"]["unet_config"]["params"]["num_anatomical_classes"] == 10
    assert cfg["params"]["label_set"] is None  # ctorgan has 6 classes; the model would refuse it with 10
    six = capacity.set_num_classes(cfg, 6)
    assert six["params"]["unet_config"]["params"]["num_anatomical_classes"] == 6
    model = capacity.build_model(cfg)
    assert isinstance(model, AnatomicalLatentDiffusion) and model.num_anatomical_classes == 10
    assert model.unet.register_bank is not None
    # the 10-class arm has more parameters than a 6-class one (more registers)
    _, anat6 = capacity.arm_configs("quick", 6)
    assert anat6["params"]["label_set"] == "ctorgan"
    six_count = capacity.training_flops_per_sample(anat6, batch=1, include_encode=False)
    assert six_count["params"] < quick10["anat"]["params"]
    # the first-stage checkpoint path is stripped, whatever it was
    cfg_with_ckpt = {**cfg, "params": {**cfg["params"], "first_stage_config": {
        **cfg["params"]["first_stage_config"],
        "params": {**cfg["params"]["first_stage_config"]["params"], "ckpt_path": "/nonexistent/ae.ckpt"}}}}
    assert "ckpt_path" not in capacity.buildable(cfg_with_ckpt)["params"]["first_stage_config"]["params"]


def test_matched_config_within_tolerance_and_plain_is_not(quick10):
    plain, anat, info = quick10["plain"], quick10["anat"], quick10["info"]
    matched = capacity.training_flops_per_sample(quick10["matched_cfg"], batch=2)  # counted again, independently
    mp, mf = _ratios(matched, anat)
    assert abs(mp - 1) <= TOL, f"matched params ratio {mp:.3f}"
    assert abs(mf - 1) <= TOL, f"matched training FLOPs ratio {mf:.3f}"
    assert (mp, mf) == pytest.approx((info["params_ratio"], info["flops_ratio"]), rel=1e-9)
    pp, pf = _ratios(plain, anat)
    # the gap the audit found: the plain arm has a fraction of the anatomical arm's capacity
    assert abs(pp - 1) > TOL and abs(pf - 1) > TOL, f"plain/anatomical: params {pp:.3f}, FLOPs {pf:.3f}"
    assert pp < 0.5 and pf < 0.5, f"plain/anatomical: params {pp:.3f}, FLOPs {pf:.3f}"
    # a plain LatentDiffusion + UNetModel, and only UNet parameters of the searched kinds changed
    cfg, plain_cfg = quick10["matched_cfg"], quick10["plain_cfg"]
    assert cfg["target"] == capacity.PLAIN_LDM_TARGET
    assert cfg["params"]["unet_config"]["target"] == capacity.PLAIN_UNET_TARGET
    assert {k: v for k, v in cfg["params"].items() if k != "unet_config"} == \
        {k: v for k, v in plain_cfg["params"].items() if k != "unet_config"}
    before, after = plain_cfg["params"]["unet_config"]["params"], cfg["params"]["unet_config"]["params"]
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and changed <= set(capacity.SEARCHED_UNET_KEYS), changed
    assert capacity.with_unet(plain_cfg, info["grid_point"]) == cfg
    for key, value in info["grid_point"].items():
        assert after.get(key, -1 if key == "num_head_channels" else False) == value
    assert all((after["model_channels"] * m) % 32 == 0 for m in after["channel_mult"])


def test_matched_config_trains_one_step_as_plain_ldm(quick10):
    model = capacity.build_model(quick10["matched_cfg"])
    assert type(model) is LatentDiffusion
    size = model.first_stage_model.encoder.resolution
    batch = {"image": torch.rand(2, size, size, 1) * 2 - 1}
    opt = torch.optim.AdamW([p for p in model.model.parameters() if p.requires_grad], lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    loss, _ = model.shared_step(batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.first_stage_model.parameters())  # frozen first stage
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.model.named_parameters())


def test_equal_flops_steps():
    assert capacity.equal_flops_steps(1000, 2e9, 1e9) == 2000  # a half-cost arm gets twice the steps
    assert capacity.equal_flops_steps(1000, 1e9, 3e9) == 333
    assert capacity.equal_flops_steps(1000, 1.0, 1.0) == 1000
    assert capacity.equal_flops_steps(5, 1.0, 2.0) == 3  # 2.5 rounds half up (Python's round would give 2)
    assert capacity.equal_flops_steps(12, 0.4440, 0.0919) == 58
    assert capacity.equal_flops_steps(1, 1.0, 1000.0) == 1  # at least one step
    for bad in ((10, 0.0, 1.0), (10, 1.0, 0.0), (10, float("nan"), 1.0), (-1, 1.0, 1.0)):
        with pytest.raises(ValueError):
            capacity.equal_flops_steps(*bad)


def test_flops_per_sample_do_not_depend_on_batch(quick10):
    for name in ("plain", "anat"):
        cfg = quick10[name + "_cfg"]
        one = capacity.training_flops_per_sample(cfg, batch=1)
        two = capacity.training_flops_per_sample(cfg, batch=2)
        three = capacity.training_flops_per_sample(cfg, batch=3, include_encode=False)
        assert two["params"] == one["params"] == quick10[name]["params"]
        assert two["train_flops_per_sample"] == quick10[name]["train_flops_per_sample"]  # deterministic
        for key in ("train_flops_per_sample", "encode_flops_per_sample"):
            assert one[key] > 0
            assert two[key] == pytest.approx(one[key], rel=0.01), (name, key, one[key], two[key])
        for key in ("train_flops_per_sample", "sample_step_flops_per_sample"):
            totals = [r[key] * r["batch"] for r in (one, two, three)]
            per_sample = totals[2] - totals[1]
            assert totals[1] - totals[0] == pytest.approx(per_sample, rel=1e-9), (name, key, totals)  # affine
            per_call = totals[0] - per_sample  # batch-independent FLOPs of one call
            if name == "plain":
                assert per_call == pytest.approx(0, abs=1e-6 * per_sample), (key, per_call)
            else:  # the register cross-attention projects its position codes once per call, for the whole batch
                assert 0 <= per_call < 0.03 * per_sample, (key, per_call, per_sample)
        # one training sample (forward + backward) costs more than one sampling step (forward)
        assert one["train_flops_per_sample"] > 2 * one["sample_step_flops_per_sample"]
    # the same frozen encoder for both arms, counted apart from the training FLOPs
    assert quick10["plain"]["encode_flops_per_sample"] == quick10["anat"]["encode_flops_per_sample"]


def test_per_level_parameter_count_equals_real_builds(quick10):
    """The search counts a point's parameters from one build per structure minus attention levels: check it."""
    plain_cfg = quick10["plain_cfg"]
    base = plain_cfg["params"]["unet_config"]["params"]
    points = [p for i, p in enumerate(capacity.search_grid(base)) if i % 37 == 0]
    points += [p for i, p in enumerate(capacity.search_grid(base, resblock_updown=True)) if i % 53 == 0]
    checked = 0
    for point in points:
        if not capacity._valid_heads(point, int(base["num_heads"])):
            continue
        structure = {k: v for k, v in point.items() if k not in ("attention_resolutions", "num_head_channels")}
        total, by_level = capacity._structure_params(plain_cfg, structure)
        derived = total - sum(n for ds, n in by_level.items() if ds not in point["attention_resolutions"])
        assert derived == capacity.unet_trainable_params(capacity.with_unet(plain_cfg, point)), point
        checked += 1
    assert checked >= 5


def test_no_match_raises_with_closest_point(quick10):
    with pytest.raises(ValueError, match="closest"):
        capacity.capacity_matched_config(quick10["plain_cfg"], quick10["anat_cfg"], tol=1e-6, target=quick10["anat"],
                                         flops_budget=1)
    with pytest.raises(ValueError, match="UNetModel"):  # the plain config must be a plain UNet
        capacity.capacity_matched_config(quick10["anat_cfg"], quick10["anat_cfg"], target=quick10["anat"])


def test_cli_quick_writes_json(quick10):
    lines = quick10["stdout"].splitlines()
    for arm in ("plain", "matched", "anatomical"):
        assert any(line.startswith(arm + " ") for line in lines), quick10["stdout"]
    assert any(line.startswith("capacity-matched UNet") for line in lines)
    record = json.loads(quick10["json"].read_text())
    assert record["benchmark"] == "capacity" and record["preset"] == "quick" and record["num_classes"] == 10
    arms = record["arms"]
    assert set(arms) == {"plain", "matched", "anatomical"}
    ratio = arms["matched"]["ratio_to_anatomical"]
    assert abs(ratio["params"] - 1) <= TOL and abs(ratio["train_flops_per_sample"] - 1) <= TOL
    assert arms["anatomical"]["ratio_to_plain"]["params"] > 1 + TOL
    assert arms["anatomical"]["ratio_to_plain"]["train_flops_per_sample"] > 1 + TOL
    assert arms["anatomical"]["equal_flops_steps_vs_anatomical"] == record["preset_steps"]
    assert arms["plain"]["equal_flops_steps_vs_anatomical"] == capacity.equal_flops_steps(
        record["preset_steps"], arms["anatomical"]["train_flops_per_sample"], arms["plain"]["train_flops_per_sample"])
    assert record["matched_config"]["params"]["unet_config"]["target"] == capacity.PLAIN_UNET_TARGET
    assert record["matched_config"] == quick10["matched_cfg"]


def test_a_mask_conditioned_arm_is_counted_with_its_condition_encoder():
    import anatomy_v2 as v2

    preset = v2.PRESETS_V2["quick"]
    plain = capacity.training_flops_per_sample(v2.arm_config("plain", preset, None, 1.0), include_encode=False)
    cond = capacity.training_flops_per_sample(v2.arm_config("plain_labelmap", preset, None, 1.0),
                                              include_encode=False)
    assert cond["params"] > plain["params"]
    # the encoder's convolutions run in the training loss and in every sampling step
    assert cond["train_flops_per_sample"] > 1.01 * plain["train_flops_per_sample"]
    assert cond["sample_step_flops_per_sample"] > 1.01 * plain["sample_step_flops_per_sample"]
