"""The transformers loop body on fetched experts: given each expert's rows found beforehand on the host
(a one-row pass: its top-k slot; more rows: expert_rows), it computes the same bits as the loop's
own torch.where path, without calling it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pipeline.kernels.hf_experts as hf_experts
from pipeline.kernels.hf_experts import ExpertWeights, Rows, add_expert, expert_rows, row_zero

H, I, K = 64, 48, 4


def _module(transposed: bool):
    return SimpleNamespace(is_transposed=transposed, act_fn=F.silu,
                           _apply_gate=lambda g: g[..., ::2].clamp(max=7.0) * torch.sigmoid(g[..., 1::2]))


def _weights(transposed: bool, g: torch.Generator) -> ExpertWeights:
    r = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    if transposed:  # GPT-OSS: [H, 2I] and [I, H], with biases
        return ExpertWeights(r(H, 2 * I), r(I, H), r(2 * I), r(H))
    return ExpertWeights(r(2 * I, H), r(H, I))


@pytest.mark.parametrize("transposed", [True, False])
def test_one_row_with_known_slots_gives_the_loop_bits(transposed):
    g = torch.Generator().manual_seed(1)
    module = _module(transposed)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    index = torch.tensor([[5, 2, 9, 0]])
    weights = torch.softmax(torch.randn(1, K, generator=g), -1).to(torch.bfloat16)
    experts = {e: _weights(transposed, g) for e in index[0].tolist()}
    ref, got = torch.zeros_like(x), torch.zeros_like(x)
    for e in sorted(experts):
        add_expert(module, ref, x, index, weights, e, experts[e])
        slot = index[0].tolist().index(e)
        add_expert(module, got, x, index, weights, e, experts[e], at=Rows(slot, row_zero(x.device)))
    assert ref.abs().sum() > 0
    assert torch.equal(ref, got)


def test_one_row_with_known_slots_does_not_look_for_rows_on_the_device(monkeypatch):
    """torch.where on a device tensor waits for the device; the known-slot path must not call it."""
    calls = []
    real_where = torch.where
    monkeypatch.setattr(hf_experts.torch, "where", lambda *a, **k: calls.append(1) or real_where(*a, **k))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    index, weights = torch.tensor([[3, 1, 2, 0]]), torch.full((1, K), 0.25, dtype=torch.bfloat16)
    out = torch.zeros_like(x)
    add_expert(_module(False), out, x, index, weights, 3, _weights(False, g), at=Rows(0, row_zero(x.device)))
    assert calls == []
    add_expert(_module(False), out, x, index, weights, 1, _weights(False, g))
    assert calls == [1]


@pytest.mark.parametrize("transposed", [True, False])
def test_many_rows_with_their_rows_found_on_the_host_give_the_loop_bits(transposed, monkeypatch):
    g = torch.Generator().manual_seed(3)
    module = _module(transposed)
    rows = 7
    x = torch.randn(rows, H, generator=g).to(torch.bfloat16)
    index = torch.stack([torch.randperm(9, generator=g)[:K] for _ in range(rows)])  # experts 0..8, some unused
    weights = torch.softmax(torch.randn(rows, K, generator=g), -1).to(torch.bfloat16)
    used = sorted(set(index.flatten().tolist()))
    experts = {e: _weights(transposed, g) for e in used}
    where = expert_rows(index, used, x.device)
    assert set(where) == set(used)
    ref, got = torch.zeros_like(x), torch.zeros_like(x)
    for e in used:
        add_expert(module, ref, x, index, weights, e, experts[e])
    calls = []
    real_where = torch.where
    monkeypatch.setattr(hf_experts.torch, "where", lambda *a, **k: calls.append(1) or real_where(*a, **k))
    for e in used:
        add_expert(module, got, x, index, weights, e, experts[e], at=where[e])
    assert calls == []
    assert ref.abs().sum() > 0
    assert torch.equal(ref, got)
