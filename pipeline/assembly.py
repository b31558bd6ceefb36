"""Building the pipeline's parts in order, and taking them down in the reverse order.

Shutdown protocol (the one place it is written down; `ExpertPipeline.close` follows it):
  1. stop intake: the API refuses new fetches (PipelineClosed) before this runs;
  2. stop the policy actor without draining: pending events only cost prediction;
  3. cancel queued prefetches and in-flight scheduler tasks (bounded wait);
  4. stop the copy engine: its streams/thread finish what was enqueued (bounded);
  5. stop the reader processes: stop marker, join with a timeout, kill survivors;
  6. release memory: the VRAM arena, then the RAM arena (unregister, munmap, unlink).
Every step runs even when an earlier one fails; the first error is re-raised at the end.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from adapters.store import StoreCheckpoint
from policies.actor import PolicyActor, PolicyActorError
from policies.process_actor import PolicyProcess, PolicySpec
from policies.cache.registry import DEFAULT_PREDICTOR, fixed_options, make_policy, parse_predictor_spec, policy_class
from policies.events import Tier
from policies.predictors.registry import make_predictor

from .config import PipelineConfig
from .copy_engine import CopyEngine
from .decode_at_use import view_bytes_for
from .ram_arena import RamArena
from .readers import ReaderPool
from .scheduler import Scheduler
from . import fused_decode
from .vram_arena import VramArena, effective_form


@dataclass
class Parts:
    store: StoreCheckpoint
    device: torch.device
    ram_arena: RamArena
    vram_arena: VramArena
    engine: CopyEngine
    readers: ReaderPool
    policy: object
    actor: PolicyActor
    scheduler: Scheduler


class _PolicyLink:
    """What the scheduler tells the policy: transfer outcomes (through the actor, which
    records a failing policy) and its own evictions. Both run on the loop thread. With the
    policy in its own process, both go to that process (`policy` is the PolicyProcess)."""

    def __init__(self, actor, policy):
        self._actor, self._policy = actor, policy

    def complete(self, layer: int, expert: int, tier: Tier, ok: bool) -> None:
        self._actor.complete(layer, expert, tier, ok)

    def forget(self, layer: int, expert: int, tier: Tier) -> None:
        self._policy.forget(layer, expert, tier)


def _device(cfg: PipelineConfig) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
    return torch.device("cuda", torch.cuda.current_device())


def ram_slots_for(store: StoreCheckpoint, ram_bytes: int) -> int:
    """RAM slots that `ram_bytes` buys: a slot holds the largest expert read (alignment included),
    and a slot more than every expert is never used."""
    return min(ram_bytes // store.index.max_read_length, store.spec.num_layers * store.spec.num_experts)


def vram_slots_for(store: StoreCheckpoint, vram_bytes: int, form: str = "dense",
                   views: int | None = None) -> tuple[int, int, int]:
    """(slots, slot bytes, bytes of dense views) that `vram_bytes` buys: with the stored form
    (mxfp4) the dense views of one fetch (`views`, default top_k) come out of it first, and no
    more slots than the store has experts."""
    stored = effective_form(store, form) == "stored"
    slot = VramArena.slot_bytes_for(store, form)
    view_bytes = view_bytes_for(store, store.spec.top_k if views is None else views) if stored else 0
    total = store.spec.num_layers * store.spec.num_experts  # a slot more than every expert is never used
    return min(max(0, vram_bytes - view_bytes) // slot, total), slot, view_bytes


def resolve_vram_form(store: StoreCheckpoint, form: str, device: torch.device | str, vram_bytes: int,
                      views: int | None = None) -> str:
    """The form `form` means for this store, device and VRAM budget: "dense" or "stored".
    "auto" is "stored" where decoding at use is cheap (an mxfp4 store on a CUDA device with
    the batched Triton decode) and pays (the budget's dense slots hold fewer than every
    expert, and the stored form holds more of them next to its dense views); else "dense"."""
    if form != "auto":
        return effective_form(store, form)
    if store.dtype != "mxfp4" or torch.device(device).type != "cuda" or not fused_decode.supports(store, device):
        return "dense"
    dense = vram_slots_for(store, vram_bytes, "dense")[0]
    stored = vram_slots_for(store, vram_bytes, "stored", views)[0]
    # Both counts stop at every expert: stored holds more only while dense cannot hold them all.
    return "stored" if stored > dense else "dense"


def vram_headroom_slots(vram_slots: int, top_k: int, experts: int) -> int:
    """VRAM slots the policy keeps free (its `vram_headroom`). A demand miss is served before
    the actor hears of it, so it takes a free slot the policy emptied, and the scheduler's own
    LRU pick is only the fallback. Two fetches' worth, because in a prefill's burst the actor
    runs a fetch behind: in a CPU replay of qwen1.5 (523 slots, 0.3 ms between fetches) one
    fetch's worth left 29% of the prefill's victims to the fallback, two none, and the run
    made 7% fewer loads. At most a sixteenth of the slots, since free slots hold nothing: on
    the built-in default (16 slots, top-4) eight free slots cut ours' VRAM hit rate from 0.46
    to 0.21. None where VRAM holds every expert, and never the slots one fetch needs."""
    if vram_slots >= experts:
        return 0
    return max(0, min(2 * top_k, vram_slots // 16, vram_slots - top_k))


def plan_slots(cfg: PipelineConfig, store: StoreCheckpoint, form: str | None = None) -> tuple[int, int, int, int]:
    """(vram slots, vram slot bytes, ram slots, ram slot bytes) for the budgets (vram_slots_for),
    in `form` (default: cfg.vram_form resolved for the config's device); ValueError with the
    numbers when a budget cannot hold one layer's top-k working set."""
    top_k = store.spec.top_k
    if form is None:
        form = resolve_vram_form(store, cfg.vram_form, _device(cfg), cfg.vram_bytes, cfg.vram_views)
    if cfg.vram_views == 0 and store.dtype == "mxfp4" and form != "stored":
        raise ValueError(f"vram_views=0 hands out the stored MXFP4 tensors, but vram_form={cfg.vram_form!r} keeps "
                         f"dense tensors in VRAM here; open with vram_form='stored'")
    n_vram, vram_slot, views = vram_slots_for(store, cfg.vram_bytes, form, cfg.vram_views)
    ram_slot = store.index.max_read_length
    n_ram = ram_slots_for(store, cfg.ram_bytes)
    for tier, n, size, budget, extra in (("vram", n_vram, vram_slot, cfg.vram_bytes, views),
                                         ("ram", n_ram, ram_slot, cfg.ram_bytes, 0)):
        if n < top_k:
            also = f" after {extra} bytes of dense views (vram_form='stored')" if extra else ""
            raise ValueError(f"{tier} budget {budget} bytes holds {n} experts of {size} bytes{also}, fewer than one "
                             f"layer's top-{top_k} working set; give {tier} at least {top_k * size + extra} bytes")
    return n_vram, vram_slot, n_ram, ram_slot


async def assemble(cfg: PipelineConfig, *, reader_hooks: dict | None = None) -> Parts:
    store = StoreCheckpoint(cfg.store)
    spec = store.spec
    device = _device(cfg)
    form = resolve_vram_form(store, cfg.vram_form, device, cfg.vram_bytes, cfg.vram_views)
    n_vram, vram_slot, n_ram, ram_slot = plan_slots(cfg, store, form)
    cls = policy_class(cfg.policy)  # unknown names fail here, before anything is allocated
    predictor, predictor_name, predictor_options = None, None, {}
    if cls.uses_predictor:
        # A spec "name:key=value,..." (the registry's default when none is given); explicit
        # predictor_options win over the spec's.
        predictor_name, predictor_options = parse_predictor_spec(cfg.predictor or DEFAULT_PREDICTOR)
        predictor_options.update(cfg.predictor_options)
        predictor = make_predictor(predictor_name, spec.num_layers, spec.num_experts, spec.top_k,
                                   **predictor_options)
    # The policy counts in RAM-slot units so its capacities are exactly the slot counts.
    headroom = vram_headroom_slots(n_vram, spec.top_k, spec.num_layers * spec.num_experts)
    policy_config = dict(num_layers=spec.num_layers, num_experts=spec.num_experts, top_k=spec.top_k,
                         vram_bytes=n_vram * ram_slot, ram_bytes=n_ram * ram_slot, expert_bytes=ram_slot,
                         containment=n_ram >= n_vram, vram_headroom=headroom * ram_slot)
    fixed = fixed_options(policy_config, cfg.policy_options)
    if fixed:
        raise ValueError(f"policy_options {', '.join(fixed)}: set by the store and the vram/ram budgets; "
                         f"remove them from policy_options")
    policy_config = {**policy_config, **cfg.policy_options}
    policy = make_policy(cfg.policy, predictor, **policy_config)
    with contextlib.ExitStack() as stack:
        ram_arena = RamArena.create(n_ram, ram_slot)
        stack.callback(ram_arena.close)
        vram_arena = VramArena(store, n_vram, device, form=form, num_views=cfg.vram_views)
        stack.callback(vram_arena.close)
        engine = CopyEngine(device)
        stack.callback(engine.close)
        readers = ReaderPool(ram_arena.path, ram_arena.size, num_readers=cfg.readers,
                             timeout_s=cfg.read_timeout_s, max_attempts=cfg.read_attempts, o_direct=cfg.o_direct,
                             hooks=reader_hooks)
        try:
            await readers.start()
        except BaseException:
            await readers.close()
            raise
        scheduler_box: list[Scheduler] = []
        on_plan = lambda stamped: scheduler_box[0].on_plan(stamped)  # noqa: E731
        if cfg.policy_process:
            # The policy built above only validated names and options; the child builds its own.
            policy = None
            actor = PolicyProcess(PolicySpec(policy=cfg.policy, predictor=predictor_name,
                                             predictor_options=predictor_options,
                                             policy_config=policy_config, num_layers=spec.num_layers,
                                             num_experts=spec.num_experts, top_k=spec.top_k,
                                             queue_size=cfg.actor_queue),
                                  on_plan=on_plan, stop_timeout=cfg.close_timeout_s / 4)
        else:
            actor = PolicyActor(policy, on_plan=on_plan, queue_size=cfg.actor_queue)
        scheduler = Scheduler(store=store, ram_arena=ram_arena, vram_arena=vram_arena, engine=engine,
                              readers=readers, policy=_PolicyLink(actor, policy or actor), top_k=spec.top_k,
                              prefetch_reads=cfg.prefetch_reads, prefetch_copies=cfg.prefetch_copies,
                              verify_checksums=cfg.verify_checksums, is_stale=actor.is_stale)
        scheduler_box.append(scheduler)
        try:
            await _start_actor(actor, cfg)
        except BaseException:
            with contextlib.suppress(Exception):  # the error on its way up says what went wrong
                await actor.stop(drain=False)
            await readers.close()
            raise
        stack.pop_all()
    return Parts(store, device, ram_arena, vram_arena, engine, readers, policy, actor, scheduler)


async def _start_actor(actor, cfg: PipelineConfig) -> None:
    """Start the policy actor; a policy process must be ready before open() returns, so one that
    cannot start fails open(), not a later fetch. Names and options were checked before, so such
    a failure is the process itself: the error says how to do
    without one, in one line (the child's own report stays its cause)."""
    if not cfg.policy_process:
        actor.start()
        return
    try:
        actor.start()
        await actor.wait_ready(timeout=max(30.0, cfg.close_timeout_s))
    except (PolicyActorError, TimeoutError, OSError) as e:
        why = next(iter(str(e).splitlines()), "") or type(e).__name__
        raise PolicyActorError(f"{why}; the policy actor runs in a process of its own by default: open with "
                               f"policy_process=False to run it on the pipeline's loop thread") from e


async def shutdown(p: Parts, timeout: float) -> None:
    """The shutdown protocol in the module docstring; bounded by about `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = lambda: max(0.1, deadline - time.monotonic())  # noqa: E731
    errors: list[BaseException] = []
    steps = (
        lambda: p.actor.stop(drain=False),
        lambda: p.scheduler.close(left() / 3),
        lambda: _sync(p.engine.close),
        lambda: p.readers.close(),
        lambda: _sync(p.vram_arena.close),
        lambda: _sync(p.ram_arena.close),
    )
    for step in steps:
        try:
            await step()
        except PolicyActorError:
            # The policy stopped earlier and the pipeline served on with its own choices; that was
            # reported when it was seen (ExpertPipeline warns once; stats().actor keeps the cause).
            pass
        except BaseException as e:  # keep going: every resource must be released
            errors.append(e)
    if errors:
        raise errors[0]


async def _sync(fn) -> None:
    fn()
