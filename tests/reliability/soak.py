"""A decode loop through the pipeline for many tokens, under faults, with every expert checked.

    report = soak(store_dir, tokens=..., faults=Faults(...), seed=0)

Routing is seeded and random (top-k of E per layer per token), the budgets force eviction in both
tiers, the policy runs in its own process and readers in theirs. Every tensor a fetch hands out is
compared with the store's own decode of that expert (no wrong tensor may ever be handed out).
Every `sample_every` tokens the process's RSS, open descriptors, threads and /dev/shm entries are
sampled; the report gives each one's slope per 1,000 tokens after the first sample (warm-up).
Faults are injected at seeded tokens: readers SIGKILLed, readers SIGSTOPped past the read
timeout, the policy process SIGKILLed (the scheduler then makes its own choices; stats say so);
`read_delay_s` slows every disk read (a slow disk).
A fetch slower than `watchdog_s` fails the run (a deadlock shows as that, not as a hang).
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import msgspec
import torch

from adapters.store import StoreCheckpoint
from pipeline import ExpertPipeline
from pipeline.api import PolicyStoppedWarning


class Faults(msgspec.Struct, frozen=True):
    reader_kills: int = 0
    reader_stops: int = 0  # SIGSTOP, left stopped: the read timeout must replace the reader
    policy_kill: bool = False


class Sample(msgspec.Struct, frozen=True):
    token: int
    rss_bytes: int
    fds: int
    threads: int
    shm_entries: int
    vram_bytes: int = 0  # allocated by torch on the GPU (0 without one)


class SoakReport(msgspec.Struct):
    tokens: int
    fetches: int
    experts_checked: int
    wrong_tensors: int
    slowest_fetch_s: float
    reader_kills: int
    reader_stops: int
    policy_killed: bool
    reader_restarts: int
    policy_state: str
    samples: list[Sample]  # while the pipeline is open
    slopes_per_1k: dict[str, float]
    # the same over the second half of the run: growth that settles (allocator warm-up) is not a leak
    slopes_second_half_per_1k: dict[str, float]
    before: Sample  # before it opened and after it closed: nothing may be left behind
    after: Sample
    seconds: float


def _sample(token: int) -> Sample:
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    vram = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return Sample(token, rss, len(os.listdir("/proc/self/fd")), threading.active_count(),
                  len([n for n in os.listdir("/dev/shm") if n.startswith("tlmc-")]), vram)


def slope_per_1k(samples: list[Sample], field: str) -> float:
    """Least-squares slope of `field` against tokens, per 1,000 tokens, the first sample left out."""
    pts = [(s.token, getattr(s, field)) for s in samples[1:]]
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 1000 * sum((x - mx) * (y - my) for x, y in pts) / var if var else 0.0


def _fault_plan(tokens: int, faults: Faults, rng: random.Random) -> dict[int, list[str]]:
    plan: dict[int, list[str]] = {}
    for kind, count in (("kill", faults.reader_kills), ("stop", faults.reader_stops),
                        ("policy", int(faults.policy_kill))):
        for _ in range(count):
            plan.setdefault(rng.randrange(tokens // 10, tokens), []).append(kind)
    return plan


def soak(store_dir: Path, *, tokens: int, faults: Faults = Faults(), seed: int = 0, vram_experts: int | None = None,
         ram_experts: int | None = None, readers: int = 4, sample_every: int = 1000, watchdog_s: float = 10.0,
         read_timeout_s: float = 2.0, read_delay_s: float = 0.0, device: str = "cpu", progress=None) -> SoakReport:
    from pipeline.vram_arena import VramArena

    st = StoreCheckpoint(store_dir)
    L, E, K = st.spec.num_layers, st.spec.num_experts, st.spec.top_k
    want = {(l, e): st.load_expert(l, e) for l in range(L) for e in range(E)}
    vram_experts = vram_experts or K + 1  # a token's working set and one more: evictions every fetch
    ram_experts = ram_experts or max(vram_experts, (L * E) // 3)  # a third of the experts: disk reads too
    rng = random.Random(seed)
    plan = _fault_plan(tokens, faults, rng)
    checked = wrong = fetches = kills = stops = 0
    policy_killed = False
    slowest = 0.0
    samples: list[Sample] = []
    stopped: list[int] = []
    got = tensors = None
    t0 = time.perf_counter()
    # The first pipeline of a process makes one pipe that the process keeps (one time, not per
    # pipeline: a second open and close leaves the count as it was); open one before counting.
    ExpertPipeline.open(store_dir, vram=VramArena.slot_bytes_for(st) * K, ram=st.index.max_read_length * K,
                        vram_form="dense", device=device, readers=1).close()
    before = _sample(0)
    with warnings.catch_warnings(), ExpertPipeline.open(
            store_dir, vram=VramArena.slot_bytes_for(st) * vram_experts, ram=st.index.max_read_length * ram_experts,
            vram_form="dense", device=device, readers=readers, read_timeout_s=read_timeout_s,
            reader_hooks={"delay_s": read_delay_s} if read_delay_s else None) as pipe:
        warnings.simplefilter("ignore", PolicyStoppedWarning)  # the kill is ours; stats() says it
        for token in range(tokens):
            for kind in plan.get(token, ()):
                if kind == "policy":
                    os.kill(pipe._p.actor._proc.pid, signal.SIGKILL)
                    policy_killed = True
                    continue
                alive = [r.proc.pid for r in pipe._p.readers._readers if r.proc.is_alive() and r.proc.pid not in stopped]
                if not alive:
                    continue
                pid = rng.choice(alive)
                if kind == "kill":
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                else:
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
                    stops += 1
            for layer in range(L):
                ids = rng.sample(range(E), K)
                start = time.perf_counter()
                got = pipe.fetch(layer, ids)
                took = time.perf_counter() - start
                slowest = max(slowest, took)
                if took > watchdog_s:
                    raise AssertionError(f"fetch of layer {layer} experts {ids} took {took:.1f} s (watchdog)")
                fetches += 1
                for e, tensors in zip(ids, got):
                    checked += 1
                    ref = want[(layer, e)]
                    if any(not torch.equal(tensors[r].cpu(), ref[r]) for r in ref):
                        wrong += 1
            if token % sample_every == 0:
                samples.append(_sample(token))
                if progress is not None:
                    progress(token, tokens)
        samples.append(_sample(tokens))
        stats = pipe.stats()
    del got, tensors  # views of the closed pipeline's VRAM arena: held, they would keep it allocated
    after = _sample(tokens)
    fields = ("rss_bytes", "fds", "threads", "shm_entries", "vram_bytes")
    slopes = {f: slope_per_1k(samples, f) for f in fields}
    late = {f: slope_per_1k(samples[len(samples) // 2:], f) for f in fields}
    return SoakReport(tokens=tokens, fetches=fetches, experts_checked=checked, wrong_tensors=wrong,
                      slowest_fetch_s=slowest, reader_kills=kills, reader_stops=stops, policy_killed=policy_killed,
                      reader_restarts=stats.readers.restarts, policy_state=stats.actor.state, samples=samples,
                      slopes_per_1k=slopes, slopes_second_half_per_1k=late, before=before, after=after, seconds=time.perf_counter() - t0)
