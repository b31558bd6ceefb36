"""Shared test set-up: GPU tests are skipped without CUDA; the real routing traces in data/traces."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "data" / "traces"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="package")
def real_traces() -> Path:
    assert TRACES.is_dir(), f"the project's traces are missing: {TRACES}"
    return TRACES


@pytest.fixture
def bin_env() -> dict[str, str]:
    """Environment for running bin/ tools as real subprocesses from the checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
