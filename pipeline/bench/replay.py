"""The decode loop of `prefetch-bench replay`: a trace's forward passes run for real through the pipeline.

    check_fit(spec, trace)                       ValueError (one line) if the trace is larger than the store
    build_passes(trace, include_prefill, limit)  -> list[Pass]
    emulate_hints(passes, E, recall, seed)       -> per pass, per layer l: scores for layer l + 1 (or None)
    Model(spec, device, seed)                    the non-expert stand-in (attention + router matmuls)
    run_loop(model, passes, fetch, hints=None, hint_sink=None, progress=None) -> LoopResult
    run_method(store_dir, store, method, vram_slots, ram_slots, passes, model, hints, ...) -> MethodRun

Per pass and per layer, in order: the stand-in of the layer's non-expert work on the hidden
state (`attn_matmuls` bf16 [n,H]x[H,H] matmuls and the router [n,H]x[H,E]: a *measured
stand-in*, not a real attention), then the emulated lookahead hint for layer l+1 (methods
that use lookahead), then `fetch(layer, ids)` of the trace's experts (in groups of top_k for
a prefill pass, whose layers need the union of its rows' experts) and the family's expert
MLP on the returned tensors, router-weighted, added to the hidden state. The trace's expert
ids drive routing, so locality is the trace's; the values carried are irrelevant to it.

Timing: everything runs on the current stream; each pass ends with a device synchronise
(on CUDA) and is timed with the host clock around it, so a pass's time includes every copy
it waited for. `fetch_s` is host time spent inside `fetch` calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import time

import msgspec
import numpy as np
import torch

from policies.traces import PREFILL, Trace, decode_steps

from .cuda_graphs import GraphCache, kernel_copy
from .expert_mlp import expert_forward, moe_forward, weighted_sum


def check_fit(spec, trace: Trace) -> None:
    """Refuse a trace the store cannot serve, naming the dimension and how to make a matching store."""
    fix = (f"make a matching store: bin/make-model --format gpt-oss --preset gpt-oss-20b --layers "
           f"{trace.num_layers} --experts {trace.num_experts} --top-k {trace.top_k} --hidden 512 "
           f"--intermediate 512 --out MODEL && bin/precompute --model MODEL --out STORE --dtype mxfp4")
    for what, t, s in (("layers", trace.num_layers, spec.num_layers), ("experts per layer", trace.num_experts,
                                                                       spec.num_experts),
                       ("top-k", trace.top_k, spec.top_k)):
        if t > s:
            raise ValueError(f"trace has {t} {what} but the store has {s}; {fix}")


@dataclasses.dataclass(frozen=True)
class Pass:
    """One forward pass: `ids[l]` the experts of layer l (router order, or a prefill union),
    `weights[l]` their router weights, `rows[l]` (prefill) per expert the rows routed to it."""

    phase: int
    n: int  # rows (tokens) in the pass
    token_ids: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    rows: tuple[tuple[tuple[int, ...], ...], ...] | None


def build_passes(trace: Trace, include_prefill: bool, limit: int | None = None) -> list[Pass]:
    out: list[Pass] = []
    for step in decode_steps(trace, include_prefill=include_prefill):
        if limit is not None and len(out) >= limit:
            break
        start, stop = step.rows
        L = trace.num_layers
        ids, ws, rows = [], [], []
        for layer in range(L):
            e = step.layer_experts(layer).astype(int).tolist()
            w = step.layer_weights(layer).astype(float).tolist()
            if not all(np.isfinite(w)) or len(w) != len(e) or not e:
                w = [1.0 / max(1, len(e))] * len(e)
            ids.append(tuple(e))
            ws.append(tuple(w))
            if step.phase == PREFILL:
                block = trace.experts[start:stop, layer]
                rows.append(tuple(tuple(np.flatnonzero((block == x).any(axis=1)).tolist()) for x in e))
        out.append(Pass(int(step.phase), stop - start, tuple(int(t) for t in step.token_ids), tuple(ids),
                        tuple(ws), tuple(rows) if step.phase == PREFILL else None))
    return out


def emulate_hints(passes: list[Pass], num_experts: int, recall: float, seed: int) -> list[list[np.ndarray | None]]:
    """Router lookahead emulated: before layer l, scores for layer l+1 in which each true
    expert appears with probability `recall`, else a random wrong expert takes its place.
    Chosen experts score 10 (minus a small rank step), the rest 0. Seeded: every method gets the same."""
    rng = np.random.default_rng(seed)
    out = []
    for p in passes:
        per = []
        for layer in range(len(p.ids)):
            if layer + 1 >= len(p.ids):
                per.append(None)  # the next token's layer 0 is not visible from here
                continue
            true = list(p.ids[layer + 1])
            chosen: list[int] = []
            for e in true:
                if rng.random() < recall:
                    chosen.append(e)
                else:
                    wrong = [x for x in range(num_experts) if x not in true and x not in chosen]
                    if wrong:
                        chosen.append(int(rng.choice(wrong)))
            s = np.zeros(num_experts)
            for r, e in enumerate(chosen):
                s[e] = max(s[e], 10.0 - 0.01 * r)
            per.append(s)
        out.append(per)
    return out


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
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)

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

    def experts(self, h: torch.Tensor, tensors, weights, rows) -> torch.Tensor:
        # From fetch(..., wait=False): each expert computed once its own copy is waited for,
        # experts already in VRAM first (pipeline.api.StagedExperts)
        staged = hasattr(tensors, "ready")
        if self._graphs is None or h.shape[0] != 1 or rows is not None:
            extra = {"ready": tensors.ready, "order": tensors.order} if staged else {}
            return h + moe_forward(self.family, tensors, self._norm(h), weights, rows, **extra).to(h.dtype)
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


class LoopResult(msgspec.Struct):
    pass_seconds: list[float]
    fetch_seconds: float
    tokens: int
    outputs: list | None = None  # final hidden state per pass (CPU), when asked


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_weights(passes: list[Pass], device: torch.device) -> torch.Tensor:
    """Every pass's router weights as one float32 tensor [passes, layers, widest] on `device`
    (zero-padded), uploaded once before timing: a decode step then slices it on the device
    instead of uploading floats per layer, which would block the host on each upload."""
    width = max((len(w) for p in passes for w in p.weights), default=1)
    layers = max((len(p.weights) for p in passes), default=1)
    out = np.zeros((len(passes), layers, width), dtype=np.float32)
    for i, p in enumerate(passes):
        for layer, w in enumerate(p.weights):
            out[i, layer, :len(w)] = w
    return torch.from_numpy(out).to(device)


def run_loop(model: Model, passes: list[Pass], fetch, *, hints=None, hint_sink=None, progress=None,
             keep_outputs: bool = False) -> LoopResult:
    """Run `passes` with `fetch(layer, ids) -> [tensors]`; hints go to `hint_sink({layer: scores})`."""
    K, dev = model.top_k, model.device
    times, outs, fetch_s, tokens = [], [], 0.0, 0
    router_w = device_weights(passes, dev)
    _sync(dev)
    for i, p in enumerate(passes):
        t0 = time.perf_counter()
        h = model.embed_rows(p.token_ids)
        pass_w = router_w[i]
        for layer, ids in enumerate(p.ids):
            h, _logits = model.non_expert(h)
            if hint_sink is not None and hints is not None and hints[i][layer] is not None:
                hint_sink({layer + 1: hints[i][layer]})
            for c in range(0, len(ids), K):
                chunk = ids[c:c + K]
                f0 = time.perf_counter()
                tensors = fetch(layer, chunk)
                fetch_s += time.perf_counter() - f0
                rows = None
                if p.rows is not None:
                    rows = [torch.tensor(r, device=dev, dtype=torch.long) for r in p.rows[layer][c:c + K]]
                h = model.experts(h, tensors, pass_w[layer, c:c + len(chunk)], rows)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        tokens += p.n
        if keep_outputs:
            outs.append(h.detach().to("cpu", copy=True))
        if progress is not None:
            progress(1)
    return LoopResult(times, fetch_s, tokens, outs if keep_outputs else None)


class MethodRun(msgspec.Struct):
    loop: LoopResult
    before: object  # SchedulerStats after warm-up
    after: object  # SchedulerStats at the end
    device: str
    pinned: bool
    vram_slots: int  # the pipeline's VRAM slots (more than the budget's dense count when stored)
    profile: dict | None = None  # pipeline/bench/gpu_profile.py summary of extra profiled passes
    graphs: int = 0  # CUDA graphs captured (0 without graphs)
    vram_form: str = "dense"  # what the pipeline's VRAM slots held ("auto" resolved)


def open_pipeline(store_dir, method, vram_bytes: int, ram_bytes: int, device: str, readers: int | None,
                  **options):
    """`options`: further PipelineConfig fields for every method (policy_process, prefetch_copies)."""
    from ..api import ExpertPipeline

    return ExpertPipeline.open(store_dir, vram=vram_bytes, ram=ram_bytes, policy=method.policy,
                               predictor=method.predictor, predictor_options=dict(method.predictor_options),
                               policy_options=dict(method.policy_options), device=device, readers=readers,
                               **options)


def warm_up(pipe, spec, model: Model) -> None:
    """Fetch every expert once, then once more so copies have landed, each group run through
    the expert math once (untimed): the RAM tier starts full, and under `model.graphs()` every
    VRAM slot's graph is captured before timing starts."""
    K = spec.top_k
    h = model.embed_rows([0])
    for _ in range(2):
        for layer in range(spec.num_layers):
            model.non_expert(h)
            for e in range(0, spec.num_experts, K):
                ids = list(range(e, min(e + K, spec.num_experts)))
                model.experts(h, pipe.fetch(layer, ids), [1.0 / len(ids)] * len(ids), None)
    _sync(model.device)


