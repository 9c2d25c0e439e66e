"""ldm.checkpoints: the one reader/loader/run finder used by the models, scripts/sample.py and main.py -r."""
from __future__ import annotations

import pytest
import torch

from ldm.checkpoints import CheckpointMismatchError, UnsafeCheckpointError, load_weights, locate_run, read_state_dict


class _Pickled:
    """An object that only full unpickling can restore."""


def test_unsafe_checkpoint_is_told_apart_by_exception_type(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_UNSAFE_LOAD", raising=False)
    unsafe, corrupt = tmp_path / "unsafe.ckpt", tmp_path / "corrupt.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": _Pickled()}, unsafe)
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(UnsafeCheckpointError, match="--unsafe-load"):
        read_state_dict(str(unsafe))
    with pytest.raises(ValueError, match="could not read checkpoint") as err:
        read_state_dict(str(corrupt))
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert list(read_state_dict(str(unsafe), weights_only=False)) == ["w"]


def test_load_weights_rules():
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    sd = src.state_dict()
    with pytest.raises(CheckpointMismatchError, match="lacks 1 weights"):
        load_weights(dst, {"weight": sd["weight"]}, required=lambda key: key == "bias", source="x.ckpt")
    with pytest.raises(CheckpointMismatchError, match="does not have"):
        load_weights(dst, {**sd, "extra": torch.zeros(1)})
    missing, unexpected = load_weights(dst, {**sd, "extra": torch.zeros(1)}, allow_unexpected=True)
    assert missing == [] and unexpected == ["extra"] and torch.equal(dst.weight, src.weight)
    with pytest.raises(RuntimeError, match="other shapes"):  # a ValueError and a RuntimeError
        load_weights(dst, {"weight": torch.zeros(3, 2)})
    # strict: every key both ways, as load_state_dict(strict=True), and nothing loaded on a mismatch
    before = dst.weight.detach().clone()
    with pytest.raises(CheckpointMismatchError, match="lacks 1 weights"):
        load_weights(dst, {"weight": torch.ones(2, 2)}, strict=True)
    with pytest.raises(CheckpointMismatchError, match="does not have"):
        load_weights(dst, {**sd, "extra": torch.zeros(1)}, allow_unexpected=True, strict=True)
    assert torch.equal(dst.weight, before)
    assert load_weights(dst, torch.nn.Linear(2, 2).state_dict(), strict=True) == ([], [])


def test_locate_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "steps").mkdir(parents=True)
    (run / "configs").mkdir()
    nested = run / "checkpoints" / "steps" / "s.ckpt"
    nested.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="checkpoints/last.ckpt does not exist.*s.ckpt"):
        locate_run(str(run))
    (run / "checkpoints" / "last.safetensors").write_bytes(b"x")
    assert locate_run(str(run)) == (str(run / "checkpoints" / "last.safetensors"), str(run))
    assert locate_run(str(nested)) == (str(nested), str(run))
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"x")
    assert locate_run(str(loose)) == (str(loose), None)
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        locate_run(str(tmp_path / "absent"))
