"""Each format: a tiny checkpoint from make-model, opened by detection, every expert checked
bit-exactly against the same tensors read independently with the safetensors library."""
from __future__ import annotations

import os
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from adapters import open_checkpoint
from adapters.errors import CheckpointError, UnknownNameError
from adapters.registry import get_adapter, names
from tests.helpers_models import make_tiny, ref_mxfp4_decode

ROOT = Path(__file__).resolve().parent.parent


class Independent:
    """Every tensor of a directory's safetensors files, read with the reference library."""

    def __init__(self, files: list[Path]):
        self.where = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.where[k] = f

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), framework="pt") as h:
            return h.get_tensor(name)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Compare bit patterns: torch.equal would call +0 == -0 and NaN != NaN.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1:
        return torch.equal(a, b)
    iv = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.dtype.itemsize]
    return torch.equal(a.contiguous().view(iv), b.contiguous().view(iv))


def _check_gpt_oss(path: Path) -> None:
    ck = open_checkpoint(path)
    s = ck.spec
    assert (s.format, s.family) == ("gpt-oss", "gpt-oss")
    ind = Independent(sorted((path / "original").glob("*.safetensors")))
    for l in range(s.num_layers):
        p = f"block.{s.layer_ids[l]}.mlp."
        full = {r: ind[p + r] for r in ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias",
                                        "mlp2_weight.blocks", "mlp2_weight.scales", "mlp2_bias")}
        for e in range(s.num_experts):
            got = ck.load_expert(l, e)
            want = {
                "mlp1_weight": ref_mxfp4_decode(full["mlp1_weight.blocks"][e].numpy(), full["mlp1_weight.scales"][e].numpy()),
                "mlp2_weight": ref_mxfp4_decode(full["mlp2_weight.blocks"][e].numpy(), full["mlp2_weight.scales"][e].numpy()),
                "mlp1_bias": full["mlp1_bias"][e], "mlp2_bias": full["mlp2_bias"][e],
            }
            assert set(got) == set(want)
            for role in want:
                assert _bits_equal(got[role], want[role]), (l, e, role)
            # The raw byte ranges are exactly the stored slices.
            raw = ck.read_raw(l, e)
            for role in ("mlp1_weight.blocks", "mlp1_weight.scales", "mlp1_bias"):
                assert raw[role] == full[role][e].contiguous().view(torch.uint8).numpy().tobytes()


def test_gpt_oss_single_file(tmp_path):
    path = make_tiny(tmp_path / "m", "gpt-oss")
    _check_gpt_oss(path)
    assert open_checkpoint(path).spec.expert_bytes == 2 * 64 * 2 * 16 + 2 * 64 * 2 + 2 * 64 * 2 + 64 * 2 * 16 + 64 * 2 + 64 * 2


def test_gpt_oss_sharded_subprocess(tmp_path, bin_env):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "make-model"), "--format", "gpt-oss", "--preset", "tiny",
                        "--layers", "2", "--experts", "6", "--seed", "5", "--shards", "3", "--out", str(out)],
                       env=bin_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "expert size" in r.stdout
    assert len(list((out / "original").glob("*.safetensors"))) == 3
    ck = open_checkpoint(out)
    assert {rg.file for l in range(2) for e in range(6) for rg in ck.locate(l, e).ranges} == {
        f"original/model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)}
    _check_gpt_oss(out)


def test_decode_accepts_tensors_and_writable_buffers(tmp_path):
    ck = open_checkpoint(make_tiny(tmp_path / "m", "gpt-oss"))
    want = ck.load_expert(1, 3)
    raw = ck.read_raw(1, 3)
    for form in (lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8), bytearray, lambda b: memoryview(b)):
        got = ck.decode({k: form(v) for k, v in raw.items()})
        assert all(_bits_equal(got[k], want[k]) for k in want)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["gpt-oss", "mixtral", "fused"])
