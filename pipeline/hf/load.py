"""Transformers MoE models whose routed experts are served by the pipeline.

    model = load_offloaded(model_dir, store=None, vram="6GiB", ram="24GiB", **PipelineConfig fields)
    model.generate(...)                       ordinary generate(): greedy, sampling, batches, streamers
    model.moe_cache.stats()                   the pipeline behind it, and the lookahead's recall
    model.moe_cache.close()                   or `with load_offloaded(...) as model:`

    offload_experts(model, store=..., vram=..., ram=...)   the same for a model already built
                                              (its experts' weights may be on the meta device)

load_offloaded builds the model on the meta device (no expert weight is ever allocated), loads
every other tensor (embeddings, attention, norms, routers, shared experts, dense layers) from the
checkpoint's safetensors straight to the device, and offloads its experts. Without `store=` it
packs the checkpoint's default store first (`precompute`, with its progress bar) when none is
there. The experts modules keep their meta parameters; transformers' experts interface sends
their forward to pipeline.hf.experts.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import msgspec
import torch

from .experts import Counters, ExpertsTag, register
from .support import check_transformers, experts_modules, router_of, supported_arch

DEFAULT_STORE = "expert_store"  # precompute's default: MODEL/expert_store


class TimeSplit(msgspec.Struct, frozen=True):
    """Host seconds inside the experts forwards, by what they went to. The host launches GPU work
    and runs ahead of it, so time the GPU needs beyond the host's shows up where the host waits:
    reading a layer's routing (the layer's input computed, and the copies it waits on landed)."""
    routing_wait_s: float  # copying the routing to the host: waiting for the GPU
    lookahead_s: float  # the next layer's router on this layer's input, and handing its scores over
    fetch_s: float  # ExpertPipeline.fetch: bookkeeping, copies queued, waits for reads (stall)
    math_s: float  # queueing the experts' math (finding each one's rows and the decode at use included)


class OffloadStats(msgspec.Struct, frozen=True):
    forward_calls: int  # experts forwards (MoE layers x forward passes)
    fetches: int
    lookahead: bool  # the next layer's router scores fed to the policy (offload_experts' lookahead, resolved)
    lookahead_recall: float | None  # of the next layer's experts, one-row passes; None without lookahead
    time: TimeSplit
    pipeline: object  # pipeline.api.PipelineStats

    def __str__(self) -> str:
        recall = "off" if not self.lookahead else "-" if self.lookahead_recall is None else f"{self.lookahead_recall:.3f}"
        t = self.time
        return (f"experts forwards {self.forward_calls}, fetches {self.fetches}, lookahead recall {recall}\n"
                f"host seconds in them: waiting for routing {t.routing_wait_s:.3f}, lookahead {t.lookahead_s:.3f}, "
                f"fetch {t.fetch_s:.3f}, expert math {t.math_s:.3f}\n"
                f"{self.pipeline}")


class OffloadedMoE:
    """`model.moe_cache`: the pipeline behind a model, its counters, and close()."""

    def __init__(self, model, pipe, counters: Counters, lookahead: bool):
        self.model, self.pipeline, self._counters = model, pipe, counters
        self.lookahead = lookahead

    def stats(self) -> OffloadStats:
        c = self._counters
        recall = c.lookahead_hits / c.lookahead_total if c.lookahead_total else None
        time = TimeSplit(c.routing_wait_s, c.lookahead_s, c.fetch_s, c.math_s)
        return OffloadStats(c.forward_calls, c.fetches, self.lookahead, recall, time, self.pipeline.stats())

    def close(self) -> None:
        """Close the pipeline; the model's experts cannot run after this."""
        self.pipeline.close()


