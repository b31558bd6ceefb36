"""The bin/ launchers: they run inside the project's .venv only once `make` has finished it,
and outside a set-up environment they name the missing package and the set-up command."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("make-model", "make-trace", "precompute", "prefetch-bench")


def _bare_python() -> str | None:
    """A Python without the project's dependencies (the system one, where it lacks msgspec)."""
    for exe in ("/usr/bin/python3", shutil.which("python3")):
        if exe and Path(exe).exists() and Path(exe).resolve() != Path(sys.executable).resolve():
            if subprocess.run([exe, "-c", "import msgspec"], capture_output=True).returncode != 0:
                return exe
    return None


@pytest.mark.parametrize("name", LAUNCHERS)
def test_a_half_built_venv_is_not_entered_and_a_missing_package_is_named(tmp_path, name):
    bare = _bare_python()
    if bare is None:
        pytest.skip("no Python without msgspec on this machine")
    checkout = tmp_path / "checkout"
    for part in ("bin", "adapters", "pipeline", "policies"):
        shutil.copytree(ROOT / part, checkout / part, ignore=shutil.ignore_patterns("__pycache__"))
    venv_py = checkout / ".venv" / "bin" / "python"  # make stopped before its stamp: no .installed
    venv_py.parent.mkdir(parents=True)
    venv_py.write_text("#!/bin/sh\nexit 99\n")
    venv_py.chmod(0o755)
    res = subprocess.run([bare, str(checkout / "bin" / name), "--help"], capture_output=True, text=True,
                         timeout=60)  # even --help: the check comes before anything runs
    assert res.returncode == 1, res  # not 99: the half-built .venv was not entered
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"{name}: needs the Python package(s) ") and "msgspec" in line, line
    assert line.endswith(f"; run `make setup` in {checkout} (or pip install -e . there)"), line
