"""One writer per output folder (ldm.folder_lock): a second process is refused naming the holder, the lock of a
killed process is taken over with a warning, exactly one of several racing processes wins, and two
scripts/sample.py sessions into one folder no longer interleave (issue 31)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from ldm import folder_lock
from ldm.folder_lock import FolderLock, FolderLockedError, check_unlocked, process_start_ticks, read_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}

# Waits for the file argv[2], takes the lock of folder argv[1], says "won" and holds it until a line on stdin.
CONTENDER = """
import os, sys, time
from ldm.folder_lock import FolderLock, FolderLockedError
folder, go = sys.argv[1], sys.argv[2]
while not os.path.exists(go):
    time.sleep(0.002)
try:
    lock = FolderLock(folder, purpose="sampling").acquire()
except FolderLockedError as err:
    print("refused", err, flush=True)
    sys.exit(3)
print("won", flush=True)
sys.stdin.readline()
lock.release()
"""


def contender(folder: Path, go: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder), str(go)], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> int:
    """Let a holder release and end (or reap an ended process); its exit status."""
    if proc.poll() is None:
        proc.communicate("\n", timeout=60)
    return proc.wait(timeout=60)


@contextlib.contextmanager
def holder(folder: Path) -> Iterator[subprocess.Popen]:
    """A second process holding ``folder``'s lock for the block."""
    proc = contender(folder, folder.parent)
    try:
        assert proc.stdout.readline().strip() == "won"
        yield proc
    finally:
        if proc.poll() is None:
            finish(proc)


def _write_record(folder: Path, **record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / folder_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000",
                                "purpose": "sampling", **record}))
    return path


# ------------------------------------------------------------------------------------------------ the lock
def test_a_second_process_is_refused_naming_the_folder_and_the_holder(tmp_path):
    out = tmp_path / "samples"
    with holder(out) as proc:
        record = read_lock(str(out / ".lock"))
        assert record["pid"] == proc.pid and record["host"] == socket.gethostname()
        with pytest.raises(FolderLockedError) as err:
            FolderLock(out, advice="sample into another folder").acquire()
        message = str(err.value)
        assert message.startswith(f"{out} is in use: its lock {out / '.lock'} is held by sampling (PID {proc.pid} ")
        assert record["started"] in message and "Wait for it to finish, or sample into another folder" in message
        with pytest.raises(FolderLockedError, match=f"PID {proc.pid} "):
            check_unlocked(out)  # the check without taking it
        assert read_lock(str(out / ".lock")) == record  # the refused attempt left the holder's lock alone
    assert proc.returncode == 0 and not (out / ".lock").exists()  # released by its holder
    with FolderLock(out) as lock:
        assert read_lock(lock.path)["pid"] == os.getpid()
    assert not (out / ".lock").exists()


def test_the_lock_of_a_killed_process_is_taken_over_with_one_warning(tmp_path, caplog):
    out = tmp_path / "samples"
    with holder(out) as proc:
        proc.kill()
        proc.wait(timeout=60)
    assert read_lock(str(out / ".lock"))["pid"] == proc.pid  # kill -9 left it behind
    check_unlocked(out)  # stale: not in use
    with caplog.at_level(logging.WARNING, logger="ldm.folder_lock"):
        with FolderLock(out) as lock:
            assert read_lock(lock.path)["pid"] == os.getpid()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"took over the stale lock of sampling (PID {proc.pid} " in warnings[0]
    assert not (out / ".lock").exists() and not (out / ".lock.takeover").exists()


@pytest.mark.skipif(process_start_ticks(os.getpid()) is None, reason="needs Linux /proc")
def test_a_reused_pid_is_stale_a_live_holder_is_not(tmp_path):
    ticks = process_start_ticks(os.getpid())
    out = tmp_path / "a"
    _write_record(out, pid=os.getpid(), pid_start=ticks)  # this very process: alive, so refused
    with pytest.raises(FolderLockedError, match=f"PID {os.getpid()} "):
        FolderLock(out).acquire()
    _write_record(out, pid=os.getpid(), pid_start=ticks + 1)  # that PID now belongs to a process started later
    assert FolderLock.is_stale(read_lock(str(out / ".lock")))
    with FolderLock(out) as lock:
        assert read_lock(lock.path)["pid_start"] == ticks


def test_another_hosts_lock_is_never_taken_over(tmp_path):
    out = tmp_path / "a"
    path = _write_record(out, pid=2 ** 30, host="node-17")  # a PID that runs nowhere here
    before = path.read_text()
    with pytest.raises(FolderLockedError) as err:
        FolderLock(out).acquire()
    assert "PID 1073741824 on node-17" in str(err.value)
    assert f"if nothing on node-17 writes into the folder any more, delete {path}" in str(err.value)
    assert path.read_text() == before