class _Offloaded:
    """Mixed into an offloaded model's class: `with model:` closes its pipeline."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.moe_cache.close()


def _with_context(model) -> None:
    cls = type(model)
    if not isinstance(model, _Offloaded):
        # A subclass made per model class; __module__ kept so transformers' checks of the class's
        # source (e.g. _can_set_experts_implementation) read the modeling file, as before.
        model.__class__ = type(cls.__name__, (cls, _Offloaded), {"__module__": cls.__module__})


def lookahead_pays(store, ram: int | str) -> bool:
    """What lookahead="auto" means for this store (a StoreCheckpoint) and RAM budget: on when the RAM
    tier holds fewer experts than the store, so that a miss a prediction avoids would read the disk.
    Where RAM holds them all, a miss is a copy from pinned memory that the GPU overlaps with the
    host's work, decoding is bound by the host's launches, and the lookahead's own host work
    (scoring, handing the scores over, the prefetches it sets off on the pipeline's thread) cost more
    than it saved: on an H100 (GPT-OSS-20B dimensions, random weights) 0.85x against 0.94x resident
    at a 25% VRAM budget, 0.82x against 0.92x at 10% (docs/results/transformers-generate.md)."""
    from ..assembly import ram_slots_for
    from ..config import parse_size

    return ram_slots_for(store, parse_size(ram, "ram")) < store.spec.num_layers * store.spec.num_experts


def offload_experts(model, *, store: str | Path, vram: int | str, ram: int | str, lookahead: bool | str = "auto",
                    **options) -> OffloadedMoE:
    """Serve `model`'s routed experts from `store` through an ExpertPipeline; returns model.moe_cache.
    `lookahead`: feed the next MoE layer's router scores to the policy (the predictor becomes
    `fusion` unless `predictor=` is given); "auto": where RAM cannot hold the whole store
    (lookahead_pays). `options` are PipelineConfig fields."""
    check_transformers()
    from ..api import ExpertPipeline

    arch = supported_arch(model.config)
    names = experts_modules(model)
    from adapters.store import StoreCheckpoint

    checkpoint = StoreCheckpoint(store)
    spec = checkpoint.spec
    _check_store_matches(spec, model, names, store)
    if lookahead == "auto":
        lookahead = lookahead_pays(checkpoint, ram)
    elif not isinstance(lookahead, bool):
        raise ValueError(f"lookahead={lookahead!r}: True, False or 'auto' (on where RAM cannot hold the whole store)")
    if lookahead:
        options.setdefault("predictor", "fusion")
    device = options.get("device", "auto")
    if device == "auto":
        options["device"] = next(p.device.type for p in model.parameters() if p.device.type != "meta")
    pipe = ExpertPipeline.open(store, vram=vram, ram=ram, **options)
    try:
        st = pipe.stats()
        # (open() has refused a budget under top_k slots.) The experts' math needs dense tensors: a
        # stored-form VRAM must decode at least one token's experts at once.
        views = st.vram_views or 0  # None: dense slots, or a stored form handing out stored tensors
        if st.vram_form == "stored" and views < spec.top_k:
            raise ValueError(f"vram_views={views}: transformers' experts compute on dense tensors and one "
                             f"token needs top_k={spec.top_k} of them at once; leave vram_views unset (top_k) or "
                             f"give at least {spec.top_k}")
        at_once = min(st.vram_slots, views) if st.vram_form == "stored" else st.vram_slots
        counters = Counters()
        register_name = register()
        layers = sorted(names)
        for i, lid in enumerate(layers):
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            router = router_of(model, names[nxt]) if (lookahead and nxt is not None) else None
            model.get_submodule(names[lid])._moe_cache = ExpertsTag(
                pipe, spec.layer_ids.index(lid), spec.family, spec.top_k, at_once, counters,
                None if router is None else spec.layer_ids.index(nxt), router)
        model.set_experts_implementation(register_name)
    except BaseException:
        pipe.close()
        raise
    model.moe_cache = OffloadedMoE(model, pipe, counters, lookahead)
    _with_context(model)
    return model.moe_cache


def _check_store_matches(spec, model, names: dict[int, str], store) -> None:
    cfg = model.config
    lids = tuple(sorted(names))
    some = model.get_submodule(names[lids[0]])
    experts = getattr(some, "num_experts", None)
    if spec.layer_ids != lids or (experts is not None and spec.num_experts != experts) \
            or spec.hidden_size != cfg.hidden_size:
        raise ValueError(f"store {store} holds {spec.num_layers} MoE layers {list(spec.layer_ids)} x "
                         f"{spec.num_experts} experts of hidden size {spec.hidden_size}, but the model has MoE layers "
                         f"{list(lids)} x {experts} experts of hidden size {cfg.hidden_size}; pass the store "
                         f"precompute made from this model's checkpoint")


def _check_store_source(store: Path, model_dir: Path) -> None:
    """A store made from another checkpoint is refused, naming the source it records. The files'
    names, sizes and headers must match, and so must the bytes of a layer's first and last expert
    (two random checkpoints of one shape have equal headers)."""
    from adapters.precompute.convert import bit_equal, expected_dense
    from adapters.registry import open_checkpoint
    from adapters.store import StoreCheckpoint
    from adapters.store_format import header_sha256

    st = StoreCheckpoint(store)
    ident = st.index.source

    def refuse(why: str) -> ValueError:
        return ValueError(f"store {store} was made from {ident.path}, not {model_dir} ({why}); pass that "
                          f"checkpoint, or run `precompute --model {model_dir} --out NEW_DIR` and give store=NEW_DIR")

    for f in ident.files:
        p = model_dir / f.name
        if not p.is_file() or p.stat().st_size != f.size or header_sha256(p) != f.header_sha256:
            raise refuse(f"{f.name} differs")
    source = open_checkpoint(model_dir, ident.adapter)
    s = st.spec
    for layer, expert in ((0, 0), (s.num_layers - 1, s.num_experts - 1)):
        want = expected_dense(source, layer, expert, st.index.dtype)
        got = st.load_expert(layer, expert)
        if any(not bit_equal(want[r], got[r]) for r in want):
            raise refuse(f"expert {layer}/{expert} differs")


def default_store(model_dir: Path, arch, progress: bool) -> Path:
    """MODEL/expert_store, packed by precompute first (in this process) when it is not there."""
    store = model_dir / DEFAULT_STORE
    if (store / "store.json").is_file():
        return store
    from adapters.precompute.build import PrecomputeConfig, precompute
    from adapters.registry import open_checkpoint

    source = open_checkpoint(model_dir, arch.checkpoint_format)
    dtype = "mxfp4" if arch.expert_layout == "mxfp4" else "bfloat16"
    rc = precompute(PrecomputeConfig(str(model_dir), str(store), dtype, workers=0, format=arch.checkpoint_format,
                                     progress=progress), source)
    if rc != 0:
        raise RuntimeError(f"precompute of {model_dir} into {store} failed (exit {rc})")
    return store


def build_meta_model(model_dir: Path, config=None):
    """The model of `model_dir`'s config with parameters on the meta device, buffers real (on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = config or AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.bfloat16)
    return model


