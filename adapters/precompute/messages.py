"""Messages between the precompute parent and its worker processes (msgspec, never pickle).

Parent -> worker: `LayerJob`, `Stop`. Worker -> parent: `Progress`, `LayerDone`, `LayerFailed`.
Each crosses a multiprocessing Pipe as msgspec JSON bytes (`send_bytes`/`recv_bytes`).
"""
from __future__ import annotations

import msgspec

from ..spec import TensorSpec
from ..store_format import LayerMeta


class LayerJob(msgspec.Struct, frozen=True, tag=True):
    model: str
    format: str
    out: str
    layer: int
    num_experts: int
    dtype: str
    tensors: tuple[TensorSpec, ...]  # one expert as stored (plan_layer orders them)
    source_digest: str


class Stop(msgspec.Struct, frozen=True, tag=True):
    pass


class Progress(msgspec.Struct, frozen=True, tag=True):
    layer: int
    experts: int  # experts finished since the last Progress of this layer (1)
    nbytes: int


class LayerDone(msgspec.Struct, frozen=True, tag=True):
    layer: int
    meta: LayerMeta


class LayerFailed(msgspec.Struct, frozen=True, tag=True):
    layer: int
    bad_input: bool  # a CheckpointError/ValueError about the files, as opposed to a bug
    message: str  # str(exception), one line
    traceback: str  # formatted in the worker, shown by the parent for bugs


ToWorker = LayerJob | Stop
ToParent = Progress | LayerDone | LayerFailed

encoder = msgspec.json.Encoder()
to_worker = msgspec.json.Decoder(ToWorker)
to_parent = msgspec.json.Decoder(ToParent)
