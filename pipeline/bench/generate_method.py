"""One method of `prefetch-bench generate`, in a process of its own so its peaks are its own.

    python -m pipeline.bench.generate_method '<MethodRun as JSON>'

The process loads the model, generates a few tokens untimed (kernels, caches) and prints
`READY`, then answers its standard input one line at a time: `run` times one generation from the
run's prompts and prints `ROUND <Round as JSON>`; `end` prints `RESULT <MethodResult as JSON>`
(medians over the rounds, peaks, the pipeline's counters) and exits. A method that cannot run here
prints `RESULT` with status "skipped: why" instead of `READY`. The parent
(pipeline.bench.generate_rounds) keeps every method of a budget loaded and sends `run` to each in
turn, so the methods' rounds are interleaved and a drift of the machine falls on all of them.

Methods: resident (every expert in the transformers model, its eager experts), ours (load_offloaded
defaults), ours-lookahead and ours-no-lookahead (the router lookahead forced on or off), on-demand
(VRAM = top_k experts, LRU, no prediction: every use copied at use) and accelerate (the transformers model with device_map="auto" and max_memory = the same
GPU budget beside the non-expert weights: accelerate's offload).
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import msgspec

METHODS = ("resident", "ours", "ours-lookahead", "ours-no-lookahead", "on-demand", "accelerate")
LOOKAHEAD = {"ours": "auto", "ours-lookahead": True, "ours-no-lookahead": False, "on-demand": False}


class MethodRun(msgspec.Struct, frozen=True):
    method: str
    model: str
    store: str
    vram_bytes: int  # the experts' VRAM budget
    ram: str
    prompt_tokens: int
    new_tokens: int
    batch: int
    seed: int = 0
    non_expert_bytes: int = 0  # accelerate: its GPU budget is these plus vram_bytes


class TimeSplitMs(msgspec.Struct):
    """Host milliseconds per decoded token inside the experts forwards (pipeline.hf.load.TimeSplit),
    and the whole step's; `rest` is the step outside them (attention, norms, sampling)."""
    step: float
    routing_wait: float
    lookahead: float
    fetch: float
    stall: float  # of fetch: waiting for reads from the disk
    math: float
    rest: float


class Round(msgspec.Struct):
    prefill_s: float
    decode_tok_s: float | None  # tokens of the whole batch per second after the first
    tokens: list[list[int]]  # this round's new tokens, per row


class MethodResult(msgspec.Struct):
    method: str
    status: str  # "ok", or "skipped: why", or "failed ..."
    prefill_s: float | None = None  # median over rounds
    decode_tok_s: float | None = None  # median over rounds, tokens of the whole batch per second
    decode_tok_s_runs: list[float] = []
    peak_vram_bytes: int | None = None
    peak_rss_bytes: int | None = None
    bytes_moved: int | None = None  # disk -> RAM -> VRAM bytes during the timed rounds (pipeline methods)
    vram_hit_rate: float | None = None
    lookahead_recall: float | None = None
    stall_s: float | None = None  # decode-loop time spent waiting for reads (pipeline methods)
    decode_ms: TimeSplitMs | None = None  # pipeline methods: where a decode step's host time goes
    tokens: list[list[int]] = []  # the first round's new tokens, per row
    load_s: float | None = None


def prompts(run: MethodRun, vocab: int):
    import torch

    g = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(2, vocab, (run.batch, run.prompt_tokens), generator=g)
    return ids, torch.ones_like(ids)


class _Clock:
    """A generate() streamer that notes when each step's tokens arrive, and the pipeline's counters
    when the first new token arrives (the end of the prefill), so a decode split leaves it out."""

    def __init__(self, cache=None):
        self.times: list[float] = []
        self.cache, self.after_prefill = cache, None

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.cache is not None:
            self.after_prefill = self.cache.stats()

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
    if run.method in LOOKAHEAD:
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
                              lookahead=LOOKAHEAD[run.method], **opts)
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