def load_non_experts(model, model_dir: Path, arch, device: torch.device) -> None:
    """Every parameter and buffer outside the experts modules, from the checkpoint's safetensors to
    `device`; a tensor the checkpoint lacks is an error naming it (tied ones are tied instead)."""
    from safetensors import safe_open

    from adapters.hf_experts import open_hf_index
    from adapters.hf_models import to_checkpoint_name

    index = open_hf_index(model_dir)
    experts = set(experts_modules(model).values())
    handles: dict[str, object] = {}
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if getattr(model.config, "tie_word_embeddings", False) \
        else set()
    with contextlib.ExitStack() as stack:
        for name, param in list(model.named_parameters()) + list(model.named_buffers()):
            module_name, _, leaf = name.rpartition(".")
            if module_name in experts:
                continue
            is_buffer = leaf in dict(model.get_submodule(module_name).named_buffers(recurse=False))
            ckpt = to_checkpoint_name(arch, name)
            if ckpt not in index:
                if is_buffer:  # computed at init (rotary frequencies): move it
                    _set(model, name, param.to(device), buffer=True)
                    continue
                if name in tied:
                    continue
                raise ValueError(f"{model_dir}: tensor {ckpt} missing for the model's {name}; the checkpoint is "
                                 "incomplete or was saved for another architecture")
            rel, _ = index.entries[ckpt]
            if rel not in handles:
                handles[rel] = stack.enter_context(safe_open(str(model_dir / rel), framework="pt"))
            t = handles[rel].get_tensor(ckpt)
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{model_dir / rel}: {ckpt} has shape {list(t.shape)}, the model's {name} needs "
                                 f"{list(param.shape)}; config.json and weights disagree")
            _set(model, name, t.to(device=device, dtype=param.dtype), buffer=is_buffer)
    if tied:
        model.tie_weights()


def _set(model, name: str, value: torch.Tensor, buffer: bool) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if buffer:
        module._buffers[leaf] = value
    else:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def load_offloaded(model_dir: str | Path, *, store: str | Path | None = None, vram: int | str, ram: int | str,
                   device: str = "auto", progress: bool = True, lookahead: bool | str = "auto", **options):
    """A transformers model of `model_dir` whose experts come from `store` through the pipeline."""
    check_transformers()
    from transformers import AutoConfig, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no config.json; give the folder of a transformers checkpoint")
    config = AutoConfig.from_pretrained(model_dir)
    arch = supported_arch(config)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if store is None:
        store = default_store(model_dir, arch, progress)
    else:
        store = Path(store)
        from adapters.errors import CheckpointError
        if not (store / "store.json").is_file():
            raise CheckpointError(store, "no store.json", fix=f"run `precompute --model {model_dir} --out {store}`")
    _check_store_source(store, model_dir)
    model = build_meta_model(model_dir, config)
    load_non_experts(model, model_dir, arch, torch.device(device))
    model.eval()
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.name_or_path = str(model_dir)
    offload_experts(model, store=store, vram=vram, ram=ram, lookahead=lookahead, device=device, **options)
    return model

