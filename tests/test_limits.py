"""`prefetch-bench limits`: the hops against their limits, measured side by side (CPU here; H2D rows on a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest

from tests.helpers_pipeline import build_tiny_store

BENCH = str(Path(__file__).resolve().parent.parent / "bin" / "prefetch-bench")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("limits"), "mxfp4")


def _run(store, tmp_path, bin_env, *extra):
    out = tmp_path / "limits.json"
    res = subprocess.run([sys.executable, BENCH, "limits", "--store", str(store), "--readers", "2",
                          "--fetches", "200", "--json", str(out), *extra], capture_output=True, text=True,
                         env=bin_env, timeout=170)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), res.stdout


def test_limits_measures_disk_and_fetch_side_by_side(store, tmp_path, bin_env):
    got, stdout = _run(store, tmp_path, bin_env)
    assert got["disk_raw_gbps"] > 0 and got["disk_readers_gbps"] > 0
    assert 0 < got["fetch_resident_us"] < 1e5 and got["experts"] == 24
    assert "disk: readers / raw O_DIRECT" in stdout and "fetch of resident experts" in stdout
    ratio = got["disk_readers_gbps"] / got["disk_raw_gbps"]
    assert f"{ratio:6.2f}" in stdout  # the printed ratio is the JSON's


@pytest.mark.gpu
def test_limits_on_the_gpu_adds_the_h2d_rows(store, tmp_path, bin_env):
    got, stdout = _run(store, tmp_path, bin_env, "--credits", "4")
    for key in ("h2d_raw_gbps", "h2d_promotion_gbps", "h2d_scheduler_gbps"):
        assert got[key] > 0, key
    assert "H2D: scheduler plan / raw pinned" in stdout and got["card"]


def test_limits_refuses_a_missing_store_in_one_line(tmp_path, bin_env):
    res = subprocess.run([sys.executable, BENCH, "limits", "--store", str(tmp_path / "nope")],
                         capture_output=True, text=True, env=bin_env, timeout=60)
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1 and "nope" in res.stderr


def test_limits_refuses_a_json_path_in_a_missing_folder_before_measuring(store, tmp_path, bin_env):
    missing = tmp_path / "no-such-folder" / "limits.json"
    res = subprocess.run([sys.executable, BENCH, "limits", "--store", str(store), "--json", str(missing)],
                         capture_output=True, text=True, env=bin_env, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"--json {missing}: its folder" in res.stderr and not missing.parent.exists()