class _Method:
    """A loaded model, timed one round at a time."""

    def __init__(self, run: MethodRun):
        import torch

        self.run = run
        t0 = time.perf_counter()
        self.model = _load(run)
        self.load_s = time.perf_counter() - t0
        ids, mask = prompts(run, self.model.config.vocab_size)
        device = next(p.device for p in self.model.parameters() if p.device.type != "meta")
        self.ids, self.mask = ids.to(device), mask.to(device)
        self.gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        self.cache = getattr(self.model, "moe_cache", None)
        if self.cache is not None:
            self.cache.pipeline.warm()
        self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=4, **self.gen)  # untimed
        self.before = self.cache.stats() if self.cache is not None else None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.rounds: list[Round] = []
        self.splits: list[TimeSplitMs] = []

    def round(self) -> Round:
        clock = _Clock(self.cache)
        _sync()
        start = time.perf_counter()
        out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=self.run.new_tokens,
                                  streamer=clock, **self.gen)
        _sync()
        steps = clock.times[1:]  # times[0] is the prompt
        rate = self.run.batch * (len(steps) - 1) / (steps[-1] - steps[0]) if len(steps) > 1 else None
        r = Round(steps[0] - start, rate, out[:, self.ids.shape[1]:].tolist())
        if self.cache is not None and len(steps) > 1:
            self.splits.append(_split(clock.after_prefill, self.cache.stats(), steps[-1] - steps[0],
                                      len(steps) - 1))
        self.rounds.append(r)
        return r

    def result(self) -> MethodResult:
        import torch

        rates = [r.decode_tok_s for r in self.rounds if r.decode_tok_s is not None]
        res = MethodResult(self.run.method, "ok", load_s=self.load_s,
                           prefill_s=statistics.median(r.prefill_s for r in self.rounds) if self.rounds else None,
                           decode_tok_s=statistics.median(rates) if rates else None, decode_tok_s_runs=rates,
                           peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           tokens=self.rounds[0].tokens if self.rounds else [])
        if torch.cuda.is_available():
            res.peak_vram_bytes = torch.cuda.max_memory_allocated()
        if self.cache is not None:
            st = self.cache.stats()
            s, b = st.pipeline.scheduler, self.before.pipeline.scheduler
            res.bytes_moved = (s.bytes_h2d - b.bytes_h2d) + (s.bytes_nvme - b.bytes_nvme)
            hits, misses = s.vram_hits - b.vram_hits, s.vram_misses - b.vram_misses
            res.vram_hit_rate = hits / (hits + misses) if hits + misses else None
            res.lookahead_recall = st.lookahead_recall
            res.stall_s = s.stall_seconds - b.stall_seconds
            if self.splits:
                res.decode_ms = TimeSplitMs(*(statistics.median(getattr(x, f) for x in self.splits)
                                              for f in TimeSplitMs.__struct_fields__))
        return res

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _split(a, b, seconds: float, steps: int) -> TimeSplitMs:
    """The counters' growth from a to b over `steps` decode steps taking `seconds`, per step in ms."""
    def per(x: float) -> float:
        return x * 1000 / steps

    # TimeSplit's fields, named here without their "_s"
    parts = {f.removesuffix("_s"): per(getattr(b.time, f) - getattr(a.time, f)) for f in a.time.__struct_fields__}
    stall = per(b.pipeline.scheduler.stall_seconds - a.pipeline.scheduler.stall_seconds)
    step = per(seconds)
    return TimeSplitMs(step=step, stall=stall, rest=step - sum(parts.values()), **parts)


def _say(tag: str, obj=None) -> None:
    sys.stdout.flush()
    os.write(1, f"\n{tag}".encode() + (b" " + msgspec.json.encode(obj) if obj is not None else b"") + b"\n")


def main(argv: list[str]) -> int:
    import torch

    run = msgspec.json.decode(argv[0].encode(), type=MethodRun)
    try:
        try:
            method = _Method(run)
        except _Skip as e:
            _say("RESULT", MethodResult(run.method, f"skipped: {e}"))
            return 0
        except torch.OutOfMemoryError:
            _say("RESULT", MethodResult(run.method, "skipped: does not fit in GPU memory"))
            return 0
        _say("READY")
        for line in sys.stdin:
            if line.strip() == "run":
                _say("ROUND", method.round())
            elif line.strip() == "end":
                res = method.result()
                method.close()
                _say("RESULT", res)
                return 0
        method.close()  # the parent went away
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