def test_released_on_ctrl_c_and_on_exceptions(tmp_path):
    out = tmp_path / "a"
    for exc in (KeyboardInterrupt, ValueError, OSError):
        with pytest.raises(exc):
            with FolderLock(out):
                assert (out / ".lock").is_file()
                raise exc("stop")
        assert not (out / ".lock").exists()


def test_a_damaged_lock_file_is_refused_naming_it(tmp_path, monkeypatch):
    out = tmp_path / "a"
    out.mkdir()
    path = out / ".lock"
    path.write_text("")  # its creator died between creating and writing it
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.raises(FolderLockedError, match=f"{path}, which holds no readable lock record.*delete {path}"):
        FolderLock(out).acquire()
    assert path.read_text() == ""
    # A young empty file is being written by its creator: acquire() waits for the record, then names the holder.
    path.write_text("")
    monkeypatch.setattr(folder_lock.time, "sleep", lambda s: _write_record(out, pid=os.getpid(),
                                                                           pid_start=process_start_ticks(os.getpid())))
    with pytest.raises(FolderLockedError, match=f"PID {os.getpid()} "):
        FolderLock(out).acquire()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_exactly_one_of_racing_processes_wins(tmp_path, stale):
    out, go = tmp_path / "samples", tmp_path / "go"
    out.mkdir()
    if stale:  # all of them find the same dead holder: only one may take it over
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _write_record(out, pid=dead.pid, pid_start=None)
    procs = [contender(out, go) for _ in range(5)]
    time.sleep(1.0)  # let them start and poll for the signal
    go.write_text("go")
    first = [p.stdout.readline().split(" ", 1) for p in procs]
    winners = [p for p, line in zip(procs, first) if line[0].strip() == "won"]
    assert len(winners) == 1, first
    refusals = [line[1] for line in first if line[0] == "refused"]
    assert len(refusals) == 4 and all(f"PID {winners[0].pid} " in r for r in refusals)
    assert read_lock(str(out / ".lock"))["pid"] == winners[0].pid
    assert sorted(finish(p) for p in procs) == [0, 3, 3, 3, 3]
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------- scripts/sample.py
# A real scripts/sample.py session that stops after each batch until it reads a line on stdin.
PAUSED_SAMPLE = """
import importlib.util, os, sys
import ldm.sampling
spec = importlib.util.spec_from_file_location("_sample", os.path.join(sys.argv[1], "scripts", "sample.py"))
sample = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample)
real = ldm.sampling.save_samples
def paused(*args, **kwargs):
    paths = real(*args, **kwargs)
    print("batch", flush=True)
    sys.stdin.readline()
    return paths
ldm.sampling.save_samples = paused
sys.exit(sample.main(sys.argv[2:]))
"""
COMMON = ["-c", "2", "--batch_size", "2", "--seed", "3", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import torch

    from test_sample_run import make_run

    torch.set_num_threads(1)
    return make_run(str(tmp_path_factory.mktemp("logs")), False, steps=1, name="lock")


def _images(out: Path) -> list[str]:
    return sorted(os.listdir(out / "images"))


def test_two_sample_py_sessions_into_one_folder(run, tmp_path, capsys):
    from ldm.util import run_script
    from test_sample_run import load_script

    sample = load_script("sample")
    out = tmp_path / "s"
    first = subprocess.Popen([sys.executable, "-c", PAUSED_SAMPLE, str(ROOT), "-r", run, "-n", "4", "-l", str(out),
                              *COMMON], cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "batch"  # it wrote samples 0 and 1 and holds the folder
        assert run_script(sample.main, ["-r", run, "-n", "4", "-l", str(out), *COMMON]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and f"error: {out} is in use: its lock {out / '.lock'} is held by sampling (PID " \
            f"{first.pid} " in err[0] and "sample into another folder (scripts/sample.py -l DIR)" in err[0]
        assert _images(out) == ["000000.png", "000001.png"]  # the second session wrote nothing
        first.communicate("\n\n", timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.wait(timeout=60) == 0
    manifest = json.loads((out / "samples.json").read_text())
    assert [(s["status"], s["start_index"], s["count"]) for s in manifest["sessions"]] == [("complete", 0, 4)]
    assert _images(out) == [f"{i:06d}.png" for i in range(4)] and manifest["num_samples"] == 4
    assert not (out / ".lock").exists()

    # Free again: the next session continues the numbering. A killed holder's lock is taken over.
    with holder(out) as proc:
        proc.kill()
        proc.wait(timeout=60)
    assert run_script(sample.main, ["-r", run, "-n", "2", "-l", str(out), *COMMON]) == 0
    manifest = json.loads((out / "samples.json").read_text())
    assert [(s["status"], s["start_index"], s["count"]) for s in manifest["sessions"]] == [("complete", 0, 4),
                                                                                          ("complete", 4, 2)]
    assert _images(out) == [f"{i:06d}.png" for i in range(6)] and not (out / ".lock").exists()
