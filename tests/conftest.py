"""Shared pytest set-up: repo root on the path, one thread per process (CI has 2 cores), fixed seeds."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPAT_DIR = ROOT.parent / "shared" / "compat"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (still run in CI)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def compat_dir() -> Path:
    """The shared CompVis reference data (../shared/compat beside the checkout)."""
    env = os.environ.get("LDM_COMPAT_DIR")
    path = Path(env) if env else COMPAT_DIR
    if not path.is_dir():
        pytest.fail(f"compat reference data not found at {path}; set LDM_COMPAT_DIR")
    return path
