"""`precompute` SIGKILLed at seeded points of its progress, each followed by a rerun: the final store
must be byte-identical to an uninterrupted one (finished layers are kept, a half-written one is
redone).

    crash_points(model_dir, work_dir, points=20, seed=0) -> CrashReport
"""
from __future__ import annotations

import filecmp
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[2]


class CrashReport(msgspec.Struct):
    points: int
    killed_mid_run: int  # kills that landed before precompute finished (the rest found it done)
    identical: int  # reruns whose store equals the uninterrupted one, file for file
    reference_seconds: float


def _precompute(model: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "precompute"), "--model", str(model), "--out",
                             str(out), "--workers", "2", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def crash_points(model: Path, work: Path, *, points: int = 20, seed: int = 0) -> CrashReport:
    """Each point: a seeded share of the uninterrupted store's bytes; precompute is killed once that
    many bytes sit in its output folder (finished layers and `.partial` files), so the kills land
    mid-run whatever the machine's speed; one that finds precompute done counts as not mid-run."""
    ref = work / "reference"
    t0 = time.perf_counter()
    p = _precompute(model, ref)
    assert p.wait() == 0, p.stderr.read()
    p.stderr.close()
    took = time.perf_counter() - t0
    total = _bytes_in(ref)
    rng = random.Random(seed)
    mid = identical = 0
    for i in range(points):
        out = work / f"run{i}"
        target = rng.uniform(0.02, 0.95) * total
        p = _precompute(model, out)
        while p.poll() is None and _bytes_in(out) < target:
            time.sleep(0.002)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            mid += 1
        p.wait()
        p.stderr.close()
        rerun = _precompute(model, out)
        _, err = rerun.communicate()
        assert rerun.returncode == 0, f"rerun after kill point {i} failed: {err[-2000:]}"
        identical += same_tree(ref, out)
        shutil.rmtree(out)
    return CrashReport(points, mid, identical, took)


def _bytes_in(folder: Path) -> int:
    total = 0
    try:
        for f in folder.iterdir():
            try:
                total += f.stat().st_size
            except FileNotFoundError:  # a .partial renamed or removed meanwhile
                pass
    except FileNotFoundError:  # not made yet
        pass
    return total


class DiskFullReport(msgspec.Struct):
    exit_code: int
    error: str  # the last line precompute printed
    partial_names: list[str]  # files under final names that are not whole (must be none)
    rerun_identical: bool


def disk_full(model: Path, work: Path, reference: Path) -> DiskFullReport:
    """precompute into a small tmpfs that a filler file fills mid-run; then free it and rerun.
    Needs root (mount); the caller skips where mounting is not allowed."""
    mnt = work / "small-disk"
    mnt.mkdir()
    need = sum(f.stat().st_size for f in reference.iterdir())
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={need + need // 4}", "tmpfs", str(mnt)], check=True,
                   capture_output=True)
    try:
        out = mnt / "store"
        p = _precompute(model, out)
        deadline = time.monotonic() + 30
        while not (out.exists() and any(out.iterdir())) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.005)  # until it writes: past the up-front space check
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
            except OSError:
                pass
        _, err = p.communicate()
        layer_files = sorted(out.glob("layer_*.safetensors")) if out.exists() else []
        from adapters.store_format import read_layer_meta

        partial = []
        for lf in layer_files:  # a file under its final name must be whole and carry its metadata
            try:
                read_layer_meta(lf)
            except Exception:  # noqa: BLE001 - any failure to read it back is a half-written file
                partial.append(lf.name)
        filler.unlink()
        rerun = _precompute(model, out)
        _, err2 = rerun.communicate()
        assert rerun.returncode == 0, err2[-2000:]
        return DiskFullReport(p.returncode, (err.strip().splitlines() or [""])[-1], partial,
                              same_tree(reference, out))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def read_only_out(model: Path, work: Path) -> tuple[int, str, float]:
    """precompute into a folder on a read-only file system: (exit code, last stderr line, seconds).
    A read-only mount, since root may write into a folder without write bits."""
    mnt = work / "read-only"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4g", "tmpfs", str(mnt)], check=True, capture_output=True)
    try:
        t0 = time.perf_counter()
        p = _precompute(model, mnt / "store")
        _, err = p.communicate()
        return p.returncode, (err.strip().splitlines() or [""])[-1], time.perf_counter() - t0
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def can_mount(work: Path) -> bool:
    probe = work / "mount-probe"
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    return ok
