"""Synthetic checkpoints in the real formats' names, dtypes and layouts, written by streaming.

`write_model(fmt, dims, seed, out, shards)` writes a model whose every tensor is random
but deterministic: each tensor (each expert slice of a stacked tensor) draws from its own
generator seeded by (seed, tensor name, expert), so files are byte-identical for a seed
whatever the sharding, the order or the threads drawing them (`workers`). At most 2 x workers
expert slices (about 1 GiB) wait in memory at a time.

What is written per format (embeddings, attention and norms are omitted: the project only
reads routed experts and routers):
  gpt-oss : original/config.json, original/model*.safetensors: per block router
            gate.weight/.bias and the six stacked MXFP4 expert tensors (random FP4 codes,
            E8M0 scales 119..124, so values are finite and varied)
  mixtral : config.json, model*.safetensors (+ index): router + experts.{e}.w1/w2/w3
  qwen-moe: same files; router, experts.{e}.gate/up/down_proj, optionally a shared expert
            with its gate, and leading dense layers (mlp.gate_proj/up_proj/down_proj)
  fused   : same files; router weight/bias + experts.gate_up_proj[_bias]/down_proj[_bias]

The output appears atomically: everything is written under `<out>.partial` and renamed.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import msgspec
import torch

from .base import TORCH_DTYPES
from .errors import UnknownNameError
from .presets import FORMATS  # the formats this module writes
from .spec import DTYPE_SIZES

_TORCH = {name: TORCH_DTYPES[name] for name in ("BF16", "F16", "F32")}  # what make-model writes


class Dims(msgspec.Struct, frozen=True):
    layers: int  # all layers, dense ones included
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    shared_intermediate: int = 0  # shared expert and dense-layer MLP width (qwen-moe)
    dense_layers: int = 0  # leading dense layers (qwen-moe)
    shared_expert: bool = False  # qwen-moe only
    dtype: str = "BF16"  # stored dtype of HF formats (gpt-oss is MXFP4 + BF16 biases)


class Planned(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: str  # "normal", "codes" (random bytes), "scales" (E8M0 near 2**-5)
    per_expert: bool  # stacked on dim 0 with one generator per expert slice

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def check_dims(fmt: str, d: Dims) -> None:
    """Raise ValueError (one line, with the fix) for dimensions the format cannot hold."""
    if fmt not in FORMATS:
        raise UnknownNameError("format", fmt, list(FORMATS))
    for k in ("layers", "experts", "top_k", "hidden", "intermediate"):
        if getattr(d, k) <= 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(d, k)}")
    if d.top_k > d.experts:
        raise ValueError(f"--top-k {d.top_k} exceeds --experts {d.experts}")
    if fmt == "gpt-oss" and (d.hidden % 32 or d.intermediate % 32):
        raise ValueError(f"gpt-oss stores MXFP4 blocks of 32: --hidden {d.hidden} and --intermediate "
                         f"{d.intermediate} must be multiples of 32")
    if fmt != "qwen-moe" and (d.dense_layers or d.shared_expert):
        raise ValueError(f"--dense-layers and --shared-expert exist only for qwen-moe, not {fmt}")
    if d.dense_layers < 0:
        raise ValueError(f"--dense-layers must be 0 or more, got {d.dense_layers}")
    if d.dense_layers >= d.layers:
        raise ValueError(f"--dense-layers {d.dense_layers} leaves no MoE layer out of {d.layers}")
    if d.dtype not in _TORCH:
        raise UnknownNameError("dtype", d.dtype, list(_TORCH))


def plan(fmt: str, d: Dims) -> tuple[str, dict, list[Planned]]:
    """(weights sub-directory, config.json contents, tensors in file order) of one format."""
    check_dims(fmt, d)
    E, H, I, dt = d.experts, d.hidden, d.intermediate, d.dtype
    t: list[Planned] = []
    if fmt == "gpt-oss":
        for l in range(d.layers):
            p = f"block.{l}.mlp."
            t += [Planned(p + "gate.weight", "BF16", (E, H), "normal", False),
                  Planned(p + "gate.bias", "BF16", (E,), "normal", False),
                  Planned(p + "mlp1_weight.blocks", "U8", (E, 2 * I, H // 32, 16), "codes", True),
                  Planned(p + "mlp1_weight.scales", "U8", (E, 2 * I, H // 32), "scales", True),
                  Planned(p + "mlp1_bias", "BF16", (E, 2 * I), "normal", True),
                  Planned(p + "mlp2_weight.blocks", "U8", (E, H, I // 32, 16), "codes", True),
                  Planned(p + "mlp2_weight.scales", "U8", (E, H, I // 32), "scales", True),
                  Planned(p + "mlp2_bias", "BF16", (E, H), "normal", True)]
        cfg = {"num_hidden_layers": d.layers, "num_experts": E, "experts_per_token": d.top_k,
               "vocab_size": 201088, "hidden_size": H, "intermediate_size": I, "swiglu_limit": 7.0,
               "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
               "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
               "rope_ntk_alpha": 1, "rope_ntk_beta": 32}
        return "original", cfg, t
    torch_dtype = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dt]
    if fmt == "mixtral":
        for l in range(d.layers):
            p = f"model.layers.{l}.block_sparse_moe."
            t.append(Planned(p + "gate.weight", dt, (E, H), "normal", False))
            for e in range(E):
                t += [Planned(f"{p}experts.{e}.w1.weight", dt, (I, H), "normal", False),
                      Planned(f"{p}experts.{e}.w2.weight", dt, (H, I), "normal", False),
                      Planned(f"{p}experts.{e}.w3.weight", dt, (I, H), "normal", False)]
        cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": d.layers,
               "hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": d.top_k,
               "torch_dtype": torch_dtype}
        return "", cfg, t
    if fmt == "qwen-moe":
        S = d.shared_intermediate or 2 * I
        for l in range(d.layers):
            p = f"model.layers.{l}.mlp."
            if l < d.dense_layers:
                t += [Planned(p + "gate_proj.weight", dt, (S, H), "normal", False),
                      Planned(p + "up_proj.weight", dt, (S, H), "normal", False),
                      Planned(p + "down_proj.weight", dt, (H, S), "normal", False)]
                continue
            t.append(Planned(p + "gate.weight", dt, (E, H), "normal", False))
            for e in range(E):
                t += [Planned(f"{p}experts.{e}.gate_proj.weight", dt, (I, H), "normal", False),
                      Planned(f"{p}experts.{e}.up_proj.weight", dt, (I, H), "normal", False),
                      Planned(f"{p}experts.{e}.down_proj.weight", dt, (H, I), "normal", False)]
            if d.shared_expert:
                t += [Planned(p + "shared_expert.gate_proj.weight", dt, (S, H), "normal", False),
                      Planned(p + "shared_expert.up_proj.weight", dt, (S, H), "normal", False),
                      Planned(p + "shared_expert.down_proj.weight", dt, (H, S), "normal", False),
                      Planned(p + "shared_expert_gate.weight", dt, (1, H), "normal", False)]
        cfg = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_hidden_layers": d.layers,
               "hidden_size": H, "intermediate_size": S, "moe_intermediate_size": I, "num_experts": E,
               "num_experts_per_tok": d.top_k, "mlp_only_layers": list(range(d.dense_layers)),
               "decoder_sparse_step": 1, "torch_dtype": torch_dtype}
        if d.shared_expert:
            cfg["shared_expert_intermediate_size"] = S
        return "", cfg, t
    for l in range(d.layers):  # fused
        p = f"model.layers.{l}.mlp."
        t += [Planned(p + "router.weight", dt, (E, H), "normal", False),
              Planned(p + "router.bias", dt, (E,), "normal", False),
              Planned(p + "experts.gate_up_proj", dt, (E, H, 2 * I), "normal", True),
              Planned(p + "experts.gate_up_proj_bias", dt, (E, 2 * I), "normal", True),
              Planned(p + "experts.down_proj", dt, (E, I, H), "normal", True),
              Planned(p + "experts.down_proj_bias", dt, (E, H), "normal", True)]
    cfg = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "num_hidden_layers": d.layers,
           "hidden_size": H, "intermediate_size": I, "num_local_experts": E, "num_experts_per_tok": d.top_k,
           "swiglu_limit": 7.0, "torch_dtype": torch_dtype}
    return "", cfg, t


def _generator(seed: int, name: str, piece: int) -> torch.Generator:
    h = hashlib.blake2b(f"{seed}|{name}|{piece}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


def _piece(seed: int, p: Planned, piece: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = _generator(seed, p.name, piece)
    if p.kind == "codes":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if p.kind == "scales":
        # 2**-8 .. 2**-3 times FP4 magnitudes up to 6: weight-sized, never overflowing.
        return torch.randint(119, 125, shape, generator=g, dtype=torch.uint8)
    if p.kind == "ones":  # norm weights: a random norm would make every layer's scale arbitrary
        return torch.ones(shape, dtype=_TORCH[p.dtype])
    if p.kind == "zeros":
        return torch.zeros(shape, dtype=_TORCH[p.dtype])
    return (torch.randn(shape, generator=g) * 0.02).to(_TORCH[p.dtype])


class SafetensorsWriter:
    """Streams one safetensors file: the header is written first from the planned entries,
    then tensor bytes in the same order through `write` (any number of pieces per tensor)."""

    def __init__(self, path: Path, entries: list[Planned], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        off = 0
        for p in entries:
            header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [off, off + p.nbytes]}
            off += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
        self.path, self.expected, self.written = path, off, 0
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        data = t.contiguous().view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self.written += data.nbytes

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller removes the half-written file with its directory
            self._f.close()

    def close(self) -> None:
        if self.written != self.expected:
            self._f.close()
            raise AssertionError(f"{self.path}: wrote {self.written} data bytes, header says {self.expected}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def split_shards(tensors: list[Planned], shards: int) -> list[list[Planned]]:
    """Contiguous groups of about equal bytes, like HF's sharding: an expert's tensors may straddle two."""
    if not 1 <= shards <= len(tensors):
        raise ValueError(f"--shards must be between 1 and the {len(tensors)} tensors, got {shards}")
    total = max(1, sum(p.nbytes for p in tensors))
    groups: list[list[Planned]] = [[] for _ in range(shards)]
    acc = prev = 0
    for i, p in enumerate(tensors):
        want = min(shards - 1, acc * shards // total)
        k = 0 if i == 0 else min(max(want, prev), prev + 1)  # never skip a shard
        k = max(k, shards - (len(tensors) - i))  # leave one tensor for each later shard
        groups[k].append(p)
        acc, prev = acc + p.nbytes, k
    return groups


def shard_names(shards: int) -> list[str]:
    if shards == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]


def needed_bytes(fmt: str, d: Dims, shards: int = 1) -> int:
    """Bytes the model takes on disk, headers included (an upper bound)."""
    return planned_bytes(plan(fmt, d)[2], shards)


def planned_bytes(tensors: list[Planned], shards: int = 1) -> int:
    return sum(p.nbytes + len(p.name) + 100 for p in tensors) + shards * 8 + (1 << 16)


class Written(msgspec.Struct, frozen=True):
    path: str
    files: tuple[str, ...]
    total_bytes: int


def _jobs(group: list[Planned]):
    """(planned tensor, piece index, piece shape) in file order: one piece per expert slice."""
    for p in group:
        if p.per_expert:
            for e in range(p.shape[0]):
                yield p, e, p.shape[1:]
        else:
            yield p, 0, p.shape


def _pieces_in_order(seed: int, group: list[Planned], workers: int):
    """The group's pieces in file order, generated by `workers` threads ahead of the writer.

    Each piece has its own generator, so the bytes do not depend on who draws them, and torch
    releases the GIL while it draws: one thread made ~120 MB/s, which put a 40 GB checkpoint
    (llama4's shape at GPT-OSS-20B's dims) at five minutes. At most 2 x workers pieces and
    about PIECES_IN_FLIGHT_BYTES wait in memory (always at least one).
    """
    if workers == 1:
        for job in _jobs(group):
            yield _piece(seed, *job)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="make-model") as pool:
        pending: collections.deque = collections.deque()
        held = 0
        try:
            for job in _jobs(group):
                nbytes = job[0].nbytes // (job[0].shape[0] if job[0].per_expert else 1)
                while pending and (held + nbytes > PIECES_IN_FLIGHT_BYTES or len(pending) >= 2 * workers):
                    fut, n = pending.popleft()
                    held -= n
                    yield fut.result()
                pending.append((pool.submit(_piece, seed, *job), nbytes))
                held += nbytes
            while pending:
                yield pending.popleft()[0].result()
        finally:  # an error or a closed generator: drop what is still queued
            for fut, _ in pending:
                fut.cancel()


PIECES_IN_FLIGHT_BYTES = 1 << 30


def write_model(fmt: str, d: Dims, seed: int, out: str | os.PathLike, shards: int = 1,
                workers: int = 1) -> Written:
    """Write a synthetic checkpoint to `out` (which must not exist or be empty); atomic as a directory.
    `workers` threads draw the random pieces (the bytes are the same for any number).

    Raises ValueError for bad dimensions, a non-empty `out`, too little free disk space or
    workers < 1.
    """
    return write_planned(plan(fmt, d), seed, out, shards, workers)


def write_planned(planned: tuple[str, dict, list[Planned]], seed: int, out: str | os.PathLike, shards: int = 1,
                  workers: int = 1) -> Written:
    """`write_model` of a plan made elsewhere (adapters.hf_models.plan_hf): (sub-directory, config, tensors)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    out = Path(out)
    sub, cfg, tensors = planned
    groups = split_shards(tensors, shards)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; --out names the checkpoint folder to make, choose a new one")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not an empty directory; choose a new --out or delete it")
    need = planned_bytes(tensors, shards)
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise ValueError(f"{out}: the model needs {need / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
                         "free space or shrink it (--layers/--experts)")
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():  # left by a killed run: it is ours by name and never a complete model
        shutil.rmtree(tmp)
    wdir = tmp / sub if sub else tmp
    wdir.mkdir(parents=True)
    try:
        names = shard_names(shards)
        files = []
        for fname, group in zip(names, groups):
            with SafetensorsWriter(wdir / fname, group, {"format": "pt"}) as w:
                for piece in _pieces_in_order(seed, group, workers):
                    w.write(piece)
            files.append(f"{sub}/{fname}" if sub else fname)
        if shards > 1 and not sub:
            weight_map = {p.name: fname for fname, group in zip(names, groups) for p in group}
            index = {"metadata": {"total_size": sum(p.nbytes for p in tensors)}, "weight_map": weight_map}
            (wdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            files.append("model.safetensors.index.json")
        (wdir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        files.append(f"{sub}/config.json" if sub else "config.json")
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum((out / f).stat().st_size for f in files)
    return Written(str(out), tuple(files), total)
