"""Routing traces in the `moe-routing-trace/1` format (see data/traces/FORMAT.md).

Offers:
- `TraceMeta`: the JSON `meta` object as a frozen msgspec struct.
- `Trace`: the arrays of one trace plus its meta (`experts` int16 [T, L, K] with -1 = no
  entry, `weights` float32 [T, L, K] with NaN = unknown, `token_ids` int64 [T],
  `phase` uint8 [T] (0 prefill, 1 decode), `request` int32 [T]).
- `load_trace(path)` / `save_trace(trace, path)`: checked reading, atomic writing.
  Every problem with a file is a `TraceError` (a `ValueError`) naming the file.
- `decode_steps(trace, include_prefill=False)`: replays a trace as forward passes
  (`Step`s) in execution order, the way the simulator and quality metrics consume it.

Files are untrusted input: nothing is unpickled (`allow_pickle=False`) and every array is
checked for dtype, shape and value range before anyone uses it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from adapters.atomic_file import replaced_atomically

FORMAT = "moe-routing-trace/1"
PREFILL, DECODE = 0, 1

# name -> (dtype, ndim); shapes are [T, L, K] or [T]
_ARRAYS: dict[str, tuple[np.dtype, int]] = {
    "experts": (np.dtype(np.int16), 3),
    "weights": (np.dtype(np.float32), 3),
    "token_ids": (np.dtype(np.int64), 1),
    "phase": (np.dtype(np.uint8), 1),
    "request": (np.dtype(np.int32), 1),
}


class TraceError(ValueError):
    """A trace file (or in-memory trace) is malformed; the message names the file and the problem."""

    def __init__(self, path: object, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


class TraceMeta(msgspec.Struct, frozen=True, kw_only=True):
    """The `meta` JSON object. Shape keys are required; descriptive ones default to empty."""

    format: str
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    tokens: int
    layer_ids: tuple[int, ...] | None = None
    has_weights: bool = False
    has_token_ids: bool = False
    workload: str = ""
    source: str = ""
    notes: str = ""
    hidden_size: int | None = None
    expert_intermediate_size: int | None = None
    expert_matrices: int | None = None
    expert_bytes_bf16: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """One routing trace. Build it with `make_trace` (checks it) or `load_trace`."""

    experts: np.ndarray
    weights: np.ndarray
    token_ids: np.ndarray
    phase: np.ndarray
    request: np.ndarray
    meta: TraceMeta

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.meta.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_requests(self) -> int:
        return 0 if self.tokens == 0 else int(np.unique(self.request).size)

    @property
    def expert_bytes(self) -> int | None:
        """Bytes of one routed expert in bf16, when the trace's meta knows it."""
        return self.meta.expert_bytes_bf16


def make_trace(experts, weights, token_ids, phase, request, meta: TraceMeta, where: object = "<trace>") -> Trace:
    """A checked `Trace` from arrays (converted to the format's dtypes when values fit)."""
    arrays = {"experts": experts, "weights": weights, "token_ids": token_ids, "phase": phase, "request": request}
    for name, (dtype, _) in _ARRAYS.items():
        arrays[name] = np.ascontiguousarray(arrays[name], dtype=dtype)
    trace = Trace(meta=meta, **arrays)
    validate(trace, where)
    return trace


def validate(trace: Trace, where: object) -> None:
    """Raise `TraceError(where, ...)` unless `trace` obeys every rule of the format."""
    for name, (dtype, ndim) in _ARRAYS.items():
        arr = getattr(trace, name)
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != ndim:
            got = f"{arr.dtype} with {arr.ndim} dims" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise TraceError(where, f"array {name!r} must be {dtype} with {ndim} dims, got {got}")
    T, L, K = trace.experts.shape
    if trace.weights.shape != (T, L, K):
        raise TraceError(where, f"array 'weights' has shape {trace.weights.shape}, experts has {(T, L, K)}")
    for name in ("token_ids", "phase", "request"):
        if getattr(trace, name).shape != (T,):
            raise TraceError(where, f"array {name!r} has shape {getattr(trace, name).shape}, expected ({T},)")
    m = trace.meta
    if m.format != FORMAT:
        raise TraceError(where, f"meta format is {m.format!r}, expected {FORMAT!r}")
    for key, value in (("num_layers", L), ("top_k", K), ("tokens", T)):
        if getattr(m, key) != value:
            raise TraceError(where, f"meta {key}={getattr(m, key)} disagrees with the arrays ({value})")
    if L < 1 or K < 1 or m.num_experts < 1 or K > m.num_experts:
        raise TraceError(where, f"need layers >= 1 and 1 <= top_k <= num_experts; got L={L}, K={K}, "
                                f"E={m.num_experts}")
    if m.layer_ids is not None and len(m.layer_ids) != L:
        raise TraceError(where, f"meta layer_ids has {len(m.layer_ids)} entries for {L} layers")
    if T and (trace.experts.min() < -1 or trace.experts.max() >= m.num_experts):
        bad = trace.experts[(trace.experts < -1) | (trace.experts >= m.num_experts)][0]
        raise TraceError(where, f"expert id {bad} out of range [-1, {m.num_experts})")
    if T and trace.phase.max() > DECODE:
        raise TraceError(where, f"phase value {trace.phase.max()} not in {{0, 1}}")
    if T:
        starts = np.flatnonzero(np.diff(trace.request)) + 1
        run_ids = trace.request[np.concatenate(([0], starts))]
        if np.unique(run_ids).size != run_ids.size:
            raise TraceError(where, "rows of one request are not consecutive (a request id appears in two runs)")


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and check a `moe-routing-trace/1` file; any problem -> `TraceError` naming it."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise TraceError(path, "no such file (check the path)") from None
    except OSError as e:
        raise TraceError(path, f"cannot open ({e.strerror})") from None
    with f:  # our own handle, so a failed np.load never leaks it
        magic = f.read(4)
        f.seek(0)
        if magic != b"PK\x03\x04":  # an .npz is a zip archive; numpy would guess "pickle" for anything else
            raise TraceError(path, "not an .npz routing trace (not a zip archive); give a file written by "
                             "make-trace or in the format of data/traces/FORMAT.md")
        try:
            npz = np.load(f, allow_pickle=False)
        except Exception as e:  # untrusted bytes: zip, header and OS errors all mean "not a trace"
            raise TraceError(path, f"not a readable .npz file ({type(e).__name__}: {e})") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise TraceError(path, "is a single .npy array, not an .npz trace")
        with npz:
            arrays = _read_members(npz, path)
    meta_arr = arrays.pop("meta")
    if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
        raise TraceError(path, f"array 'meta' must be a 0-d str holding JSON, got {meta_arr.dtype} {meta_arr.shape}")
    try:
        meta = msgspec.json.decode(str(meta_arr), type=TraceMeta)
    except msgspec.DecodeError as e:
        raise TraceError(path, f"bad meta JSON: {e}") from None
    trace = Trace(meta=meta, **arrays)
    validate(trace, path)
    return trace


