"""One method of `prefetch-bench generate`, run in a process of its own so its peaks are its own.

    python -m pipeline.bench.generate_method '<MethodRun as JSON>'   prints one MethodResult as JSON

Methods: resident (every expert in the transformers model, its eager experts), ours (load_offloaded
defaults), ours-no-lookahead, on-demand (VRAM = top_k experts, LRU, no prediction: every use copied
at use) and accelerate (the transformers model with device_map="auto" and max_memory = the same
GPU budget beside the non-expert weights: accelerate's offload). Each loads the model, generates a
few tokens untimed (kernels, caches), then times `repeat` generations from the same prompts.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import msgspec

METHODS = ("resident", "ours", "ours-no-lookahead", "on-demand", "accelerate")


class MethodRun(msgspec.Struct, frozen=True):
    method: str
    model: str
    store: str
    vram_bytes: int  # the experts' VRAM budget
    ram: str
    prompt_tokens: int
    new_tokens: int
    batch: int
    repeat: int = 1
    seed: int = 0
    non_expert_bytes: int = 0  # accelerate: its GPU budget is these plus vram_bytes


class MethodResult(msgspec.Struct):
    method: str
    status: str  # "ok", or "skipped: why"
    prefill_s: float | None = None  # median over repeats
    decode_tok_s: float | None = None  # median over repeats, tokens of the whole batch per second
    decode_tok_s_runs: list[float] = []
    peak_vram_bytes: int | None = None
    peak_rss_bytes: int | None = None
    bytes_moved: int | None = None  # disk -> RAM -> VRAM bytes during the timed runs (pipeline methods)
    vram_hit_rate: float | None = None
    lookahead_recall: float | None = None
    stall_s: float | None = None  # decode-loop time spent waiting for experts (pipeline methods)
    tokens: list[list[int]] = []  # the first timed run's new tokens, per row
    load_s: float | None = None


def prompts(run: MethodRun, vocab: int):
    import torch

    g = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(2, vocab, (run.batch, run.prompt_tokens), generator=g)
    return ids, torch.ones_like(ids)


class _Clock:
    """A generate() streamer that only notes when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _load(run: MethodRun):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if run.method in ("ours", "ours-no-lookahead", "on-demand"):
        from pipeline.hf import load_offloaded

        opts: dict = {"o_direct": False}
        vram: int | str = run.vram_bytes
        if run.method == "on-demand":
            from adapters.store import StoreCheckpoint
            from pipeline.vram_arena import VramArena

            store = StoreCheckpoint(run.store)
            opts.update(policy="lru", predictor=None, vram_form="dense")
            vram = store.spec.top_k * VramArena.slot_bytes_for(store, "dense")
        return load_offloaded(run.model, store=run.store, vram=vram, ram=run.ram, progress=False,
                              lookahead=run.method == "ours", **opts)
    config = AutoConfig.from_pretrained(run.model)
    kw: dict = {"experts_implementation": "eager", "dtype": torch.bfloat16}
    if getattr(config, "quantization_config", None):
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    if run.method == "resident":
        return AutoModelForCausalLM.from_pretrained(run.model, device_map=device, **kw)
    if device == "cpu":
        raise _Skip("accelerate offloads to a GPU; there is none")
    return AutoModelForCausalLM.from_pretrained(
        run.model, device_map="auto", max_memory={0: run.non_expert_bytes + run.vram_bytes, "cpu": "500GiB"}, **kw)


class _Skip(Exception):
    pass


def run_method(run: MethodRun) -> MethodResult:
    import torch

    t0 = time.perf_counter()
    try:
        model = _load(run)
    except _Skip as e:
        return MethodResult(run.method, f"skipped: {e}")
    except torch.OutOfMemoryError:
        return MethodResult(run.method, "skipped: does not fit in GPU memory")
    load_s = time.perf_counter() - t0
    ids, mask = prompts(run, model.config.vocab_size)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = getattr(model, "moe_cache", None)
    if cache is not None:
        cache.pipeline.warm()
    model.generate(ids, attention_mask=mask, max_new_tokens=4, **gen)  # untimed: kernels, allocator
    before = cache.stats().pipeline.scheduler if cache is not None else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    prefill, rates, tokens = [], [], []
    for _ in range(run.repeat):
        clock = _Clock()
        _sync()
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=run.new_tokens, streamer=clock, **gen)
        _sync()
        steps = clock.times[1:]  # times[0] is the prompt
        prefill.append(steps[0] - start)
        if len(steps) > 1:
            rates.append(run.batch * (len(steps) - 1) / (steps[-1] - steps[0]))
        if not tokens:
            tokens = out[:, ids.shape[1]:].tolist()
    res = MethodResult(run.method, "ok", prefill_s=statistics.median(prefill),
                       decode_tok_s=statistics.median(rates) if rates else None, decode_tok_s_runs=rates,
                       peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, tokens=tokens,
                       load_s=load_s)
    if torch.cuda.is_available():
        res.peak_vram_bytes = torch.cuda.max_memory_allocated()
    if cache is not None:
        st = cache.stats()
        s = st.pipeline.scheduler
        res.bytes_moved = (s.bytes_h2d - before.bytes_h2d) + (s.bytes_nvme - before.bytes_nvme)
        hits, misses = s.vram_hits - before.vram_hits, s.vram_misses - before.vram_misses
        res.vram_hit_rate = hits / (hits + misses) if hits + misses else None
        res.lookahead_recall = st.lookahead_recall
        res.stall_s = s.stall_seconds - before.stall_seconds
        cache.close()
    return res


def main(argv: list[str]) -> int:
    run = msgspec.json.decode(argv[0].encode(), type=MethodRun)
    try:
        res = run_method(run)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return 130
    sys.stdout.flush()
    os.write(1, b"\nRESULT " + msgspec.json.encode(res) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
