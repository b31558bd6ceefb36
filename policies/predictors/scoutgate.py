"""ScoutGate: a two-tower model that predicts, from the last few token ids, which experts each
layer will use for the NEXT token; and `ScoutGatePredictor`, its online `Predictor`.

Offers:
- `ScoutGateConfig`: frozen dims and identity of a trained model (stored in the weights file).
- `ScoutGateModel(config)`: torch module, `forward(buckets [B, m]) -> logits [B, L, E]`;
  `probabilities(token_ids)` for numpy callers.
- `token_buckets(token_ids, buckets)`: the tokenizer-agnostic hash of token ids.
- `save_scoutgate(model, path)` / `load_scoutgate(path)`: safetensors weights, config in
  the header's `__metadata__` (no pickle). Any problem -> `CheckpointError` naming the file.
- `NumpyScoutGate(model)`: the same inference pass in numpy, one context at a time (serving).
- `ScoutGatePredictor(num_layers, num_experts, top_k, *, weights_path, model, history, blend)`.

Context tower: hashed token embeddings -> position-weighted pooling -> linear + LayerNorm,
joined with a learned layer embedding -> MLP -> query [L, d]. Expert tower: an embedding per
(layer, expert). Score = query^T U V^T expert + bias[layer, expert] (rank-r bilinear).

Torch is imported here and in `scoutgate_train` only; nothing in `policies` imports this
module at import time (the registry imports it lazily), so policies imports without torch.
Everything runs on the CPU.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import torch
from torch import nn

from adapters.atomic_file import replaced_atomically
from adapters.errors import CheckpointError
from adapters.safetensors_io import read_header

from ..events import Activation
from .base import Predictor

FORMAT = "scoutgate/1"
_META_KEY = "scoutgate"
# Fibonacci hashing: spreads consecutive token ids over the buckets, so tokenizers with
# vocabularies larger than the bucket count collide at random rather than in blocks.
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


class ScoutGateConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Shape of a ScoutGate model and what it was trained on; validated on construction."""

    num_layers: int
    num_experts: int
    top_k: int
    history: int = 8  # token ids of context (most recent last)
    vocab_buckets: int = 1 << 16  # hashed token vocabulary; a power of two
    token_dim: int = 32
    layer_dim: int = 16
    dim: int = 64  # query / expert embedding size d
    hidden: int = 128
    rank: int = 16  # rank r of the bilinear score
    pooling: str = "weighted"  # "weighted" (learned per position) or "mean"
    trained_on: str = ""  # identity of the training trace
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"scoutgate config: need layers >= 1, experts >= 1, 1 <= top_k <= experts; got "
                             f"{self.num_layers}, {self.num_experts}, {self.top_k}")
        b = self.vocab_buckets
        if b < 2 or b & (b - 1):
            raise ValueError(f"scoutgate config: vocab_buckets must be a power of two >= 2, got {b}")
        for name in ("history", "token_dim", "layer_dim", "dim", "hidden", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"scoutgate config: {name} must be >= 1, got {getattr(self, name)}")
        if self.pooling not in ("weighted", "mean"):
            raise ValueError(f"scoutgate config: pooling must be 'weighted' or 'mean', got {self.pooling!r}")
        if self.format != FORMAT:
            raise ValueError(f"scoutgate config: format {self.format!r}, this code reads {FORMAT!r}")


def token_buckets(token_ids, buckets: int) -> np.ndarray:
    """int64 array of bucket ids in [0, buckets]; `buckets` itself is the pad (ids < 0)."""
    ids = np.atleast_1d(np.asarray(token_ids, dtype=np.int64))
    shift = np.uint64(64 - (buckets.bit_length() - 1))
    hashed = ((ids.astype(np.uint64) * _HASH_MUL) >> shift).astype(np.int64)
    return np.where(ids < 0, buckets, hashed)


