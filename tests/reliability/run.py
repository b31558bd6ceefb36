"""`make reliability`: the long versions of the reliability suite, with progress and a table.

    python -m tests.reliability.run [--tokens 100000] [--reader-kills 100] [--crash-points 20]
                                    [--fuzz-examples 3000] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make reliability")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--reader-kills", type=int, default=100)
    p.add_argument("--reader-stops", type=int, default=5)
    p.add_argument("--crash-points", type=int, default=20)
    p.add_argument("--fuzz-examples", type=int, default=3000)
    p.add_argument("--device", default="cpu", help="where the VRAM tier lives: cpu or cuda (default cpu)")
    p.add_argument("--parts", default="soak,crash,fuzz",
                   help="which parts to run, comma-separated, of soak, crash, fuzz (default all)")
    p.add_argument("--json", help="write every figure here")
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))
    if not parts or parts - {"soak", "crash", "fuzz"}:
        p.error(f"--parts {a.parts}: name some of soak, crash, fuzz, comma-separated")
    from tests.helpers_models import make_tiny
    from tests.helpers_pipeline import build_tiny_store
    from tests.reliability.soak import Faults, soak

    work = Path(tempfile.mkdtemp(prefix="reliability-"))
    store = build_tiny_store(work, "bfloat16")
    rows: list[tuple[str, str]] = []
    out: dict = {"commit": _commit(), "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                 f"python {platform.python_version()})"}
    if a.device == "cuda":
        import torch

        out["machine"] += f", {torch.cuda.get_device_name()}, torch {torch.__version__}"

    def progress(token, total):
        print(f"\r  soak: {token}/{total} tokens", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    if "soak" in parts:
        r = soak(store, tokens=a.tokens, faults=Faults(a.reader_kills, a.reader_stops, True), seed=0, device=a.device,
                 progress=progress)
        print(file=sys.stderr)
        out["soak"] = msgspec.to_builtins(r)
        s = r.slopes_per_1k
        rows += [("soak", f"{r.tokens} tokens, {r.experts_checked} experts checked, {r.wrong_tensors} wrong, slowest "
                          f"fetch {r.slowest_fetch_s:.2f} s, {r.seconds:.0f} s"),
                 ("slopes per 1k tokens", f"RSS {s['rss_bytes'] / 1e3:+.1f} kB, fds {s['fds']:+.3f}, threads "
                                          f"{s['threads']:+.3f}, /dev/shm {s['shm_entries']:+.3f}, VRAM "
                                          f"{s['vram_bytes'] / 1e3:+.1f} kB"),
                 ("the same, second half", f"RSS {r.slopes_second_half_per_1k['rss_bytes'] / 1e3:+.1f} kB, fds "
                                           f"{r.slopes_second_half_per_1k['fds']:+.3f}, threads "
                                           f"{r.slopes_second_half_per_1k['threads']:+.3f}"),
                 ("after close vs before open", f"fds {r.after.fds - r.before.fds:+d}, threads "
                                                f"{r.after.threads - r.before.threads:+d}, /dev/shm "
                                                f"{r.after.shm_entries - r.before.shm_entries:+d}"),
                 ("faults survived", f"{r.reader_kills} reader SIGKILLs, {r.reader_stops} reader SIGSTOPs past the read "
                                     f"timeout, policy SIGKILLed: {r.policy_killed} (then {r.policy_state}, decode went "
                                     f"on), {r.reader_restarts} readers replaced")]
        slow = soak(store, tokens=max(1, a.tokens // 50), seed=1, read_delay_s=0.003, device=a.device)
        rows.append(("slow disk (3 ms a read)", f"{slow.tokens} tokens, {slow.wrong_tensors} wrong"))
    if "crash" in parts:
        from tests.reliability import crash

        model = make_tiny(work / "m", "qwen-moe", "--layers", "12", "--experts", "16", "--hidden", "256",
                          "--intermediate", "512", "--shards", "3")
        (work / "kills").mkdir()
        c = crash.crash_points(model, work / "kills", points=a.crash_points, seed=0)
        out["crash"] = msgspec.to_builtins(c)
        rows.append(("precompute SIGKILLed", f"{c.points} points ({c.killed_mid_run} mid-run), {c.identical} reruns "
                                             f"byte-identical to an uninterrupted store"))
        if crash.can_mount(work):
            (work / "full").mkdir()
            d = crash.disk_full(model, work / "full", work / "kills" / "reference")
            out["disk_full"] = msgspec.to_builtins(d)
            rows.append(("disk full mid-write", f"exit {d.exit_code}, {len(d.partial_names)} half-written files, "
                                                f"rerun identical: {d.rerun_identical}"))
            (work / "ro").mkdir()
            code, line, secs = crash.read_only_out(model, work / "ro")
            rows.append(("read-only output", f"exit {code} after {secs:.1f} s: {line[:80]}"))
    if "fuzz" in parts:
        from tests.reliability import fuzz

        n = a.fuzz_examples
        counts = {"safetensors-header": fuzz.fuzz_safetensors_header(n, 0), "store-json": fuzz.fuzz_store_json(n, 0, store),
                  "trace": fuzz.fuzz_trace(n, 0), "config": fuzz.fuzz_config(n, 0), "fetch": fuzz.fuzz_fetch(n, 0, store)}
        out["fuzz_cases"] = counts
        rows.append(("fuzz cases (all ended in the project's error or a correct result)",
                     ", ".join(f"{k} {v}" for k, v in counts.items())))
    rows.append(("total", f"{time.perf_counter() - t0:.0f} s on {out['machine']}, commit {out['commit']}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def _commit() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
