"""Damaged stores: every kind of damage is an error naming the file (and the expert), never a crash.

Each test copies one good store, damages the copy, and checks both the reader
(`StoreCheckpoint`, CheckpointError) and `precompute validate` (non-zero, one line).
"""
from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from adapters.cli.make_model import main as make_model
from adapters.errors import CheckpointError
from adapters.precompute.cli import main
from adapters.store import StoreCheckpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("good")
    with redirect_stdout(io.StringIO()):
        assert make_model(["--format", "gpt-oss", "--preset", "tiny", "--seed", "5", "--out", str(base / "m")]) == 0
        assert main(["--model", str(base / "m"), "--out", str(base / "s"), "--workers", "0", "--no-progress"]) == 0
    return base / "m", base / "s"


@pytest.fixture
def store(good, tmp_path) -> Path:
    dst = tmp_path / "s"
    shutil.copytree(good[1], dst)
    return dst


def validate(store: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = main(["validate", "--store", str(store), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return rc, err


def edit_index(store: Path, fn) -> None:
    idx = json.loads((store / "store.json").read_text())
    fn(idx)
    (store / "store.json").write_text(json.dumps(idx))


def test_the_good_store_validates(good, capsys):
    assert main(["validate", "--store", str(good[1]), "--no-progress", "--samples", "0"]) == 0
    assert "OK" in capsys.readouterr().out


def test_truncated_layer_file(store, capsys):
    f = store / "layer_001.safetensors"
    f.write_bytes(f.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=r"layer_001\.safetensors.*store\.json says"):
        StoreCheckpoint(store)
    rc, err = validate(store, capsys)
    assert rc == 2 and "layer_001.safetensors" in err and "precompute --force" in err


def test_missing_layer_file(store, capsys):
    (store / "layer_002.safetensors").unlink()
    rc, err = validate(store, capsys)
    assert rc == 2 and "layer_002.safetensors" in err and "missing" in err


@pytest.mark.parametrize("damage", [b"{not json", b"", b'{"version": 1}', b"[1, 2, 3]"])
def test_corrupted_store_json(store, capsys, damage):
    (store / "store.json").write_bytes(damage)
    with pytest.raises(CheckpointError, match=r"store\.json"):
        StoreCheckpoint(store)
    rc, err = validate(store, capsys)
    assert rc == 2 and "store.json" in err
    # precompute will not silently overwrite what it cannot read
    rc = main(["--model", str(store), "--out", str(store), "--no-progress"])
    assert rc == 2


def test_corrupted_store_json_refuses_precompute_without_force(good, store, capsys):
    (store / "store.json").write_bytes(b"{garbage")
    assert main(["--model", str(good[0]), "--out", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "store.json" in err and "--force" in err
    assert (store / "store.json").read_bytes() == b"{garbage"


def test_corrupted_layer_header(store, capsys):
    f = store / "layer_000.safetensors"
    data = bytearray(f.read_bytes())
    assert data[8:9] == b"{"
    data[8:9] = b"X"
    f.write_bytes(bytes(data))
    rc, err = validate(store, capsys)
    assert rc == 2 and "layer_000.safetensors" in err and "JSON" in err


def test_layer_header_disagreeing_with_the_index(store, capsys):
    # Same length, valid JSON, but two experts' names swapped: the header lies about expert 1.
    f = store / "layer_002.safetensors"
    data = f.read_bytes()
    swapped = data.replace(b'"expert.1.mlp1_bias"', b'"expert.#.mlp1_bias"', 1)
    swapped = swapped.replace(b'"expert.2.mlp1_bias"', b'"expert.1.mlp1_bias"', 1)
    swapped = swapped.replace(b'"expert.#.mlp1_bias"', b'"expert.2.mlp1_bias"', 1)
    assert swapped != data and len(swapped) == len(data)
    f.write_bytes(swapped)
    rc, err = validate(store, capsys)
    assert rc == 2 and "layer_002.safetensors" in err and "expert 2/1" in err


def test_out_of_range_offset_in_store_json(store, capsys):
    def push(idx):
        idx["experts"][15]["offset"] += 4096 * 1000  # layer 1, expert 7: still aligned, past EOF

    edit_index(store, push)
    with pytest.raises(CheckpointError, match=r"layer_001\.safetensors.*expert 1/7.*past the end"):
        StoreCheckpoint(store)
    rc, err = validate(store, capsys)
    assert rc == 2 and "expert 1/7" in err


@pytest.mark.parametrize("field, value, needle", [
    ("offset", 4097, "aligned"),
    ("length", 0, "aligned and consistent"),
    ("offset", -4096, "overlaps"),
])
def test_inconsistent_entries_in_store_json(store, capsys, field, value, needle):
    def bad(idx):
        x = idx["experts"][9]
        x[field] = value if field != "offset" or value > 0 else idx["experts"][8]["offset"]

    edit_index(store, bad)
    with pytest.raises(CheckpointError, match=rf"store\.json.*expert 1/1.*{needle}"):
        StoreCheckpoint(store)


def test_flipped_byte_in_expert_data(store, capsys):
    st = StoreCheckpoint(store)
    x = st.expert_range(2, 6)
    f = store / x.file
    data = bytearray(f.read_bytes())
    data[x.offset + x.length // 3] ^= 0x40
    f.write_bytes(bytes(data))
    rc, err = validate(store, capsys)
    assert rc == 1 and "layer_002.safetensors" in err and "expert 2/6" in err and "crc32" in err
    with pytest.raises(CheckpointError, match=r"layer_002\.safetensors.*expert 2/6"):
        st.verify(2, 6, st.read_expert(2, 6))
    st.verify(2, 5, st.read_expert(2, 5))  # its neighbours are intact


def test_store_that_differs_from_its_source(good, store, tmp_path, capsys):
    # A source with other weights: checksums pass, the bit-exact sample comparison fails.
    other = tmp_path / "other"
    with redirect_stdout(io.StringIO()):
        assert make_model(["--format", "gpt-oss", "--preset", "tiny", "--seed", "6", "--out", str(other)]) == 0
    rc, err = validate(store, capsys, "--model", str(other), "--samples", "2")
    assert rc == 1 and "expert 0/0" in err and "differs from the source" in err