def _read_members(npz, path: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for name in (*_ARRAYS, "meta"):
        if name not in npz.files:
            raise TraceError(path, f"missing array {name!r} (has {', '.join(npz.files) or 'none'})")
        try:
            arrays[name] = npz[name]
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise TraceError(path, f"array {name!r} cannot be read without pickle ({e})") from None
        except Exception as e:  # truncated / corrupt member
            raise TraceError(path, f"array {name!r} is corrupt ({type(e).__name__}: {e})") from None
    return arrays


def save_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Write `trace` to `path` atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    validate(trace, path)
    meta = np.array(msgspec.json.encode(trace.meta).decode())
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append ".npz"
        np.savez_compressed(f, experts=trace.experts, weights=trace.weights, token_ids=trace.token_ids,
                            phase=trace.phase, request=trace.request, meta=meta)


def first_layers(trace: Trace, n: int) -> Trace:
    """The trace's first `n` MoE layers (every row kept): a real model's routing replayed on a
    store of fewer layers, e.g. experts at full size on a disk too small for all of them."""
    if not 1 <= n <= trace.num_layers:
        raise ValueError(f"--layers must be in [1, {trace.num_layers}] (the trace's MoE layers), got {n}")
    ids = None if trace.meta.layer_ids is None else trace.meta.layer_ids[:n]
    meta = msgspec.structs.replace(trace.meta, num_layers=n, layer_ids=ids)
    return make_trace(trace.experts[:, :n], trace.weights[:, :n], trace.token_ids, trace.phase, trace.request,
                      meta, where=f"first {n} layers of {trace.meta.model}")


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """One forward pass: a decode row, or all prefill rows of one request at once.

    `experts` int16 [L, W] and `weights` float32 [L, W] are padded with -1 / NaN. For a
    decode row W = K and the order is the router's; for a prefill pass each layer holds
    the sorted union of its rows' experts and the weights are NaN (a union has no single
    router weight).
    """

    request: int
    phase: int
    rows: tuple[int, int]  # [start, stop) in the trace
    token_ids: np.ndarray  # int64 [stop - start]
    experts: np.ndarray
    weights: np.ndarray

    def layer_experts(self, layer: int) -> np.ndarray:
        row = self.experts[layer]
        return row[row >= 0]

    def layer_weights(self, layer: int) -> np.ndarray:
        return self.weights[layer][self.experts[layer] >= 0]


def _union_pass(experts: np.ndarray) -> np.ndarray:
    """[n, L, K] -> [L, W]: per layer, the sorted union of valid ids, padded with -1."""
    L = experts.shape[1]
    sets = [np.unique(experts[:, layer][experts[:, layer] >= 0]) for layer in range(L)]
    out = np.full((L, max(1, max(s.size for s in sets))), -1, dtype=np.int16)
    for layer, s in enumerate(sets):
        out[layer, : s.size] = s
    return out


def decode_steps(trace: Trace, include_prefill: bool = False) -> Iterator[Step]:
    """Yield the trace's forward passes in execution order (requests back to back).

    Each decode row is one pass through layers 0..L-1; with `include_prefill`, each run of
    prefill rows of one request is a single pass whose layers need the union of the rows'
    experts. Decode steps are views into the trace's arrays (no copies).
    """
    T = trace.tokens
    if T == 0:
        return
    # runs of equal (request, phase): boundaries where either changes
    change = np.flatnonzero((np.diff(trace.request) != 0) | (np.diff(trace.phase) != 0)) + 1
    bounds = np.concatenate(([0], change, [T]))
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        req, ph = int(trace.request[start]), int(trace.phase[start])
        if ph == PREFILL:
            if not include_prefill:
                continue
            ex = _union_pass(trace.experts[start:stop])
            yield Step(req, ph, (start, stop), trace.token_ids[start:stop], ex,
                       np.full(ex.shape, np.nan, dtype=np.float32))
            continue
        for t in range(start, stop):
            yield Step(req, ph, (t, t + 1), trace.token_ids[t:t + 1], trace.experts[t], trace.weights[t])
