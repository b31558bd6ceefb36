"""Synthetic routing traces in the `moe-routing-trace/1` format, deterministic by seed.

`generate(SyntheticConfig(...)) -> Trace`. The model of routing, per token row and layer:

- **Skewed popularity** (`skew` a >= 0): layer l's base popularity of the expert of rank r
  is proportional to 1 / (r + 1)^a, ranks assigned by a per-layer random permutation.
  a = 0 is uniform; a ~ 1 is Zipf.
- **Topics** (`phases` n >= 1, `topic_strength` s >= 0): each request draws one of n
  topics; topic j multiplies layer l's popularity by exp(s * z_jle), z ~ N(0, 1), so
  prompts on different subjects favour different experts.
- **Layer correlation** (`layer_corr` c in [0, 1]): a fixed random map f_l sends each
  expert of layer l to one of layer l+1; layer l+1 samples from
  (1 - c) * popularity + c * uniform over f_l(experts chosen at l for this row).
- **Temporal reuse** (`reuse` p in [0, 1]): each expert chosen at the previous row of the
  same request and layer is kept with probability p; the remaining slots are sampled
  (without replacement) from the distribution above.
- **Router weights**: a Dirichlet(1) draw over the K slots, sorted descending (they sum
  to 1); the kept experts take the highest weights, so ids are ranked by weight.

Requests have `prompt_tokens` prefill rows (phase 0) then `decode_tokens` decode rows
(phase 1); token ids are uniform over a 32k vocabulary. `PRESETS` hold settings tuned so
that `policies.trace_stats` of the result resembles the real traces in data/traces (`--like`).
"""
from __future__ import annotations

import msgspec
import numpy as np

from .traces import FORMAT, Trace, TraceMeta, make_trace

VOCAB = 32000


class SyntheticConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Generator settings; checked on construction (`ValueError` names the bad field)."""

    layers: int
    experts: int
    top_k: int
    requests: int
    prompt_tokens: int
    decode_tokens: int
    seed: int = 0
    skew: float = 1.0
    reuse: float = 0.3
    layer_corr: float = 0.3
    phases: int = 4
    topic_strength: float = 1.0
    expert_bytes: int | None = None
    model: str = "synthetic"

    def __post_init__(self):
        checks = [
            (self.layers >= 1, "layers must be >= 1"),
            (self.experts >= 1, "experts must be >= 1"),
            (1 <= self.top_k <= self.experts, "top_k must be in [1, experts]"),
            (self.experts <= 32767, "experts must fit int16 (<= 32767)"),
            (self.requests >= 1, "requests must be >= 1"),
            (self.prompt_tokens >= 0 and self.decode_tokens >= 0, "token counts must be >= 0"),
            (self.prompt_tokens + self.decode_tokens >= 1, "each request needs at least one token"),
            (self.skew >= 0, "skew must be >= 0"),
            (0 <= self.reuse <= 1, "reuse must be in [0, 1]"),
            (0 <= self.layer_corr <= 1, "layer_corr must be in [0, 1]"),
            (self.phases >= 1, "phases must be >= 1"),
            (self.topic_strength >= 0, "topic_strength must be >= 0"),
            (self.expert_bytes is None or self.expert_bytes > 0, "expert_bytes must be > 0"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ValueError(f"synthetic trace: {problem}")


# name -> settings that resemble a real trace (shape and size copied, statistics tuned)
PRESETS: dict[str, dict] = {
    "llama4-maverick": dict(layers=24, experts=128, top_k=1, requests=235, prompt_tokens=20, decode_tokens=126,
                            skew=1.3, reuse=0.2, layer_corr=0.12, phases=10, topic_strength=1.6,
                            expert_bytes=251658240),
    "qwen1.5-moe": dict(layers=24, experts=60, top_k=4, requests=6, prompt_tokens=55, decode_tokens=128,
                        skew=0.22, reuse=0.07, layer_corr=0.56, phases=5, topic_strength=0.4,
                        expert_bytes=17301504),
    "qwen3.6-moe": dict(layers=40, experts=256, top_k=8, requests=1, prompt_tokens=36, decode_tokens=127,
                        skew=1.16, reuse=0.18, layer_corr=0.64, phases=1, topic_strength=0.4),
}


def _popularity(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """[phases, L, E] sampling weights (unnormalised logs)."""
    L, E = cfg.layers, cfg.experts
    base = -cfg.skew * np.log(np.arange(1, E + 1, dtype=np.float64))
    logp = np.stack([base[rng.permutation(E)] for _ in range(L)])
    topics = cfg.topic_strength * rng.standard_normal((cfg.phases, L, E))
    return logp[None] + topics


def generate(cfg: SyntheticConfig, source: str = "policies.synthetic.generate") -> Trace:
    """A checked synthetic `Trace`; the same config (seed included) gives identical arrays."""
    rng = np.random.default_rng(cfg.seed)
    L, E, K = cfg.layers, cfg.experts, cfg.top_k
    per_req = cfg.prompt_tokens + cfg.decode_tokens
    T = cfg.requests * per_req
    logpop = _popularity(cfg, rng)
    pop = np.exp(logpop - logpop.max(axis=2, keepdims=True))
    pop /= pop.sum(axis=2, keepdims=True)
    layer_map = rng.integers(0, E, size=(L, E))  # f_l: expert of layer l -> expert of layer l+1
    topic_of = rng.integers(0, cfg.phases, size=cfg.requests)

    experts = np.empty((T, L, K), dtype=np.int16)
    weights = np.empty((T, L, K), dtype=np.float32)
    t = 0
    for r in range(cfg.requests):
        p_topic = pop[topic_of[r]]
        prev: list[np.ndarray | None] = [None] * L
        for _ in range(per_req):
            below = None
            for layer in range(L):
                q = p_topic[layer]
                if below is not None and cfg.layer_corr > 0:
                    q = (1 - cfg.layer_corr) * q
                    np.add.at(q, layer_map[layer - 1, below], cfg.layer_corr / below.size)
                chosen = _choose(rng, q, prev[layer], cfg.reuse, K)
                experts[t, layer] = chosen
                prev[layer] = below = chosen
            t += 1
        # weights drawn in one block per request: descending Dirichlet(1) per (row, layer)
    w = rng.dirichlet(np.ones(K), size=(T, L)) if K > 1 else np.ones((T, L, 1))
    weights[:] = -np.sort(-w, axis=2)
    phase = np.tile(np.r_[np.zeros(cfg.prompt_tokens), np.ones(cfg.decode_tokens)], cfg.requests)
    request = np.repeat(np.arange(cfg.requests), per_req)
    token_ids = rng.integers(0, VOCAB, size=T)
    meta = TraceMeta(format=FORMAT, model=cfg.model, num_layers=L, num_experts=E, top_k=K, tokens=T,
                     layer_ids=tuple(range(L)), has_weights=True, has_token_ids=True,
                     workload=f"synthetic: {cfg.requests} requests x ({cfg.prompt_tokens} prompt + "
                              f"{cfg.decode_tokens} decode) tokens",
                     source=source, notes=msgspec.json.encode(cfg).decode(),
                     expert_bytes_bf16=cfg.expert_bytes)
    return make_trace(experts, weights, token_ids, phase, request, meta, where=source)


def _choose(rng: np.random.Generator, q: np.ndarray, prev: np.ndarray | None, reuse: float, k: int) -> np.ndarray:
    """k distinct experts: kept ones from `prev` (each with prob `reuse`) first, rest ~ q."""
    if prev is not None and reuse > 0:
        kept = prev[rng.random(prev.size) < reuse]
    else:
        kept = prev[:0] if prev is not None else np.empty(0, dtype=np.int64)
    need = k - kept.size
    if need == 0:
        return kept
    # Gumbel top-k = sampling without replacement in proportion to q
    keys = np.log(np.maximum(q, 1e-300)) + rng.gumbel(size=q.size)
    keys[kept] = -np.inf
    fresh = np.argpartition(-keys, need - 1)[:need]
    fresh = fresh[np.argsort(-keys[fresh])]
    return np.concatenate((kept, fresh))