def run_method(store_dir, store, method, vram_bytes: int, ram_bytes: int, passes: list[Pass], model: Model,
               hints, *, device: str, readers: int | None = None, progress=None, policy_process: bool = False,
               keep_outputs: bool = False, cuda_graphs: bool = True, per_expert_waits: bool = False,
               profile_passes: int = 0, prefetch_copies: int | None = None, vram_form: str = "dense",
               layer_graphs: bool = True) -> MethodRun:
    extra = {} if prefetch_copies is None else {"prefetch_copies": prefetch_copies}
    with contextlib.ExitStack() as stack:
        pipe = stack.enter_context(open_pipeline(store_dir, method, vram_bytes, ram_bytes, device, readers,
                                                 policy_process=policy_process, vram_form=vram_form, **extra))
        form = pipe.stats().vram_form
        # Stored form: every fetch lands in the same few dense views, so a layer is one graph.
        # The graphs scope closes first: its graphs read the pipeline's slots.
        stack.enter_context(model.graphs(cuda_graphs, whole_layers=layer_graphs and form == "stored"))
        if method.warm:
            warm_up(pipe, store.spec, model)
        before = pipe.stats().scheduler
        fetch = functools.partial(pipe.fetch, wait=False) if per_expert_waits else pipe.fetch
        hints = hints if method.lookahead else None
        sink = pipe.hint_scores if method.lookahead else None
        loop = run_loop(model, passes, fetch, hints=hints, hint_sink=sink, progress=progress,
                        keep_outputs=keep_outputs)
        st = pipe.stats()
        prof = None
        if profile_passes > 0 and model.device.type == "cuda":  # after the counters: they stay the timed run's
            from .gpu_profile import profile

            tail = passes[-profile_passes:]
            prof = profile(lambda: run_loop(model, tail, fetch, hints=hints[-len(tail):] if hints else None,
                                            hint_sink=sink),
                           sum(p.n for p in tail))
        return MethodRun(loop, before, st.scheduler, st.device, st.pinned, st.vram_slots, prof, model.graph_captures,
                         form)


def direct_fetch(store, device: torch.device):
    """A `fetch` that loads experts straight from the store (the resident reference), cached."""
    cache: dict[tuple[int, int], dict] = {}

    def fetch(layer, ids):
        for e in ids:
            if (layer, e) not in cache:
                cache[(layer, e)] = store.load_expert(layer, e, device)
        return [cache[(layer, e)] for e in ids]

    return fetch


def compute_only_fetch(store, device: torch.device):
    """A `fetch` returning top_k experts loaded once: times the math with nothing to move."""
    pool = [store.load_expert(0, e, device) for e in range(store.spec.top_k)]
    return lambda layer, ids: pool[: len(ids)]


def access_keys(passes: list[Pass], num_experts: int, top_k: int) -> np.ndarray:
    """The expert keys layer * E + e in fetch order (Belady's input)."""
    keys = [layer * num_experts + e for p in passes for layer, ids in enumerate(p.ids) for e in ids]
    return np.asarray(keys, dtype=np.int64)
