"""The model the replay runs around the experts: embeddings, a stand-in of each layer's
non-expert work, the experts' MLPs and their router-weighted sum, eager or as CUDA graphs.

    Model(spec, device, seed=0, attn_matmuls=4)
      graphs(enabled=True, whole_layers=False)   scope in which single-row passes run as graphs
      embed_rows(token_ids) -> h                 [n, H]
      non_expert(h) -> (h, router logits)        the stand-in: `attn_matmuls` bf16 [n,H]x[H,H]
                                                 matmuls and the router [n,H]x[H,E]
      experts(h, tensors, weights) -> h          h + the weighted sum of a decode layer's experts
      norm(h) -> x                               a layer's normalised input
      expert_sum(x, tensors, weights, rows=None) -> y
                                                 the weighted sum of experts on x (rows[i]: the
                                                 rows expert i sees), float32 [n, H], eager
      graph_captures                             graphs captured in the current scope
Experts handed out in their stored MXFP4 form (pipeline/kernels/stored_math.py) are computed
from those bytes: on CUDA a decode layer is two kernels, outside the graphs.
"""
from __future__ import annotations

import contextlib

import torch

from ..kernels import stored_math
from .cuda_graphs import GraphCache, kernel_copy
from ..kernels.expert_mlp import expert_forward, moe_forward, rms_norm, weighted_sum

NORM_EPS = 1e-6


