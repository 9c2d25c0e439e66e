"""scripts/prepare_dicom.py on a full disk (issue 31): SimpleITK's writer only prints an error and leaves a truncated
.nii.gz; each volume is read back before it counts, the run stops with one line naming the file, nothing is left
under a final name, and the rerun after a failed run (a 0-byte or cut-off split.json) converts again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm import atomic_io
from ldm.atomic_io import WriteError
from test_dicom import _load_script, _volume, write_series  # noqa: E402


def _args(src: Path, out: Path) -> list[str]:
    return [str(src), str(out), "--val-fraction", "0", "--test-fraction", "0"]


def _series(tmp_path: Path) -> Path:
    src = tmp_path / "dicom"
    write_series(src / "P0" / "ct", "P0", _volume(0))
    write_series(src / "P1" / "ct", "P1", _volume(1))
    return src


def _truncating_writer(monkeypatch, nth: int) -> None:
    """SimpleITK.WriteImage as on a full disk from its ``nth`` call on: the file is cut short, nothing is raised."""
    import SimpleITK as sitk

    real, calls = sitk.WriteImage, []

    def write(image, path, *args, **kwargs):
        calls.append(path)
        real(image, path, *args, **kwargs)
        if len(calls) >= nth:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 3])
            print("ERROR: NWAD: wrote only 0 of 1 bytes")  # what SimpleITK says, and it returns

    monkeypatch.setattr(sitk, "WriteImage", write)


def test_a_silently_truncated_volume_stops_the_run_naming_it(tmp_path, monkeypatch, capsys):
    src, out = _series(tmp_path), tmp_path / "out"
    prepare = _load_script("prepare_dicom")
    _truncating_writer(monkeypatch, nth=2)
    with pytest.raises(WriteError, match=r"could not write .*/\.partial/train/images/P1/1_axial\.nii\.gz: the written "
                                         r"file is incomplete"):
        prepare.main(_args(src, out))
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # no volume, no split.json
    _truncating_writer(monkeypatch, nth=1)
    capsys.readouterr()
    assert atomic_io.run_script_reporting_writes(prepare.main, _args(src, out)) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert "error: could not write " in line and "1_axial.nii.gz: the written file is incomplete" in line
    monkeypatch.undo()
    prepare.main(_args(src, out))  # space freed: the rerun converts
    assert len(json.loads((out / "split.json").read_text())["series"]) == 2


@pytest.mark.parametrize("left", [b"", b'{"series": [{"patient": "P0"'])
def test_the_rerun_after_a_failed_run_is_not_refused_by_its_split_json(tmp_path, left):
    src, out = _series(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "split.json").write_bytes(left)  # what a full disk left before split.json was written atomically
    prepare = _load_script("prepare_dicom")
    prepare.main(_args(src, out))
    record = json.loads((out / "split.json").read_text())
    assert len(record["series"]) == 2 and record["splits"]["train"] == ["P0", "P1"]
    with pytest.raises(ValueError, match="split.json exists: prepare into a new"):  # a complete one still counts
        prepare.main(_args(src, out))
