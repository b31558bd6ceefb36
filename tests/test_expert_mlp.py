"""The expert MLP of each family against a float64 reference written here from the model cards."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.kernels.expert_mlp import expert_forward, moe_forward, router_weights, weighted_sum

H, I, N = 12, 10, 3


def _rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _silu(v):
    return [a / (1 + math.exp(-a)) for a in v]


def _matvec(w, x):  # w [out, in] as nested lists
    return [sum(wi * xi for wi, xi in zip(row, x)) for row in w]


def _ref(family, t, x):
    """Plain-Python float64 maths, one row at a time (independent of torch ops)."""
    out = []
    for row in x.tolist():
        if family in ("gpt-oss", "fused"):
            if family == "gpt-oss":
                h = [a + b for a, b in zip(_matvec(t["mlp1_weight"].tolist(), row), t["mlp1_bias"].tolist())]
            else:
                h = [a + b for a, b in zip(_matvec(t["gate_up_proj"].T.tolist(), row),
                                           t["gate_up_proj_bias"].tolist())]
            gate, lin = h[0::2], h[1::2]
            gate = [min(g, 7.0) for g in gate]
            lin = [max(-7.0, min(7.0, v)) for v in lin]
            act = [(v + 1) * g / (1 + math.exp(-1.702 * g)) for g, v in zip(gate, lin)]
            if family == "gpt-oss":
                y = [a + b for a, b in zip(_matvec(t["mlp2_weight"].tolist(), act), t["mlp2_bias"].tolist())]
            else:
                y = [a + b for a, b in zip(_matvec(t["down_proj"].T.tolist(), act), t["down_proj_bias"].tolist())]
        else:
            names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
            g_, u_ = _silu(_matvec(t[names[0]].tolist(), row)), _matvec(t[names[1]].tolist(), row)
            y = _matvec(t[names[2]].tolist(), [a * b for a, b in zip(g_, u_)])
        out.append(y)
    return torch.tensor(out, dtype=torch.float64)


def _tensors(family, g):
    s = 3.0  # large enough that the GPT-OSS clamps bite
    if family == "gpt-oss":
        return {"mlp1_weight": _rand(2 * I, H, g=g) * s, "mlp1_bias": _rand(2 * I, g=g),
                "mlp2_weight": _rand(H, I, g=g), "mlp2_bias": _rand(H, g=g)}
    if family == "fused":
        return {"gate_up_proj": _rand(H, 2 * I, g=g) * s, "gate_up_proj_bias": _rand(2 * I, g=g),
                "down_proj": _rand(I, H, g=g), "down_proj_bias": _rand(H, g=g)}
    if family == "mixtral":
        return {"w1": _rand(I, H, g=g), "w2": _rand(H, I, g=g), "w3": _rand(I, H, g=g)}
    return {"gate_proj": _rand(I, H, g=g), "up_proj": _rand(I, H, g=g), "down_proj": _rand(H, I, g=g)}


@pytest.mark.parametrize("family", ["gpt-oss", "fused", "mixtral", "qwen-moe"])
def test_expert_matches_float64_reference(family):
    g = torch.Generator().manual_seed(1)
    t, x = _tensors(family, g), _rand(N, H, g=g)
    got = expert_forward(family, t, x)
    assert got.shape == (N, H)
    torch.testing.assert_close(got, _ref(family, t, x), rtol=1e-10, atol=1e-10)
    if family in ("gpt-oss", "fused"):  # the clamp must have been exercised
        h = x @ (t["mlp1_weight"].T if family == "gpt-oss" else t["gate_up_proj"])
        assert (h[:, 0::2] > 7).any() and (h[:, 1::2].abs() > 7).any()


def test_moe_weighted_sum_with_row_routing():
    g = torch.Generator().manual_seed(2)
    experts = [_tensors("mixtral", g) for _ in range(2)]
    x = _rand(N, H, g=g)
    rows = [torch.tensor([0, 2]), torch.tensor([1, 2])]
    got = moe_forward("mixtral", experts, x, [0.25, 0.75], rows)
    want = torch.zeros(N, H, dtype=torch.float64)
    want[[0, 2]] += 0.25 * _ref("mixtral", experts[0], x[[0, 2]])
    want[[1, 2]] += 0.75 * _ref("mixtral", experts[1], x[[1, 2]])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family 'dense'.*gpt-oss"):
        expert_forward("dense", {}, torch.zeros(1, H))


def test_moe_compute_order_changes_nothing_and_waits_before_each_expert(monkeypatch):
    """`order` + `ready`: each expert computed after its own ready(i), in that order; the sum
    stays in router order, so bf16 results equal the router-order run bit for bit."""
    from pipeline.kernels import expert_mlp

    g = torch.Generator().manual_seed(3)
    experts = [{k: v.to(torch.bfloat16) for k, v in _tensors("qwen-moe", g).items()} for _ in range(4)]
    x, w = _rand(1, H, g=g).to(torch.bfloat16), [0.4, 0.3, 0.2, 0.1]
    want = moe_forward("qwen-moe", experts, x, w)
    seen = []

    def watched(family, t, xi):
        assert seen and experts[seen[-1]] is t  # ready(i) came right before expert i's math
        return expert_forward(family, t, xi)

    monkeypatch.setattr(expert_mlp, "expert_forward", watched)
    got = moe_forward("qwen-moe", experts, x, w, ready=seen.append, order=(2, 0, 3, 1))
    assert seen == [2, 0, 3, 1]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    with pytest.raises(ValueError, match="each of the 4 experts once"):
        moe_forward("qwen-moe", experts, x, w, order=(0, 1, 1, 3))


def test_weighted_sum_is_float32_and_independent_of_how_weights_arrive():
    """bf16 expert outputs are weighted and summed in float32 (a bf16 sum would round at each
    add); floats and a device tensor of the same weights give the same bits."""
    g = torch.Generator().manual_seed(4)
    ys = _rand(3, 2, H, g=g).to(torch.bfloat16)
    w = [0.5, 0.3125, 0.1875]
    got = weighted_sum(ys, router_weights(w, ys))
    assert got.dtype == torch.float32
    want = sum(wi * ys[i].double() for i, wi in enumerate(w))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    experts = [{k: v.to(torch.bfloat16) for k, v in _tensors("mixtral", g).items()} for _ in range(3)]
    x = _rand(1, H, g=g).to(torch.bfloat16)
    a = moe_forward("mixtral", experts, x, w)
    b = moe_forward("mixtral", experts, x, torch.tensor(w))
    assert a.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_weighted_sum_with_row_routing_is_float32_for_bf16():
    g = torch.Generator().manual_seed(5)
    experts = [{k: v.to(torch.bfloat16) for k, v in _tensors("mixtral", g).items()} for _ in range(2)]
    x = _rand(N, H, g=g).to(torch.bfloat16)
    got = moe_forward("mixtral", experts, x, [0.25, 0.75], [torch.tensor([0, 2]), None])
    assert got.dtype == torch.float32
    want = 0.75 * expert_forward("mixtral", experts[1], x).float()
    want[[0, 2]] += 0.25 * expert_forward("mixtral", experts[0], x[[0, 2]]).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