def test_decode_on_cuda_matches_cpu(tmp_path, fmt):
    ck = open_checkpoint(make_tiny(tmp_path / "m", fmt))
    for e in (0, 7):
        want = ck.load_expert(2, e)
        raw = ck.read_raw(2, e)
        for form in (lambda b: b, lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).cuda()):
            got = ck.decode({k: form(v) for k, v in raw.items()}, "cuda")
            assert all(got[k].is_cuda and _bits_equal(got[k].cpu(), want[k]) for k in want)


def test_registry_names_and_unknown(tmp_path):
    assert {"gpt-oss", "mixtral", "qwen-moe", "fused"} <= set(names())
    assert names()[0] == "gpt-oss"  # tried first: a GPT-OSS HF directory also holds top-level HF weights
    with pytest.raises(UnknownNameError, match="valid: .*gpt-oss"):
        get_adapter("gpt-oss-bad")
    with pytest.raises(UnknownNameError, match="gpt-oss"):
        open_checkpoint(tmp_path, format="nope")


def test_undetectable_directory_names_it_and_formats(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "gpt-oss" in msg and "\n" not in msg


def test_index_out_of_range(tmp_path):
    ck = open_checkpoint(make_tiny(tmp_path / "m", "gpt-oss"))
    with pytest.raises(IndexError, match="3 MoE layers x 8 experts"):
        ck.locate(3, 0)
    with pytest.raises(IndexError):
        ck.locate(0, -1)


# --- bad input -------------------------------------------------------------------------

def _rewrite_without(path: Path, drop: str | None = None, reshape: tuple[str, list[int]] | None = None) -> None:
    """Rewrite one safetensors file with a tensor dropped, or one's header shape changed (same bytes)."""
    with safe_open(str(path), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    from safetensors.torch import save_file

    if drop:
        del tensors[drop]
    if reshape:
        name, shape = reshape
        tensors[name] = tensors[name].reshape(shape)
    save_file(tensors, str(path))


def test_gpt_oss_missing_tensor(tmp_path):
    path = make_tiny(tmp_path / "m", "gpt-oss")
    _rewrite_without(path / "original" / "model.safetensors", drop="block.1.mlp.mlp2_bias")
    with pytest.raises(CheckpointError, match=r"model.safetensors \[block.1.mlp.mlp2_bias\]: tensor missing"):
        open_checkpoint(path)


def test_gpt_oss_wrong_shape_in_a_shard(tmp_path):
    path = make_tiny(tmp_path / "m", "gpt-oss", "--shards", "2")
    shard = path / "original" / "model-00002-of-00002.safetensors"
    _rewrite_without(shard, reshape=("block.2.mlp.mlp1_weight.scales", [8, 64, 4]))
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)
    msg = str(ei.value)
    assert "model-00002-of-00002.safetensors" in msg and "block.2.mlp.mlp1_weight.scales" in msg
    assert "[8, 64, 4]" in msg and "[8, 128, 2]" in msg


def test_gpt_oss_missing_and_malformed_config(tmp_path):
    path = make_tiny(tmp_path / "m", "gpt-oss")
    cfg = path / "original" / "config.json"
    text = cfg.read_text()
    cfg.write_text(text[:-20])
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        open_checkpoint(path, "gpt-oss")
    cfg.write_text(json.dumps({**json.loads(text), "num_experts": "8"}))
    with pytest.raises(CheckpointError, match=r"num_experts = '8' is not a positive integer"):
        open_checkpoint(path, "gpt-oss")
    cfg.unlink()
    with pytest.raises(CheckpointError, match=r"original/config.json: missing"):
        open_checkpoint(path, "gpt-oss")


def test_truncated_shard_is_named(tmp_path):
    path = make_tiny(tmp_path / "m", "gpt-oss")
    f = path / "original" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors \[.*\]: data_offsets end"):
        open_checkpoint(path)
    f.write_bytes(struct.pack("<Q", 10**6) + data[8:40])
    with pytest.raises(CheckpointError, match=r"model.safetensors: header length"):
        open_checkpoint(path)


# --- Hugging Face per-expert layouts ----------------------------------------------------

HF_NAMES = {
    "mixtral": (("w1", "w3", "w2"), "model.layers.{l}.block_sparse_moe.experts.{e}.{r}.weight"),
    "qwen-moe": (("gate_proj", "up_proj", "down_proj"), "model.layers.{l}.mlp.experts.{e}.{r}.weight"),
}


def _check_per_expert(path: Path, fmt: str) -> None:
    ck = open_checkpoint(path)
    s = ck.spec
    assert (s.format, s.family) == (fmt, fmt)
    roles, pattern = HF_NAMES[fmt]
    ind = Independent(sorted(path.glob("*.safetensors")))
    for l in range(s.num_layers):
        for e in range(s.num_experts):
            got = ck.load_expert(l, e)
            assert list(got) == list(roles)
            for r in roles:
                want = ind[pattern.format(l=s.layer_ids[l], e=e, r=r)]
                assert _bits_equal(got[r], want), (l, e, r)


@pytest.mark.parametrize("fmt", ["mixtral", "qwen-moe"])
def test_per_expert_single_file(tmp_path, fmt):
    path = make_tiny(tmp_path / "m", fmt)
    assert [p.name for p in path.iterdir() if p.suffix == ".safetensors"] == ["model.safetensors"]
    _check_per_expert(path, fmt)
    s = open_checkpoint(path).spec
    assert (s.num_layers, s.num_experts, s.top_k, s.layer_ids) == (3, 8, 2, (0, 1, 2))
    assert s.expert_tensors[0].dtype == "BF16" and s.expert_bytes == 3 * 64 * 64 * 2


@pytest.mark.parametrize("fmt, dtype", [("mixtral", "F32"), ("qwen-moe", "F16")])
def test_per_expert_sharded_other_dtypes(tmp_path, fmt, dtype):
    # 5 shards: byte-balanced boundaries then fall inside some experts (checked below)
    path = make_tiny(tmp_path / "m", fmt, "--shards", "5", "--dtype", dtype)
    assert (path / "model.safetensors.index.json").is_file()
    _check_per_expert(path, fmt)
    ck = open_checkpoint(path)
    assert ck.spec.expert_tensors[0].dtype == dtype
    files_per_expert = [{r.file for r in ck.locate(l, e).ranges} for l in range(3) for e in range(8)]
    assert set().union(*files_per_expert) == {f"model-0000{k}-of-00005.safetensors" for k in (1, 2, 3, 4, 5)}
    assert any(len(f) > 1 for f in files_per_expert), "no expert straddles two shards"


def test_qwen_shared_expert_and_dense_layer_left_out(tmp_path):
    out = make_tiny(tmp_path / "q", "qwen-moe", "--layers", "4", "--shared-expert", "--dense-layers", "1", "--shards", "2")
    ind = Independent(sorted(out.glob("*.safetensors")))
    # The generator did write the shared expert and the dense layer ...
    assert "model.layers.0.mlp.gate_proj.weight" in ind.where
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in ind.where
    assert "model.layers.2.mlp.shared_expert.down_proj.weight" in ind.where
    assert "model.layers.2.mlp.shared_expert_gate.weight" in ind.where
    ck = open_checkpoint(out)
    s = ck.spec
    # ... and the adapter leaves both out of the routed experts.
    assert (s.num_layers, s.layer_ids, s.num_experts) == (3, (1, 2, 3), 8)
    _check_per_expert(out, "qwen-moe")
    located = {(r.file, r.offset) for l in range(3) for e in range(8) for r in ck.locate(l, e).ranges}
    assert len(located) == 3 * 8 * 3
    from adapters.safetensors_io import read_header

    for f in sorted(out.glob("*.safetensors")):
        for name, t in read_header(f).tensors.items():
            if ".experts." not in name:
                assert (f.name, t.offset) not in located, name


def test_per_expert_missing_tensor(tmp_path):
    path = make_tiny(tmp_path / "m", "mixtral", "--shards", "2")
    shard = path / "model-00002-of-00002.safetensors"
    victim = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    _rewrite_without(shard, drop=victim)
    with pytest.raises(CheckpointError, match=rf"\[{re.escape(victim)}\]: tensor missing .*looked in model-00001"):
        open_checkpoint(path)


def test_per_expert_wrong_shape_in_a_shard(tmp_path):
    path = make_tiny(tmp_path / "m", "qwen-moe", "--shards", "2")
    victim = "model.layers.0.mlp.experts.1.down_proj.weight"
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][victim]
    _rewrite_without(shard, reshape=(victim, [32, 128]))
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)
    msg = str(ei.value)
    assert shard.name in msg and victim in msg and "[32, 128]" in msg and "[64, 64]" in msg


