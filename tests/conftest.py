"""Shared pytest set-up: repo root on the path, one thread per process (CI has 2 cores), fixed seeds."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COMPAT_DIR = ROOT / "tests" / "data" / "compat"  # recorded CompVis reference data (numbers and key lists)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow(seconds): takes more than ~20 s on 2 CPU cores, about `seconds` on an "
                            "idle core (still run in CI; the longest start first)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped elsewhere")


def _expected_seconds(item: pytest.Item) -> float:
    mark = item.get_closest_marker("slow")
    return float(mark.args[0]) if mark is not None and mark.args else 0.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    # the slow tests first, the longest first, the rest in file order: with pytest-xdist (`make test`) the
    # workers then finish together instead of one of them starting the longest test last
    items.sort(key=lambda item: -_expected_seconds(item))
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
    """The CompVis reference data the repository carries (tests/data/compat; ``$LDM_COMPAT_DIR`` overrides it)."""
    env = os.environ.get("LDM_COMPAT_DIR")
    path = Path(env) if env else COMPAT_DIR
    if not path.is_dir():
        pytest.fail(f"compat reference data not found at {path} (it is part of the repository: tests/data/compat); "
                    "check out the whole repository or point LDM_COMPAT_DIR at a copy")
    return path


@pytest.fixture
def main_process_state(monkeypatch):
    """For tests that run ``main.py`` in-process on the toy run: its configs' classes are trusted, and the signal
    handlers main and Lightning install are put back afterwards."""
    import signal

    monkeypatch.setenv("LDM_TRUSTED_TARGETS", "test_main_toy")
    handlers = {s: signal.getsignal(getattr(signal, s)) for s in ("SIGINT", "SIGTERM", "SIGUSR1")
                if hasattr(signal, s)}
    yield
    for name, handler in handlers.items():
        signal.signal(getattr(signal, name), handler)
