"""What `prefetch-bench replay` prints and writes: progress bar, table, JSON, plot.

    progress_bar(total, desc, enabled) -> callable(n) with .close()   (tqdm on stderr)
    method_row(name, method, run, compute_s_per_token, slots) -> dict  the figures of one method
    median_row(rows) -> dict                                            one method's repeated runs as one row
    budget_copy(row) -> dict                                            a fixed-size method's row for another budget
    add_ratios(rows, oracle_tokens_per_s)                               ratios to the oracle and on-demand
    print_table(budget, rows, file)                                     the table of one VRAM budget
    environment() -> dict                                               machine, card, driver, torch
    write_json(path, obj)                                               atomic (temp file + rename)
    plot(path, budgets)                                                 tokens/s and VRAM hit rate vs budget
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from adapters.atomic_file import replaced_atomically
from policies.traces import DECODE


class _NoBar:
    def __call__(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, bar):
        self.bar = bar

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety; the run goes on without it
        return _NoBar()
    return _Bar(tqdm(total=total, desc=desc, unit="pass", file=sys.stderr, leave=False))


def method_row(name: str, method, run, compute_s_per_token: float, vram_slots: int, ram_slots: int) -> dict:
    """Figures of one method's timed replay (scheduler counters taken as after - before warm-up)."""
    a, b = run.after, run.before
    d = {k: getattr(a, k) - getattr(b, k) for k in ("vram_hits", "vram_misses", "ram_hits", "ram_misses",
                                                    "bytes_h2d", "bytes_nvme", "prefetch_copies",
                                                    "prefetch_reads", "prefetch_dropped", "stall_seconds",
                                                    "evictions_vram", "evictions_vram_fallback", "fetches",
                                                    "fetches_via_loop")}
    seconds = sum(run.loop.pass_seconds)
    tokens = run.loop.tokens
    uses = d["vram_hits"] + d["vram_misses"]
    ms_tok = seconds / max(1, tokens) * 1e3
    # A prefill pass runs many rows at once, so its time per token says little about decoding:
    # the two phases are also reported apart (a decode pass is one token).
    decode_s = [t for t, ph in zip(run.loop.pass_seconds, run.loop.pass_phases) if ph == DECODE]
    return {
        "method": name, "policy": method.policy, "predictor": method.predictor,
        "predictor_options": dict(method.predictor_options), "policy_options": dict(method.policy_options),
        "lookahead": method.lookahead, "note": method.note,
        "vram_slots": vram_slots, "ram_slots": ram_slots, "device": run.device, "pinned": run.pinned,
        "tokens": tokens, "passes": len(run.loop.pass_seconds), "seconds": seconds, "setup_s": run.setup_s,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "ms_per_token": ms_tok,
        "prefill_s": seconds - sum(decode_s),
        "decode_ms_per_token": sum(decode_s) / len(decode_s) * 1e3 if decode_s else None,
        # Time beyond the math with everything resident, per token.
        "stall_ms_per_token": max(0.0, ms_tok - compute_s_per_token * 1e3),
        "fetch_ms_per_token": run.loop.fetch_seconds / max(1, tokens) * 1e3,
        "vram_hit_rate": d["vram_hits"] / uses if uses else 0.0,
        # Of the VRAM misses, the share RAM served (None: no VRAM miss to serve).
        "ram_hit_rate": d["ram_hits"] / max(1, d["ram_hits"] + d["ram_misses"]) if d["vram_misses"] else None,
        "gb_h2d": d["bytes_h2d"] / 1e9, "gb_nvme": d["bytes_nvme"] / 1e9,
        "h2d_gbps": d["bytes_h2d"] / seconds / 1e9 if seconds > 0 else 0.0,
        "nvme_gbps": d["bytes_nvme"] / seconds / 1e9 if seconds > 0 else 0.0,
        "loop_stall_s": d["stall_seconds"], "prefetch_copies": d["prefetch_copies"],
        "prefetch_reads": d["prefetch_reads"], "prefetch_dropped": d["prefetch_dropped"],
        # VRAM evictions, and of them those the scheduler picked itself (LRU) because the
        # policy had not emptied a slot yet: the policy chose the rest.
        "evictions_vram": d["evictions_vram"], "evictions_vram_fallback": d["evictions_vram_fallback"],
        # Fetches the pipeline's loop thread served (a hop there and back for the decode thread:
        # a disk read or a slot still filling), of all fetches.
        "fetches": d["fetches"], "fetches_via_loop": d["fetches_via_loop"],
        # The policy actor's events in the timed passes; a fast decode loop can outrun it, and
        # what it drops or merges the policy never sees.
        "actor_events": run.actor,
        # torch's CUDA allocator in the timed passes (None off CUDA): see MethodRun.allocator
        "allocator": run.allocator,
        "skipped": None,
    }