class ScoutGateModel(nn.Module):
    """The two towers. `prior` [L, E] is the training set's expert frequency (a buffer):
    the fallback when events carry no token ids, and the frequency baseline in `evaluate`."""

    def __init__(self, config: ScoutGateConfig):
        super().__init__()
        c = self.config = config
        L, E = c.num_layers, c.num_experts
        # Sparse gradients: a batch touches a few hundred of the 2^16 rows, and a dense optimizer
        # step over the whole table would cost most of the training time.
        self.tokens = nn.Embedding(c.vocab_buckets + 1, c.token_dim, padding_idx=c.vocab_buckets, sparse=True)
        # Start with a mild recency bias: the latest tokens say most about the next one.
        self.position_logits = nn.Parameter(torch.linspace(-1.0, 1.0, c.history))
        self.project = nn.Linear(c.token_dim, c.dim)
        self.norm = nn.LayerNorm(c.dim)
        self.layer_emb = nn.Parameter(torch.randn(L, c.layer_dim) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(c.dim + c.layer_dim, c.hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(c.hidden, c.dim))  # tanh GELU: `NumpyScoutGate` computes the same
        self.expert_emb = nn.Parameter(torch.randn(L, E, c.dim) * 0.1)
        self.u = nn.Linear(c.dim, c.rank, bias=False)
        self.v = nn.Linear(c.dim, c.rank, bias=False)
        # Every expert starts at the uninformed rate k/E, so the sum per layer starts at k.
        rate = c.top_k / E
        self.bias = nn.Parameter(torch.full((L, E), float(np.log(rate / max(1.0 - rate, 1e-6)))))
        self.register_buffer("prior", torch.full((L, E), rate, dtype=torch.float32))

    def context(self, buckets: torch.Tensor) -> torch.Tensor:
        """[B, m] bucket ids (oldest first, pad = vocab_buckets) -> [B, dim] context vector."""
        c = self.config
        emb = self.tokens(buckets)  # [B, m, token_dim]; pad rows are zero
        real = buckets != c.vocab_buckets
        if c.pooling == "weighted":
            logits = self.position_logits[-buckets.shape[1]:].expand_as(real)
        else:
            logits = torch.zeros(real.shape, dtype=emb.dtype)
        logits = logits.masked_fill(~real, -1e9)
        w = torch.softmax(logits, dim=1) * real  # an all-pad context pools to zero
        return self.norm(self.project((w.unsqueeze(-1) * emb).sum(1)))

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """[B, m] bucket ids -> [B, L, E] logits that expert e is used at layer l next token."""
        ctx = self.context(buckets)
        B, L = ctx.shape[0], self.config.num_layers
        joined = torch.cat([ctx.unsqueeze(1).expand(B, L, -1), self.layer_emb.unsqueeze(0).expand(B, L, -1)], -1)
        query = self.u(self.mlp(joined))  # [B, L, r]
        keys = self.v(self.expert_emb)  # [L, E, r]
        return torch.einsum("blr,ler->ble", query, keys) + self.bias

    @torch.no_grad()
    def probabilities(self, contexts) -> np.ndarray:
        """contexts: int64 [B, m] token ids (-1 = none), oldest first -> float64 [B, L, E]."""
        ids = np.asarray(contexts, dtype=np.int64)
        m = self.config.history
        if ids.ndim != 2:
            raise ValueError(f"scoutgate: contexts must be [B, m], got shape {ids.shape}")
        if ids.shape[1] > m:
            ids = ids[:, -m:]
        elif ids.shape[1] < m:
            ids = np.concatenate([np.full((ids.shape[0], m - ids.shape[1]), -1, np.int64), ids], axis=1)
        buckets = torch.from_numpy(token_buckets(ids, self.config.vocab_buckets).reshape(ids.shape))
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(buckets)).double().numpy()
        finally:
            self.train(was_training)


