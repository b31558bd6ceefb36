"""ScoutGate: learns a planted token -> next-experts pattern, keeps per-layer mass near k,
round-trips through safetensors, refuses what it cannot use, and serves online predictions.

Tiny synthetic traces (4 layers x 16 experts, top-2) keep each test to a few seconds; one
slow test runs on a real Qwen trace.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from adapters.errors import CheckpointError
from policies.cli import scoutgate_cmd
from policies.events import Activation
from policies.predictors.scoutgate import NumpyScoutGate, ScoutGatePredictor, load_scoutgate, save_scoutgate
from policies.predictors.scoutgate_train import (evaluate, next_token_examples, split_in_time, split_requests,
                                                 train_scoutgate)
from policies.traces import FORMAT, TraceMeta, make_trace, save_trace

L, E, K = 4, 16, 2
SMALL = dict(vocab_buckets=1024, token_dim=16, dim=32, hidden=64, rank=8)


def planted_trace(*, requests: int = 10, prefill: int = 4, decode: int = 40, vocab: int = 30, seed: int = 0,
                  token_ids: bool = True):
    """Token ids drawn at random; the experts of row t+1 at layer l are a fixed function
    table[token of row t, l]. Uniform random tokens leave EWMA and the frequency prior near
    chance (k/E), so only a model that reads the context can do well."""
    rng = np.random.default_rng(seed)
    vocab_ids = rng.choice(200_000, size=vocab, replace=False)  # large ids exercise the hashing
    table = np.stack([np.stack([rng.choice(E, size=K, replace=False) for _ in range(L)]) for _ in range(vocab)])
    per = prefill + decode
    T = requests * per
    tok = rng.integers(0, vocab, size=T)
    experts = np.empty((T, L, K), dtype=np.int16)
    for t in range(T):
        if t % per == 0:  # first row of a request: nothing before it
            experts[t] = np.stack([rng.choice(E, size=K, replace=False) for _ in range(L)])
        else:
            experts[t] = table[tok[t - 1]]
    phase = np.tile(np.r_[np.zeros(prefill), np.ones(decode)], requests)
    meta = TraceMeta(format=FORMAT, model="planted", num_layers=L, num_experts=E, top_k=K, tokens=T,
                     has_token_ids=token_ids)
    ids = vocab_ids[tok] if token_ids else np.full(T, -1)
    return make_trace(experts, np.full((T, L, K), np.nan), ids, phase, np.repeat(np.arange(requests), per), meta)


@pytest.fixture(scope="module")
def planted():
    trace = planted_trace()
    train, held = split_requests(trace, 0.7, seed=1)
    model = train_scoutgate(trace, train_requests=train, epochs=40, lr=1e-2, seed=0, **SMALL)
    return trace, train, held, model


def test_learns_planted_pattern_beyond_the_baselines(planted):
    trace, _, held, model = planted
    scores = evaluate(model, trace, held)
    base = max(scores["ewma"]["recall"], scores["prior"]["recall"])
    # The pattern is fully learnable: ScoutGate must close at least half the gap to perfect.
    assert scores["scoutgate"]["recall"] >= base + 0.5 * (1.0 - base), scores
    assert scores["scoutgate"]["precision"] >= base + 0.5 * (1.0 - base), scores
    assert len(scores["scoutgate"]["recall_per_layer"]) == L


def test_cardinality_each_layer_sums_to_about_k(planted):
    trace, _, held, model = planted
    ex = next_token_examples(trace, np.isin(trace.request, held), model.config.history)
    sums = model.probabilities(ex.contexts).sum(-1)  # [N, L]
    assert sums.shape == (ex.rows.size, L)
    assert np.abs(sums.mean(0) - K).max() < 0.2 * K, sums.mean(0)
    assert np.abs(sums - K).max() < 0.5 * K, (sums.min(), sums.max())


def test_split_requests_disjoint_complete_and_seeded():
    trace = planted_trace(requests=7, decode=3)
    everything = set(range(7))
    for frac in (0.1, 0.5, 0.7, 0.95):
        for seed in range(3):
            train, held = split_requests(trace, frac, seed)
            assert train and held and not set(train) & set(held)
            assert set(train) | set(held) == everything
            assert split_requests(trace, frac, seed) == (train, held)
    assert len({split_requests(trace, 0.5, s) for s in range(10)}) > 1  # the seed matters
    # Examples of the held-out requests never target a row of a training request.
    train, held = split_requests(trace, 0.7, 0)
    ex = next_token_examples(trace, np.isin(trace.request, held), 8)
    assert ex.rows.size and set(trace.request[ex.rows].tolist()) <= set(held)
    one = planted_trace(requests=1, decode=20)
    with pytest.raises(ValueError, match="1 request"):
        split_requests(one)
    tr_rows, ev_rows = split_in_time(one, 0.7)
    assert not (tr_rows & ev_rows).any() and tr_rows.sum() == 14 and ev_rows.sum() == 6
    assert np.flatnonzero(tr_rows).max() < np.flatnonzero(ev_rows).min()


def test_save_load_roundtrip_identical(planted, tmp_path):
    trace, _, held, model = planted
    path = tmp_path / "sg.safetensors"
    save_scoutgate(model, path)
    loaded = load_scoutgate(path)
    assert loaded.config == model.config
    ex = next_token_examples(trace, np.isin(trace.request, held), model.config.history)
    np.testing.assert_array_equal(loaded.probabilities(ex.contexts), model.probabilities(ex.contexts))
    a = ScoutGatePredictor(L, E, K, weights_path=str(path))
    b = ScoutGatePredictor(L, E, K, model=model)
    for p in (a, b):
        for layer in range(L):
            p.observe(Activation(layer=layer, experts=(1, 2), token_id=int(trace.token_ids[5])))
    np.testing.assert_array_equal(a.predict_all(), b.predict_all())
    assert [x.name for x in tmp_path.iterdir()] == ["sg.safetensors"]  # no temp file left behind


def test_load_rejects_wrong_shape_truncated_and_foreign_files(planted, tmp_path):
    _, _, _, model = planted
    path = tmp_path / "sg.safetensors"
    save_scoutgate(model, path)
    with pytest.raises(CheckpointError, match=r"trained for 4 layers x 16 experts.*predictor is for 4 x 32"):
        ScoutGatePredictor(L, 32, K, weights_path=str(path))
    with pytest.raises(CheckpointError, match="trained for 4 layers"):
        ScoutGatePredictor(5, E, K, weights_path=str(path))
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*truncated"):
        load_scoutgate(cut)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="no ScoutGate config"):
        load_scoutgate(other)


def test_training_is_deterministic_by_seed():
    trace = planted_trace(requests=3, decode=10)
    runs = [train_scoutgate(trace, train_requests=(0, 1), epochs=2, seed=s, **SMALL) for s in (5, 5, 6)]
    sd = [r.state_dict() for r in runs]
    assert all(torch.equal(sd[0][n], sd[1][n]) for n in sd[0])
    assert not all(torch.equal(sd[0][n], sd[2][n]) for n in sd[0])


def test_refuses_trace_without_token_ids(tmp_path, capsys):
    trace = planted_trace(requests=3, decode=5, token_ids=False)
    with pytest.raises(ValueError, match="^trace planted has no token ids; ScoutGate needs them$"):
        train_scoutgate(trace, train_requests=(0, 1), epochs=1, **SMALL)
    src, out = tmp_path / "noids.npz", tmp_path / "w.safetensors"
    save_trace(trace, src)
    assert scoutgate_cmd.main(["train", "--trace", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "noids.npz has no token ids; ScoutGate needs them" in err
    assert not out.exists()


def test_predictor_one_forward_per_token_and_next_visit_semantics(planted):
    trace, _, _, model = planted
    p = ScoutGatePredictor(L, E, K, model=model, blend=0.0)
    ids = [int(x) for x in trace.token_ids[:6]]
    for n, tok in enumerate(ids):
        for layer in range(L):
            p.observe(Activation(layer=layer, experts=(0, 1), token_id=tok))
            got = p.predict_all()
            # layers 0..layer already ran for this token: they next run for the next token
            now = model.probabilities(np.array([ids[max(0, n - 7): n + 1]]))[0]
            before = model.probabilities(np.array([ids[max(0, n - 8): n] or [-1]]))[0]
            # the predictor runs the float64 numpy copy of the float32 torch model
            np.testing.assert_allclose(got[: layer + 1], now[: layer + 1], atol=1e-5)
            np.testing.assert_allclose(got[layer + 1:], before[layer + 1:], atol=1e-5)
    assert p.degraded is None
    assert p.forward_passes <= len(ids) + 1  # not one per predict call
    assert got.dtype == np.float64 and ((got >= 0) & (got <= 1)).all()


def test_numpy_serving_pass_matches_the_torch_model(planted):
    trace, _, held, model = planted
    forward = NumpyScoutGate(model)
    ex = next_token_examples(trace, np.isin(trace.request, held), model.config.history)
    contexts = np.concatenate([ex.contexts[:40], np.full((1, model.config.history), -1)])  # + an empty one
    contexts[:5, :3] = -1  # short contexts (start of a request)
    want = model.probabilities(contexts)
    got = np.stack([forward(tuple(c.tolist())) for c in contexts])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # different contexts give different answers


def test_predictor_degrades_without_token_ids_or_weights(planted):
    _, _, _, model = planted
    p = ScoutGatePredictor(L, E, K, model=model)
    p.observe(Activation(layer=0, experts=(3, 4), token_id=None))
    assert p.degraded and "no token ids" in p.degraded
    # EWMA started at the training prior and moved towards the observed experts
    want = 0.7 * model.prior.double().numpy()[0]
    want[[3, 4]] += 0.3
    np.testing.assert_allclose(p.predict(0), want)
    p.observe(Activation(layer=0, experts=(3, 4), token_id=17))
    assert p.degraded is None  # ids came back: the model serves again
    bare = ScoutGatePredictor(L, E, K)
    assert bare.degraded and "no trained" in bare.degraded
    np.testing.assert_allclose(bare.predict(1), np.full(E, K / E))


def test_cli_train_then_eval_on_held_out(tmp_path, capsys):
    src, out = tmp_path / "planted.npz", tmp_path / "w.safetensors"
    save_trace(planted_trace(requests=4, decode=12), src)
    assert scoutgate_cmd.main(["train", "--trace", str(src), "--out", str(out), "--epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "held out" in text and "ewma" in text and "prior" in text and out.exists()
    assert scoutgate_cmd.main(["eval", "--trace", str(src), "--weights", str(out)]) == 0
    assert "requests" in capsys.readouterr().out
    other = tmp_path / "other.npz"
    t = planted_trace(requests=2, decode=3)
    save_trace(make_trace(t.experts, t.weights, t.token_ids, t.phase, t.request,
                          TraceMeta(format=FORMAT, model="wide", num_layers=L, num_experts=E * 2, top_k=K,
                                    tokens=t.tokens, has_token_ids=True)), other)
    assert scoutgate_cmd.main(["eval", "--trace", str(other), "--weights", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "trained for 4 layers x 16 experts" in err


def test_importing_policies_does_not_import_torch():
    code = ("import sys, policies, policies.events, policies.predictors, policies.predictors.base; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=str(scoutgate_cmd.Path(__file__).parent.parent)
                          ).returncode == 0


@pytest.mark.slow
def test_real_qwen_trace_beats_prior_and_llama_is_refused(real_traces):
    from policies.traces import load_trace

    with pytest.raises(ValueError, match="has no token ids; ScoutGate needs them"):
        train_scoutgate(load_trace(real_traces / "llama4-maverick-mmlu.npz"), train_requests=(0,))
    trace = load_trace(real_traces / "qwen1.5-moe-a2.7b-chat.npz")
    train, held = split_requests(trace, 0.7, 0)
    model = train_scoutgate(trace, train_requests=train, seed=0)
    scores = evaluate(model, trace, held)
    assert scores["scoutgate"]["recall"] > scores["prior"]["recall"], scores
    # the predictor's default blend: the model adds to what the EWMA knows about the request
    assert scores["scoutgate+ewma 0.5"]["recall"] > scores["ewma"]["recall"], scores
    assert np.abs(np.array(scores["prob_sum_per_layer"]) - trace.top_k).max() < 0.25 * trace.top_k
