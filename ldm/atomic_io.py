"""The one way this project writes a file that something reads back: staged beside its target, checked, renamed.

:func:`atomic_write` runs a writer on a hidden temporary name in the target's own folder (``.tmp-<id>-<name>``, the
same extension, so writers that choose the format by extension still do), flushes and fsyncs it, checks the result
(never empty; a ``verify`` function where the format allows a cheap check) and only then renames it over the target
with ``os.replace``, which is atomic because both names are on one filesystem. A file that exists under its final
name is therefore whole; a failed write leaves the previous file (or none) and no partial file, and raises
:class:`WriteError` (an ``OSError``) with one line naming the path and the reason, e.g. ``could not write
out/split.json: No space left on device (12 KiB free in out)``.

Some writers hide the reason: ``torch.save`` turns a failed ``write`` into a ``RuntimeError`` ("unexpected pos"),
and SimpleITK's ``WriteImage`` only prints an error and returns with a truncated file. Writers given a stream
(:func:`atomic_write_stream`: JSON, text, ``torch.save``) get a file object that remembers the ``OSError`` of the
write that failed, so that error is the one reported; a file that a writer truncated without a word is caught by
the checks (:func:`verify_nifti` reads a NIfTI's header and decompresses it to the end, :func:`verify_torch_zip`
reads a checkpoint's zip directory, :func:`verify_json` parses it again).

Entry points: :func:`atomic_write` (the writer takes the temporary path), :func:`atomic_write_stream` (it takes a
binary file object), :func:`write_bytes`, :func:`write_text`, :func:`write_json`, :func:`save_torch`,
:func:`save_nifti_file`; :func:`remove_staging_files` deletes what a killed process left.
"""
from __future__ import annotations

import errno as errno_codes
import functools
import gzip
import json
import os
import uuid
from typing import Any, BinaryIO, Callable, Optional

TMP_PREFIX = ".tmp-"


class WriteError(OSError):
    """A file could not be written (full disk, no permission, a writer that failed or truncated it); the target is
    unchanged and no partial file remains. ``filename`` is the target, ``errno`` the cause's when it had one."""

    def __init__(self, path: str, reason: str, code: Optional[int] = None) -> None:
        super().__init__(code if code is not None else 0, reason)
        self.filename = path
        self.reason = reason

    def __str__(self) -> str:
        return f"could not write {self.filename}: {self.reason}"

    def __reduce__(self) -> Any:  # picklable (DataLoader workers, multiprocessing)
        return (type(self), (self.filename, self.reason, self.errno or None))


@functools.lru_cache(maxsize=1)
def default_file_mode() -> int:
    """The mode a newly created file gets here (``0o666`` less the umask; read once: reading it sets it briefly)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def staging_path(path: str) -> str:
    """A fresh hidden temporary name beside ``path`` that keeps its extension (``.tmp-1a2b3c4d-x.nii.gz``)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")


def _free_space(folder: str) -> str:
    try:
        st = os.statvfs(folder or ".")
    except (OSError, AttributeError):
        return ""
    free = st.f_bavail * st.f_frsize
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if free >= size:
            return f"{free / size:.1f} {unit} free in {folder or '.'}"
    return f"{free} bytes free in {folder or '.'}"


def _reason(err: BaseException, folder: str) -> tuple[str, Optional[int]]:
    code = err.errno if isinstance(err, OSError) and err.errno else None
    text = (err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0] if str(err)
            else type(err).__name__)
    if not isinstance(err, OSError):
        text = f"{type(err).__name__}: {text}"
    free = _free_space(folder) if code in (None, errno_codes.ENOSPC, errno_codes.EFBIG, errno_codes.EDQUOT) else ""
    return (f"{text} ({free})" if free else text), code


