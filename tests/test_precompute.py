"""`bin/precompute`: precompute -> validate per dtype, up-to-date/refusal/--force, resume after
SIGKILL (byte-identical), clean stop on SIGTERM, disk-space refusal, worker errors, stats, clean."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from adapters.cli.make_model import main as make_model
from adapters.precompute import messages as m
from adapters.precompute.cli import main
from adapters.precompute.pool import WorkerError, WorkerPool
from adapters.store_format import read_layer_meta

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin" / "precompute"


def run(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def make(out: Path, *extra: str) -> Path:
    with redirect_stdout(io.StringIO()):
        assert make_model(["--format", "gpt-oss", "--preset", "tiny", "--seed", "11", "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def bigger(tmp_path_factory) -> Path:
    """Takes a few seconds to convert with one worker, so a run can be interrupted mid-way."""
    return make(tmp_path_factory.mktemp("m") / "bigger", "--layers", "8", "--experts", "16",
                "--hidden", "256", "--intermediate", "256")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mxfp4"])
def test_precompute_then_validate_every_expert(tiny, tmp_path, capsys, dtype):
    out = tmp_path / "st"
    rc, _, err = run(["--model", str(tiny), "--out", str(out), "--dtype", dtype, "--workers", "2"], capsys)
    assert rc == 0, err
    assert "experts/s" in err and "B/s" in err  # the progress summary with rates
    assert not list(out.glob("*.partial"))
    rc, out_text, err = run(["validate", "--store", str(out), "--samples", "0"], capsys)
    assert rc == 0, err
    assert "24 experts bit-exact" in out_text and "/s" in out_text


def test_default_out_up_to_date_refusal_and_force(tiny, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    rc, _, err = run(["--model", str(model), "--workers", "1", "--no-progress"], capsys)
    assert rc == 0, err
    store = model / "expert_store"
    before = files_of(store)
    rc, out, _ = run(["--model", str(model), "--no-progress"], capsys)
    assert rc == 0 and "up to date" in out and files_of(store) == before
    rc, _, err = run(["--model", str(model), "--dtype", "mxfp4", "--no-progress"], capsys)
    assert rc == 2 and "--force" in err and "another --out" in err and len(err.strip().splitlines()) == 1
    assert files_of(store) == before
    rc, _, err = run(["--model", str(model), "--dtype", "mxfp4", "--force", "--no-progress"], capsys)
    assert rc == 0, err
    assert files_of(store) != before
    assert run(["validate", "--store", str(store), "--samples", "3"], capsys)[0] == 0


def test_resume_keeps_finished_layers_and_matches_an_uninterrupted_run(tiny, tmp_path, capsys):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(["--model", str(tiny), "--out", str(ref), "--workers", "0", "--no-progress"], capsys)[0] == 0
    assert run(["--model", str(tiny), "--out", str(out), "--workers", "1", "--no-progress"], capsys)[0] == 0
    # What a kill leaves: no store.json, a missing layer, a stale partial of another pid.
    (out / "store.json").unlink()
    (out / "layer_002.safetensors").unlink()
    (out / "layer_002.safetensors.99999.partial").write_bytes(b"half")
    kept = (out / "layer_000.safetensors").stat().st_mtime_ns
    rc, text, err = run(["--model", str(tiny), "--out", str(out), "--workers", "1", "--no-progress"], capsys)
    assert rc == 0, err
    assert "2 finished layers kept, 1 to convert" in text
    assert (out / "layer_000.safetensors").stat().st_mtime_ns == kept  # reused, not rewritten
    assert files_of(out) == files_of(ref)


def test_a_layer_of_another_dtype_is_redone_only_with_force(tiny, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["--model", str(tiny), "--out", str(a), "--workers", "0", "--no-progress"], capsys)[0] == 0
    assert run(["--model", str(tiny), "--out", str(b), "--dtype", "mxfp4", "--workers", "0", "--no-progress"],
               capsys)[0] == 0
    (a / "store.json").unlink()
    shutil.copy(b / "layer_001.safetensors", a / "layer_001.safetensors")
    rc, _, err = run(["--model", str(tiny), "--out", str(a), "--no-progress"], capsys)
    assert rc == 2 and "layer_001.safetensors" in err and "--force" in err
    assert not (a / "store.json").exists()
    shutil.copy(b / "layer_002.safetensors", a / "layer_007.safetensors")  # a layer this model lacks
    rc, _, err = run(["--model", str(tiny), "--out", str(a), "--no-progress"], capsys)
    assert rc == 2 and "layer_007.safetensors: not a layer of this model" in err and "--force" in err
    rc, _, err = run(["--model", str(tiny), "--out", str(a), "--force", "--workers", "0", "--no-progress"], capsys)
    assert rc == 0, err
    assert read_layer_meta(a / "layer_001.safetensors").dtype == "bfloat16"
    assert sorted(p.name for p in a.iterdir()) == [f"layer_00{i}.safetensors" for i in range(3)] + ["store.json"]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"precompute ended (rc {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() - t0 < timeout, f"{path.name} did not appear in {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(bigger, tmp_path, bin_env, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, str(BIN), "--model", str(bigger), "--out", str(out), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, env=bin_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(out / "layer_000.safetensors", proc)
    proc.kill()
    proc.wait(10)
    assert not (out / "store.json").exists(), "the run finished before it could be killed"
    finished = {p.name for p in out.glob("layer_???.safetensors")}
    assert 1 <= len(finished) < 8
    for name in finished:  # whatever has a final name is complete
        assert read_layer_meta(out / name).size == (out / name).stat().st_size
    # The rerun and the reference run in this process (their own worker pool / no pool): the
    # same code as the CLI without paying another interpreter + torch start-up.
    rc, text, err = run(cmd[2:], capsys)
    assert rc == 0, err
    assert "finished layers kept" in text
    assert main(["--model", str(bigger), "--out", str(ref), "--workers", "0", "--no-progress"]) == 0
    assert not list(out.glob("*.partial"))
    assert files_of(out) == files_of(ref)


@pytest.mark.slow
def test_sigterm_stops_cleanly(bigger, tmp_path, bin_env):
    out = tmp_path / "out"
    cmd = [sys.executable, str(BIN), "--model", str(bigger), "--out", str(out), "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=bin_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "layer_000.safetensors", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("precompute: stopped by SIGTERM") and "Traceback" not in err
    assert not (out / "store.json").exists()
    assert not list(out.glob("*.partial"))
    for p in out.glob("layer_???.safetensors"):
        assert read_layer_meta(p).size == p.stat().st_size


def test_refuses_when_the_disk_is_too_small(tiny, tmp_path, capsys, monkeypatch):
    real = tmp_path / "real"
    assert run(["--model", str(tiny), "--out", str(real), "--workers", "0", "--no-progress"], capsys)[0] == 0
    real_bytes = sum(p.stat().st_size for p in real.iterdir())
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    out = tmp_path / "st"
    rc, _, err = run(["--model", str(tiny), "--out", str(out)], capsys)
    assert rc == 2 and "not enough disk space" in err and "5.00 KB free" in err, err
    need = float(re.search(r"need ([0-9.]+) MB", err).group(1)) * 1e6
    assert need >= real_bytes * 0.99  # rounding of the message
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--model", "{missing}"], "is not a directory"),
    (["--model", "{tiny}", "--dtype", "int3"], "unknown store dtype 'int3'; valid: bfloat16, float16, mxfp4"),
    (["--model", "{tiny}", "--format", "nope"], "unknown checkpoint format 'nope'; valid:"),
    (["--model", "{tiny}", "--workers", "-1"], "--workers"),
    (["validate", "--store", "{missing}"], "store.json: missing"),
    (["stats", "--store", "{missing}"], "store.json: missing"),
    (["--model", "{tiny}", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: --model"),
    (["--model", "{tiny}", "--out", "{file}"], "is a file, not a store folder; choose a new --out"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, argv, needle):
    (tmp_path / "a-file").write_text("mine")
    argv = [a.format(tiny=tiny, missing=tmp_path / "nothing", file=tmp_path / "a-file") for a in argv]
    before = sorted(p.name for p in tiny.iterdir())
    rc, _, err = run(argv, capsys)
    assert rc == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tiny.iterdir()) == before and not (tmp_path / "nothing").exists()
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.parametrize("fmt", ["mixtral", "qwen-moe", "fused"])
def test_dense_sources_convert_and_refuse_mxfp4(tmp_path, capsys, fmt):
    model = tmp_path / fmt
    with redirect_stdout(io.StringIO()):
        assert make_model(["--format", fmt, "--preset", "tiny", "--seed", "3", "--out", str(model)]) == 0
    rc, _, err = run(["--model", str(model), "--dtype", "mxfp4"], capsys)
    assert rc == 2 and "mxfp4 needs a source whose experts are MXFP4" in err and "--dtype bfloat16 or float16" in err
    assert len(err.strip().splitlines()) == 1 and not (model / "expert_store").exists()
    assert run(["--model", str(model), "--workers", "1", "--no-progress"], capsys)[0] == 0
    rc, text, err = run(["validate", "--store", str(model / "expert_store"), "--samples", "0"], capsys)
    assert rc == 0 and "24 experts bit-exact" in text, err


def test_worker_failure_comes_back_naming_the_layer(tmp_path, tiny):
    from adapters.registry import open_checkpoint

    spec = open_checkpoint(tiny).spec
    job = m.LayerJob(str(tmp_path / "gone"), "gpt-oss", str(tmp_path), 4, 8, "mxfp4", spec.expert_tensors, "d")
    with pytest.raises(WorkerError, match=r"layer 4: .*gone.*original") as e:
        with WorkerPool(1, tmp_path) as pool:
            pool.run([job], lambda p: None, lambda d: None)
    assert e.value.bad_input
    assert not list(tmp_path.glob("*.partial"))


def _jobs(model: Path, out: Path, layers) -> list[m.LayerJob]:
    from adapters.precompute.convert import store_tensors
    from adapters.registry import open_checkpoint

    src = open_checkpoint(model)
    tensors = store_tensors(src, "mxfp4")
    return [m.LayerJob(str(model), "gpt-oss", str(out), l, src.spec.num_experts, "mxfp4", tensors, "d") for l in layers]


def test_a_dead_worker_is_replaced_and_its_layer_redone(bigger, tmp_path):
    from adapters.precompute.worker import convert_layer
    from adapters.registry import open_checkpoint

    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir(), ref.mkdir()
    killed: list[int] = []
    with WorkerPool(1, out) as pool:
        def on_progress(p):  # SIGKILL the worker once, in the middle of layer 1
            if p.layer == 1 and not killed:
                killed.append(pool.procs[0].pid)
                os.kill(killed[0], signal.SIGKILL)

        pool.run(_jobs(bigger, out, [0, 1]), on_progress, lambda d: None)
        assert pool.restarts == 1 and pool.procs[0].pid != killed[0]
    src = open_checkpoint(bigger)
    for job in _jobs(bigger, ref, [0, 1]):
        convert_layer(src, job)
    assert files_of(out) == files_of(ref)  # no .partial of the dead worker either


def test_a_layer_that_kills_its_worker_twice_is_an_error(bigger, tmp_path):
    with pytest.raises(WorkerError, match=r"layer 0: worker process died 2 times"):
        with WorkerPool(1, tmp_path) as pool:
            pool.run(_jobs(bigger, tmp_path, [0]), lambda p: os.kill(pool.procs[0].pid, signal.SIGKILL),
                     lambda d: None)
    assert not list(tmp_path.iterdir())


def test_stats_and_clean(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "st"
    assert run(["--model", str(tiny), "--out", str(out), "--workers", "0", "--no-progress"], capsys)[0] == 0
    rc, text, _ = run(["stats", "--store", str(out), "--detailed"], capsys)
    assert rc == 0 and "bfloat16" in text and "3 MoE layers x 8 experts = 24 experts" in text
    assert text.count("layer_00") == 3 and "disk free" in text
    (out / "notes.txt").write_text("mine")
    for answer in ("", "n\n"):  # no stdin / not 'y': abort, nothing removed
        rc, _, err = run(["clean", "--store", str(out)], capsys, stdin=answer, monkeypatch=monkeypatch)
        assert rc == 1 and "aborted" in err
        assert len(list(out.glob("layer_*.safetensors"))) == 3 and (out / "store.json").exists()
    rc, _, _ = run(["clean", "--store", str(out)], capsys, stdin="y\n", monkeypatch=monkeypatch)
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only its own files
    (out / "notes.txt").unlink()
    assert run(["--model", str(tiny), "--out", str(out), "--workers", "0", "--no-progress"], capsys)[0] == 0
    assert run(["clean", "--store", str(out), "--force"], capsys)[0] == 0
    assert not out.exists()


def test_force_with_too_little_disk_keeps_the_old_store(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "st"
    assert run(["--model", str(tiny), "--out", str(out), "--workers", "0", "--no-progress"], capsys)[0] == 0
    before = files_of(out)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 5000, 5000))
    rc, _, err = run(["--model", str(tiny), "--out", str(out), "--dtype", "mxfp4", "--force"], capsys)
    assert rc == 2 and "not enough disk space" in err
    assert files_of(out) == before


def test_sigint_stops_with_130_and_one_line(tiny, tmp_path, capsys, monkeypatch):
    import adapters.precompute.build as build

    def interrupted_run(cfg, source, log=print):
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the middle of a run
        time.sleep(5)
        raise AssertionError("SIGINT did not stop the run")

    monkeypatch.setattr(build, "precompute", interrupted_run)
    rc, _, err = run(["--model", str(tiny), "--out", str(tmp_path / "st")], capsys)
    assert rc == 130 and err.strip().splitlines() == [
        "precompute: stopped by SIGINT; finished layers are kept, rerun to resume"]


def test_sigint_handler_is_restored_after_main(tiny, tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    run(["--model", str(tiny), "--out", str(tmp_path / "st"), "--workers", "0", "--no-progress"], capsys)
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.path.exists(tmp_path / "st" / "store.json")


def test_explicit_precompute_subcommand_is_the_default_one(tiny, tmp_path, capsys):
    # The original tool spelled it `precompute precompute --model ...`; both forms build the same store.
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(["precompute", "--model", str(tiny), "--out", str(a), "--workers", "0", "--no-progress"], capsys)[0] == 0
    assert run(["--model", str(tiny), "--out", str(b), "--workers", "0", "--no-progress"], capsys)[0] == 0
    assert files_of(a).keys() == files_of(b).keys()
    assert all(files_of(a)[k] == files_of(b)[k] for k in files_of(a) if k != "store.json")
