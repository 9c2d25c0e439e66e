"""scripts/sample.py and scripts/export.py (issue 31): unknown checkpoint keys are an error, no environment value
leaks into shared outputs, the same command after an interruption finishes the session to the count asked for,
and Ctrl-C or a full disk end with one line."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from ldm import atomic_io, sample_io, sampling
from ldm.checkpoints import CheckpointMismatchError
from test_reliability_atomic import FullDisk
from test_sample_robust import COMMON, _all_digests
from test_sample_run import load_script, make_run

SECRET = "LDM_RELIABILITY_SECRET"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    return make_run(str(tmp_path_factory.mktemp("logs")), True, steps=1, name="reliable")


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "s"
    assert load_script("sample").main(["-r", run, "-n", "5", "--batch_size", "2", "-l", str(out), *COMMON]) == 0
    return out


def _interrupt_after(monkeypatch, pngs: int, error: BaseException) -> None:
    real, calls = sample_io._save_png, []

    def save(path, array):
        calls.append(path)
        if len(calls) > pngs:
            raise error
        real(path, array)

    monkeypatch.setattr(sample_io, "_save_png", save)


# ----------------------------------------------------------------------------- resuming to the count asked for
def test_the_same_command_after_ctrl_c_finishes_the_session(run, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    args = ["-r", run, "-n", "5", "--batch_size", "2", "-l", str(out), *COMMON]
    sample = load_script("sample")
    _interrupt_after(monkeypatch, 7, KeyboardInterrupt())  # 3 PNGs a sample: 0, 1 whole, 2 without its image
    assert sample.cli(args) == 130
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"sample.py: interrupted (Ctrl-C); 2 complete samples are in {out} ") and \
        "Run the same command again to finish it" in line
    monkeypatch.undo()
    assert sample.main(args) == 0  # before: 5 more (7 or 8 in all); now the session's 5
    assert _all_digests(out) == _all_digests(reference)
    manifest = json.loads((out / "samples.json").read_text())
    first, second = manifest["sessions"]
    assert (first["status"], second["status"], second["resumes"]) == ("interrupted", "complete", first["id"])
    assert second["redone"] == [2] and (second["start_index"], second["count"]) == (3, 2)
    assert manifest["num_samples"] == 5
    assert sample.main([*args[:2], "-n", "1", *args[4:]]) == 0  # a finished folder: -n adds, as before
    assert json.loads((out / "samples.json").read_text())["num_samples"] == 6


def test_a_full_disk_is_one_line_naming_the_file_and_the_rerun_finishes(run, reference, tmp_path, monkeypatch,
                                                                       capsys):
    out = tmp_path / "s"
    args = ["-r", run, "-n", "5", "--batch_size", "2", "-l", str(out), *COMMON]
    sample = load_script("sample")
    real_open, count = atomic_io.open_staging, []

    def staging(path):
        count.append(path)
        return FullDisk(path, room=50) if len(count) == 9 else real_open(path)

    monkeypatch.setattr(atomic_io, "open_staging", staging)
    assert sample.cli(args) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    target = os.path.join(os.path.dirname(count[8]), os.path.basename(count[8]).split("-", 2)[2])  # .tmp-ID-NAME
    assert line.startswith(f"sample.py: error: could not write {target}: No space left on device")
    assert "Run the same command again to finish it" in line
    assert not [n for sub in ("images", "masks", "masks_colour") for n in os.listdir(out / sub)
                if n.startswith(atomic_io.TMP_PREFIX)]
    monkeypatch.undo()
    assert sample.main(args) == 0
    assert _all_digests(out) == _all_digests(reference)  # 5, not 5 + 5 (before: 75 instead of 64)


# ----------------------------------------------------------------------------- unknown keys
def test_unknown_keys_in_a_safetensors_file_are_an_error_naming_the_file(run, tmp_path):
    from safetensors.torch import save_file

    config = os.path.join(run, "configs", "2026-01-01T00-00-00-project.yaml")
    state = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), map_location="cpu",
                       weights_only=True)["state_dict"]
    path = tmp_path / "weights.safetensors"
    save_file({**state, "model.diffusion_model.extra_block.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointMismatchError, match=rf"checkpoint {path} has 1 keys this model does not have "
                                                      r"\(e\.g\. \['model\.diffusion_model\.extra_block\.weight'\]\)"):
        sampling.load_model_for_sampling(str(path), [config])
    # the EMA copy is one a config without EMA legitimately does not use
    no_ema = tmp_path / "no_ema.yaml"
    cfg = yaml.safe_load(open(config))
    cfg["model"]["params"]["use_ema"] = False
    no_ema.write_text(yaml.safe_dump(cfg))
    save_file(state, str(path))
    model, info = sampling.load_model_for_sampling(str(path), [str(no_ema)])
    assert not info["has_ema"]


# ----------------------------------------------------------------------------- no environment values shared
def test_environment_values_do_not_leak_into_samples_json_or_an_export(run, tmp_path, monkeypatch):
    monkeypatch.setenv(SECRET, "hunter2-token")
    extra = tmp_path / "env.yaml"
    extra.write_text(f"data:\n  params:\n    token: ${{oc.env:{SECRET}}}\n    note: ${{data.params.token}}/x\n")
    out = tmp_path / "s"
    assert load_script("sample").main(["-r", run, "-b", str(extra), "-n", "1", "-l", str(out), *COMMON]) == 0
    text = (out / "samples.json").read_text()
    assert "hunter2" not in text
    assert json.loads(text)["config"]["data"]["params"] == {"token": f"${{oc.env:{SECRET}}}",
                                                            "note": f"${{oc.env:{SECRET}}}/x"}
    export = tmp_path / "export"
    load_script("export").export_run(run, str(export), [str(extra)])
    written = (export / "config.yaml").read_text()
    assert "hunter2" not in written and f"${{oc.env:{SECRET}}}" in written
    monkeypatch.delenv(SECRET)  # the export samples where the variable is not set
    assert load_script("sample").main(["-r", str(export), "-n", "1", "-l", str(tmp_path / "e"), *COMMON]) == 0