def test_per_expert_missing_config_and_shard(tmp_path):
    path = make_tiny(tmp_path / "m", "qwen-moe", "--shards", "2")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: shard listed in the index is missing"):
        open_checkpoint(path)
    path = make_tiny(tmp_path / "n", "mixtral")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(path)  # detected from the weights, then the config is missing
    assert str(ei.value).startswith(f"{path / 'config.json'}: missing")


def test_config_with_fewer_experts_than_the_file(tmp_path):
    path = make_tiny(tmp_path / "m", "mixtral")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_local_experts"] = 6
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"expert 6 exists but config.json says 6 experts"):
        open_checkpoint(path)


# --- Hugging Face fused layout ----------------------------------------------------------

def _check_fused(path: Path) -> None:
    ck = open_checkpoint(path)
    s = ck.spec
    assert (s.format, s.family) == ("fused", "fused")
    ind = Independent(sorted(path.glob("*.safetensors")))
    for l in range(s.num_layers):
        full = {r: ind[f"model.layers.{l}.mlp.experts.{r}"]
                for r in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}
        for e in range(s.num_experts):
            got = ck.load_expert(l, e)
            assert list(got) == list(full)
            for r in full:
                assert _bits_equal(got[r], full[r][e]), (l, e, r)
            for rg in ck.locate(l, e).ranges:  # one contiguous range per tensor, 1/E of it
                assert rg.length * s.num_experts == full[rg.role].numel() * full[rg.role].element_size()


