"""Quality metrics: hand-checked recall/precision, online order (predict before observe),
decode-only scoring, the oracle's perfect score, and the `quality` subcommand."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pipeline.bench import quality_cmd
from policies.predictors.base import Predictor
from policies.quality import build_predictor, evaluate
from policies.synthetic import SyntheticConfig, generate
from policies.traces import TraceMeta, make_trace, save_trace


class Fixed(Predictor):
    """Always ranks experts 0 > 1 > 2 > ... (probabilities decreasing with the id)."""

    name = "fixed"

    def observe(self, event):
        pass

    def predict(self, layer):
        return np.linspace(0.9, 0.1, self.num_experts)


class LastSeen(Predictor):
    """Predicts the experts layer l used at its previous visit: perfect if it could peek."""

    name = "last"

    def __init__(self, *a):
        super().__init__(*a)
        self.last = np.zeros((self.num_layers, self.num_experts))

    def observe(self, event):
        self.last[event.layer] = 0
        self.last[event.layer, list(event.experts)] = 1

    def predict(self, layer):
        return self.last[layer].copy()


def small_trace():
    # one request: 1 prefill row then 3 decode rows; L=2, E=6, K=2
    ex = np.array([[[4, 5], [4, 5]],
                   [[0, 3], [1, 2]],
                   [[2, 3], [4, 5]],
                   [[0, 1], [0, 5]]])
    meta = TraceMeta(format="moe-routing-trace/1", model="t", num_layers=2, num_experts=6, top_k=2, tokens=4)
    return make_trace(ex, np.full(ex.shape, np.nan), [-1] * 4, [0, 1, 1, 1], [0] * 4, meta)


def test_fixed_predictor_hand_checked():
    # top-2 is always {0, 1}. Decode visits: L0 {0,3} {2,3} {0,1} -> hits 1, 0, 2; L1 {1,2} {4,5} {0,5} -> 1, 0, 1
    (r2, r4) = evaluate(small_trace(), Fixed(2, 6, 2), ks=(2, 4))
    assert r2.visits == 6  # the prefill pass is not scored
    assert r2.recall == pytest.approx(5 / 12) and r2.precision == pytest.approx(5 / 12)
    assert r2.recall_per_layer == pytest.approx((3 / 6, 2 / 6), abs=1e-4)
    # top-4 = {0,1,2,3}: L0 hits 2, 2, 2; L1 hits 2, 0, 1 -> 9 of 12 used, 9 of 24 predicted
    assert r4.recall == pytest.approx(9 / 12) and r4.precision == pytest.approx(9 / 24)


def test_predict_comes_before_observe():
    # layer 0's sets: prefill {4,5}, then {0,3}, {2,3}, {0,1}; last-seen overlaps 0, 1, 0 of them
    # layer 1's sets: {4,5}, {1,2}, {4,5}, {0,5} -> 0, 0, 1. Peeking at the truth would give 1.0
    (r,) = evaluate(small_trace(), LastSeen(2, 6, 2), ks=(2,))
    assert r.recall == pytest.approx(2 / 12)


def test_oracle_scores_perfectly_and_ewma_beats_chance():
    t = generate(SyntheticConfig(layers=4, experts=16, top_k=2, requests=2, prompt_tokens=3, decode_tokens=40,
                                 skew=1.2, reuse=0.5, seed=5))
    (o,) = evaluate(t, build_predictor("oracle", t), ks=(2,))
    assert o.recall == 1.0 and o.precision == 1.0 and o.visits == 2 * 40 * 4
    (e,) = evaluate(t, build_predictor("ewma", t), ks=(2,))
    assert e.recall > 2 * (2 / 16)


def test_quality_command_table_and_json(tmp_path, capsys):
    t = generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=1, prompt_tokens=2, decode_tokens=10))
    path = tmp_path / "t.npz"
    save_trace(t, path)
    out = tmp_path / "q.json"
    ns = argparse.Namespace(trace=str(path), predictors=["ewma", "oracle"], ks=[2], json_out=str(out))
    assert quality_cmd.run(ns) == 0
    table = capsys.readouterr().out
    assert "recall@k" in table and "oracle" in table and "ewma" in table
    data = json.loads(out.read_text())
    rows = {r["predictor"]: r for r in data["results"]}
    assert rows["oracle"]["recall"] == 1.0 and len(rows["ewma"]["recall_per_layer"]) == 3


def test_quality_command_unknown_predictor_lists_valid(tmp_path):
    ns = argparse.Namespace(trace=str(tmp_path / "missing.npz"), predictors=["nope"], ks=None, json_out=None)
    with pytest.raises(KeyError, match="unknown predictor 'nope'; valid: colayer, ewma, fusion"):
        quality_cmd.run(ns)


def test_prefetch_bench_quality_end_to_end(tmp_path, bin_env):
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(__file__).resolve().parent.parent / "bin" / "prefetch-bench"
    t = generate(SyntheticConfig(layers=2, experts=6, top_k=1, requests=1, prompt_tokens=1, decode_tokens=5))
    save_trace(t, tmp_path / "t.npz")
    ok = subprocess.run([sys.executable, str(exe), "quality", "--trace", str(tmp_path / "t.npz"),
                         "--predictor", "oracle", "--k", "1"], capture_output=True, text=True, env=bin_env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert any(line.split()[:3] == ["oracle", "1", "1.000"] for line in ok.stdout.splitlines())
    bad = subprocess.run([sys.executable, str(exe), "quality", "--trace", str(tmp_path / "t.npz"),
                          "--predictor", "bogus", "--json", str(tmp_path / "o.json")],
                         capture_output=True, text=True, env=bin_env, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "valid: colayer, ewma" in bad.stderr
    assert not (tmp_path / "o.json").exists()


def test_quality_command_passes_predictor_options(tmp_path, capsys):
    # `NAME:key=value` reaches the predictor: two EWMA rates score differently on the same trace.
    t = generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=1, prompt_tokens=2, decode_tokens=30))
    path = tmp_path / "t.npz"
    save_trace(t, path)
    out = tmp_path / "q.json"
    ns = argparse.Namespace(trace=str(path), predictors=["ewma:alpha=0.9", "ewma:alpha=0.01"], ks=[2],
                            json_out=str(out))
    assert quality_cmd.run(ns) == 0
    rows = {r["predictor"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"ewma:alpha=0.9", "ewma:alpha=0.01"}
    assert rows["ewma:alpha=0.9"]["recall_per_layer"] != rows["ewma:alpha=0.01"]["recall_per_layer"]
    bad = argparse.Namespace(trace=str(path), predictors=["ewma:beta=1"], ks=[2], json_out=None)
    with pytest.raises((ValueError, TypeError), match="beta"):
        quality_cmd.run(bad)
