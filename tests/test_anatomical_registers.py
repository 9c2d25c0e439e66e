"""Register bank, time-aware bank, spatial encoding and the register cross-attention (tiny, CPU)."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.anatomical_registers import (AnatomicalRegisterBank, SpatialPositionEncoding,
                                              TimestepAwareRegisterBank)


def test_register_bank_shapes_classes_and_normalisation():
    bank = AnatomicalRegisterBank(num_classes=3, num_registers_per_class=2, register_dim=16)
    assert bank.registers.shape == (3, 2, 16)
    tokens = bank(4)
    assert tokens.shape == (4, 6, 16) and tokens.dtype == torch.float32
    assert bank.token_classes.tolist() == [0, 0, 1, 1, 2, 2]
    # layer-normalised: zero mean, unit variance per token (LayerNorm affine at its identity init)
    assert torch.allclose(tokens.mean(-1), torch.zeros(4, 6), atol=1e-5)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(4, 6), atol=1e-3)
    # the same tokens for every sample of the static bank
    assert torch.equal(tokens[0], tokens[3])
    membership = bank.class_membership()
    assert membership.shape == (6, 3) and membership.sum(0).tolist() == [2.0, 2.0, 2.0]
    # token_classes is derived, not stored in checkpoints
    assert "token_classes" not in bank.state_dict() and "registers" in bank.state_dict()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=0, num_registers_per_class=2, register_dim=8), "num_classes"),
    (dict(num_classes=2, num_registers_per_class=0, register_dim=8), "num_registers_per_class"),
    (dict(num_classes=2, num_registers_per_class=2, register_dim=8, dropout=1.0), "dropout"),
])
def test_register_bank_rejects_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnatomicalRegisterBank(**kwargs)


def test_timestep_aware_bank_starts_equal_to_static_bank_then_depends_on_time():
    torch.manual_seed(0)
    static = AnatomicalRegisterBank(3, 2, 8)
    torch.manual_seed(0)
    timed = TimestepAwareRegisterBank(3, 2, 8, time_embed_dim=12)
    emb = torch.randn(5, 12)
    assert torch.allclose(timed(5, emb), static(5), atol=0)
    with torch.no_grad():
        timed.time_modulation[1].weight.normal_()
    out = timed(5, emb)
    assert out.shape == (5, 6, 8)
    assert (out[0] - out[1]).abs().max() > 1e-2  # different time embeddings -> different tokens
    with pytest.raises(ValueError, match="batch size"):
        timed(4, emb)


def test_timestep_aware_bank_gradients_reach_registers_and_modulation():
    bank = TimestepAwareRegisterBank(2, 3, 8, time_embed_dim=4)
    emb = torch.randn(2, 4)
    (bank(2, emb) * torch.randn(2, 6, 8)).sum().backward()
    assert bank.registers.grad is not None and bank.registers.grad.abs().sum() > 0
    # zero-initialised last layer: its weight gets a gradient even though its output starts at zero
    assert bank.time_modulation[1].weight.grad.abs().sum() > 0


def test_spatial_position_encoding_is_resolution_agnostic():
    enc = SpatialPositionEncoding(num_frequencies=3)
    assert enc.dim == 14
    c4 = enc(4, 4)
    c8 = enc(8, 8)
    assert c4.shape == (16, 14) and c8.shape == (64, 14)
    # coordinates span the same [-1, 1] square at every size
    assert torch.allclose(c4[:, :2].amin(0), torch.tensor([-0.75, -0.75]))
    assert torch.allclose(c8[:, :2].amax(0), torch.tensor([0.875, 0.875]))
    # the centre of the 2x2 block of fine pixels averages to the coarse pixel's coordinate
    fine = c8[:, :2].view(8, 8, 2)
    coarse = c4[:, :2].view(4, 4, 2)
    assert torch.allclose(fine.view(4, 2, 4, 2, 2).mean((1, 3)), coarse, atol=1e-6)
    # row-major: x varies fastest
    assert c4[1, 0] > c4[0, 0] and c4[1, 1] == c4[0, 1]
    # non-square grids work
    assert enc(3, 5).shape == (15, 14)
    with pytest.raises(ValueError):
        SpatialPositionEncoding(-1)


def test_bank_position_codes_follow_use_spatial_encoding():
    on = AnatomicalRegisterBank(2, 2, 8, use_spatial_encoding=True, num_frequencies=2)
    off = AnatomicalRegisterBank(2, 2, 8, use_spatial_encoding=False)
    assert on.position_dim == 10 and on.position_codes(4, 2).shape == (8, 10)
    assert off.position_dim is None and off.position_codes(4, 4) is None
