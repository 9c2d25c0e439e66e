"""LitEma: CompVis key naming, update rule with warm-up, store/copy_to/restore."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.ema import LitEma


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 2)))
    net.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    return net


def test_key_naming():
    ema = LitEma(_net())
    keys = list(ema.state_dict())
    assert keys == ["decay", "num_updates", "0weight", "0bias", "10weight", "10bias"]
    assert ema.decay.dtype == torch.float32 and float(ema.decay) == pytest.approx(0.9999)
    assert ema.num_updates.dtype == torch.int32 and int(ema.num_updates) == 0
    assert ema.m_name2s_name["1.0.weight"] == "10weight"


def test_update_rule_with_warmup():
    net = _net()
    ema = LitEma(net, decay=0.9)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema(net)  # first update: decay = min(0.9, 2/11)
    d1 = 2.0 / 11.0
    assert torch.allclose(ema.get_buffer("0weight"), start + (1 - d1) * 1.0, atol=1e-6)
    assert int(ema.num_updates) == 1
    ema(net)  # second update: decay = min(0.9, 3/12)
    d2 = 3.0 / 12.0
    expected = (start + (1 - d1)) * d2 + (start + 1.0) * (1 - d2)
    assert torch.allclose(ema.get_buffer("0weight"), expected, atol=1e-6)
    assert not torch.allclose(ema.get_buffer("0weight"), net[0].weight)


def test_no_num_updates_uses_fixed_decay():
    net = _net()
    ema = LitEma(net, decay=0.5, use_num_upates=False)
    start = net[0].bias.detach().clone()
    with torch.no_grad():
        net[0].bias.add_(2.0)
    ema(net)
    assert int(ema.num_updates) == -1
    assert torch.allclose(ema.get_buffer("0bias"), start + 1.0, atol=1e-6)


def test_store_copy_restore_round_trip():
    net = _net()
    ema = LitEma(net, decay=0.0, use_num_upates=False)  # decay 0: shadow follows the model exactly
    with torch.no_grad():
        net[0].weight.fill_(3.0)
    ema(net)
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
    live = [p.detach().clone() for p in net.parameters()]
    ema.store(net.parameters())
    ema.copy_to(net)
    assert torch.all(net[0].weight == 3.0)
    assert torch.all(net.frozen == 1.0)  # untracked parameter untouched
    ema.restore(net.parameters())
    for before, p in zip(live, net.parameters()):
        assert torch.equal(before, p)
    assert torch.all(net[0].weight == -1.0)


def test_restore_without_store_raises():
    net = _net()
    ema = LitEma(net)
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(net.parameters())


def test_bad_decay_raises():
    with pytest.raises(ValueError, match="decay"):
        LitEma(_net(), decay=1.5)
