"""LR multipliers of ldm.lr_scheduler at chosen steps (CompVis formulas)."""
from __future__ import annotations

import math

import pytest
import torch

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def test_warmup_cosine_values():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(0) == pytest.approx(0.0)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))  # half way: 0.55
    assert s(60) == pytest.approx(0.55)
    assert s(110) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)


def test_warmup_cosine2_cycles():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[10, 0], f_min=[0.0, 0.5], f_max=[1.0, 1.0],
                                     f_start=[0.0, 1.0], cycle_lengths=[20, 100])
    assert s(5) == pytest.approx(0.5)
    assert s(15) == pytest.approx(0.5)  # cosine half way between f_max 1 and f_min 0
    assert s(20) == pytest.approx(0.0)
    assert s(21) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 100)))
    assert s(120) == pytest.approx(0.5)
    assert s(10_000) == pytest.approx(0.5)  # past the last cycle stays at its end


def test_linear_scheduler_compvis_config():
    # the LambdaLinearScheduler of the CompVis LDM configs: warm-up from 1e-6 to 1 over 10k steps, then flat
    s = LambdaLinearScheduler(warm_up_steps=[10000], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                              cycle_lengths=[10000000000000])
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert s(10000) == pytest.approx(1.0)
    assert s(123456) == pytest.approx(1.0)


def test_linear_scheduler_decay():
    s = LambdaLinearScheduler(warm_up_steps=[10], f_min=[0.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[100])
    assert s(50) == pytest.approx(0.5)  # f_min + (f_max - f_min) * (100 - 50) / 100
    assert s(100) == pytest.approx(0.0)


def test_lambda_lr_uses_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    s = LambdaLinearScheduler(warm_up_steps=[4], f_min=[1.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[100])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s.schedule)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_bad_lists_raise():
    with pytest.raises(ValueError, match="equal length"):
        LambdaLinearScheduler(warm_up_steps=[1, 2], f_min=[1.0], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0, lr_max=1, lr_start=0, max_decay_steps=5)