def _fsync_path(path: str) -> None:
    """Flush ``path`` to the disk: a full disk can show only here (delayed allocation), so that error counts; a
    filesystem that cannot fsync at all (EINVAL, ENOTSUP) is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno_codes.EINVAL, errno_codes.ENOTSUP, errno_codes.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    """Make the rename durable where the platform allows it (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def atomic_write(path: str, write: Callable[[str], Any], verify: Optional[Callable[[str], None]] = None,
                 mode: Optional[int] = None) -> None:
    """``write(tmp)`` to a hidden temporary name beside ``path`` (same extension), fsync it, check it (not empty;
    ``verify(tmp)`` raises when the content is incomplete), then rename it to ``path`` with the mode a file created
    directly would have (``mode`` to choose; a writer that stages through ``mkstemp``, as safetensors does, would
    leave it ``0600``).

    On any failure the temporary file is removed and the target is unchanged; an ``Exception`` becomes
    :class:`WriteError` naming ``path`` and the reason (an interruption, ``KeyboardInterrupt``, is re-raised as is).
    """
    path = os.fspath(path)
    folder = os.path.dirname(path)
    tmp = staging_path(path)
    try:
        try:
            write(tmp)
            if not os.path.isfile(tmp):
                raise WriteError(path, "the writer produced no file")
            _fsync_path(tmp)
            if os.path.getsize(tmp) == 0:
                raise WriteError(path, "the written file is empty" + (f" ({_free_space(folder)})"
                                                                      if _free_space(folder) else ""))
            if verify is not None:
                try:
                    verify(tmp)
                except WriteError:
                    raise
                except Exception as err:
                    free = _free_space(folder)
                    what = (str(err).splitlines() or [type(err).__name__])[0]
                    raise WriteError(path, f"the written file is incomplete ({what})"
                                     + (f"; {free}" if free else "")) from err
            os.chmod(tmp, default_file_mode() if mode is None else mode)
            os.replace(tmp, path)
        except WriteError:
            raise
        except Exception as err:
            cause = getattr(err, "_ldm_write_cause", None)
            reason, code = _reason(cause or err, folder)
            raise WriteError(path, reason, code) from err
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
    _fsync_folder(folder)


class _RecordingFile:
    """A binary file object that remembers the ``OSError`` its ``write`` raised (``torch.save`` hides it)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.raw.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        try:
            self.raw.flush()
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:  # tell, seek, read, name, ...: the file's own
        return getattr(self.raw, name)


def open_staging(path: str) -> BinaryIO:
    """The binary file a stream writer writes (a seam for tests that simulate a full disk)."""
    return open(path, "wb")


def atomic_write_stream(path: str, write: Callable[[BinaryIO], Any],
                        verify: Optional[Callable[[str], None]] = None, mode: Optional[int] = None) -> None:
    """:func:`atomic_write` for a writer that takes a binary file object: ``write(f)``. The ``OSError`` of the
    write that failed is what :class:`WriteError` reports, even when the writer raised something else."""

    def to_file(tmp: str) -> None:
        with open_staging(tmp) as raw:
            stream = _RecordingFile(raw)
            try:
                write(stream)  # type: ignore[arg-type]
                stream.flush()
            except Exception as err:
                if stream.error is not None and stream.error is not err:
                    err._ldm_write_cause = stream.error  # type: ignore[attr-defined]
                raise

    atomic_write(path, to_file, verify, mode)


def write_bytes(path: str, data: bytes, mode: Optional[int] = None) -> None:
    """``data`` to ``path``, atomically (:func:`atomic_write_stream`)."""
    atomic_write_stream(path, lambda f: f.write(data), mode=mode)


def write_text(path: str, text: str, verify: Optional[Callable[[str], None]] = None) -> None:
    """UTF-8 ``text`` to ``path``, atomically."""
    atomic_write_stream(path, lambda f: f.write(text.encode("utf-8")), verify)


def verify_json(path: str) -> None:
    """Raise unless ``path`` parses as JSON."""
    with open(path, encoding="utf-8") as f:
        json.load(f)


def write_json(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """``obj`` as JSON (``indent=2`` unless given) to ``path``, atomically, parsed again before the rename."""
    dump_kwargs.setdefault("indent", 2)
    write_text(path, json.dumps(obj, **dump_kwargs), verify=verify_json)


def verify_torch_zip(path: str) -> None:
    """Raise unless ``path`` is a ``torch.save`` zip archive whose directory (at its end) is intact."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch.save archive (its zip directory is missing: truncated?)")
    with zipfile.ZipFile(path) as archive:
        if not archive.namelist():
            raise ValueError("the torch.save archive is empty")


def save_torch(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path``, atomically; the archive's directory is read back before the rename."""
    import torch

    atomic_write_stream(path, lambda f: torch.save(obj, f), verify=verify_torch_zip)


def verify_nifti(path: str) -> None:
    """Raise unless ``path`` is a complete NIfTI file: its header reads, and (``.nii.gz``) the gzip stream
    decompresses to its end (CRC and length checked) and holds every voxel the header declares; an ``.nii`` is
    at least as long as header and voxels. SimpleITK's writer leaves a truncated file on a full disk without
    raising; this is what catches it."""
    import nibabel as nib
    import numpy as np

    header = nib.load(path).header
    shape = tuple(int(s) for s in header.get_data_shape())
    needed = int(header.get_data_offset()) + int(np.prod(shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    if path.endswith(".gz"):
        total = 0
        with gzip.open(path, "rb") as f:
            while True:
                block = f.read(1 << 22)
                if not block:
                    break
                total += len(block)
    else:
        total = os.path.getsize(path)
    if total < needed:
        raise ValueError(f"the NIfTI file holds {total} bytes, its header declares {needed} (shape {shape})")


def save_nifti_file(path: str, write: Callable[[str], Any]) -> None:
    """A NIfTI written by ``write(tmp)`` (nibabel, SimpleITK), atomically, checked by :func:`verify_nifti`."""
    atomic_write(path, write, verify=verify_nifti)


def remove_staging_files(folder: str) -> int:
    """Delete the temporary files interrupted writes left in ``folder`` (not below it); returns how many."""
    removed = 0
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(TMP_PREFIX):
                _remove(os.path.join(folder, name))
                removed += 1
    return removed


def run_script_reporting_writes(main: Callable[..., Any], argv: Optional[list[str]] = None) -> int:
    """:func:`ldm.util.run_script` (a ``ValueError``/``FileNotFoundError`` is one ``<script>: error:`` line, exit 2),
    and a write that failed (an ``OSError``: a full disk, no permission) one line too, naming the file, exit 1,
    instead of a traceback (``LDM_TRACEBACK=1`` keeps it)."""
    import sys

    from ldm.util import run_script

    try:
        return run_script(main, argv)
    except OSError as err:
        if os.environ.get("LDM_TRACEBACK"):
            raise
        sys.stderr.write(f"{os.path.basename(sys.argv[0]) or 'script'}: error: {err}\n")
        return 1
