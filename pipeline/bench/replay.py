"""The decode loop of `prefetch-bench replay`: a trace's forward passes run for real through the pipeline.

    check_fit(spec, trace)                       ValueError (one line) if the trace is larger than the store
    build_passes(trace, include_prefill, limit)  -> list[Pass]
    emulate_hints(passes, E, recall, seed)       -> per pass, per layer l: scores for layer l + 1 (or None)
    Model(spec, device, seed)                    the model around the experts (pipeline/bench/model.py)
    run_loop(model, passes, fetch, hints=None, hint_sink=None, progress=None) -> LoopResult
    run_method(store_dir, store, method, vram_slots, ram_slots, passes, model, hints, ...) -> MethodRun

Per pass and per layer, in order: the stand-in of the layer's non-expert work on the hidden
state (`attn_matmuls` bf16 [n,H]x[H,H] matmuls and the router [n,H]x[H,E]: a *measured
stand-in*, not a real attention), then the emulated lookahead hint for layer l+1 (methods
that use lookahead), then `fetch(layer, ids, rows=n)` of the trace's experts and the family's
expert MLP on the returned tensors, router-weighted, added to the hidden state. A prefill
pass's layer needs the union of its rows' experts: it fetches them in groups of top_k, each
group's experts run on their rows of the layer's one normalised input, and the groups' sums
are added to the hidden state once. The trace's expert
ids drive routing, so locality is the trace's; the values carried are irrelevant to it.

Timing: everything runs on the current stream; each pass ends with a device synchronise
(on CUDA) and is timed with the host clock around it, so a pass's time includes every copy
it waited for. `fetch_s` is host time spent inside `fetch` calls.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time

import msgspec
import numpy as np
import torch

from adapters.child import freeze_start_up_heap
from policies.traces import PREFILL, Trace, decode_steps

from ..warm import first_of_each_layer, warm_groups
from .model import Model


def check_fit(spec, trace: Trace) -> None:
    """Refuse a trace the store cannot serve, naming the dimension and how to make a matching store."""
    fix = (f"make a matching store: bin/make-model --format gpt-oss --preset gpt-oss-20b --layers "
           f"{trace.num_layers} --experts {trace.num_experts} --top-k {trace.top_k} --hidden 512 "
           f"--intermediate 512 --out MODEL && bin/precompute --model MODEL --out STORE --dtype mxfp4")
    for what, t, s in (("layers", trace.num_layers, spec.num_layers), ("experts per layer", trace.num_experts,
                                                                       spec.num_experts),
                       ("top-k", trace.top_k, spec.top_k)):
        if t > s:
            also = f", or replay its first {s} with --layers {s}" if what == "layers" else ""
            raise ValueError(f"trace has {t} {what} but the store has {s}; {fix}{also}")


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


class LoopResult(msgspec.Struct):
    pass_seconds: list[float]
    fetch_seconds: float
    tokens: int
    outputs: list | None = None  # final hidden state per pass (CPU), when asked
    pass_phases: list[int] = []  # PREFILL or DECODE per pass, beside pass_seconds


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


def device_rows(passes: list[Pass], device: torch.device) -> list[tuple[tuple[torch.Tensor, ...], ...] | None]:
    """Per prefill pass, per layer, per expert of the union: the rows routed to it, as int64
    tensors on `device` (views of one upload before timing); None for a decode pass. Built
    in the loop instead, each `torch.tensor(rows, device=cuda)` is a blocking upload from
    pageable memory, which waits for everything queued on the stream: the host could not run
    ahead of the GPU, so a prefill pass's copies never overlapped its math."""
    flat: list[int] = []
    for p in passes:
        for layer_rows in p.rows or ():
            for r in layer_rows:
                flat.extend(r)
    every = torch.tensor(flat, dtype=torch.long).to(device)
    out, at = [], 0
    for p in passes:
        if p.rows is None:
            out.append(None)
            continue
        layers = []
        for layer_rows in p.rows:
            views = []
            for r in layer_rows:
                views.append(every[at:at + len(r)])
                at += len(r)
            layers.append(tuple(views))
        out.append(tuple(layers))
    return out


