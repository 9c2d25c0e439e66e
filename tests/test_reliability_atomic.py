"""ldm.atomic_io, the one writer of files that are read back (issue 31): staged beside the target, fsynced, checked,
renamed; a full disk (simulated: a write that raises ENOSPC after some bytes) or a writer that truncates a file
without a word leaves the previous file, no partial file, and one error naming the path and the reason."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
import torch

from ldm import atomic_io
from ldm.atomic_io import TMP_PREFIX, WriteError


class FullDisk:
    """A binary file whose writes fail with ENOSPC once ``room`` bytes are written (the bytes before it land)."""

    def __init__(self, path: str, room: int) -> None:
        self.f = open(path, "wb")
        self.room = room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def __getattr__(self, name: str):  # tell, seek, read, ...: the real file's
        return getattr(self.f, name)

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def full_disk(monkeypatch, room: int = 100, staged: list | None = None) -> None:
    def opener(path):
        if staged is not None:
            staged.append(path)
        return FullDisk(path, room)

    monkeypatch.setattr(atomic_io, "open_staging", opener)


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]


def test_a_full_disk_keeps_the_previous_json_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "split.json"
    atomic_io.write_json(str(path), {"series": [1]})
    staged: list[str] = []
    full_disk(monkeypatch, room=5, staged=staged)
    with pytest.raises(WriteError) as err:
        atomic_io.write_json(str(path), {"series": list(range(1000))})
    assert str(err.value).startswith(f"could not write {path}: No space left on device (")
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert json.loads(path.read_text()) == {"series": [1]}  # the previous file, whole
    assert _leftovers(tmp_path) == []
    assert [os.path.dirname(p) for p in staged] == [str(tmp_path)]  # staged beside the target, not in $TMPDIR


def test_torch_save_on_a_full_disk_reports_the_disk_not_its_runtime_error(tmp_path, monkeypatch):
    """torch.save turns the failed write into RuntimeError('unexpected pos ...'); the OSError is what is said."""
    path = tmp_path / "last.ckpt"
    full_disk(monkeypatch, room=2000)
    with pytest.raises(WriteError, match=rf"could not write {path}: No space left on device"):
        atomic_io.save_torch({"w": torch.zeros(10000)}, str(path))
    assert not path.exists() and _leftovers(tmp_path) == []


def test_a_nifti_writer_that_truncates_without_raising_is_caught(tmp_path):
    """SimpleITK's writer prints 'NWAD: wrote only 0 of N bytes' and returns: the file is read back first."""
    import nibabel as nib

    path = tmp_path / "vol.nii.gz"

    def truncating_writer(tmp: str) -> None:
        nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)), tmp)
        data = open(tmp, "rb").read()
        open(tmp, "wb").write(data[: len(data) // 2])

    with pytest.raises(WriteError, match=rf"could not write {path}: the written file is incomplete"):
        atomic_io.save_nifti_file(str(path), truncating_writer)
    assert not path.exists() and _leftovers(tmp_path) == []
    atomic_io.save_nifti_file(str(path), lambda tmp: nib.save(nib.Nifti1Image(np.zeros((2, 2, 2)), np.eye(4)), tmp))
    assert nib.load(str(path)).shape == (2, 2, 2)


def test_sample_files_go_through_the_helper(tmp_path, monkeypatch):
    """A sample folder's PNG, NPZ and samples.json writes meet the full disk too (no partial file, path named)."""
    from ldm import sample_io

    full_disk(monkeypatch, room=10)
    images = torch.zeros(1, 1, 8, 8)
    with pytest.raises(WriteError, match=r"could not write .*images/000000\.npz: No space left on device"):
        sample_io.save_samples(str(tmp_path), 0, images, formats=("png", "npz"))
    with pytest.raises(WriteError, match=r"samples\.json: No space left on device"):
        sample_io.begin_session(str(tmp_path), {"checkpoint": "c", "checkpoint_sha256": "0"}, {"id": "x"})
    assert _leftovers(tmp_path / "images") == [] and not (tmp_path / "samples.json").exists()


def test_an_interrupt_while_writing_is_re_raised_and_leaves_nothing(tmp_path):
    def interrupted(tmp: str) -> None:
        open(tmp, "wb").write(b"part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_io.atomic_write(str(tmp_path / "x.bin"), interrupted)
    assert os.listdir(tmp_path) == []
