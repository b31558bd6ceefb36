"""The packed expert store: layout (valid safetensors, aligned contiguous experts) and bit-exactness.

Stores are built from tiny GPT-OSS checkpoints written by the project's own `make-model`,
and from an in-memory fake Mixtral-like checkpoint (F32 dense experts) for the dense path.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import struct
from contextlib import redirect_stdout
from pathlib import Path

import msgspec
import pytest
import torch
from safetensors import safe_open

from adapters.base import Checkpoint
from adapters.cli.make_model import main as make_model
from adapters.errors import CheckpointError, UnknownNameError
from adapters.precompute.build import PrecomputeConfig, precompute
from adapters.precompute.cli import main as precompute_main
from adapters.precompute.convert import store_tensors
from adapters.registry import get_adapter, open_checkpoint
from adapters.spec import ExpertLocation, ModelSpec, TensorRange, TensorSpec
from adapters.store import StoreCheckpoint

DTYPES = ("bfloat16", "float16", "mxfp4")
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a tensor, so that the comparison is exact (NaN, -0) and dtype-checked."""
    return t.contiguous().view({2: torch.int16, 1: torch.uint8, 4: torch.int32}[t.element_size()])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny"
    with redirect_stdout(io.StringIO()):
        assert make_model(["--format", "gpt-oss", "--preset", "tiny", "--seed", "7", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module", params=DTYPES)
def store(request, tiny_model, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"store_{request.param}")
    with redirect_stdout(io.StringIO()):
        rc = precompute_main(["--model", str(tiny_model), "--out", str(out), "--dtype", request.param,
                              "--workers", "2", "--no-progress"])
    assert rc == 0
    return request.param, out


def test_layer_files_are_valid_safetensors_with_aligned_contiguous_experts(store, tiny_model):
    dtype, out = store
    st = StoreCheckpoint(out)
    src = open_checkpoint(tiny_model)
    s = st.spec
    assert len(list(out.glob("layer_*.safetensors"))) == s.num_layers
    for layer in range(s.num_layers):
        path = out / f"layer_{layer:03d}.safetensors"
        size = path.stat().st_size
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert (8 + n) % 4096 == 0
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            for e in range(s.num_experts):
                x = st.expert_range(layer, e)
                assert x.offset % 4096 == 0 and x.read_length % 4096 == 0
                assert x.length <= x.read_length < x.length + 4096
                assert x.offset + x.read_length <= size
                # One contiguous range: the tensors tile [offset, offset+length) exactly.
                loc = st.locate(layer, e)
                spans = sorted((r.offset, r.offset + r.length) for r in loc.ranges)
                assert spans[0][0] == x.offset and spans[-1][1] == x.offset + x.length
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
                # The safetensors library reads the same tensors the store decodes from.
                raw = st.read_raw(layer, e)
                for r in loc.ranges:
                    t = f.get_tensor(f"expert.{e}.{r.role}")
                    assert list(t.shape) == list(r.shape)
                    assert t.contiguous().view(torch.uint8).numpy().tobytes() == bytes(raw[r.role])
                if dtype == "mxfp4":  # the source's MXFP4 bytes, verbatim
                    with safe_open(str(src.root / src.locate(layer, e).ranges[0].file), framework="pt") as g:
                        for role in ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp2_bias"):
                            want = g.get_slice(f"block.{layer}.mlp.{role}")[e]
                            assert torch.equal(bits(f.get_tensor(f"expert.{e}.{role}")), bits(want))
            assert {n for n in names if not n.startswith("__pad__")} == {
                f"expert.{e}.{t.role}" for e in range(s.num_experts) for t in s.expert_tensors}


def test_every_expert_is_bit_exact_with_the_source(store, tiny_model):
    dtype, out = store
    st = open_checkpoint(out)
    assert isinstance(st, StoreCheckpoint) and st.spec.format == "store"
    src = open_checkpoint(tiny_model)
    checked = 0
    for layer in range(src.spec.num_layers):
        for e in range(src.spec.num_experts):
            want = src.load_expert(layer, e)
            if dtype != "mxfp4":
                want = {r: t.to(TORCH[dtype]) for r, t in want.items()}
            got = st.load_expert(layer, e)
            assert sorted(got) == sorted(want) == ["mlp1_bias", "mlp1_weight", "mlp2_bias", "mlp2_weight"]
            for r in want:
                assert got[r].dtype == want[r].dtype and got[r].shape == want[r].shape
                assert torch.equal(bits(got[r]), bits(want[r])), (layer, e, r)
            checked += 1
    assert checked == 3 * 8


def test_decode_from_buffer_slices_views_of_one_buffer(store):
    dtype, out = store
    st = StoreCheckpoint(out)
    x = st.expert_range(2, 5)
    buf = torch.zeros(x.read_length, dtype=torch.uint8)  # an aligned slot, bigger than the expert
    buf[: x.length] = torch.frombuffer(bytearray(st.read_expert(2, 5)), dtype=torch.uint8)
    got = st.decode_from_buffer(buf, "cpu")
    want = st.decode(st.read_raw(2, 5))
    for r in want:
        assert torch.equal(bits(got[r]), bits(want[r]))
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    if dtype != "mxfp4":  # no copies: every tensor lies inside the buffer
        assert all(lo <= t.data_ptr() < hi for t in got.values())
    else:  # biases are views; weights are decoded into new bf16 tensors
        assert lo <= got["mlp1_bias"].data_ptr() < hi and got["mlp1_weight"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs"):
        st.decode_from_buffer(buf[: x.length - 1])
    # Into preallocated tensors (the pipeline's fixed slots): same values, same storage.
    slots = {t.role: torch.full(t.shape, 7, dtype={"BF16": torch.bfloat16, "F16": torch.float16}[t.dtype])
             for t in st.dense_tensors}
    ptrs = {r: t.data_ptr() for r, t in slots.items()}
    res = st.decode_from_buffer(buf, "cpu", out=slots)
    assert sorted(res) == sorted(want)
    for r in want:
        assert res[r].data_ptr() == ptrs[r] and torch.equal(bits(res[r]), bits(want[r]))


def test_stored_views_are_the_experts_bytes_as_stored_and_refuse_bad_buffers(store):
    """The tensors as the index describes them (MXFP4 blocks and scales, not decoded), views of
    the one buffer; a wrong dtype, a short buffer or a misaligned start are one-line errors."""
    dtype, out = store
    st = StoreCheckpoint(out)
    x = st.expert_range(1, 3)
    buf = torch.zeros(x.read_length + 2, dtype=torch.uint8)
    buf[: x.length] = st.read_expert_tensor(1, 3)
    got = st.stored_views(buf)
    raw = st.read_raw(1, 3)
    assert [t.role for t in x.tensors] == list(got)
    for t in x.tensors:
        v = got[t.role]
        assert tuple(v.shape) == tuple(t.shape) and buf.data_ptr() <= v.data_ptr() < buf.data_ptr() + buf.numel()
        assert bytes(v.contiguous().view(torch.uint8).flatten().numpy()) == bytes(raw[t.role])
    if dtype == "mxfp4":
        assert got["mlp1_weight.blocks"].dtype == torch.uint8 and "mlp1_weight" not in got
    with pytest.raises(ValueError, match="1-D uint8"):
        st.stored_views(buf.view(torch.int16))
    with pytest.raises(ValueError, match="needs"):
        st.stored_views(buf[: x.length - 1])
    if any(t.dtype != "U8" for t in x.tensors):  # a 2-byte tensor one byte off its boundary
        with pytest.raises(ValueError, match="misaligns .*2-byte boundary"):
            st.stored_views(buf[1:])


def test_store_json_records_source_and_per_tensor_ranges(store, tiny_model):
    dtype, out = store
    idx = json.loads((out / "store.json").read_text())
    assert idx["dtype"] == dtype and idx["checksum_algorithm"] == "crc32"
    assert idx["source"]["adapter"] == "gpt-oss" and Path(idx["source"]["path"]) == tiny_model.resolve()
    for f in idx["source"]["files"]:
        st = (tiny_model / f["name"]).stat()
        assert (f["size"], f["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and len(f["header_sha256"]) == 64
    assert idx["model"]["format"] == "gpt-oss" and len(idx["experts"]) == 24
    x = idx["experts"][9]
    assert (x["layer"], x["expert"], x["file"]) == (1, 1, "layer_001.safetensors")
    assert {t["role"] for t in x["tensors"]} == {t["role"] for t in idx["expert_tensors"]}
    assert get_adapter("store") is StoreCheckpoint and StoreCheckpoint.detect(out)
    assert not StoreCheckpoint.detect(tiny_model)


def test_verify_and_bounds(store):
    _, out = store
    st = StoreCheckpoint(out)
    data = bytearray(st.read_expert(1, 3))
    st.verify(1, 3, data)
    data[len(data) // 2] ^= 0x01
    with pytest.raises(CheckpointError, match=r"layer_001\.safetensors.*expert 1/3"):
        st.verify(1, 3, data)
    with pytest.raises(IndexError, match="out of range"):
        st.locate(3, 0)


# -- a fake dense (Mixtral-like, F32) source: the dense path and the mxfp4 refusal -------------
class FakeMixtral(Checkpoint):
    def __init__(self, root: Path, layers=2, experts=3, hidden=32, inter=48):
        self.root = root
        (root / "fake.bin").write_bytes(b"\0" * 64)  # the file its ranges name (identity only)
        shapes = {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}
        self.spec = ModelSpec("mixtral", "fake", layers, experts, 2, hidden, inter, tuple(range(layers)),
                              tuple(TensorSpec(r, "F32", s) for r, s in shapes.items()))
        g = torch.Generator().manual_seed(3)
        self.w = {(l, e): {r: torch.randn(s, generator=g) * 3 for r, s in shapes.items()}
                  for l in range(layers) for e in range(experts)}

    def locate(self, layer, expert):
        self.check_index(layer, expert)
        return ExpertLocation(layer, expert, tuple(TensorRange(t.role, "fake.bin", 0, t.nbytes, t.dtype, t.shape)
                                                   for t in self.spec.expert_tensors))

    def read_raw(self, layer, expert):
        return {r: t.numpy().tobytes() for r, t in self.w[(layer, expert)].items()}

    def decode(self, raw, device="cpu"):
        return {t.role: torch.frombuffer(bytearray(raw[t.role]), dtype=torch.float32).view(t.shape).to(device)
                for t in self.spec.expert_tensors}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dense_source_converts_bit_exactly_in_process(tmp_path, dtype):
    (tmp_path / "src").mkdir()
    src = FakeMixtral(tmp_path / "src")
    out = tmp_path / "store"
    assert precompute(PrecomputeConfig(str(src.root), str(out), dtype, workers=0, progress=False), src,
                      log=lambda *a: None) == 0
    st = StoreCheckpoint(out)
    assert [t.role for t in st.spec.expert_tensors] == ["w1", "w2", "w3"]
    for (l, e), w in src.w.items():
        got = st.load_expert(l, e)
        for r, t in w.items():
            assert torch.equal(bits(got[r]), bits(t.to(TORCH[dtype])))


def test_mxfp4_needs_an_mxfp4_source(tmp_path):
    (tmp_path / "src").mkdir()
    src = FakeMixtral(tmp_path / "src")
    with pytest.raises(CheckpointError, match=r"mxfp4.*F32.*bfloat16 or float16"):
        store_tensors(src, "mxfp4")
    with pytest.raises(UnknownNameError, match="bfloat16, float16, mxfp4"):
        store_tensors(src, "int4")
    assert not (tmp_path / "store").exists()


def test_index_decode_error_names_the_field(store, tmp_path):
    _, out = store
    idx = json.loads((out / "store.json").read_text())
    idx["experts"][4]["offset"] = "x"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "store.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"store\.json.*\$\.experts\[4\]\.offset"):
        StoreCheckpoint(bad)
    assert msgspec.json.decode((out / "store.json").read_bytes())["version"] == 1


def test_an_expert_can_be_read_with_o_direct(store):
    _, out = store
    st = StoreCheckpoint(out)
    # The last expert of a layer: its padded read must still end inside the file.
    x = st.expert_range(1, st.spec.num_experts - 1)
    assert x.offset + x.read_length == (out / x.file).stat().st_size
    buf = mmap.mmap(-1, x.read_length)  # page-aligned memory, as O_DIRECT requires
    try:
        fd = os.open(out / x.file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as e:  # e.g. tmpfs: the file system has no direct I/O
        pytest.skip(f"no O_DIRECT on this file system: {e}")
    try:
        n = os.preadv(fd, [buf], x.offset)  # aligned offset and length, or EINVAL
    finally:
        os.close(fd)
    assert n == x.read_length
    data = bytes(buf[: x.length])
    assert data == st.read_expert(1, x.expert) and bytes(buf[x.length:]) == bytes(x.read_length - x.length)
    st.verify(1, x.expert, data)


@pytest.mark.gpu
def test_gpu_decode_from_a_device_buffer_matches_the_cpu(store):
    # The pipeline copies an expert's stored bytes into VRAM and decodes there (MXFP4 on the GPU).
    dtype, out = store
    st = StoreCheckpoint(out)
    for layer, expert in ((0, 0), (2, 5)):
        x = st.expert_range(layer, expert)
        host = torch.zeros(x.read_length, dtype=torch.uint8)
        host[: x.length] = torch.frombuffer(bytearray(st.read_expert(layer, expert)), dtype=torch.uint8)
        want = st.decode_from_buffer(host, "cpu")
        got = st.decode_from_buffer(host.cuda(), "cuda")
        assert sorted(got) == sorted(want)
        for r in want:
            assert got[r].is_cuda and torch.equal(bits(got[r].cpu()), bits(want[r]))
