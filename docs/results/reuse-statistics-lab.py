"""Would knowing each expert's reuse statistics in advance bring a causal cache near Belady?

A lab check for the project's 1.25x-of-Belady target (tests/test_simulator.py), not a project
tool. The rule: one demand
cache shared by all layers (unit-size experts, decode rows, the simulator's access order, as
`policies/horizon_bound.py`); on a miss with the cache full it evicts the cached expert with
the largest expected time to its next use, D(l | now) + L * MRL(a), where a is the number of
visits of its layer since its last use and MRL(a) = E[g - a | g > a] is the mean residual
life of its reuse gap g. The gap distributions are taken from the WHOLE trace in advance
(variant "oracle-key": each expert's own gaps, the end of the trace counted as one gap of
more than the trace's length; "oracle-global": all experts' gaps pooled): statistics no
causal policy has, so its loads over Belady's say how far reuse statistics alone can go.

    python docs/results/reuse-statistics-lab.py TRACE_NAME oracle-key 0.1,0.25
"""
import sys, numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))
from policies.traces import load_trace
from policies.cache.belady import belady_min
from policies.simulator import access_sequence

name, variant = sys.argv[1], sys.argv[2]
fracs = [float(x) for x in sys.argv[3].split(',')]
tr = load_trace(str(__import__('pathlib').Path(__file__).resolve().parents[3] / 'shared' / 'traces' / f'{name}.npz'))
ex = tr.experts[tr.phase == 1].astype(np.int64)  # [T, L, K]
T, L, K = ex.shape; E = tr.num_experts; N = L * E
AMAX = 1024

def mrl_table_from_gaps(gaps_per_key, censor_per_key, prior=None):
    """MRL[key, a] = E[g - a | g > a] in visits, from observed gaps (+ censored tail as one long gap)."""
    tab = np.empty((N, AMAX + 1))
    ages = np.arange(AMAX + 1)
    for k in range(N):
        g = np.sort(np.asarray(gaps_per_key[k] + censor_per_key[k], dtype=float))
        if g.size == 0:
            tab[k] = 1e6; continue
        # suffix sums
        idx = np.searchsorted(g, ages, side='right')  # gaps > a start at idx
        suf = np.concatenate([np.cumsum(g[::-1])[::-1], [0.0]])
        cnt = g.size - idx
        with np.errstate(invalid='ignore', divide='ignore'):
            m = suf[idx] / cnt - ages
        tab[k] = np.where(cnt > 0, m, 1e6)
    return tab

# offline per-key gaps
last = np.full(N, -1); gaps = [[] for _ in range(N)]; first = np.full(N, -1)
for t in range(T):
    for l in range(L):
        for e in ex[t, l]:
            if e < 0: continue
            k = l * E + e
            if last[k] >= 0: gaps[k].append(t - last[k])
            else: first[k] = t
            last[k] = t
censor = [[(T - last[k]) + T] if last[k] >= 0 else [] for k in range(N)]

acc = access_sequence(tr)
for frac in fracs:
    C = int(frac * N)
    _, bl = belady_min(acc, C)
    if variant == 'oracle-key':
        tab = mrl_table_from_gaps(gaps, censor)
    elif variant == 'oracle-global':
        allg = [g for k in range(N) for g in gaps[k]] ; allc = [c for k in range(N) for c in censor[k]]
        t1 = mrl_table_from_gaps([allg] + [[]]*(N-1), [allc] + [[]]*(N-1))[0]
        tab = np.tile(t1, (N, 1))
    cached = np.zeros(N, bool); lastuse = np.full(N, -1); loads = 0
    keys_l = np.arange(N) // E
    for t in range(T):
        for l in range(L):
            need = [l * E + e for e in ex[t, l] if e >= 0]
            for k in need:
                if not cached[k]:
                    loads += 1
                    if cached.sum() >= C:
                        ck = np.flatnonzero(cached)
                        ck = ck[~np.isin(ck, need)]
                        kl = keys_l[ck]
                        done = np.where(kl <= l, t + 1, t)  # visits of layer kl done incl. now
                        age = np.minimum(done - 1 - lastuse[ck], AMAX)
                        D = np.where(kl > l, kl - l, kl - l + L)
                        score = D + L * tab[ck, age]
                        cached[ck[np.argmax(score)]] = False
                    cached[k] = True
            for k in need: lastuse[k] = t
    print(f'{name} {variant} frac {frac} C {C} loads {loads} belady {bl} x {loads/bl:.3f}', flush=True)