@pytest.mark.parametrize("extra", [(), ("--shards", "3", "--dtype", "F32")])
def test_fused(tmp_path, extra):
    path = make_tiny(tmp_path / "m", "fused", *extra)
    _check_fused(path)
    s = open_checkpoint(path).spec
    assert s.expert_tensors[0].shape == (64, 128) and s.expert_tensors[2].shape == (64, 64)


def test_fused_wrong_shape(tmp_path):
    path = make_tiny(tmp_path / "m", "fused")
    _rewrite_without(path / "model.safetensors", reshape=("model.layers.1.mlp.experts.down_proj", [8, 128, 32]))
    with pytest.raises(CheckpointError, match=r"model.safetensors \[model.layers.1.mlp.experts.down_proj\]: "
                                              r"shape \[8, 128, 32\] does not match the config's \[8, 64, 64\]"):
        open_checkpoint(path)


def test_detection_picks_each_format(tmp_path):
    for fmt in ("gpt-oss", "mixtral", "qwen-moe", "fused"):
        assert open_checkpoint(make_tiny(tmp_path / fmt, fmt, "--layers", "1")).spec.format == fmt
    # Like an openai/gpt-oss-* download: original/ next to top-level HF weights -> gpt-oss.
    (tmp_path / "gpt-oss" / "original").rename(tmp_path / "fused" / "original")
    assert open_checkpoint(tmp_path / "fused").spec.format == "gpt-oss"
    assert open_checkpoint(tmp_path / "fused", "fused").spec.format == "fused"


def test_a_file_truncated_after_opening_is_a_short_read_naming_it(tmp_path):
    ck = open_checkpoint(make_tiny(tmp_path / "m", "mixtral"))
    r = ck.locate(2, 5).ranges[0]
    os.truncate(ck.root / r.file, r.offset + r.length // 2)
    with pytest.raises(CheckpointError, match=rf"{r.file}.*short read of expert 2/5"):
        ck.read_raw(2, 5)