def run_loop(model: Model, passes: list[Pass], fetch, *, hints=None, hint_sink=None, progress=None,
             keep_outputs: bool = False) -> LoopResult:
    """Run `passes` with `fetch(layer, ids, rows=n) -> [tensors]` (n: the pass's token rows);
    hints go to `hint_sink({layer: scores})`."""
    K, dev = model.top_k, model.device
    times, outs, fetch_s, tokens = [], [], 0.0, 0
    router_w = device_weights(passes, dev)
    routed_rows = device_rows(passes, dev)

    def timed_fetch(layer, ids, rows):
        nonlocal fetch_s
        f0 = time.perf_counter()
        tensors = fetch(layer, ids, rows=rows)
        fetch_s += time.perf_counter() - f0
        return tensors

    _sync(dev)
    for i, p in enumerate(passes):
        t0 = time.perf_counter()
        h = model.embed_rows(p.token_ids)
        pass_w = router_w[i]
        for layer, ids in enumerate(p.ids):
            h, _logits = model.non_expert(h)
            if hint_sink is not None and hints is not None and hints[i][layer] is not None:
                hint_sink({layer + 1: hints[i][layer]})
            if routed_rows[i] is None:  # a decode pass: its row's top_k experts, one fetch
                h = model.experts(h, timed_fetch(layer, ids, p.n), pass_w[layer, :len(ids)])
                continue
            # A prefill pass: the layer's union in groups of top_k, each on the same
            # normalised input, their sums added to the hidden state once.
            x, moe = model.norm(h), None
            for c in range(0, len(ids), K):
                group = ids[c:c + K]
                y = model.expert_sum(x, timed_fetch(layer, group, p.n), pass_w[layer, c:c + len(group)],
                                     routed_rows[i][layer][c:c + K])
                if moe is None:
                    moe = y
                else:
                    moe += y  # y is this group's own new tensor: no allocation per group
            h = h + moe.to(h.dtype)
        _sync(dev)
        times.append(time.perf_counter() - t0)
        tokens += p.n
        if keep_outputs:
            outs.append(h.detach().to("cpu", copy=True))
        if progress is not None:
            progress(1)
    return LoopResult(times, fetch_s, tokens, outs if keep_outputs else None, [p.phase for p in passes])


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
    # The policy actor's events in the timed passes: {"received", "processed", "coalesced",
    # "dropped"} (after - before). Dropped and coalesced events never reached the policy.
    actor: dict | None = None
    # Untimed seconds before the timed passes: "open" (processes, pinned RAM, VRAM arena), "warm"
    # (the warm-up) and "history" (--warm-passes, and the policy actor catching up).
    setup_s: dict | None = None
    # torch's CUDA allocator in the timed passes (after - before): device mallocs and frees,
    # failed mallocs retried after freeing the cache, and the device syncs those cost. Each
    # one stalls the decode thread; every window on the H100 made one malloc (docs/results).
    allocator: dict | None = None


def open_pipeline(store_dir, method, vram_bytes: int, ram_bytes: int, device: str, readers: int | None,
                  **options):
    """`options`: further PipelineConfig fields for every method (policy_process, prefetch_copies)."""
    from ..api import ExpertPipeline

    return ExpertPipeline.open(store_dir, vram=vram_bytes, ram=ram_bytes, policy=method.policy,
                               predictor=method.predictor, predictor_options=dict(method.predictor_options),
                               policy_options=dict(method.policy_options), device=device, readers=readers,
                               **options)


def warm_up(pipe, spec, model: Model) -> None:
    """Fill RAM first with `pipe.warm` (as many experts as RAM holds, each layer's first ones,
    several per fetch so several readers read at once, no math). Then the same experts once
    more, twice, each group of top_k run through the expert math (untimed): the RAM tier starts
    full, and under `model.graphs()` every VRAM slot's graph is captured before timing starts.
    Only what RAM holds is warmed: a round over every expert would cycle a set larger than RAM,
    and each of its fetches would read the disk (llama4 at full size, RAM 0.5: 109 s of warm-up,
    against 47 s to fill all of RAM once)."""
    K, L, E = spec.top_k, spec.num_layers, spec.num_experts
    experts = first_of_each_layer(L, E, pipe.stats().ram_slots)
    pipe.warm(experts)
    h = model.embed_rows([0])
    for _ in range(2):
        last = None
        for layer, ids in warm_groups(experts, L, E, K):
            if layer != last:  # a layer's non-expert work once, before its first group
                model.non_expert(h)
                last = layer
            model.experts(h, pipe.fetch(layer, ids), [1.0 / len(ids)] * len(ids))
    _sync(model.device)


