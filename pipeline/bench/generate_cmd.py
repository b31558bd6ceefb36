"""`prefetch-bench generate`: a transformers MoE model's generate(), every method on the same model,
prompts and device in one run.

  prefetch-bench generate --model DIR [--store DIR] --vram X [--vram Y ...] --ram Z
                          --prompt-tokens N --new-tokens M [--batch B] [--baselines] [--repeat R]
                          [--json OUT] [--plot OUT.png]

--vram is a share of all experts (0.1) or a size (2GiB). A share buys VRAM slots for that share of
the experts in the form the pipeline keeps them in (stored MXFP4 where it decodes at use, on a GPU),
plus the top_k dense views that decoding at use writes into: at 1.0 every expert has a slot. The
bytes are printed and are accelerate's budget too. Methods: `ours` always; --baselines adds
resident, ours with the router lookahead the other way (ours-no-lookahead where the defaults turn it
on, ours-lookahead where they leave it off), on-demand and accelerate (pipeline.bench.generate_method
says what each is). Budgets run from the smallest; within one, every method is loaded at once, each in its own
process (its peak RSS and VRAM are its own), and timed in R interleaved rounds
(pipeline.bench.generate_rounds); medians are reported, with each round in the JSON, and the ratio
to resident is the median of the rounds' ratios. on-demand does not depend on the budget and runs
with the first; resident runs with every budget, so each ratio is taken side by side.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import msgspec

from .generate_method import MethodResult, MethodRun
from .generate_rounds import run_budget
from .report import check_plot_available, environment, write_json

BUDGET_FREE = ("on-demand",)  # measured once, with the first budget


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="transformers checkpoint folder (make-model --format hf writes one)")
    p.add_argument("--store", help="expert store (default MODEL/expert_store, made by precompute when missing)")
    p.add_argument("--vram", action="append", required=True,
                   help="experts' VRAM budget: a share of all experts (0.25) or a size (2GiB); repeatable")
    p.add_argument("--ram", default="1.0",
                   help="pinned RAM budget: a share of all experts (RAM slots for them) or a size (default 1.0)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--accelerate-new-tokens", type=int, default=None,
                   help="accelerate's new tokens (default --new-tokens): its offload copies a layer's experts per "
                        "token, slow enough to cap")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1,
                   help="timed rounds, each method in turn within a round (medians reported)")
    p.add_argument("--baselines", action="store_true",
                   help="also resident, ours with the lookahead the other way, on-demand, accelerate")
    p.add_argument("--methods", nargs="+", help="run exactly these methods instead")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="write a bar chart of decode tokens/s here (needs matplotlib)")


def _non_expert_bytes(model_dir: Path) -> int:
    from adapters.hf_experts import open_hf_index

    index = open_hf_index(model_dir)
    return sum(e.length for name, (_, e) in index.entries.items() if ".experts." not in name)


def _store_of(args) -> Path:
    from pipeline.hf.load import default_store
    from pipeline.hf.support import supported_arch
    from transformers import AutoConfig

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise ValueError(f"--model {model}: no config.json; give a transformers checkpoint folder")
    if args.store:
        return Path(args.store)
    return default_store(model, supported_arch(AutoConfig.from_pretrained(model)), progress=True)


def _methods(args, lookahead_on: bool) -> list[str]:
    from .generate_method import METHODS

    if args.methods:
        bad = [m for m in args.methods if m not in METHODS]
        if bad:
            raise ValueError(f"--methods {' '.join(bad)} unknown; valid: {', '.join(METHODS)}")
        return args.methods
    if not args.baselines:
        return ["ours"]
    other = "ours-no-lookahead" if lookahead_on else "ours-lookahead"
    return ["resident", "ours", other, "on-demand", "accelerate"]


def run(args) -> int:
    from adapters.atomic_file import check_output_path
    from adapters.store import StoreCheckpoint

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_path(path, flag)
    if args.plot:
        check_plot_available()
    for flag in ("prompt_tokens", "new_tokens", "batch", "repeat"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.methods:
        _methods(args, False)  # a bad name fails before the store is made
    store = _store_of(args)
    import torch

    from .replay_cmd import parse_budget

    st = StoreCheckpoint(store)
    spec = st.spec
    experts, size = spec.num_layers * spec.num_experts, spec.expert_bytes
    total = experts * size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    budgets = sorted(((v, *_budget_bytes(v, st, device)) for v in args.vram), key=lambda b: b[1])
    ram_slot = st.index.max_read_length  # a RAM slot holds the largest expert read, alignment included
    ram = str(parse_budget(args.ram, "ram", experts, ram_slot, spec.top_k) * ram_slot)
    from pipeline.hf.load import lookahead_pays

    methods = _methods(args, lookahead_pays(st, ram))
    base = dict(model=str(args.model), store=str(store), ram=ram, prompt_tokens=args.prompt_tokens,
                batch=args.batch, non_expert_bytes=_non_expert_bytes(Path(args.model)))
    rows: list[dict] = []
    once: dict[str, dict] = {}
    machine = _machine()
    for label, vram, holds_all in budgets:
        print(f"vram {label}: {vram / 1e9:.2f} GB for experts", file=sys.stderr, flush=True)
        runs, results = [], {}
        for m in methods:
            if m in once:
                continue
            if m == "accelerate" and holds_all:
                results[m] = MethodResult(m, "skipped: the budget holds every expert (that is resident)")
                continue
            new = args.accelerate_new_tokens or args.new_tokens if m == "accelerate" else args.new_tokens
            runs.append(MethodRun(method=m, vram_bytes=vram, new_tokens=new, **base))
        t0 = time.perf_counter()
        results.update(zip((r.method for r in runs),
                           run_budget(runs, args.repeat, lambda text: print(f"  {text}", file=sys.stderr, flush=True))))
        print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        group = [{**once[m], "vram": label, "vram_bytes": vram} if m in once
                 else {"vram": label, "vram_bytes": vram, **msgspec.to_builtins(results[m])} for m in methods]
        _compare(group)
        for row in group:
            if row["method"] in BUDGET_FREE and row["status"] == "ok":
                once.setdefault(row["method"], {**row, "measured_at_vram": label})
        rows += group
        if args.json:  # after every budget: a run stopped midway keeps what it measured
            write_json(args.json, {"command": "prefetch-bench generate " + " ".join(sys.argv[2:]),
                                    "machine": machine, "model": str(args.model), "store": str(store),
                                    "experts_bytes": total, "rows": rows})
    print(_table(rows, spec))
    if args.plot:
        _plot(rows, args.plot)
    failed = [r["method"] for r in rows if r["status"].startswith("failed")]
    return 1 if failed else 0


def _budget_bytes(text: str, store, device: str) -> tuple[int, bool]:
    """--vram as (bytes, whether they hold every expert): a size as given; a share as the VRAM that
    holds that share of the experts in the form the pipeline will keep them in, plus the dense views
    a stored form decodes into."""
    from pipeline.assembly import resolve_vram_form
    from pipeline.decode_at_use import view_bytes_for
    from pipeline.vram_arena import VramArena

    from ..config import parse_size
    from .replay_cmd import parse_budget

    spec = store.spec
    experts = spec.num_layers * spec.num_experts
    n = parse_budget(text, "vram", experts, spec.expert_bytes, spec.top_k)
    try:
        share = 0 < float(text) <= 1
    except ValueError:
        share = False
    if not share:
        size = parse_size(text, "--vram")
        return size, size >= experts * spec.expert_bytes
    if store.dtype == "mxfp4":
        stored = n * VramArena.slot_bytes_for(store, "stored") + view_bytes_for(store, spec.top_k)
        if resolve_vram_form(store, "auto", device, stored) == "stored":
            return stored, n == experts
    return n * VramArena.slot_bytes_for(store, "dense"), n == experts


def _compare(group: list[dict]) -> None:
    """Each row's tokens against its budget's resident (their common prefix when a method made fewer),
    and its decode rate's ratio to resident's: the median of the rounds' ratios."""
    resident = next((r for r in group if r["method"] == "resident" and r["status"] == "ok"), None)
    for r in group:
        if "measured_at_vram" in r:  # a budget-free method's row from an earlier budget, compared there
            continue
        r["tokens_equal_resident"] = r["vs_resident"] = None
        r["vs_resident_runs"] = []
        if resident is None or r["status"] != "ok":
            continue
        ref = resident["tokens"]
        n = min(len(ref[0]), len(r["tokens"][0])) if r["tokens"] else 0
        r["tokens_equal_resident"] = all(a[:n] == b[:n] for a, b in zip(ref, r["tokens"])) and n > 0
        r["vs_resident_runs"] = [a / b for a, b in zip(r["decode_tok_s_runs"], resident["decode_tok_s_runs"])]
        if r["vs_resident_runs"]:
            r["vs_resident"] = statistics.median(r["vs_resident_runs"])


