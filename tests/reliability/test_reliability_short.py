"""The reliability suite's short versions, run by `make test`; `make reliability` runs the long ones
(tests/reliability/run.py) and prints the table of figures."""
from __future__ import annotations

import os
import warnings

import pytest

from adapters.errors import CheckpointError
from adapters.store import StoreCheckpoint
from pipeline import ExpertPipeline
from pipeline.api import PolicyStoppedWarning
from tests.helpers_pipeline import budgets, build_tiny_store, no_leaks  # noqa: F401
from tests.reliability.soak import Faults, slope_per_1k, soak, Sample


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_tiny_store(tmp_path_factory.mktemp("soak"), "bfloat16")


def test_soak_under_a_fault_storm_hands_out_only_exact_experts(store, no_leaks):  # noqa: F811
    r = soak(store, tokens=2000, faults=Faults(reader_kills=8, reader_stops=2, policy_kill=True), seed=3,
             sample_every=250)
    assert r.wrong_tensors == 0 and r.experts_checked == r.fetches * 2 == 2000 * 3 * 2
    assert r.reader_kills == 8 and r.reader_stops == 2 and r.policy_killed
    assert r.reader_restarts >= 8  # every killed reader replaced (a stopped one when its read timed out)
    assert r.policy_state == "failed"  # and decoding went on: every token above was served
    assert r.slowest_fetch_s < 10
    assert r.slopes_per_1k["shm_entries"] == 0 and r.slopes_per_1k["threads"] == 0
    # closed: the same descriptors, threads and /dev/shm entries as before it opened
    assert (r.after.fds, r.after.threads, r.after.shm_entries) == (r.before.fds, r.before.threads, r.before.shm_entries)


def test_soak_on_a_slow_disk_stays_exact(store, no_leaks):  # noqa: F811
    r = soak(store, tokens=300, seed=4, read_delay_s=0.003, sample_every=100)
    assert r.wrong_tensors == 0 and r.experts_checked == 300 * 3 * 2


def test_the_slope_is_per_thousand_tokens_after_warm_up():
    s = [Sample(0, 999, 0, 0, 0), Sample(1000, 10, 0, 0, 0), Sample(2000, 20, 0, 0, 0), Sample(3000, 30, 0, 0, 0)]
    assert slope_per_1k(s, "rss_bytes") == pytest.approx(10.0)  # the first (warm-up) sample left out
    assert slope_per_1k(s[:2], "rss_bytes") == 0.0


def test_a_killed_policy_is_told_once_and_the_pipeline_serves_on(store, no_leaks):  # noqa: F811
    import signal
    import time

    with ExpertPipeline.open(store, **budgets(store, 3, 6), device="cpu", readers=1) as pipe:
        pipe.fetch(0, [0, 1])
        os.kill(pipe._p.actor._proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pipe.stats().actor.state != "failed" and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.warns(PolicyStoppedWarning, match=r"^policy process stopped: policy process exited unexpectedly \(exit code -9\); the pipeline goes on"):
            pipe.fetch(1, [2, 3])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            want = StoreCheckpoint(store).load_expert(2, 4)
            got = pipe.fetch(2, [4, 5])[0]  # told once: no second warning, and still exact
        assert all((got[r] == want[r]).all() for r in want)
        assert pipe.stats().actor.state == "failed"
    # close() did not raise: the failure was told when it was seen


@pytest.mark.parametrize("how", ["truncated", "replaced"])
def test_a_store_file_changed_under_an_open_pipeline_is_an_error_naming_it(tmp_path, no_leaks, how):  # noqa: F811
    store = build_tiny_store(tmp_path, "bfloat16")
    st = StoreCheckpoint(store)
    layer_file = store / st.index.layers[2].file
    with ExpertPipeline.open(store, **budgets(store, 3, 3), device="cpu", readers=1, read_attempts=2) as pipe:
        pipe.fetch(0, [0, 1])
        size = layer_file.stat().st_size
        if how == "truncated":
            os.truncate(layer_file, size // 2)
        else:  # same size, other bytes: only the checksums can tell
            data = bytearray(layer_file.read_bytes())
            for x in st.index.experts[2 * st.spec.num_experts:3 * st.spec.num_experts]:
                data[x.offset] ^= 0xFF
            tmp = layer_file.with_suffix(".new")
            tmp.write_bytes(bytes(data))
            os.replace(tmp, layer_file)
        with pytest.raises(CheckpointError) as e:
            pipe.fetch(2, [st.spec.num_experts - 1])
        msg = str(e.value)
        assert str(layer_file.name) in msg and ("short read" in msg or "checksum" in msg), msg


@pytest.fixture(scope="module")
def packable(tmp_path_factory):
    """A model that takes precompute a second or two: long enough to be killed mid-run."""
    from tests.helpers_models import make_tiny

    root = tmp_path_factory.mktemp("crash")
    return make_tiny(root / "m", "qwen-moe", "--layers", "12", "--experts", "16", "--hidden", "256",
                     "--intermediate", "512", "--shards", "3"), root


def test_precompute_killed_at_random_points_resumes_to_the_same_bytes(packable):
    from tests.reliability.crash import crash_points

    model, root = packable
    (root / "kills").mkdir()
    r = crash_points(model, root / "kills", points=3, seed=5)
    assert r.points == 3 and r.identical == 3
    assert r.killed_mid_run >= 2  # the kill points fall inside the run (by bytes written), mostly


def mountable(root, name):
    """A fresh folder under `root` where file systems can be mounted (root only; skipped elsewhere)."""
    from tests.reliability.crash import can_mount

    work = root / name
    work.mkdir()
    if not can_mount(work):
        pytest.skip("mounting a small tmpfs needs root")
    return work


def test_precompute_on_a_disk_that_fills_up_mid_write_then_resumes(packable):
    from tests.reliability.crash import _precompute, disk_full

    model, root = packable
    work = mountable(root, "full")
    ref = work / "reference"
    _precompute(model, ref).communicate()
    r = disk_full(model, work, ref)
    assert r.exit_code == 2 and r.error.startswith("precompute: error: ")
    assert "no space left on the disk of" in r.error and "free some and rerun" in r.error, r.error
    assert r.partial_names == [] and r.rerun_identical


def test_precompute_into_a_read_only_folder_fails_at_once_naming_it(packable):
    from tests.reliability.crash import read_only_out

    model, root = packable
    code, line, _ = read_only_out(model, mountable(root, "ro"))
    assert code == 2 and line.endswith("store: cannot write there (read-only file system); choose another --out")


@pytest.mark.parametrize("target", ["safetensors-header", "store-json", "trace", "config", "fetch"])
def test_fuzzed_inputs_end_in_the_projects_error_or_a_correct_result(target, store, no_leaks):  # noqa: F811
    from tests.reliability import fuzz

    run = {"safetensors-header": lambda: fuzz.fuzz_safetensors_header(150, 1),
           "store-json": lambda: fuzz.fuzz_store_json(150, 1, store),
           "trace": lambda: fuzz.fuzz_trace(150, 1), "config": lambda: fuzz.fuzz_config(150, 1),
           "fetch": lambda: fuzz.fuzz_fetch(150, 1, store)}[target]
    assert run() == 150


def test_make_reliability_refuses_an_unknown_part_with_the_valid_ones(capsys):
    from tests.reliability.run import main

    with pytest.raises(SystemExit) as e:
        main(["--parts", "soak,bogus"])
    assert e.value.code == 2
    assert "--parts soak,bogus: name some of soak, crash, fuzz" in capsys.readouterr().err
