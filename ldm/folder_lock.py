"""One writer per output folder: an exclusive lock file beside the outputs.

A process that writes into a folder (:func:`ldm.sampling.generate`, so ``scripts/sample.py``) holds
``<folder>/.lock`` while it writes::

    with FolderLock(out_dir, purpose="sampling"):
        ...  # write into out_dir

The lock file is created atomically (``os.open`` with ``O_CREAT | O_EXCL``: of two processes exactly one creates
it) and holds the holder's PID, host, start time, purpose and command line as JSON. A second process pointing at
the folder stops at once with :class:`FolderLockedError` (a ``ValueError``: one line from the scripts) naming the
folder, the holder and what to do. The lock is released when the ``with`` block ends, also on Ctrl-C and on an
exception.

A lock left by a process that died without releasing it (``kill -9``, a crash of the machine) is stale when it was
taken on this host and its PID no longer runs, or now belongs to a process started later than the holder (a reused
PID; Linux ``/proc``): it is taken over with one warning. A lock taken on another host is never taken over, since
its process cannot be seen from here: the error says to delete the file once nothing there writes into the folder.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import uuid
from typing import Any, Optional

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
TAKEOVER_SUFFIX = ".takeover"
TAKEOVER_TIMEOUT_S = 30.0  # a takeover guard older than this was left by a process that died while taking over
WRITE_GRACE_S = 5.0  # a lock file younger than this may still be being written by the process that created it
ACQUIRE_TIMEOUT_S = 10.0  # how long acquire() waits out another process's takeover or half-written lock file


class FolderLockedError(ValueError):
    """Another process holds the folder's lock (or its lock file cannot be read); nothing was written."""


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """``(state, start time in clock ticks since boot)`` of ``pid`` from Linux ``/proc/<pid>/stat``; None where it
    cannot be read (no such process, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 (state) onwards
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> Optional[int]:
    """Start time of process ``pid`` (clock ticks since boot, Linux); None where unknown."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def pid_alive(pid: int, start_ticks: Optional[int] = None) -> bool:
    """Whether process ``pid`` runs on this host; with ``start_ticks`` (from :func:`process_start_ticks`) also that it
    is the process that started then, not a later one that reuses the number. A zombie counts as ended."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc (macOS): os.kill is all there is
    state, ticks = stat
    return state != "Z" and (start_ticks is None or ticks == start_ticks)


def read_lock(path: str) -> Optional[dict[str, Any]]:
    """The record in lock file ``path``; None when it does not exist or holds no lock record (empty, being written,
    damaged)."""
    try:
        with open(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def describe_holder(record: dict[str, Any]) -> str:
    """``"sampling (PID 123 on host, started 2026-01-01T10:00:00+0000; sample.py -r ...)"``."""
    command = f"; {record['command']}" if record.get("command") else ""
    return (f"{record.get('purpose') or 'a process'} (PID {record.get('pid')} on {record.get('host')}, started "
            f"{record.get('started')}{command})")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class FolderLock:
    """The exclusive lock of one folder (``<folder>/.lock``), for one ``with`` block at a time.

    Args:
        folder: the folder to lock; created if missing.
        purpose: what the holder does there, shown to a process that finds the folder locked ("sampling").
        advice: what that process can do instead of waiting, appended to the error ("sample into another folder").
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "writing",
                 advice: str = "write into another folder") -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.purpose = purpose
        self.advice = advice
        self._token: Optional[str] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._token is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ acquire
    def acquire(self) -> "FolderLock":
        """Take the lock, or raise :class:`FolderLockedError` naming the holder. A stale lock (its process is gone,
        on this host) is taken over with a warning."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        os.makedirs(self.folder, exist_ok=True)
        deadline = time.monotonic() + ACQUIRE_TIMEOUT_S
        while True:
            if self._create():
                return self
            holder = read_lock(self.path)
            if holder is None:
                self._unreadable(deadline)
            elif not self.is_stale(holder):
                raise FolderLockedError(self._locked_message(holder))
            elif self._take_over(holder):
                continue
            if time.monotonic() > deadline:
                raise FolderLockedError(f"{self.folder}: could not take its lock {self.path} within "
                                        f"{ACQUIRE_TIMEOUT_S:g} s (other processes keep taking it over); try again")
            time.sleep(0.05)

    def _record(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pid_start": process_start_ticks(os.getpid()), "purpose": self.purpose,
                "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300],
                "token": uuid.uuid4().hex}

    def _create(self) -> bool:
        """Create the lock file with this process's record; False when it exists already."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        record = self._record()
        try:
            os.write(fd, json.dumps(record).encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.remove(self.path)
            raise
        os.close(fd)
        self._token = record["token"]
        return True

    @staticmethod
    def is_stale(holder: dict[str, Any]) -> bool:
        """Whether the lock record ``holder`` was left by a process that no longer runs (this host only)."""
        if holder.get("host") != socket.gethostname():
            return False
        start = holder.get("pid_start")
        return not pid_alive(int(holder["pid"]), start if isinstance(start, int) else None)

    def _unreadable(self, deadline: float) -> None:
        """A lock file without a record: being written (wait), gone (retry) or damaged (refuse, naming it)."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return  # released meanwhile
        if age < WRITE_GRACE_S and time.monotonic() < deadline:
            return  # its creator is writing it: look again
        raise FolderLockedError(f"{self.folder} is locked by {self.path}, which holds no readable lock record (a "
                                "process may have died while creating it): if no process writes into "
                                f"{self.folder}, delete {self.path} and try again; or {self.advice}")

    def _take_over(self, holder: dict[str, Any]) -> bool:
        """Remove the stale lock ``holder`` unless another process is taking it over now; True when it is gone.

        A guard file (``O_EXCL`` too) lets one process at a time decide, so two processes that both found the same
        stale lock cannot both remove it and then remove each other's new lock."""
        guard = self.path + TAKEOVER_SUFFIX
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(guard) > TAKEOVER_TIMEOUT_S:
                    _remove_quietly(guard)  # left by a process that died while taking over
            except FileNotFoundError:
                pass
            return False
        try:
            if read_lock(self.path) != holder:
                return True  # changed meanwhile: look at it again
            _remove_quietly(self.path)
        finally:
            _remove_quietly(guard)
        logger.warning("%s: took over the stale lock of %s, which no longer runs (it was killed or crashed "
                       "without releasing it)", self.folder, describe_holder(holder))
        return True

    def _locked_message(self, holder: dict[str, Any]) -> str:
        text = f"{self.folder} is in use: its lock {self.path} is held by {describe_holder(holder)}. "
        if holder.get("host") == socket.gethostname():
            return text + f"Wait for it to finish, or {self.advice}."
        return text + (f"That host's processes cannot be checked from here: wait for it to finish, or {self.advice};"
                       f" if nothing on {holder.get('host')} writes into the folder any more, delete {self.path}.")

    # ------------------------------------------------------------------------------------------ release
    def release(self) -> None:
        """Remove the lock file if it is still this lock's (nothing when not held)."""
        if self._token is None:
            return
        token, self._token = self._token, None
        holder = read_lock(self.path)
        if holder is None or holder.get("token") != token:
            logger.warning("%s: at release the lock was no longer this process's (removed by hand, or taken over by "
                           "another process); left as it is", self.path)
            return
        os.remove(self.path)


def check_unlocked(folder: str | os.PathLike, advice: str = "write into another folder") -> None:
    """Raise :class:`FolderLockedError` when a live process holds ``folder``'s lock, without taking it: for a
    command line that checks its output folder before the slow work (loading a model) that precedes writing."""
    path = os.path.join(os.fspath(folder), LOCK_NAME)
    holder = read_lock(path)
    if holder is not None and not FolderLock.is_stale(holder):
        raise FolderLockedError(FolderLock(folder, advice=advice)._locked_message(holder))