def _table(rows: list[dict], spec) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-".rjust(int(fmt.split(".")[0] or 0))

    head = f"{'vram':>6} {'method':<18} {'prefill s':>9} {'decode tok/s':>12} {'x resident':>10} {'VRAM GB':>8} " \
           f"{'RSS GB':>7} {'moved GB':>8} {'hit':>5} {'same':>5}"
    lines = [f"generate: {spec.num_layers} MoE layers x {spec.num_experts} experts (top-{spec.top_k}), "
             f"{spec.expert_bytes / 1e6:.2f} MB each as stored", head]
    for r in rows:
        if "measured_at_vram" in r:  # shown with the budget it ran with
            continue
        if r["status"] != "ok":
            lines.append(f"{r['vram']:>6} {r['method']:<18} {r['status']}")
            continue
        same = {None: "-", True: "yes", False: "NO"}[r["tokens_equal_resident"]]
        lines.append(f"{r['vram']:>6} {r['method']:<18} {f(r['prefill_s'], '9.3f')} {f(r['decode_tok_s'], '12.2f')} "
                     f"{f(r['vs_resident'], '10.2f')} {f(r['peak_vram_bytes'] and r['peak_vram_bytes'] / 1e9, '8.2f')} "
                     f"{f(r['peak_rss_bytes'] / 1e9, '7.2f')} "
                     f"{f(r['bytes_moved'] is not None and r['bytes_moved'] / 1e9 or None, '8.2f')} "
                     f"{f(r['vram_hit_rate'], '5.2f')} {same:>5}")
    split = [r for r in rows if r["status"] == "ok" and r.get("decode_ms") and "measured_at_vram" not in r]
    if split:
        lines += ["", "where a decode step's host time goes, ms per token (stall: fetch waiting for reads; rest: "
                      "attention, norms, sampling)",
                  f"{'vram':>6} {'method':<18} {'step':>7} {'routing wait':>12} {'lookahead':>9} {'fetch':>7} "
                  f"{'stall':>7} {'math':>7} {'rest':>7}"]
        for r in split:
            d = r["decode_ms"]
            lines.append(f"{r['vram']:>6} {r['method']:<18} {d['step']:7.2f} {d['routing_wait']:12.2f} "
                         f"{d['lookahead']:9.2f} {d['fetch']:7.2f} {d['stall']:7.2f} {d['math']:7.2f} {d['rest']:7.2f}")
    return "\n".join(lines)


def _machine() -> dict:
    import transformers

    return {**environment(), "transformers": transformers.__version__}


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adapters.atomic_file import replaced_atomically

    ok = [r for r in rows if r["status"] == "ok" and r.get("decode_tok_s")]
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['method']}\n@{r['vram']}" for r in ok]
    ax.bar(range(len(ok)), [r["decode_tok_s"] for r in ok])
    ax.set_xticks(range(len(ok)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("decode tokens/s")
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png")
