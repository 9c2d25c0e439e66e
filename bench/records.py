"""Benchmark records: one small self-contained file per (arm, training seed), meant to be committed.

A claim run can then span machines and days: each task writes ``<arm>_seed<k>.json`` (settings, protocol hash,
code commit, device, timings, per-seed metrics) and ``<arm>_seed<k>.npz`` (per-sample outcomes and descriptors,
referenced from the JSON by its SHA-256), plus one ``setup_<id>.json`` per measuring instrument (autoencoder and
judges: calibration, judge sensitivity, capacity ratios). The report is built from any set of records with the
same protocol hash (``collect``).

- ``load_protocol``: the JSON block of ``bench/PROTOCOL.md`` and its hash.
- ``write_record`` / ``read_record``: one record, written atomically; the NPZ is checked against its hash.
- ``collect``: every record under some directories, grouped by protocol hash, duplicates refused.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import subprocess
from typing import Any, Iterable, Optional

import numpy as np

from ldm.atomic_io import write_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOCOL_PATH = os.path.join(HERE, "PROTOCOL.md")
RECORDS_DIR = os.path.join(HERE, "records")
RECORD_FORMAT = "anatomy-record/1"
SETUP_FORMAT = "anatomy-setup/1"

__all__ = ["load_protocol", "protocol_hash", "write_record", "read_record", "write_setup", "collect",
           "code_commit", "canonical_hash", "RECORDS_DIR", "RECORD_FORMAT", "SETUP_FORMAT"]


def canonical_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 (hex, first ``length`` digits) of ``obj`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def json_block(path: str, what: str = "protocol") -> dict[str, Any]:
    """The first fenced ``json`` block of the Markdown file ``path`` (a pre-registration), parsed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    found = re.search(r"```json\s*\n(.*?)\n```", text, flags=re.S)
    if found is None:
        raise ValueError(f"{path} holds no ```json block with the {what}")
    try:
        return json.loads(found.group(1))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what}'s JSON block does not parse: {err}") from None


def load_protocol(path: str = PROTOCOL_PATH) -> dict[str, Any]:
    """The protocol's JSON block (the first fenced ``json`` block of ``path``)."""
    protocol = json_block(path)
    for key in ("protocol", "version", "arms", "claim_training_seeds", "claim_noise_seed", "dev_training_seeds",
                "dev_noise_seed", "samplers", "budgets", "primary"):
        if key not in protocol:
            raise ValueError(f"{path}: the protocol lacks {key!r}")
    overlap = set(protocol["claim_training_seeds"]) & set(protocol["dev_training_seeds"])
    if overlap or protocol["claim_noise_seed"] == protocol["dev_noise_seed"]:
        raise ValueError(f"{path}: claim and development seeds must differ (shared: {sorted(overlap)})")
    return protocol


def protocol_hash(protocol: dict[str, Any], settings: dict[str, Any]) -> str:
    """What makes records poolable: the protocol block and the preset's settings (sizes, steps, samples)."""
    return canonical_hash({"protocol": protocol, "settings": settings})


def code_commit(root: Optional[str] = None) -> dict[str, Any]:
    """The git commit of the code (``None`` outside a git checkout) and whether tracked files were modified."""
    root = root or os.path.dirname(HERE)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty if commit else None}


