"""make-model: deterministic by seed, atomic output, one-line errors with exit 2."""
from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import adapters.synthetic as synthetic
from adapters.cli.make_model import main
from adapters.presets import PRESETS
from adapters.safetensors_io import read_header


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["gpt-oss", "mixtral", "qwen-moe", "fused"])
def test_same_seed_same_bytes_other_seed_differs(tmp_path, fmt):
    args = ["--format", fmt, "--preset", "tiny", "--layers", "2", "--shards", "2"]
    assert main([*args, "--seed", "7", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "7", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "8", "--out", str(tmp_path / "c")]) == 0
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert a == b
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == 2 and all(a[k] != c[k] for k in weights)


def test_gpt_oss_layout_and_weights_not_degenerate(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["--format", "gpt-oss", "--preset", "tiny", "--seed", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "expert size 6912 bytes" in printed
    f = out / "original" / "model.safetensors"
    hdr = read_header(f)
    e, h, i = 8, 64, 64
    assert hdr.tensors["block.0.mlp.mlp1_weight.blocks"].shape == (e, 2 * i, h // 32, 16)
    assert hdr.tensors["block.2.mlp.mlp2_weight.scales"].shape == (e, h, i // 32)
    assert hdr.tensors["block.1.mlp.gate.weight"].dtype == "BF16"
    with safe_open(str(f), framework="pt") as s:
        codes = s.get_tensor("block.0.mlp.mlp1_weight.blocks")
        scales = s.get_tensor("block.0.mlp.mlp1_weight.scales")
        bias = s.get_tensor("block.0.mlp.mlp1_bias")
    assert len(torch.unique(codes & 15)) == 16 and len(torch.unique(codes >> 4)) == 16
    assert 100 <= int(scales.min()) and int(scales.max()) <= 130
    assert bias.abs().max() > 0 and not torch.equal(bias[0], bias[1])


def test_presets_carry_real_dimensions():
    p = PRESETS["gpt-oss-20b"]
    assert (p.layers, p.experts, p.top_k, p.hidden, p.intermediate) == (24, 32, 4, 2880, 2880)
    p = PRESETS["gpt-oss-120b"]
    assert (p.layers, p.experts, p.top_k, p.hidden, p.intermediate) == (36, 128, 4, 2880, 2880)
    p = PRESETS["mixtral-8x7b"]
    assert (p.layers, p.experts, p.top_k, p.hidden, p.intermediate) == (32, 8, 2, 4096, 14336)
    p = PRESETS["qwen1.5-moe"]
    assert (p.layers, p.experts, p.top_k, p.hidden, p.intermediate, p.shared_intermediate) == (24, 60, 4, 2048, 1408, 5632)
    # gpt-oss-20b experts: per expert 3*2880*2880/2 code bytes + 3*2880*90 scales + 3*2880 bf16
    # biases = 13.24 MB; x 24 x 32 = 10.17 GB (the routers add ~4 MB).
    per_expert = 3 * 2880 * 2880 // 2 + 3 * 2880 * 90 + 3 * 2880 * 2
    d = synthetic.Dims(24, 32, 4, 2880, 2880)
    assert 0 < synthetic.needed_bytes("gpt-oss", d) - 768 * per_expert < 10e6


@pytest.mark.parametrize("argv, needle", [
    (["--format", "gguf"], "unknown format 'gguf'; valid: fused, gpt-oss, hf, mixtral, qwen-moe"),
    (["--format", "gpt-oss", "--preset", "llama"], "unknown preset 'llama'; valid: gpt-oss-120b, gpt-oss-20b"),
    (["--format", "gpt-oss", "--hidden", "48"], "--hidden 48 and --intermediate 64 must be multiples of 32"),
    (["--format", "gpt-oss", "--experts", "0"], "--experts must be positive"),
    (["--format", "gpt-oss", "--top-k", "9"], "--top-k 9 exceeds --experts 8"),
    (["--format", "gpt-oss", "--dense-layers", "1"], "only for qwen-moe"),
    (["--format", "qwen-moe", "--dense-layers", "-1"], "--dense-layers must be 0 or more"),
    (["--format", "qwen-moe", "--dense-layers", "3"], "--dense-layers 3 leaves no MoE layer out of 3"),
    (["--format", "mixtral", "--dtype", "F8"], "unknown dtype 'F8'; valid: BF16, F16, F32"),
    (["--format", "gpt-oss", "--shards", "0"], "--shards must be between 1"),
    (["--format", "gpt-oss", "--layers", "x"], "invalid int value: 'x'"),
    (["--format", "gpt-oss", "--workers", "0"], "--workers must be >= 1, got 0"),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "m"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("make-model: error:")
    assert not out.exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("workers", [0, True, 1.5])
def test_write_model_refuses_a_worker_count_that_is_not_a_positive_int(tmp_path, workers):
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        synthetic.write_model("gpt-oss", synthetic.Dims(layers=3, experts=8, top_k=2, hidden=64, intermediate=64), 0,
                              tmp_path / "m", workers=workers)
    assert not (tmp_path / "m").exists()


def test_refuses_non_empty_out(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    assert main(["--format", "gpt-oss", "--out", str(tmp_path / "m")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
    (tmp_path / "f").write_text("mine")
    assert main(["--format", "gpt-oss", "--out", str(tmp_path / "f")]) == 2
    assert "is a file; --out names the checkpoint folder to make" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"


def test_refuses_without_disk_space(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert main(["--format", "gpt-oss", "--preset", "gpt-oss-20b", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "needs 10.1" in err and "GB" in err and "0.00 GB free" in err
    assert not (tmp_path / "m").exists()


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic._piece

    def dying(*a):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return real(*a)

    monkeypatch.setattr(synthetic, "_piece", dying)
    assert main(["--format", "gpt-oss", "--out", str(tmp_path / "m"), "--workers", "1"]) == 2
    assert calls["n"] == 20
    assert list(tmp_path.iterdir()) == []


def test_a_failure_in_a_drawing_thread_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls, lock = {"n": 0}, threading.Lock()
    real = synthetic._piece

    def dying(*a):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 20:
            raise OSError(28, "No space left on device")
        return real(*a)

    monkeypatch.setattr(synthetic, "_piece", dying)
    assert main(["--format", "gpt-oss", "--out", str(tmp_path / "m"), "--workers", "3"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert 20 <= calls["n"] < 20 + 2 * 3 + 3  # the writer stopped at the failed piece, not at the end
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["gpt-oss", "mixtral"])
def test_drawing_threads_write_the_same_bytes(tmp_path, fmt):
    args = ["--format", fmt, "--preset", "tiny", "--layers", "2", "--shards", "2", "--seed", "3"]
    assert main([*args, "--workers", "1", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--workers", "4", "--out", str(tmp_path / "four")]) == 0
    one = _digest(tmp_path / "one")
    assert one == _digest(tmp_path / "four") and any(k.endswith(".safetensors") for k in one)


def test_interrupt_mid_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = synthetic._piece

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(synthetic, "_piece", interrupted)
    assert main(["--format", "mixtral", "--shards", "2", "--out", str(tmp_path / "m"), "--workers", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_from_killed_run_is_replaced(tmp_path):
    stale = tmp_path / "m.partial" / "original"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["--format", "gpt-oss", "--out", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m.partial").exists()
    assert read_header(tmp_path / "m" / "original" / "model.safetensors").tensors