def save_scoutgate(model: ScoutGateModel, path: str | os.PathLike) -> None:
    """Write weights + config as safetensors, atomically (temp file in the folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    meta = {_META_KEY: msgspec.json.encode(model.config).decode()}
    with replaced_atomically(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_scoutgate(path: str | os.PathLike) -> ScoutGateModel:
    """Read a file written by `save_scoutgate`; every defect -> `CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header = read_header(path)  # checks lengths, offsets and dtypes before any byte is used
    raw = header.metadata.get(_META_KEY)
    if raw is None:
        raise CheckpointError(path, "no ScoutGate config in the safetensors metadata",
                              fix="not a ScoutGate weights file; train one with `scoutgate_cmd train`")
    try:
        config = msgspec.json.decode(raw, type=ScoutGateConfig)
    except (msgspec.DecodeError, ValueError) as e:
        raise CheckpointError(path, f"bad ScoutGate config ({e})", fix="re-train and save the model") from None
    model = ScoutGateModel(config)
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    have = {name: entry.shape for name, entry in header.tensors.items()}
    if set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CheckpointError(path, f"tensors do not match the config (missing {missing}, unexpected {extra})",
                              fix="re-train and save the model")
    for name, shape in want.items():
        if have[name] != shape:
            raise CheckpointError(path, f"shape {have[name]} but the config needs {shape}", tensor=name,
                                  fix="re-train and save the model")
        if header.tensors[name].dtype != "F32":
            raise CheckpointError(path, f"dtype {header.tensors[name].dtype}, expected F32", tensor=name)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(path, f"cannot read tensors ({e})", fix="the file is corrupted; re-create it") from None
    model.load_state_dict(state)
    for name, t in state.items():
        if not torch.isfinite(t).all():
            raise CheckpointError(path, "holds NaN or infinite values", tensor=name, fix="re-train the model")
    model.eval()
    return model


def check_compatible(config: ScoutGateConfig, num_layers: int, num_experts: int, top_k: int,
                     where: object = "<model>") -> None:
    """Raise `CheckpointError` unless a model of `config` fits a predictor of this shape."""
    if (config.num_layers, config.num_experts, config.top_k) != (num_layers, num_experts, top_k):
        raise CheckpointError(where, f"trained for {config.num_layers} layers x {config.num_experts} experts "
                                     f"(top-{config.top_k}) on {config.trained_on or 'an unknown trace'}; "
                                     f"the predictor is for {num_layers} x {num_experts} (top-{top_k})",
                              fix="train ScoutGate on a trace of this model")


class NumpyScoutGate:
    """The model's inference pass in numpy, for one context at a time on the serving path.

    Torch's intra-op threads cost ~30 ms per token for these tiny matrices on a busy 2-core
    box (~1 ms with one thread), and the thread count is process-wide, so the predictor must
    not change it. Inputs that never change (the expert tower, the layer half of the first
    MLP layer) are computed once here.
    """

    def __init__(self, model: ScoutGateModel):
        c = self.config = model.config
        sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
        self.table = sd["tokens.weight"]
        self.position_logits = sd["position_logits"]
        self.w_proj, self.b_proj = sd["project.weight"], sd["project.bias"]
        self.ln_w, self.ln_b, self.ln_eps = sd["norm.weight"], sd["norm.bias"], model.norm.eps
        w1 = sd["mlp.0.weight"]
        self.w1_ctx = w1[:, : c.dim]
        self.h_layer = sd["layer_emb"] @ w1[:, c.dim:].T + sd["mlp.0.bias"]  # [L, hidden]
        self.w2, self.b2 = sd["mlp.2.weight"], sd["mlp.2.bias"]
        self.u = sd["u.weight"]
        self.keys = sd["expert_emb"] @ sd["v.weight"].T  # [L, E, r]
        self.bias = sd["bias"]

    def __call__(self, context: tuple[int, ...]) -> np.ndarray:
        """Token ids (oldest first) -> float64 [L, E] probabilities for the next token."""
        c = self.config
        ids = np.asarray(context[-c.history:], dtype=np.int64)
        ids = ids[ids >= 0]
        if ids.size:
            logits = self.position_logits[-ids.size:] if c.pooling == "weighted" else np.zeros(ids.size)
            w = np.exp(logits - logits.max())
            pooled = (w / w.sum()) @ self.table[token_buckets(ids, c.vocab_buckets)]
        else:  # an all-pad context pools to zero, as in the torch model
            pooled = np.zeros(c.token_dim)
        x = self.w_proj @ pooled + self.b_proj
        x = (x - x.mean()) / np.sqrt(x.var() + self.ln_eps) * self.ln_w + self.ln_b
        h = self.h_layer + self.w1_ctx @ x  # [L, hidden]
        h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h ** 3)))
        query = (h @ self.w2.T + self.b2) @ self.u.T  # [L, r]
        logits = np.einsum("lr,ler->le", query, self.keys) + self.bias
        return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow warnings


class ScoutGatePredictor(Predictor):
    """Online ScoutGate. `predict(layer)` answers for the layer's next visit: a layer the
    current token has already passed next runs for the following token (context includes the
    current token); a layer not yet reached next runs for the current token (context up to the
    previous token). Each distinct context costs one forward pass for all layers.

    Without a model, or when events carry no token ids, it falls back to an EWMA (alpha 0.3)
    that starts from the training set's frequency prior (k/E without a model), and says why
    in `degraded` (None while the model is in use). `history` is how many token ids the
    context keeps; a loaded model uses the last `config.history` of them.

    `blend` mixes that EWMA into the model's answer: p = (1 - blend) model + blend EWMA. The
    EWMA follows the current request's drift (topic, language) that a model trained on other
    requests cannot know; on the held-out Qwen requests 0.5 beat both parts alone (see
    `scoutgate_train.evaluate`). blend=0 serves the model alone.
    """

    name = "scoutgate"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, *, weights_path: str | None = None,
                 model: ScoutGateModel | None = None, history: int = 8, blend: float = 0.5):
        super().__init__(num_layers, num_experts, top_k)
        if history < 1:
            raise ValueError(f"scoutgate: history must be >= 1, got {history}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"scoutgate: blend must be in [0, 1], got {blend}")
        self.blend = float(blend)
        if model is None and weights_path is not None:
            model = load_scoutgate(weights_path)
        if model is not None:
            check_compatible(model.config, num_layers, num_experts, top_k, weights_path or "<model>")
            model.eval()
            history = max(history, model.config.history)
        self.model = model
        self.degraded: str | None = None if model else "no trained ScoutGate weights; using EWMA"
        self.alpha = 0.3
        prior = model.prior.double().numpy() if model is not None else np.full((num_layers, num_experts),
                                                                               top_k / num_experts)
        self._ewma = prior.copy()
        self._context: deque[int] = deque(maxlen=history)
        self._previous: tuple[int, ...] = ()  # context before the current token
        self._token: int | None = None
        self._last_layer = -1  # deepest layer the current token has passed
        self._cache: dict[tuple[int, ...], np.ndarray] = {}
        self._forward = NumpyScoutGate(model) if model is not None else None
        self.forward_passes = 0

    def observe(self, event: Activation) -> None:
        layer = event.layer
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"scoutgate: layer {layer} out of range [0, {self.num_layers})")
        if layer == 0 or layer <= self._last_layer or (event.token_id is not None and event.token_id != self._token):
            self._new_token(event.token_id)
        self._last_layer = max(self._last_layer, layer)
        row = self._ewma[layer]
        row *= 1.0 - self.alpha
        ids = np.asarray(event.experts, dtype=np.int64)
        row[ids[(ids >= 0) & (ids < self.num_experts)]] += self.alpha

    def _new_token(self, token_id: int | None) -> None:
        self._previous = tuple(self._context)
        self._last_layer = -1
        self._token = token_id
        if self.model is None:
            return
        if token_id is None:  # no context to run the model on; recovers when ids come back
            self.degraded = "events carry no token ids; using the frequency prior blended with EWMA"
            self._context.clear()
            return
        self.degraded = None
        self._context.append(int(token_id))

    def _probabilities(self, context: tuple[int, ...]) -> np.ndarray:
        probs = self._cache.get(context)
        if probs is None:
            assert self._forward is not None
            probs = self._forward(context)
            self.forward_passes += 1
            # Only the current and the previous context are ever asked for again.
            self._cache = {k: v for k, v in self._cache.items() if k in (tuple(self._context), self._previous)}
            self._cache[context] = probs
        return probs

    def predict(self, layer: int) -> np.ndarray:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"scoutgate: layer {layer} out of range [0, {self.num_layers})")
        if self.degraded is not None or self.model is None:
            return np.clip(self._ewma[layer], 0.0, 1.0)
        context = tuple(self._context) if layer <= self._last_layer else self._previous
        probs = self._probabilities(context)[layer]
        return np.clip((1.0 - self.blend) * probs + self.blend * self._ewma[layer], 0.0, 1.0)