def skipped_row(name: str, method, why: str) -> dict:
    return {"method": name, "policy": method.policy, "predictor": method.predictor, "note": method.note,
            "skipped": why}


def median_row(rows: list[dict]) -> dict:
    """The run of median tokens/s among one method's repeats (the lower middle of an even
    count: a real run, never an average of two), with every run's tokens/s beside it.

    One run of a method on a shared GPU machine can be off by 2x (ours once measured
    68 and 131 tok/s in two runs); the median of interleaved repeats is what a ratio between
    methods can rest on, and the spread says how far it can be trusted."""
    done = [r for r in rows if not r["skipped"]]
    if not done:
        return rows[0]
    ranked = sorted(done, key=lambda r: r["tokens_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    runs = [r["tokens_per_s"] for r in done]  # in run order
    row["repeats"] = {"tokens_per_s": runs, "decode_ms_per_token": [r["decode_ms_per_token"] for r in done],
                      "prefill_s": [r["prefill_s"] for r in done],
                      "spread": max(runs) / min(runs) - 1.0 if min(runs) > 0 else None}
    return row


def budget_copy(row: dict) -> dict:
    """A fixed-size method's row (measured once) for another VRAM budget: add_ratios writes
    that budget's ratios into the row and into its `repeats`, so both are its own."""
    out = dict(row)
    if "repeats" in out:
        out["repeats"] = dict(out["repeats"])
    return out


def oracle_bound(budget: dict) -> float:
    """The bound a budget's ratios are to (tokens/s): Belady at the slots its methods hold,
    the stored-slot one where VRAM holds the stored form (`oracle_basis`)."""
    return (budget["stored"] if budget.get("oracle_basis") == "stored" else budget)["oracle_tokens_per_s"]


def add_ratios(rows: list[dict], oracle_tokens_per_s: float) -> None:
    """Each row's ratios to the oracle bound and to on-demand. With repeats, also those of its
    fastest run (`repeats.best_ratio_oracle`, `repeats.best_ratio_on_demand`, the latter to
    on-demand's fastest): the bound is built from the fastest resident run, so best against
    best is the like-for-like ratio, and the median row's ratio the conservative one. A pure
    torch loop with no pipeline spread 66% over nine rounds on an H100 (cc7ed26), so
    slow runs are the machine's."""
    base = next((r for r in rows if r["method"] == "on-demand" and not r["skipped"]), None)
    base_best = max(base.get("repeats", {}).get("tokens_per_s") or [base["tokens_per_s"]]) if base else None
    for r in rows:
        if r["skipped"]:
            continue
        r["ratio_oracle"] = r["tokens_per_s"] / oracle_tokens_per_s if oracle_tokens_per_s > 0 else None
        r["ratio_on_demand"] = r["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
        rep = r.get("repeats")
        if rep and len(rep["tokens_per_s"]) > 1:
            best = max(rep["tokens_per_s"])
            rep["best_ratio_oracle"] = best / oracle_tokens_per_s if oracle_tokens_per_s > 0 else None
            rep["best_ratio_on_demand"] = best / base_best if base_best else None


def _f(x, spec: str) -> str:
    return format("-", f">{spec.split('.')[0]}") if x is None else format(x, spec)


def print_table(budget: dict, rows: list[dict], file=None) -> None:
    file = file or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    stored = "stored" in budget
    print(f"\nVRAM {budget['vram']} = {budget['vram_slots']} {'bf16 ' if stored else ''}expert slots, RAM "
          f"{budget['ram_slots']} slots; {'dense-slot ' if stored else ''}oracle bound "
          f"{budget['oracle_tokens_per_s']:.1f} tokens/s (Belady {budget['belady_loads_warm']} loads "
          f"from a warm start, {budget['belady_loads']} cold)",
          file=file)
    if stored:
        st = budget["stored"]
        print(f"  stored MXFP4 in VRAM (vram_form stored): the same bytes hold {st['vram_slots']} experts; "
              f"oracle bound there {st['oracle_tokens_per_s']:.1f} tokens/s (Belady {st['belady_loads_warm']} loads "
              f"warm, {st['belady_loads']} cold); "
              f"/oracle below is to this bound", file=file)
    head = (f"{'method':22s} {'tok/s':>8s} {'ms/tok':>7s} {'stall':>7s} {'VRAMhit':>7s} {'RAMhit':>7s} "
            f"{'GB h2d':>7s} {'GB nvme':>7s} {'h2d GB/s':>8s} {'nvme GB/s':>9s} {'/oracle':>7s} {'/on-dem':>7s} "
            f"{'prefill s':>9s} {'dec ms/tok':>10s}")
    print(head, file=file)
    for r in rows:
        if r["skipped"]:
            print(f"{r['method']:22s} skipped: {r['skipped']}", file=file)
            continue
        print(f"{r['method']:22s} {r['tokens_per_s']:8.1f} {r['ms_per_token']:7.2f} {r['stall_ms_per_token']:7.2f} "
              f"{r['vram_hit_rate']:7.3f} {_f(r['ram_hit_rate'], '7.3f')} {r['gb_h2d']:7.3f} {r['gb_nvme']:7.3f} "
              f"{r['h2d_gbps']:8.2f} {r['nvme_gbps']:9.2f} {_f(r.get('ratio_oracle'), '7.2f')} "
              f"{_f(r.get('ratio_on_demand'), '7.2f')} {_f(r.get('prefill_s'), '9.3f')} "
              f"{_f(r.get('decode_ms_per_token'), '10.2f')}", file=file)
    repeated = [r for r in rows if not r["skipped"] and len(r.get("repeats", {}).get("tokens_per_s", [])) > 1]
    if repeated:
        print("  each row is the median run; tokens/s of every run, in order, and the fastest run's ratios:",
              file=file)
        for r in repeated:
            rep = r["repeats"]
            spread = "" if rep["spread"] is None else f" (max/min - 1 = {rep['spread']:.0%})"
            best = (f"; fastest {_f(rep.get('best_ratio_oracle'), '.2f')} x oracle, "
                    f"{_f(rep.get('best_ratio_on_demand'), '.2f')} x on-demand's fastest")
            print(f"  {r['method']:22s} {' '.join(f'{x:.1f}' for x in rep['tokens_per_s'])}{spread}{best}", file=file)
    # Only a method held to the bound's VRAM can be bounded by it: resident moves nothing.
    slots = (budget["stored"] if budget.get("oracle_basis") == "stored" else budget)["vram_slots"]
    above = [r["method"] for r in rows
             if not r["skipped"] and (r.get("ratio_oracle") or 0) > 1.0 and r["vram_slots"] <= slots]
    if above:
        print(f"  note: {', '.join(above)} ran faster than the oracle bound, so the compute time under the bound "
              f"(the limits line) was measured in a slow spell of the machine (python -m "
              f"pipeline.bench.launch_noise shows its spread); with --repeat N the bound takes the resident "
              f"method's fastest run (N >= 3 advised)", file=file)


def environment() -> dict:
    import torch

    env = {"machine": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "card": None, "driver": None}
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name()
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            pass
        env["driver"] = env["driver"] or f"cuda {torch.version.cuda}"
    return env


def write_json(path: str | Path, obj) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False, default=str)
        f.write("\n")


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib, or the project's `plot` extra)") from None


def plot(path: str | Path, budgets: list[dict]) -> None:
    """tokens/s and VRAM hit rate against the VRAM budget (slots), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    names = []
    for b in budgets:
        names += [r["method"] for r in b["methods"] if r["method"] not in names]
    for name in names:
        pts = [(b["vram_slots"], r) for b in budgets for r in b["methods"] if r["method"] == name and not r["skipped"]]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        a1.plot(xs, [r["tokens_per_s"] for _, r in pts], marker="o", label=name)
        a2.plot(xs, [r["vram_hit_rate"] for _, r in pts], marker="o", label=name)
    xs = [b["vram_slots"] for b in budgets]
    # With a marker: a run of one budget draws its bound as a single point.
    a1.plot(xs, [oracle_bound(b) for b in budgets], "k--", marker="_", markersize=14, label="oracle bound")
    a1.set(xlabel="VRAM budget (expert slots)", ylabel="tokens/s", title="throughput")
    a2.set(xlabel="VRAM budget (expert slots)", ylabel="VRAM hit rate", title="VRAM hit rate", ylim=(0, 1.05))
    a1.legend(fontsize=7)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
