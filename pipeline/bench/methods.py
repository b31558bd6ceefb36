"""The ways `prefetch-bench replay` opens and drives the pipeline, one per method.

    baseline_methods() -> list[Method]       resident, on-demand, on-demand-disk, lru-lookahead,
                                             watermark-ewma, ours, ours-lookahead, ours-colayer
    extra_methods(policies, predictor) -> list[Method]     what --policy / --predictor add
    slots_for(method, budget_vram_slots, budget_ram_slots, store) -> (vram slots, ram slots)

A method is a recipe (frozen struct): the policy and predictor by registry name, how its
VRAM and RAM budgets are set ("budget" = the run's --vram / --ram, "top_k" = exactly one
layer's working set, "all" = every expert), whether every expert is fetched once untimed
before timing (`warm`), and whether it receives the emulated router-lookahead hints.
"""
from __future__ import annotations

import msgspec

from adapters.errors import UnknownNameError
from policies.cache.registry import DEFAULT_POLICY, DEFAULT_PREDICTOR, parse_predictor_spec, policy_class
from policies.predictors.registry import predictor_class

SIZES = ("budget", "top_k", "all")
# Predictors that read Activation.hint, so they get the lookahead signal.
HINTED_PREDICTORS = ("lookahead", "fusion")


class Method(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    policy: str
    predictor: str | None = None  # registry name; None for policies that take none
    predictor_options: dict[str, float | int | str] = {}
    policy_options: dict[str, float | int | str | bool] = {}
    vram: str = "budget"
    ram: str = "budget"
    # Fetch every expert once, untimed, before timing: the RAM tier starts filled up to its
    # budget, as in a server that loaded the model. Every built-in method is warmed, so none
    # pays cold disk reads in its timed region that another was spared.
    warm: bool = True
    lookahead: bool = False  # hand it the emulated next-layer router scores
    note: str = ""

    def __post_init__(self):
        for what in (self.vram, self.ram):
            if what not in SIZES:
                raise ValueError(f"method {self.name}: size {what!r} unknown; valid: {', '.join(SIZES)}")


def _predictor(spec: str) -> tuple[str, dict]:
    name, opts = parse_predictor_spec(spec)
    predictor_class(name)  # unknown names fail now, listing the valid ones
    return name, opts


def baseline_methods() -> list[Method]:
    ours_pred, ours_opts = _predictor(DEFAULT_PREDICTOR)
    return [
        Method(name="resident", policy="lru", vram="all", ram="all",
               note="every expert in VRAM, warmed: the ceiling"),
        Method(name="on-demand", policy="lru", vram="top_k", ram="all",
               note="VRAM = top_k slots, every use copied from pinned RAM (a framework's CPU offload)"),
        Method(name="on-demand-disk", policy="lru", vram="top_k", ram="top_k",
               note="VRAM = RAM = top_k slots: every use read from the store, then copied"),
        Method(name="lru-lookahead", policy="lru-lookahead", predictor="lookahead", lookahead=True,
               note="LRU per layer + next-layer router lookahead (the Mixtral offloading demo)"),
        Method(name="watermark-ewma", policy="watermark", predictor="ewma", note="the original design"),
        # Ours: what the library does by default, the registry's default policy and predictor.
        # A variant fuses that predictor with the router lookahead. Fusion raises the VRAM hit
        # rate (qwen1.5 on an H100, RAM 1.0: 0.49 vs 0.13 at 10%), yet it was the slower of the
        # two in every GPU replay (GPT-OSS-20B dims, qwen1.5 at 10%: 39.9 vs 54.5 tok/s at
        # 84d8d16, 33.6 vs 55.5 in an earlier run). A hint comes one layer ahead, 0.3 ms of math, for
        # about 0.8 ms of copies, and its wrong guesses take link time from the demand copies.
        Method(name="ours", policy=DEFAULT_POLICY, predictor=ours_pred, predictor_options=ours_opts,
               note=f"{DEFAULT_POLICY} + {DEFAULT_PREDICTOR} (the defaults)"),
        Method(name="ours-lookahead", policy=DEFAULT_POLICY, predictor="fusion", lookahead=True,
               note=f"{DEFAULT_POLICY} + fusion(ewma, router lookahead)"),
        # The causal stand-in for lookahead: this token's earlier experts predict its later
        # ones (recall@k 0.40 / 0.41 on the Qwen traces against EWMA's 0.15 / 0.30), so
        # prefetching one layer ahead at a lower threshold; the simulator at H100 figures puts
        # it 6% above ours on qwen1.5 at 10% and 25% (2% on qwen3.6). On the H100 it was the
        # slower one at 10% in four runs (31-39 vs 40-49 tok/s): each prefetch costs the
        # decode thread GIL time (docs/results/README.md); faster at 25% in one run.
        Method(name="ours-colayer", policy=DEFAULT_POLICY, predictor="colayer",
               policy_options={"prefetch_min_prob": 0.2, "max_prefetch": 2},
               note=f"{DEFAULT_POLICY} (prefetch at p >= 0.2, 2 per layer) + colayer"),
    ]


def extra_methods(policies: list[str], predictor: str | None) -> list[Method]:
    """One method per --policy name, with --predictor (default: the registry's default)."""
    out = []
    for name in policies:
        cls = policy_class(name)  # UnknownNameError lists the valid policies
        pred, opts = (None, {})
        if cls.uses_predictor:
            pred, opts = _predictor(predictor or DEFAULT_PREDICTOR)
        label = name if pred is None else f"{name}/{predictor or DEFAULT_PREDICTOR}"
        out.append(Method(name=label, policy=name, predictor=pred, predictor_options=opts,
                          lookahead=pred in HINTED_PREDICTORS, note="--policy"))
    return out


def select(methods: list[Method], names: list[str]) -> list[Method]:
    """The methods called `names`, in that order; unknown names list the valid ones."""
    by = {m.name: m for m in methods}
    for n in names:
        if n not in by:
            raise UnknownNameError("method", n, list(by))
    return [by[n] for n in names]


def slots_for(method: Method, vram_slots: int, ram_slots: int, top_k: int, total: int) -> tuple[int, int]:
    """(VRAM slots, RAM slots) of `method` given the run's budgets in slots."""
    pick = {"budget": None, "top_k": top_k, "all": total}
    v = pick[method.vram] if pick[method.vram] is not None else vram_slots
    r = pick[method.ram] if pick[method.ram] is not None else ram_slots
    return v, max(r, v) if method.ram == "budget" else r
