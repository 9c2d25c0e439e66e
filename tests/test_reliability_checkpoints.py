"""Checkpoints of main.py runs written through ldm.training.checkpoint_io.AtomicCheckpointIO (issue 31): staged
beside their target (not in $TMPDIR), fsynced, renamed; a full disk (simulated: writes that raise ENOSPC after some
bytes) leaves no truncated checkpoint under any final name and last.ckpt the previous good one."""
from __future__ import annotations

import errno
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import main
from ldm import atomic_io
from ldm.atomic_io import TMP_PREFIX
from ldm.training.checkpoint_io import AtomicCheckpointIO, with_atomic_checkpoint_io

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
TOY = str(ROOT / "configs" / "tests" / "toy.yaml")
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from test_reliability_atomic import FullDisk  # noqa: E402


pytestmark = pytest.mark.usefixtures("main_process_state")  # tests/conftest.py


def _run_dir(logs: Path) -> Path:
    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    return run


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_a_full_disk_leaves_last_ckpt_the_previous_good_one_and_no_partial_file(tmp_path, monkeypatch, capsys):
    """Saves every step (last.ckpt) and top-k at each validation; from the 4th checkpoint write on the disk is full."""
    writes: list[str] = []
    real_open = atomic_io.open_staging

    def staging(path):
        if ".ckpt" not in path:  # configs, run.json
            return real_open(path)
        writes.append(path)
        return FullDisk(path, room=3000) if len(writes) >= 4 else real_open(path)

    monkeypatch.setattr(atomic_io, "open_staging", staging)
    logs = tmp_path / "logs"
    assert main.main(["--base", TOY, "-t", "-l", str(logs), "lightning.modelcheckpoint.params.every_n_train_steps=1",
                      "lightning.logger.target=pytorch_lightning.loggers.CSVLogger"]) == 1
    ckpts = _run_dir(logs) / "checkpoints"
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("main.py")]
    assert line.startswith(f"main.py: error: could not write {ckpts / 'last.ckpt'}: No space left on device")
    assert line.endswith(f"; {ckpts / 'last.ckpt'} of global step 3 is unchanged")
    assert all(os.path.dirname(p) == str(ckpts) for p in writes)  # staged in the checkpoints folder itself
    names = sorted(os.listdir(ckpts))
    assert not [n for n in names if n.startswith(TMP_PREFIX) or n.endswith(".tmp")], names
    for name in names:  # every file under a final name loads whole (before: a truncated top-k file stayed)
        torch.load(ckpts / name, map_location="cpu", weights_only=True)
    assert _step(ckpts / "last.ckpt") == 3 and "last-previous.ckpt" not in names


def test_checkpoints_are_not_staged_in_tmpdir(tmp_path, monkeypatch):
    """A $TMPDIR without room stopped every save (Lightning staged there through fsspec); it is not used now."""
    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (the $TMPDIR of this test)")

    monkeypatch.setattr(tempfile, "mkstemp", no_room)
    logs = tmp_path / "logs"
    assert main.main(["--base", TOY, "-t", "-l", str(logs), "--max_steps", "4",
                      "lightning.logger.target=pytorch_lightning.loggers.CSVLogger"]) == 0
    ckpts = _run_dir(logs) / "checkpoints"
    assert _step(ckpts / "last.ckpt") == 4
    assert [n for n in os.listdir(ckpts) if n.startswith("epoch=")]  # the top-k checkpoint was written too


def test_the_plugin_is_added_unless_a_checkpoint_io_is_given():
    mine = AtomicCheckpointIO()
    assert [type(p) for p in with_atomic_checkpoint_io(None)] == [AtomicCheckpointIO]
    assert with_atomic_checkpoint_io([mine]) == [mine]
    assert [type(p) for p in with_atomic_checkpoint_io("x")] == [str, AtomicCheckpointIO]
