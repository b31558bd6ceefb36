"""`prefetch-bench replay --store DIR --trace PATH --vram X [--vram Y ...] [--ram Y] [--baselines] ...`

The end-to-end decode benchmark: a trace's forward passes run for real through the pipeline
(pipeline/bench/replay.py), once per method (pipeline/bench/methods.py), in this process,
one after another, on the same store and trace; the physical limits are measured in the same
run (raw pinned H2D, or host memcpy in CPU mode; raw O_DIRECT disk reads of the store's
expert ranges; the math per token with nothing to move), and the oracle bound is computed:
tokens/s if VRAM loads were exactly Belady's minimum at that capacity, moved at the raw H2D
bandwidth and overlapped perfectly with compute,
    time/token = max(compute/token, belady_loads_warm * expert_bytes / tokens / raw_h2d).
Every method starts warm (its untimed warm-up fills the tiers), so Belady may too: from the
best warm start it makes belady_loads - min(VRAM slots, distinct experts)
(policies.cache.belady.warm_start_loads). The JSON keeps both counts.
On CUDA each decode step's math runs as captured graphs (`--cuda-graphs`, default): eager
PyTorch at batch 1 is launch-bound, and its host time would be charged to every method.
Every input is checked before anything runs: a bad one is a one-line error (exit 2) and no
JSON is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from adapters.atomic_file import check_output_path

DEFAULT_RECALL = 0.8


MXFP4_MATH = ("every method's experts computed from their stored MXFP4 bytes (VRAM holds the stored form, "
              "fetch hands it out: vram_views=0); on CUDA two Triton kernels per layer, elsewhere an exact "
              "decode and the dense math")


def _graphs_text(stored: bool, mxfp4_math: bool = False) -> str:
    if mxfp4_math:
        return f"decode rows: the stand-in as CUDA graphs, {MXFP4_MATH}; prefill rows eager"
    per = "each expert MLP as a graph, one per VRAM slot, and the weighted sum as one graph"
    if stored:
        per += ("; stored-form methods, whose fetches land in the same few dense views, the whole "
                "layer (experts and weighted sum) as one graph")
    return f"decode rows as CUDA graphs: the stand-in, {per}; prefill rows eager"


def add_arguments(p) -> None:
    p.add_argument("--store", required=True, help="packed expert store (bin/precompute)")
    p.add_argument("--trace", required=True, help="routing trace (.npz, moe-routing-trace/1)")
    p.add_argument("--vram", action="append", help="VRAM budget: a fraction of all experts (0.1) or bytes "
                   "(6GiB); repeat for a sweep (default 0.1)")
    p.add_argument("--ram", default="0.5", help="RAM budget: fraction of all experts or bytes (default 0.5)")
    p.add_argument("--baselines", action="store_true", help="also run resident, on-demand, on-demand-disk, "
                   "lru-lookahead, watermark-ewma")
    p.add_argument("--policy", action="append", default=[], help="add a method with this cache policy (repeatable)")
    p.add_argument("--predictor", help="predictor of the --policy methods, e.g. ewma:alpha=0.05")
    p.add_argument("--methods", help="run only these methods (comma-separated names)")
    p.add_argument("--tokens", type=int, help="replay at most this many forward passes")
    p.add_argument("--warm-passes", type=int, default=0,
                   help="run the trace's first N forward passes untimed through each method, then time the next "
                   "--tokens: the tiers start with what real routing left in them, as on a server that has been "
                   "decoding (default 0: only the synthetic warm-up; matters most when RAM is below the store)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each method this many times, in interleaved rounds, and report the median run "
                        "with every run's tokens/s (a single run on a shared machine can be off by 2x)")
    p.add_argument("--layers", type=int, help="replay only the trace's first N MoE layers, on a store made with "
                   "--layers N (full-size experts on a smaller disk)")
    p.add_argument("--include-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="run each request's prefill rows as one forward pass (default on)")
    p.add_argument("--lookahead-recall", type=float, default=DEFAULT_RECALL,
                   help="emulated router lookahead: P(a true next-layer expert is seen) (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--readers", type=int, help="reader processes (default: the pool's)")
    p.add_argument("--policy-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run each method's policy actor in its own process (PipelineConfig.policy_process, "
                        "default on); --no-policy-process: on the pipeline's loop thread, for A/B runs")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="run each decode step's stand-in, expert MLPs (one graph per VRAM slot) and weighted "
                   "sum as captured CUDA graphs, in every method alike (default on; no effect on the CPU)")
    p.add_argument("--layer-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="where VRAM holds the stored form, run each decode layer's experts and weighted sum as one "
                   "graph (their fetches land in the same few views); --no-layer-graphs: one graph per "
                   "expert as elsewhere, for A/B runs (default on)")
    p.add_argument("--per-expert-waits", action="store_true",
                   help="fetch with wait=False and compute each expert once its own copy has landed, experts "
                   "already in VRAM first, so their math overlaps the other copies (default: wait for all)")
    p.add_argument("--profile-passes", type=int, default=0,
                   help="after each method's timed run, run its last N passes again under the torch profiler "
                   "and report GPU time per token: copying, computing, and both at once (CUDA only; default 0: off)")
    p.add_argument("--prefetch-copies", type=int,
                   help="prefetch H2D copies in flight at once, every method (PipelineConfig.prefetch_copies; "
                        "default: the pipeline's)")
    p.add_argument("--vram-form", default="auto",
                   help="what a VRAM slot holds for an mxfp4 store, in every method whose VRAM is the --vram "
                        "budget: dense bf16 (decoded per copy), stored (the MXFP4 bytes, ~3.8x more experts "
                        "in the same bytes, decoded at each use) or auto (stored on CUDA with Triton where it "
                        "holds more; PipelineConfig.vram_form; default auto)")
    p.add_argument("--expert-math", default="dense", choices=("dense", "mxfp4"),
                   help="dense: the experts' bf16 tensors (decoded per copy, or at use with --vram-form stored); "
                        "mxfp4: every method keeps the stored MXFP4 bytes in VRAM and computes from them, "
                        "resident and on-demand included (mxfp4 stores; default dense)")
    p.add_argument("--attn-matmuls", type=int, default=4, help="[n,H]x[H,H] matmuls of the attention stand-in")
    p.add_argument("--disk-probe-bytes", default="1GiB", help="cap on bytes read by the raw disk probe")
    p.add_argument("--json", help="write every figure and setting here (atomically)")
    p.add_argument("--plot", help="PNG of tokens/s and VRAM hit rate against the VRAM budget (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")


def parse_budget(text: str, what: str, total: int, slot_bytes: int, top_k: int) -> int:
    """Slots for a budget given as a fraction of all experts or as bytes; ValueError if < top_k."""
    from ..config import parse_size

    try:
        frac = float(text)
    except ValueError:
        frac = None
    if frac is not None and 0 < frac <= 1:
        slots = min(total, round(frac * total))
    else:
        try:
            slots = min(total, parse_size(text, f"--{what}") // slot_bytes)
        except ValueError as e:
            raise ValueError(f"{e} (or a fraction of all experts in (0, 1], e.g. 0.1)") from None
    if slots < top_k:
        raise ValueError(f"--{what} {text} holds {slots} experts of {slot_bytes} bytes, fewer than top-k={top_k}; "
                         f"give at least {top_k * slot_bytes} bytes or a fraction >= {top_k / total:.3g}")
    return slots


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _fits(nbytes_vram: int, nbytes_ram: int, device) -> str | None:
    """Why this many bytes would not fit (None if they do)."""
    import torch

    host = nbytes_ram + (nbytes_vram if device.type == "cpu" else 0)
    if host > 0.8 * _mem_available():
        return f"needs {host / 1e9:.1f} GB of host memory, {_mem_available() / 1e9:.1f} GB available"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if nbytes_vram > free - (1 << 30):
            return f"needs {nbytes_vram / 1e9:.1f} GB of VRAM, {free / 1e9:.1f} GB free"
    return None


def _limits(store, device, cap_bytes: int, seed: int) -> dict:
    import torch

    from .h2d_probe import raw_h2d_bandwidth
    from .limits_cmd import _drop_cache, raw_read_ranges

    experts = store.index.experts
    size = store.index.max_read_length
    out = {}
    n = max(1, min(len(experts), cap_bytes // size))
    step = max(1, len(experts) // n)
    pick = experts[::step][:n]
    ranges = [(str(store.root / x.file), x.offset, x.read_length) for x in pick]
    try:
        _drop_cache(sorted({p for p, _, _ in ranges}))
    except OSError:
        pass
    out["disk_raw_gbps"] = raw_read_ranges(ranges, threads=4) / 1e9
    copy_bytes = max(size, min(256 << 20, 16 * size))
    if device.type == "cuda":
        out["h2d_raw_gbps"] = raw_h2d_bandwidth(copy_bytes, 5, device) / 1e9
        out["h2d_link"] = "pinned host -> device"
    else:  # CPU mode: the "VRAM" tier is host memory, its copies are memcpy
        src = torch.empty(copy_bytes, dtype=torch.uint8).fill_(1)
        dst = torch.zeros_like(src)  # touched: the timed copies pay no page faults
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        out["h2d_raw_gbps"] = copy_bytes / best / 1e9
        out["h2d_link"] = "host memcpy (CPU mode)"
    return out


def _validate(args):
    """Everything that can be wrong with the input, checked before any work."""
    from adapters.store import StoreCheckpoint
    from policies.traces import first_layers, load_trace

    from ..assembly import vram_slots_for
    from ..config import VRAM_FORMS
    from ..vram_arena import VramArena, effective_form
    from . import methods as M
    from .replay import check_fit

    if not os.path.isdir(args.store):
        raise ValueError(f"store {args.store} does not exist; make one with bin/make-model + bin/precompute")
    store = StoreCheckpoint(args.store)
    trace = load_trace(args.trace)
    if args.layers is not None:
        trace = first_layers(trace, args.layers)
    check_fit(store.spec, trace)
    if not 0 <= args.lookahead_recall <= 1:
        raise ValueError(f"--lookahead-recall must be in [0, 1], got {args.lookahead_recall}")
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.warm_passes < 0:
        raise ValueError(f"--warm-passes must be >= 0, got {args.warm_passes}")
    if args.profile_passes < 0:
        raise ValueError(f"--profile-passes must be >= 0, got {args.profile_passes}")
    if args.attn_matmuls < 0:
        raise ValueError(f"--attn-matmuls must be >= 0, got {args.attn_matmuls}")
    if args.prefetch_copies is not None and args.prefetch_copies < 0:
        raise ValueError(f"--prefetch-copies must be >= 0, got {args.prefetch_copies}")
    spec = store.spec
    total = spec.num_layers * spec.num_experts
    vslot = VramArena.slot_bytes_for(store)
    rslot = store.index.max_read_length
    vrams = [(v, parse_budget(v, "vram", total, vslot, spec.top_k)) for v in (args.vram or ["0.1"])]
    ram = parse_budget(args.ram, "ram", total, rslot, spec.top_k)
    if args.vram_form not in VRAM_FORMS:
        raise ValueError(f"--vram-form {args.vram_form!r} unknown; valid: {', '.join(VRAM_FORMS)}")
    if args.expert_math == "mxfp4":
        if store.dtype != "mxfp4":
            raise ValueError(f"--expert-math mxfp4 computes from MXFP4 bytes but store {args.store} holds "
                             f"{store.dtype}; make an mxfp4 store (bin/precompute --dtype mxfp4) or use "
                             f"--expert-math dense")
        if args.vram_form == "dense":
            raise ValueError("--expert-math mxfp4 keeps the stored form in VRAM; drop --vram-form dense "
                             "(or use --expert-math dense)")
        args.vram_form = "stored"
    # Only the dense views can leave a stored budget short: without them (--expert-math mxfp4) a
    # budget holds at least its top_k dense slots' worth of smaller stored slots.
    if args.vram_form == "stored" and args.expert_math == "dense" and effective_form(store, "stored") == "stored":
        for text, slots in vrams:
            n = vram_slots_for(store, slots * vslot, "stored")[0]
            if n < spec.top_k:
                raise ValueError(f"--vram {text} with --vram-form stored holds {n} experts next to one fetch's "
                                 f"dense views, fewer than top-k={spec.top_k}; give a larger --vram or use "
                                 f"--vram-form dense")
    methods = []
    if args.baselines:
        methods += M.baseline_methods()
    else:
        methods += [m for m in M.baseline_methods() if m.name.startswith("ours")]
    methods += M.extra_methods(args.policy, args.predictor)
    if args.methods:
        methods = M.select(methods + [m for m in M.baseline_methods() if m not in methods],
                           [n.strip() for n in args.methods.split(",") if n.strip()])
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:  # a typo in a folder name found now, not when the run writes
            check_output_path(path, flag)
    if args.plot:  # a missing matplotlib costs the plot, not the run
        from .report import check_plot_available

        try:
            check_plot_available()
        except ValueError as e:
            print(f"prefetch-bench replay: {e}; running without the plot", file=sys.stderr)
            args.plot = None
    from ..config import parse_size

    cap = parse_size(args.disk_probe_bytes, "--disk-probe-bytes")
    return store, trace, methods, vrams, ram, vslot, rslot, cap


def run(args) -> int:
    store, trace, methods, vrams, ram_slots, vslot, rslot, cap = _validate(args)
    import numpy as np
    import torch

    from policies.cache.belady import belady_min, warm_start_loads
    from policies.traces import PREFILL

    from ..assembly import resolve_vram_form, vram_slots_for
    from ..vram_arena import VramArena
    from . import report as R
    from .gpu_profile import describe
    from .methods import slots_for
    from .replay import (Model, access_keys, build_passes, compute_only_fetch, emulate_hints, frozen_heap,
                         kernel_representatives, run_loop, run_method)

    spec = store.spec
    total = spec.num_layers * spec.num_experts
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cpu":
        # One intra-op thread: at these sizes a thread pool competing for a small, shared CPU
        # spends more time spinning than computing (measured: 100x slower per pass on 2 cores).
        torch.set_num_threads(1)
    W = args.warm_passes
    everything = build_passes(trace, args.include_prefill, None if args.tokens is None else W + args.tokens)
    history, passes = everything[:W], everything[W:]
    if not passes:
        rows = "" if args.include_prefill else " (decode rows)"
        if W:
            raise ValueError(f"trace {args.trace} has {len(everything)} forward passes{rows}, none left after "
                             f"--warm-passes {W}; lower --warm-passes")
        raise ValueError(f"trace {args.trace} has no forward passes to replay"
                         f"{rows + '; try --include-prefill' if rows else ''}")
    tokens = sum(p.n for p in passes)
    all_hints = emulate_hints(everything, spec.num_experts, args.lookahead_recall, args.seed)
    history_hints, hints = all_hints[:W], all_hints[W:]
    model = Model(spec, device, seed=args.seed, attn_matmuls=args.attn_matmuls)
    show = not args.no_progress
    print(f"replay: store {args.store} ({spec.family}, {store.dtype}, {spec.num_layers} layers x "
          f"{spec.num_experts} experts, top-{spec.top_k}, H={spec.hidden_size}, I={spec.intermediate_size}, "
          f"{rslot} bytes/expert moved), trace {args.trace}: {len(passes)} passes, {tokens} tokens"
          f"{f' after {W} untimed passes of its history' if W else ''}, device {device}")
    print(f"  non-expert work is a measured STAND-IN ({args.attn_matmuls} bf16 [n,H]x[H,H] matmuls + router "
          f"[n,H]x[H,E]), not a real attention; router lookahead is EMULATED (recall {args.lookahead_recall}, "
          f"seed {args.seed}), the same signal for every method that uses it")
    if ram_slots < total and not W:
        print(f"  RAM holds {ram_slots} of {total} experts: the warm-up's choice of them is arbitrary and a short "
              f"run measures cold disk reads; --warm-passes N times a window after N passes of real routing")

    limits = _limits(store, device, cap, args.seed)
    graphs = args.cuda_graphs and device.type == "cuda"
    if args.profile_passes and device.type != "cuda":
        print("  --profile-passes: GPU time needs a CUDA device; no profile on the CPU", file=sys.stderr)
    mxfp4_math = args.expert_math == "mxfp4"
    views = 0 if mxfp4_math else None  # vram_views: 0 hands the stored tensors out
    sslot = VramArena.slot_bytes_for(store, "stored")
    forms = {text: resolve_vram_form(store, args.vram_form, device, slots * vslot, views) for text, slots in vrams}
    stored = "stored" in forms.values() and args.layer_graphs and not mxfp4_math
    compute_text = _graphs_text(stored, mxfp4_math) if graphs else (
        f"eager{'; ' + MXFP4_MATH if mxfp4_math else ''}")
    print(f"  compute: {compute_text}"
          f"{', each expert after its own copy (--per-expert-waits)' if args.per_expert_waits else ''}, "
          f"the same math for every method")
    with model.graphs(graphs):  # warm-up: every launch shape of the timed passes' expert math, the allocator
        run_loop(model, kernel_representatives(passes, spec.top_k), compute_only_fetch(store, device, mxfp4_math))
    fixed: dict[str, dict] = {}  # methods whose budgets do not depend on --vram run once

    def run_one(m, vram_slots, vram_text, compute_s_tok):
        v, r = slots_for(m, vram_slots, ram_slots, spec.top_k, total)
        # The fixed-size baselines (top_k, all) keep dense slots: their size is a slot count; with
        # --expert-math mxfp4 they hold that many stored slots, like everyone else.
        fixed_size = m.vram != "budget"
        vbytes = v * (sslot if fixed_size and mxfp4_math else vslot)
        why = _fits(vbytes, r * rslot, device)
        if why:
            return R.skipped_row(m.name, m, f"does not fit: {why}")
        bar = R.progress_bar(len(passes), f"{m.name} @ {vram_text}", show)
        form = "dense" if fixed_size and not mxfp4_math else forms[vram_text]
        # A method whose RAM holds every expert reads the disk only in its untimed warm-up, and
        # each method's warm-up reads the whole store again: llama4 at full size took 25-42 s
        # per method on the H100 host, about its 1.56 GB/s of O_DIRECT. Through the page cache
        # the second warm-up on need not wait for the disk (not yet measured there: on this
        # project's 2-core CPU the warm-up fills RAM at 0.5 GB/s either way, bound elsewhere).
        # Any method that may read while timed keeps O_DIRECT: its reads cost a disk read.
        o_direct = r < total
        try:
            mr = run_method(args.store, store, m, vbytes, r * rslot, passes, model, hints,
                            device=str(device), readers=args.readers, progress=bar,
                            policy_process=args.policy_process, cuda_graphs=graphs,
                            per_expert_waits=args.per_expert_waits, profile_passes=args.profile_passes,
                            prefetch_copies=args.prefetch_copies, vram_form=form, layer_graphs=args.layer_graphs,
                            vram_views=views, history=(history, history_hints), o_direct=o_direct)
        finally:
            bar.close()
        row = R.method_row(m.name, m, mr, compute_s_tok, mr.vram_slots, r)
        row["vram_form"] = mr.vram_form
        row["o_direct"] = o_direct  # how its readers opened the store (see above)
        row["gpu_profile"] = mr.profile
        history_text = f", history {mr.setup_s['history']:.1f} s" if W else ""
        print(f"  set-up {m.name} @ {vram_text}: open {mr.setup_s['open']:.1f} s, warm-up {mr.setup_s['warm']:.1f} s"
              f"{history_text} (untimed)")
        if mr.profile is not None:
            print(f"  profile {m.name} @ {vram_text}: {describe(mr.profile)}")
        if mr.allocator and any(mr.allocator.values()):
            print(f"  allocator {m.name} @ {vram_text}: the timed passes made {mr.allocator['cuda_mallocs']} CUDA "
                  f"mallocs, {mr.allocator['cuda_frees']} frees, {mr.allocator['malloc_retries']} retries after "
                  f"freeing the cache (each a device sync)")
        return row

    def repeated(m, vram_slots, vram_text, compute_s_tok):
        """The median of --repeat runs of one method (its only run without --repeat)."""
        return R.median_row([run_one(m, vram_slots, vram_text, compute_s_tok) for _ in range(args.repeat)])

    def compute_only(label: str, whole_layers: bool = False) -> float:
        """Seconds per token of the math on top_k preloaded experts, nothing to move."""
        bar = R.progress_bar(len(passes), label, show)
        with model.graphs(graphs, whole_layers=whole_layers):
            fetch = compute_only_fetch(store, device, mxfp4_math)
            run_loop(model, kernel_representatives(passes, spec.top_k), fetch)  # captures its graphs untimed
            with frozen_heap():
                comp = run_loop(model, passes, fetch, progress=bar)
        bar.close()
        return sum(comp.pass_seconds) / tokens

    def oracle_s_tok(loads: int) -> float:
        """The bound's time per token: the math, or the loads moved at raw H2D, whichever is longer."""
        return max(compute_s_tok, loads * rslot / tokens / (limits["h2d_raw_gbps"] * 1e9))

    # Compute per token with everything resident: the resident method when it runs and fits,
    # else the math on top_k preloaded experts with nothing to move.
    resident = next((m for m in methods if m.name == "resident"), None)
    row = repeated(resident, vrams[0][1], vrams[0][0], 0.0) if resident else None
    if row is not None and not row["skipped"]:
        fixed["resident"] = row
        # The fastest of its runs: the bound must hold for every run, and with --repeat a
        # median resident run is beaten by methods that move experts (H100: resident 585-898
        # tok/s over three runs of 96 tokens).
        compute_s_tok = 1.0 / max(row["repeats"]["tokens_per_s"])
        source = "resident method" + (f", fastest of {args.repeat} runs" if args.repeat > 1 else "")
    else:
        if row is not None:
            fixed["resident"] = row
        compute_s_tok, source = compute_only("compute only"), f"top-{spec.top_k} preloaded experts"
    if graphs and stored:
        # Stored-form methods run a layer as one graph, which launches less than the resident
        # method's graph per expert: the bound takes the faster compute, so it stays a bound.
        layers_s_tok = compute_only("compute only, whole-layer graphs", whole_layers=True)
        limits["compute_whole_layers_ms_per_token"] = layers_s_tok * 1e3
        if layers_s_tok < compute_s_tok:
            compute_s_tok, source = layers_s_tok, f"top-{spec.top_k} preloaded experts, one graph per layer"
    if "resident" in fixed and not fixed["resident"]["skipped"]:
        fixed["resident"]["stall_ms_per_token"] = 0.0
    with model.graphs(graphs):
        for _ in range(2):  # the last round timed; the first captures the stand-in's graph
            t0 = time.perf_counter()
            for p in passes[: min(len(passes), 16)]:  # the stand-in alone
                h = model.embed_rows(p.token_ids)
                for _ in p.ids:
                    h, _ = model.non_expert(h)
            if device.type == "cuda":
                torch.cuda.synchronize()
    standin_ms_tok = (time.perf_counter() - t0) / sum(p.n for p in passes[:16]) * 1e3
    limits.update(compute_ms_per_token=compute_s_tok * 1e3, compute_source=source,
                  standin_ms_per_token=standin_ms_tok)
    print(f"  limits: raw {limits['h2d_link']} {limits['h2d_raw_gbps']:.2f} GB/s, raw O_DIRECT disk "
          f"{limits['disk_raw_gbps']:.2f} GB/s, compute {compute_s_tok * 1e3:.3f} ms/token with nothing to move "
          f"({source}; the stand-in alone {standin_ms_tok:.3f} ms/token)")

    def result(complete: bool) -> dict:
        return {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "environment": R.environment(),
                "store": {"path": args.store, "family": spec.family, "dtype": store.dtype, "layers": spec.num_layers,
                          "experts": spec.num_experts, "top_k": spec.top_k, "hidden": spec.hidden_size,
                          "intermediate": spec.intermediate_size, "expert_read_bytes": rslot, "vram_slot_bytes": vslot},
                "trace": {"path": args.trace, "model": trace.meta.model, "layers": trace.num_layers,
                          "experts": trace.num_experts, "top_k": trace.top_k, "rows": trace.tokens},
                "passes": len(passes), "tokens": tokens, "device": str(device),
                # untimed before the timed passes, through every method (--warm-passes)
                "history": {"passes": len(history), "tokens": sum(p.n for p in history)},
                "prefill_tokens": sum(p.n for p in passes if p.phase == PREFILL),
                "stand_in": f"{args.attn_matmuls} bf16 [n,H]x[H,H] matmuls + router [n,H]x[H,E] (not a real attention)",
                "compute": compute_text, "expert_math": args.expert_math,
                "lookahead": f"emulated: recall {args.lookahead_recall}, seed {args.seed}",
                "timing": "host clock per pass, device synchronised at the end of each pass",
                "limits": limits, "budgets": budgets,
                # False while budgets are still running: the file is rewritten after each one,
                # so a run cut short keeps what it finished
                "complete": complete}

    keys = access_keys(passes, spec.num_experts, spec.top_k)
    distinct = len(np.unique(keys))

    def bound(slots: int) -> dict:
        """Belady's loads with `slots` VRAM slots, cold and from the best warm start, and the
        oracle bound those warm loads give."""
        hits, cold = belady_min(keys, slots)
        warm = warm_start_loads(cold, slots, distinct)
        return {"vram_slots": slots, "belady_loads": cold, "belady_hit_rate": hits / max(1, len(keys)),
                "belady_loads_warm": warm, "oracle_tokens_per_s": 1.0 / oracle_s_tok(warm)}

    budgets = []
    for vram_text, vram_slots in vrams:
        budget = {"vram": vram_text, **bound(vram_slots), "vram_bytes": vram_slots * vslot, "ram_slots": ram_slots,
                  "methods": [], "vram_form": forms[vram_text]}
        if forms[vram_text] == "stored":
            # The same bytes hold more experts stored: the bound for what those caches can do
            # (same formula; it leaves out the decode each use then costs).
            budget["stored"] = bound(vram_slots_for(store, vram_slots * vslot, "stored", views)[0])
        # Repeats run in rounds of every method, so a slow spell of the machine (another
        # tenant, a throttled clock) falls on all of them rather than on one method's runs.
        timed = [m for m in methods if m.name not in fixed]
        runs: dict[str, list[dict]] = {m.name: [] for m in timed}
        for _ in range(args.repeat):
            for m in timed:
                runs[m.name].append(run_one(m, vram_slots, vram_text, compute_s_tok))
        for m in methods:
            if m.name in fixed:  # a copy: its ratios are this budget's, not the last one's
                budget["methods"].append(R.budget_copy(fixed[m.name]))
                continue
            row = R.median_row(runs[m.name])
            if m.vram != "budget" and m.ram != "budget":
                fixed[m.name] = row
            budget["methods"].append(row)
        # The ratios are to the bound for what these bytes hold in the form the budget's methods
        # use: with the stored form that is the stored-slot bound (the dense-slot one, which
        # counts the budget in bf16 slots, stays beside it for comparison with older runs).
        budget["oracle_basis"] = "stored" if "stored" in budget else "dense"
        R.add_ratios(budget["methods"], R.oracle_bound(budget))
        R.print_table(budget, budget["methods"])
        budgets.append(budget)
        if args.json:
            R.write_json(args.json, result(complete=False))
    if args.json:
        R.write_json(args.json, result(complete=True))
    if args.plot:
        R.plot(args.plot, budgets)
        print(f"plot: {args.plot}")
    return 0