def _settle_actor(pipe, timeout: float = 5.0) -> None:
    """Until the policy actor has taken every warm-up event (bounded): the timed passes then
    start with its queue empty, and their event counts are theirs alone (a policy process
    reports what it processed a little later than the parent counts what it sent)."""
    deadline = time.monotonic() + timeout
    while pipe.stats().actor.pending and time.monotonic() < deadline:
        time.sleep(0.001)


ALLOCATOR_COUNTS = {"cuda_mallocs": "num_device_alloc", "cuda_frees": "num_device_free",
                    "malloc_retries": "num_alloc_retries", "syncs": "num_sync_all_streams"}


def allocator_counts(device: torch.device) -> dict | None:
    """torch's CUDA allocator counters (None off CUDA)."""
    if device.type != "cuda":
        return None
    st = torch.cuda.memory_stats(device)
    return {k: int(st.get(name, 0)) for k, name in ALLOCATOR_COUNTS.items()}


@contextlib.contextmanager
def frozen_heap():
    """Around a timed window: collect, then move every live object out of the collector's
    reach (gc.freeze) until the window ends. The collector still runs on what the window
    allocates, but a full collection no longer walks the ~200k objects of torch, numpy and the
    set-up, which took up to 80 ms on this project's CPU: inside a 0.3 s window of one method
    and not another's, that can reorder methods. (It is not what spreads runs on the
    H100: see docs/benchmarking.md.) Servers freeze after start-up for the same reason."""
    freeze_start_up_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def run_method(store_dir, store, method, vram_bytes: int, ram_bytes: int, passes: list[Pass], model: Model,
               hints, *, device: str, readers: int | None = None, progress=None, policy_process: bool = True,
               keep_outputs: bool = False, cuda_graphs: bool = True, per_expert_waits: bool = False,
               profile_passes: int = 0, prefetch_copies: int | None = None, vram_form: str = "dense",
               layer_graphs: bool = True, vram_views: int | None = None,
               history: tuple[list[Pass], list] | None = None, o_direct: bool = True) -> MethodRun:
    """`vram_views=0` with vram_form="stored": the experts are handed out stored and computed
    from their MXFP4 bytes (pipeline/kernels/stored_math.py). `history`: (passes, their hints) run
    untimed after the warm-up, so the tiers hold what real routing left in them. `o_direct`:
    PipelineConfig.o_direct (False only where RAM holds every expert, so no timed pass reads)."""
    extra = {"o_direct": o_direct}
    if prefetch_copies is not None:
        extra["prefetch_copies"] = prefetch_copies
    if vram_views is not None:
        extra["vram_views"] = vram_views
    t_open = time.perf_counter()
    with contextlib.ExitStack() as stack:
        pipe = stack.enter_context(open_pipeline(store_dir, method, vram_bytes, ram_bytes, device, readers,
                                                 policy_process=policy_process, vram_form=vram_form, **extra))
        form = pipe.stats().vram_form
        t_warm = time.perf_counter()
        # Stored form: every fetch lands in the same few dense views, so a layer is one graph.
        # The graphs scope closes first: its graphs read the pipeline's slots.
        stack.enter_context(model.graphs(cuda_graphs, whole_layers=layer_graphs and form == "stored"
                                         and vram_views != 0))
        if method.warm:
            warm_up(pipe, store.spec, model)
        fetch = functools.partial(pipe.fetch, wait=False) if per_expert_waits else pipe.fetch
        sink = pipe.hint_scores if method.lookahead else None
        t_history = time.perf_counter()
        if history and history[0]:
            run_loop(model, history[0], fetch, hints=history[1] if method.lookahead else None, hint_sink=sink)
        _settle_actor(pipe)
        setup = {"open": t_warm - t_open, "warm": t_history - t_warm, "history": time.perf_counter() - t_history}
        st0 = pipe.stats()
        before = st0.scheduler
        hints = hints if method.lookahead else None
        alloc0 = allocator_counts(model.device)
        with frozen_heap():
            loop = run_loop(model, passes, fetch, hints=hints, hint_sink=sink, progress=progress,
                            keep_outputs=keep_outputs)
        st = pipe.stats()
        alloc = allocator_counts(model.device)
        if alloc is not None:
            alloc = {k: alloc[k] - alloc0[k] for k in alloc}
        prof = None
        if profile_passes > 0 and model.device.type == "cuda":  # after the counters: they stay the timed run's
            from .gpu_profile import profile

            tail = passes[-profile_passes:]
            prof = profile(lambda: run_loop(model, tail, fetch, hints=hints[-len(tail):] if hints else None,
                                            hint_sink=sink),
                           sum(p.n for p in tail))
        # What became of the timed passes' events, counted once the actor has caught up (a policy
        # process reports its counts up to STATS_EVERY_S late); the scheduler's counters above
        # stay those at the end of the timed passes.
        _settle_actor(pipe)
        end = pipe.stats().actor
        actor = {k: getattr(end, k) - getattr(st0.actor, k) for k in ("received", "processed", "coalesced",
                                                                      "dropped")}
        return MethodRun(loop, before, st.scheduler, st.device, st.pinned, st.vram_slots, prof, model.graph_captures,
                         form, actor, setup, alloc)


