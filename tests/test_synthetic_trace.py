"""Synthetic traces: deterministic by seed, well formed, the knobs do what they say, and the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from policies.cli.make_trace import main
from policies.synthetic import PRESETS, SyntheticConfig, generate
from policies.trace_stats import gini, trace_stats
from policies.traces import DECODE, load_trace

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
SMALL = dict(layers=6, experts=16, top_k=2, requests=3, prompt_tokens=4, decode_tokens=30)


def test_same_seed_identical_other_seed_differs():
    a, b = generate(SyntheticConfig(**SMALL, seed=7)), generate(SyntheticConfig(**SMALL, seed=7))
    c = generate(SyntheticConfig(**SMALL, seed=8))
    for name in ("experts", "weights", "token_ids", "phase", "request"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.experts, c.experts)


def test_shape_phases_weights_and_distinct_ids():
    t = generate(SyntheticConfig(**SMALL, seed=1))
    assert t.experts.shape == (3 * 34, 6, 2)
    assert t.phase.tolist() == ([0] * 4 + [1] * 30) * 3
    assert t.request.tolist() == sorted(t.request.tolist()) and set(t.request.tolist()) == {0, 1, 2}
    assert (t.experts >= 0).all() and (t.experts < 16).all()
    assert (t.experts[:, :, 0] != t.experts[:, :, 1]).all()  # top-k ids are distinct
    assert np.allclose(t.weights.sum(axis=2), 1, atol=1e-5)
    assert (np.diff(t.weights, axis=2) <= 0).all()  # ranked by weight


def test_knobs_move_the_statistics():
    base = dict(layers=4, experts=32, top_k=1, requests=2, prompt_tokens=0, decode_tokens=400, phases=1)
    flat = trace_stats(generate(SyntheticConfig(**base, skew=0.0, reuse=0.0, layer_corr=0.0, topic_strength=0.0)))
    skewed = trace_stats(generate(SyntheticConfig(**base, skew=1.5, reuse=0.0, layer_corr=0.0, topic_strength=0.0)))
    sticky = trace_stats(generate(SyntheticConfig(**base, skew=0.0, reuse=0.8, layer_corr=0.0, topic_strength=0.0)))
    chained = trace_stats(generate(SyntheticConfig(**base, skew=0.0, reuse=0.0, layer_corr=0.9, topic_strength=0.0)))
    assert skewed["gini"] > flat["gini"] + 0.3
    assert flat["reuse"] < 0.1 and sticky["reuse"] > 0.7
    assert chained["layer_lift"] > 3 * flat["layer_lift"]


@pytest.mark.parametrize("bad, field", [(dict(top_k=17), "top_k"), (dict(reuse=1.5), "reuse"),
                                        (dict(layer_corr=-0.1), "layer_corr"), (dict(requests=0), "requests")])
def test_bad_config_names_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{**SMALL, **bad})


def test_gini_known_values():
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)  # (n-1)/n for one holder


def test_cli_writes_loadable_trace(tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc = main(["--layers", "3", "--experts", "8", "--top-k", "2", "--requests", "2", "--prompt-tokens", "2",
               "--decode-tokens", "5", "--seed", "3", "--expert-bytes", "4096", "--out", str(out)])
    assert rc == 0
    t = load_trace(out)
    assert (t.num_layers, t.num_experts, t.top_k, t.tokens, t.expert_bytes) == (3, 8, 2, 14, 4096)
    assert t.meta.source.startswith("make-trace --layers 3")
    assert int((t.phase == DECODE).sum()) == 10
    ref = generate(SyntheticConfig(layers=3, experts=8, top_k=2, requests=2, prompt_tokens=2, decode_tokens=5,
                                   seed=3))
    assert np.array_equal(t.experts, ref.experts)


def test_cli_like_preset_with_override(tmp_path):
    out = tmp_path / "q.npz"
    assert main(["--like", "qwen3.6-moe", "--decode-tokens", "3", "--prompt-tokens", "1", "--out", str(out)]) == 0
    t = load_trace(out)
    assert (t.num_layers, t.num_experts, t.top_k, t.tokens) == (40, 256, 8, PRESETS["qwen3.6-moe"]["requests"] * 4)


def test_cli_bad_input_one_line_no_output(tmp_path, bin_env):
    out = tmp_path / "bad.npz"
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "make-trace"), "--layers", "2", "--experts", "4",
                        "--top-k", "9", "--requests", "1", "--prompt-tokens", "1", "--decode-tokens", "1",
                        "--out", str(out)], capture_output=True, text=True, env=bin_env, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "top_k" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_missing_shape_flags(tmp_path, capsys):
    assert main(["--layers", "2", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "missing --experts" in err and "--like" in err
    assert list(tmp_path.iterdir()) == []