def _atomic_bytes(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes(path, data)


def write_record(directory: str, record: dict[str, Any], arrays: dict[str, np.ndarray]) -> str:
    """Write ``<arm>_seed<k>.npz`` then ``.json`` (the JSON names the NPZ and its SHA-256); returns the JSON path."""
    for key in ("arm", "training_seed", "protocol_hash"):
        if key not in record:
            raise ValueError(f"a record needs {key!r}")
    stem = os.path.join(directory, f"{record['arm']}_seed{record['training_seed']}")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    _atomic_bytes(stem + ".npz", data)
    record = {"format": RECORD_FORMAT, **record,
              "arrays": {"file": os.path.basename(stem) + ".npz", "sha256": hashlib.sha256(data).hexdigest()}}
    _atomic_bytes(stem + ".json", (json.dumps(record, indent=1, sort_keys=False) + "\n").encode())
    return stem + ".json"


def write_setup(directory: str, setup: dict[str, Any]) -> str:
    """Write ``setup_<id>.json`` (the instrument's calibration; ``setup["setup_id"]`` names it)."""
    path = os.path.join(directory, f"setup_{setup['setup_id']}.json")
    _atomic_bytes(path, (json.dumps({"format": SETUP_FORMAT, **setup}, indent=1) + "\n").encode())
    return path


def read_record(path: str, with_arrays: bool = True) -> tuple[dict[str, Any], Optional[dict[str, np.ndarray]]]:
    """A record and (``with_arrays``) its per-sample arrays, checked against the hash the record holds."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} is not an anatomy record (format {record.get('format')!r})")
    if not with_arrays:
        return record, None
    npz = os.path.join(os.path.dirname(path), record["arrays"]["file"])
    if not os.path.isfile(npz):
        raise ValueError(f"{path}: its per-sample arrays {npz} are missing")
    with open(npz, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != record["arrays"]["sha256"]:
        raise ValueError(f"{npz} does not match the hash in {path} (changed or truncated)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return record, {k: z[k] for k in z.files}


def _json_files(directories: Iterable[str]) -> list[str]:
    found: list[str] = []
    for d in directories:
        if os.path.isfile(d) and d.endswith(".json"):
            found.append(d)
        elif os.path.isdir(d):
            found.extend(sorted(glob.glob(os.path.join(d, "**", "*.json"), recursive=True)))
        else:
            raise ValueError(f"no records at {d}")
    return found


def collect(directories: Iterable[str], protocol_hash_: Optional[str] = None, with_arrays: bool = True
            ) -> dict[str, Any]:
    """Every record and setup under ``directories`` with one protocol hash.

    Returns ``{"protocol_hash", "records": [(record, arrays)], "setups": {setup_id: setup}, "other_hashes": {...}}``.
    Without ``protocol_hash_`` the directories must hold exactly one; two records of one (arm, seed, setup)
    are an error (a task counted twice).
    """
    records, setups, by_hash = [], {}, {}
    for path in _json_files(directories):
        with open(path, encoding="utf-8") as f:
            try:
                head = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        if head.get("format") == SETUP_FORMAT:
            setups[head["setup_id"]] = head
        elif head.get("format") == RECORD_FORMAT:
            by_hash.setdefault(head["protocol_hash"], []).append(path)
    if not by_hash:
        raise ValueError(f"no anatomy records under {', '.join(directories)}")
    if protocol_hash_ is None:
        if len(by_hash) > 1:
            raise ValueError("records of several protocols (" + ", ".join(f"{h}: {len(p)} records" for h, p in
                             by_hash.items()) + "); pass --protocol-hash to choose one")
        protocol_hash_ = next(iter(by_hash))
    if protocol_hash_ not in by_hash:
        raise ValueError(f"no records with protocol hash {protocol_hash_} (found: {', '.join(by_hash)})")
    seen: dict[tuple, str] = {}
    for path in by_hash[protocol_hash_]:
        record, arrays = read_record(path, with_arrays)
        key = (record["arm"], record["training_seed"], record["setup_id"])
        if key in seen:
            raise ValueError(f"{path} and {seen[key]} are both {key[0]} seed {key[1]} (setup {key[2]}): "
                             "one task counted twice")
        seen[key] = path
        if record["setup_id"] not in setups:
            raise ValueError(f"{path}: its setup record setup_{record['setup_id']}.json is missing")
        records.append((record, arrays))
    return {"protocol_hash": protocol_hash_, "records": records, "setups": setups,
            "other_hashes": {h: len(p) for h, p in by_hash.items() if h != protocol_hash_}}
