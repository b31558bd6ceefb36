"""Ctrl-C in every tool: SIGINT to the tool's process group (what a terminal sends) mid-run ends it
with exit code 130 and no traceback, leaves no process of its group behind, and no half-written
output (a JSON file there is whole; a checkpoint or trace file is absent)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from policies.synthetic import SyntheticConfig, generate
from policies.traces import save_trace
from tests.conftest import ROOT, TRACES
from tests.helpers_pipeline import build_tiny_store


def interrupt(argv: list[str], env: dict, after_s: float) -> tuple[int, str]:
    """Run a bin/ tool in its own process group, SIGINT the group after `after_s`, wait for it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bin" / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    time.sleep(after_s)
    if proc.poll() is not None:
        _, err = proc.communicate()
        raise AssertionError(f"{argv[0]} ended before it could be interrupted: {err[-1000:]}")
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{argv[0]} did not stop within 30 s of SIGINT")
    deadline = time.monotonic() + 5  # workers notice their parent's exit (PDEATHSIG) at once
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"processes of {argv[0]}'s group outlived it")
    assert "Traceback" not in err, err[-3000:]
    return proc.returncode, err


def whole_json_or_absent(path) -> None:
    if path.exists():
        json.loads(path.read_text())
    assert not list(path.parent.glob(f".{path.name}*")), "a temporary file was left behind"


def test_simulate(tmp_path, bin_env):
    out = tmp_path / "s.json"
    rc, err = interrupt(["prefetch-bench", "simulate", "--trace", str(TRACES / "llama4-maverick-mmlu.npz"),
                         "--vram-capacity", "0.1", "--ram-capacity", "0.5", "--json", str(out)], bin_env, 3.0)
    assert rc == 130 and "prefetch-bench simulate: interrupted" in err
    assert not out.exists()


def test_replay(tmp_path, bin_env):
    store = build_tiny_store(tmp_path, "mxfp4")
    trace = tmp_path / "t.npz"
    save_trace(generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=4, prompt_tokens=3,
                                        decode_tokens=4000, seed=1)), trace)
    out = tmp_path / "r.json"
    rc, err = interrupt(["prefetch-bench", "replay", "--store", str(store), "--trace", str(trace), "--vram", "0.5",
                         "--methods", "ours", "--device", "cpu", "--no-progress", "--json", str(out)], bin_env, 4.0)
    assert rc == 130 and "prefetch-bench replay: interrupted" in err
    whole_json_or_absent(out)


def test_generate(tmp_path, bin_env):
    pytest.importorskip("transformers")
    from tests.helpers_models import make_tiny

    model = make_tiny(tmp_path / "m", "hf", "--arch", "mixtral")
    out = tmp_path / "g.json"
    rc, err = interrupt(["prefetch-bench", "generate", "--model", str(model), "--vram", "0.5", "--prompt-tokens",
                         "16", "--new-tokens", "100000", "--json", str(out)], bin_env, 8.0)
    assert rc == 130 and "prefetch-bench generate: interrupted" in err
    whole_json_or_absent(out)


def test_make_model(tmp_path, bin_env):
    out = tmp_path / "big"
    rc, err = interrupt(["make-model", "--format", "mixtral", "--preset", "mixtral-8x7b", "--layers", "2",
                         "--workers", "1", "--out", str(out)], bin_env, 2.0)
    assert rc == 130 and "interrupted; nothing written" in err
    assert not out.exists() and not (tmp_path / "big.partial").exists()


def test_make_trace(tmp_path, bin_env):
    out = tmp_path / "t.npz"
    rc, err = interrupt(["make-trace", "--like", "llama4-maverick", "--requests", "100000", "--out", str(out)], bin_env, 2.0)
    assert rc == 130 and "make-trace: interrupted; nothing written" in err
    assert not out.exists()
