"""Trace reader/writer: round trip, every malformed-file case, the shared traces, replay."""
from __future__ import annotations

import json

import numpy as np
import pytest

from policies.traces import (DECODE, PREFILL, Trace, TraceError, TraceMeta, decode_steps, load_trace,
                             make_trace, save_trace)

SHARED = ["llama4-maverick-mmlu.npz", "qwen1.5-moe-a2.7b-chat.npz", "qwen3.6-35b-a3b.npz"]


def tiny_trace() -> Trace:
    """2 requests: r0 = 2 prefill + 2 decode rows, r1 = 1 prefill + 1 decode row; L=3, E=5, K=2."""
    rng = np.random.default_rng(0)
    T, L, K, E = 6, 3, 2, 5
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    experts[1, 2, 1] = -1  # a missing entry
    weights = rng.random((T, L, K)).astype(np.float32)
    meta = TraceMeta(format="moe-routing-trace/1", model="tiny", num_layers=L, num_experts=E, top_k=K,
                     tokens=T, has_weights=True, expert_bytes_bf16=1234)
    return make_trace(experts, weights, np.arange(T) + 100, [0, 0, 1, 1, 0, 1], [0, 0, 0, 0, 1, 1], meta)


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def arrays_of(trace: Trace) -> dict:
    return {"experts": trace.experts, "weights": trace.weights, "token_ids": trace.token_ids,
            "phase": trace.phase, "request": trace.request,
            "meta": np.array(json.dumps({"format": "moe-routing-trace/1", "model": "tiny", "num_layers": 3,
                                          "num_experts": 5, "top_k": 2, "tokens": 6}))}


def test_round_trip(tmp_path):
    t = tiny_trace()
    p = tmp_path / "t.npz"
    save_trace(t, p)
    u = load_trace(p)
    for name in ("experts", "weights", "token_ids", "phase", "request"):
        a, b = getattr(t, name), getattr(u, name)
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), name
    assert u.meta == t.meta
    assert (u.num_layers, u.num_experts, u.top_k, u.tokens, u.expert_bytes) == (3, 5, 2, 6, 1234)
    assert [x.name for x in tmp_path.iterdir()] == ["t.npz"]  # no temp file left


def test_save_refuses_invalid_and_leaves_nothing(tmp_path):
    t = tiny_trace()
    bad = Trace(t.experts, t.weights, t.token_ids, t.phase, t.request,
                TraceMeta(format="moe-routing-trace/1", model="x", num_layers=3, num_experts=5, top_k=2, tokens=7))
    with pytest.raises(TraceError, match="tokens=7"):
        save_trace(bad, tmp_path / "bad.npz")
    assert list(tmp_path.iterdir()) == []


def _mutate(tmp_path, **changes):
    arrays = arrays_of(tiny_trace())
    for k, v in changes.items():
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    p = tmp_path / "bad.npz"
    write_npz(p, **arrays)
    return p


T0 = tiny_trace()