def _stored_loader(store, device: torch.device, slots: int):
    """load(slot, layer, expert) -> the expert's stored tensors in `slot` of a stored-form VRAM
    arena of its own, laid out as the pipeline's (the MXFP4 kernels address a launch's experts
    from one base)."""
    from ..vram_arena import VramArena

    arena = VramArena(store, slots, device, form="stored", num_views=0)

    def load(slot: int, layer: int, expert: int) -> dict[str, torch.Tensor]:
        raw = store.read_expert_tensor(layer, expert)
        arena.raw_view(slot)[: raw.numel()].copy_(raw)
        return arena.stored_tensors(slot)

    return load


def direct_fetch(store, device: torch.device, stored: bool = False):
    """A `fetch` that loads experts straight from the store (the resident reference), cached;
    `stored`: their stored tensors, as a pipeline with vram_form="stored", vram_views=0 hands out."""
    cache: dict[tuple[int, int], dict] = {}
    E = store.spec.num_experts
    load = (_stored_loader(store, device, store.spec.num_layers * E) if stored
            else lambda _slot, layer, e: store.load_expert(layer, e, device))

    def fetch(layer, ids, rows=1):
        for e in ids:
            if (layer, e) not in cache:
                cache[(layer, e)] = load(layer * E + e, layer, e)
        return [cache[(layer, e)] for e in ids]

    return fetch


def compute_only_fetch(store, device: torch.device, stored: bool = False):
    """A `fetch` returning top_k experts loaded once: times the math with nothing to move."""
    K = store.spec.top_k
    load = (_stored_loader(store, device, K) if stored
            else lambda _slot, layer, e: store.load_expert(layer, e, device))
    pool = [load(e, 0, e) for e in range(K)]
    return lambda layer, ids, rows=1: pool[: len(ids)]


def kernel_representatives(passes: list[Pass], top_k: int) -> list[Pass]:
    """The fewest passes, in order, that launch the expert math in every way `passes` do.

    A launch's kernels depend on whether the pass is a prefill (no residual, no norm inside)
    and on how many experts it takes at once: a decode row's count, a prefill group's (top_k,
    or a union's remainder), or one where a group's experts see different rows. A pass is kept
    when it brings a new (prefill?, group size) pair, which covers all three and may keep a
    prefill pass more than needed. Each new way compiles its Triton kernels on first
    use, or loads them from Triton's disk cache: on a fresh H100 that cost 1.5 s inside the
    first timed loop that met a new prefill group size (the compute-only loop of one run at
    5551074's parent read 7.69 ms/token where the resident method ran 1.57). Running these passes once,
    untimed, before any timing keeps those costs out of every timed window."""
    seen: set[tuple[bool, int]] = set()
    out = []
    for p in passes:
        prefill = p.rows is not None
        ways = {(prefill, len(ids[c:c + top_k])) for ids in p.ids for c in range(0, len(ids), top_k)}
        if not ways <= seen:
            seen |= ways
            out.append(p)
    return out


def access_keys(passes: list[Pass], num_experts: int, top_k: int) -> np.ndarray:
    """The expert keys layer * E + e in fetch order (Belady's input)."""
    keys = [layer * num_experts + e for p in passes for layer, ids in enumerate(p.ids) for e in ids]
    return np.asarray(keys, dtype=np.int64)