class Model:
    """The model around the experts: embeddings, the non-expert stand-in per layer, norms.

    Inside `with model.graphs():` (CUDA only; a no-op elsewhere) single-row passes run the
    stand-in and each expert as captured CUDA graphs (pipeline/bench/cuda_graphs.py), one per
    distinct set of expert weight addresses, so one per VRAM slot, and the weighted sum as one
    more; with `whole_layers`, a layer's experts and sum as one graph per tuple of addresses.
    The math and its kernels are the eager ones, so the values are the same bit for bit (a GPU
    test compares them). The scope must close before the tensors the graphs read are freed,
    e.g. before a pipeline closes.
    """

    def __init__(self, spec, device: torch.device, *, seed: int = 0, attn_matmuls: int = 4,
                 dtype: torch.dtype = torch.bfloat16):
        g = torch.Generator().manual_seed(seed)
        H, E = spec.hidden_size, spec.num_experts
        self.family, self.top_k, self.device, self.dtype = spec.family, spec.top_k, device, dtype
        self.attn_matmuls = attn_matmuls
        self._inter = spec.intermediate_size
        scale = H ** -0.5
        self.embed = (torch.randn(64, H, generator=g)).to(device, dtype)
        self.attn = [(torch.randn(H, H, generator=g) * scale).to(device, dtype) for _ in range(attn_matmuls)]
        self.router = (torch.randn(H, E, generator=g) * scale).to(device, dtype)
        self._graphs: GraphCache | None = None

    @contextlib.contextmanager
    def graphs(self, enabled: bool = True, *, whole_layers: bool = False):
        """Run single-row passes as CUDA graphs inside this scope (when on CUDA and `enabled`).
        `whole_layers`: a layer's experts and their weighted sum as one graph per distinct
        tuple of expert addresses, for a fetch whose tensors sit at a few fixed addresses
        (vram_form='stored': the dense views); elsewhere one graph per expert weight set."""
        if not enabled or self.device.type != "cuda" or self._graphs is not None:
            yield
            return
        H, E = self.embed.shape[1], self.router.shape[1]
        self._ne_in, self._ne_h, self._ne_logits = (torch.zeros(1, n, device=self.device, dtype=self.dtype)
                                                    for n in (H, H, E))
        # The expert graphs read the stand-in's output buffer (_ne_h) directly, and each
        # layer's result is written where the next stand-in reads it (_ne_in): no copy
        # between graphs (see kernel_copy).
        self._y_out: torch.Tensor | None = None
        self._ys: torch.Tensor | None = None  # [top_k, 1, H]: expert i's output, router order
        self._w_in: dict[int, torch.Tensor] = {}  # k -> [k] float32: the router weights the graphs read
        self._acts: dict[int, torch.Tensor] = {}  # k -> [k, 1, I] float32: stored-math activations
        self._whole_layers = whole_layers
        self._graphs = GraphCache(self.device)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)  # no graph still reads what the caller frees next
            self._graphs.clear()
            self._graphs = None

    @property
    def graph_captures(self) -> int:
        return 0 if self._graphs is None else self._graphs.captures

    @staticmethod
    def _norm(h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, NORM_EPS)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self._norm(h)

    def expert_sum(self, x: torch.Tensor, tensors, weights, rows=None) -> torch.Tensor:
        """The router-weighted sum of `tensors`' experts on x (float32, eager): one group of a
        prefill layer (every group reads the layer's one normalised input, as in a real MoE
        layer, and the caller adds the groups' sums), or a whole layer off the graphs.
        From fetch(..., wait=False) each expert is computed once its own copy is waited for,
        experts already in VRAM first (pipeline.api.StagedExperts)."""
        extra = {"ready": tensors.ready, "order": tensors.order} if hasattr(tensors, "ready") else {}
        if stored_math.is_stored(tensors[0]):
            return stored_math.group_sum(self.family, x, tensors, weights, rows, **extra)
        return moe_forward(self.family, tensors, x, weights, rows, **extra)

    def embed_rows(self, token_ids) -> torch.Tensor:
        idx = torch.tensor([t % 64 for t in token_ids], device=self.device)
        return self.embed.index_select(0, idx)

    def _non_expert_math(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._norm(h)
        for w in self.attn:
            a = a @ w
        h = h + a
        return h, self._norm(h) @ self.router

    def non_expert(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stand-in of attention + router: (new hidden, router logits). Under graphs the
        results are the graph's output buffers, overwritten by the next call."""
        if self._graphs is None or h.shape[0] != 1:
            return self._non_expert_math(h)
        if h is not self._ne_in:
            kernel_copy(self._ne_in, h)
        h2, logits = self._graphs.run("non-expert", lambda: self._non_expert_math(self._ne_in),
                                      (self._ne_h, self._ne_logits))
        return h2, logits

    @staticmethod
    def _address(t: dict[str, torch.Tensor]) -> int:
        # The first tensor's address names an expert's weight set: its tensors live and die
        # together (a slot's views, or one loaded expert), so two live sets never share it.
        return next(iter(t.values())).data_ptr()

    def _graphed_expert(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        # The graph reads the weights where they are now: one graph per set of addresses (one
        # per VRAM slot), valid for whichever expert the slot holds when it replays.
        if self._y_out is None:
            self._y_out = torch.zeros_like(self._ne_h, dtype=next(iter(t.values())).dtype)
        (y,) = self._graphs.run(self._address(t), lambda: (expert_forward(self.family, t, self._norm(self._ne_h)),),
                                (self._y_out,))
        return y

    def _stored_layer(self, h: torch.Tensor, tensors, weights, staged: bool) -> torch.Tensor:
        # One launch reads every expert, so every copy is waited for first.
        for i in (tensors.order if staged else ()):
            tensors.ready(i)
        out, act = None, None
        if self._graphs is not None and h.shape[0] == 1:
            if h is not self._ne_in:
                out = self._ne_in  # where the next stand-in graph reads its input: no copy
            # One activation buffer per fetch size, reused layer after layer: the kernels run
            # in order on the decode loop's stream, so a layer overwrites it only after the
            # layer before has read it. Saves an allocation per layer.
            act = self._acts.get(len(tensors))
            if act is None:
                act = self._acts[len(tensors)] = torch.empty(len(tensors), 1, self._inter, device=self.device,
                                                             dtype=torch.float32)
        return stored_math.layer(self.family, h, tensors, weights, NORM_EPS, out, act)

    def _load_weights(self, weights) -> torch.Tensor:
        """The router weights into the fixed buffer the graphs read: one kernel from a device
        tensor (the decode loop's), a blocking upload from floats (warm-up only)."""
        k = len(weights)
        w = self._w_in.get(k)
        if w is None:
            w = self._w_in[k] = torch.zeros(k, device=self.device, dtype=torch.float32)
        if isinstance(weights, torch.Tensor):
            kernel_copy(w, weights)
        else:
            w.copy_(torch.tensor(list(weights), dtype=torch.float32))
        return w

    def _layer_math(self, tensors, w: torch.Tensor) -> torch.Tensor:
        x = self._norm(self._ne_h)
        ys = torch.stack([expert_forward(self.family, t, x) for t in tensors])
        return self._ne_h + weighted_sum(ys, w).to(self.dtype)

    def experts(self, h: torch.Tensor, tensors, weights) -> torch.Tensor:
        staged = hasattr(tensors, "ready")  # from fetch(..., wait=False): see expert_sum
        if stored_math.is_stored(tensors[0]):
            return self._stored_layer(h, tensors, weights, staged)
        if self._graphs is None or h.shape[0] != 1:
            return h + self.expert_sum(self._norm(h), tensors, weights).to(h.dtype)
        # Graphs: the same kernels on the same inputs as the eager branch above (the norm runs
        # inside the graphs), so the same values bit for bit; the result is written where the
        # next layer's stand-in reads it.
        if h is not self._ne_h:
            kernel_copy(self._ne_h, h)
        k = len(tensors)
        w = self._load_weights(weights)
        if self._whole_layers and not staged:
            # One launch for the layer: the graph reads the experts where they sit now, so one
            # graph per tuple of addresses (one in all when every fetch lands in the same views).
            key = ("layer",) + tuple(self._address(t) for t in tensors)
            (out,) = self._graphs.run(key, lambda: (self._layer_math(tensors, w),), (self._ne_in,))
            return out
        if self._ys is None:
            self._ys = torch.zeros(self.top_k, 1, h.shape[1], device=self.device,
                                   dtype=next(iter(tensors[0].values())).dtype)
        for i in (tensors.order if staged else range(k)):
            if staged:
                tensors.ready(i)
            kernel_copy(self._ys[i], self._graphed_expert(tensors[i]))  # the next replay overwrites _y_out
        ys = self._ys[:k]
        (out,) = self._graphs.run(("sum", k), lambda: (self._ne_h + weighted_sum(ys, w).to(self.dtype),),
                                  (self._ne_in,))
        return out


__all__ = ["Model"]