@pytest.mark.parametrize("changes, problem", [
    ({"weights": None}, "missing array 'weights'"),
    ({"experts": T0.experts.astype(np.int32)}, "'experts' must be int16"),
    ({"phase": T0.phase.astype(np.int64)}, "'phase' must be uint8"),
    ({"experts": T0.experts[:, :, 0]}, "'experts' must be int16 with 3 dims"),
    ({"weights": T0.weights[:, :2]}, "'weights' has shape"),
    ({"request": T0.request[:5]}, "'request' has shape"),
    ({"experts": np.where(T0.experts == T0.experts[3, 1, 0], 5, T0.experts).astype(np.int16)},
     r"expert id 5 out of range \[-1, 5\)"),
    ({"experts": np.where(T0.experts == T0.experts[3, 1, 0], -2, T0.experts).astype(np.int16)}, "expert id -2"),
    ({"phase": np.array([0, 0, 1, 2, 0, 1], np.uint8)}, "phase value 2"),
    ({"request": np.array([0, 0, 1, 1, 0, 0], np.int32)}, "not consecutive"),
    ({"meta": np.array("{not json")}, "bad meta JSON"),
    ({"meta": np.array(json.dumps({"format": "moe-routing-trace/1", "model": "m", "num_layers": 3,
                                   "num_experts": 5, "top_k": 2}))}, "bad meta JSON.*tokens"),
    ({"meta": np.array(json.dumps({"format": "moe-routing-trace/2", "model": "m", "num_layers": 3,
                                   "num_experts": 5, "top_k": 2, "tokens": 6}))}, "format is 'moe-routing-trace/2'"),
    ({"meta": np.array(json.dumps({"format": "moe-routing-trace/1", "model": "m", "num_layers": 4,
                                   "num_experts": 5, "top_k": 2, "tokens": 6}))}, "num_layers=4 disagrees"),
    ({"meta": np.array(json.dumps({"format": "moe-routing-trace/1", "model": "m", "num_layers": 3,
                                   "num_experts": "five", "top_k": 2, "tokens": 6}))}, "bad meta JSON"),
    ({"meta": np.array(3)}, "'meta' must be a 0-d str"),
])
def test_malformed_files_name_file_and_problem(tmp_path, changes, problem):
    p = _mutate(tmp_path, **changes)
    with pytest.raises(TraceError, match=problem) as e:
        load_trace(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg


def test_pickle_only_object_array_refused(tmp_path):
    arrays = arrays_of(tiny_trace())
    arrays["token_ids"] = np.array([object()] * 6, dtype=object)
    p = tmp_path / "obj.npz"
    with open(p, "wb") as f:
        np.savez(f, **arrays)  # object arrays are stored as pickles
    with pytest.raises(TraceError, match=r"obj.npz: array 'token_ids' cannot be read without pickle"):
        load_trace(p)


@pytest.mark.parametrize("content, problem", [
    (b"", r"not an \.npz routing trace \(not a zip archive\); give a file written by make-trace"),
    (b"a,b\n1,2\n", r"not an \.npz routing trace \(not a zip archive\)"),  # numpy would call this a pickle
    (b"PK\x03\x04garbage", "not a readable")])
def test_not_an_npz(tmp_path, content, problem):
    p = tmp_path / "x.npz"
    p.write_bytes(content)
    with pytest.raises(TraceError, match=problem):
        load_trace(p)


def test_truncated_file(tmp_path):
    p = tmp_path / "t.npz"
    save_trace(tiny_trace(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=str(p)):
        load_trace(p)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "nope.npz")


@pytest.mark.parametrize("name", SHARED)
def test_loads_real_traces(real_traces, name):
    t = load_trace(real_traces / name)
    assert t.tokens == t.meta.tokens and t.experts.shape == (t.tokens, t.num_layers, t.top_k)
    # decode rows per FORMAT.md's table
    expected_decode = {"llama4-maverick-mmlu.npz": 29684, "qwen1.5-moe-a2.7b-chat.npz": 768,
                       "qwen3.6-35b-a3b.npz": 127}[name]
    assert int((t.phase == DECODE).sum()) == expected_decode
    assert sum(1 for _ in decode_steps(t)) == expected_decode


def test_decode_steps_order_and_prefill_union():
    t = tiny_trace()
    steps = list(decode_steps(t))
    assert [s.rows for s in steps] == [(2, 3), (3, 4), (5, 6)]
    assert all(s.phase == DECODE for s in steps)
    assert [s.request for s in steps] == [0, 0, 1]
    assert np.array_equal(steps[0].layer_experts(1), t.experts[2, 1])
    assert steps[0].token_ids.tolist() == [102]

    steps = list(decode_steps(t, include_prefill=True))
    assert [(s.rows, s.phase) for s in steps] == [((0, 2), PREFILL), ((2, 3), DECODE), ((3, 4), DECODE),
                                                  ((4, 5), PREFILL), ((5, 6), DECODE)]
    first = steps[0]
    for layer in range(3):
        want = set(t.experts[0:2, layer].ravel().tolist()) - {-1}
        got = first.layer_experts(layer)
        assert set(got.tolist()) == want and got.size == len(want)
        assert np.isnan(first.layer_weights(layer)).all()
    assert first.token_ids.tolist() == [100, 101]
    # the missing entry (row 1, layer 2) is not an expert
    assert -1 not in first.layer_experts(2).tolist()
