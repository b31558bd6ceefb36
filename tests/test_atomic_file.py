"""Output files appear whole or not at all, as ordinary files, and an unwritable output path
is refused before the long work starts (adapters/atomic_file.py and every command using it)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.bench.cli import main as bench
from adapters.atomic_file import check_output_path, replaced_atomically
from policies.synthetic import SyntheticConfig, generate
from policies.traces import load_trace, save_trace


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_replaced_file_appears_whole_with_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "r.json"
        with replaced_atomically(target) as tmp, open(tmp, "w") as f:
            f.write("{}")
            assert not target.exists()  # nothing under the real name until the end
        assert target.read_text() == "{}" and _mode(target) == 0o644  # not mkstemp's 0600
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_an_error_leaves_neither_the_file_nor_a_temporary(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), replaced_atomically(target) as tmp, open(tmp, "w") as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_check_output_path_names_the_flag_and_the_fix(tmp_path):
    check_output_path(tmp_path / "ok.json", "--json")  # a new file in an existing folder
    with pytest.raises(ValueError, match=r"^--json .*/nope/r.json: its folder .*/nope does not exist; create it"):
        check_output_path(tmp_path / "nope" / "r.json", "--json")
    with pytest.raises(ValueError, match=r"^--out .*: is a folder; give a file name inside it$"):
        check_output_path(tmp_path, "--out")


def test_a_link_is_checked_where_the_writer_writes_its_folder(tmp_path):
    """The temporary goes beside the link, and the rename replaces the link itself: the link's
    own folder is the one to check, not its target's."""
    link = tmp_path / "r.json"
    link.symlink_to(tmp_path / "missing-folder" / "r.json")  # dangling
    check_output_path(link, "--json")
    with replaced_atomically(link) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert not link.is_symlink() and link.read_text() == "{}"


def test_check_output_path_refuses_a_folder_it_may_not_write(tmp_path, monkeypatch):
    # The permission itself is the kernel's (root may write anywhere, and CI runs as root): the
    # check asks os.access, so that is what says no here.
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro else real(p, mode))
    with pytest.raises(ValueError, match=r"^--json .*/ro/r.json: its folder .*/ro is not writable; write elsewhere$"):
        check_output_path(ro / "r.json", "--json")
    check_output_path(tmp_path / "r.json", "--json")  # its neighbour is fine


@pytest.fixture
def trace_file(tmp_path):
    """A small synthetic trace, saved under umask 022."""
    path = tmp_path / "t.npz"
    old = os.umask(0o022)
    try:
        save_trace(generate(SyntheticConfig(layers=2, experts=4, top_k=1, requests=1, prompt_tokens=2,
                                            decode_tokens=6, seed=0)), path)
    finally:
        os.umask(old)
    return path


def test_saved_traces_are_ordinary_files(trace_file):
    assert _mode(trace_file) == 0o644 and load_trace(trace_file).num_layers == 2


@pytest.mark.parametrize("command", [
    ["simulate", "--vram-capacity", "0.5", "--ram-capacity", "0.5", "--expert-bytes", "1000"],
    ["quality", "--predictor", "ewma"],
    ["horizon", "--vram-capacity", "0.5"],
])
def test_a_missing_output_folder_is_refused_before_the_run(trace_file, tmp_path, capsys, monkeypatch, command):
    """The one-line error comes before any replay: the replays are made to fail if reached."""
    import policies.horizon_bound as hb
    import policies.quality as q
    import policies.simulator as sim

    def reached(*a, **k):
        raise AssertionError("the run started before the output path was checked")

    for mod, name in ((sim, "simulate"), (q, "evaluate"), (hb, "horizon_loads")):
        monkeypatch.setattr(mod, name, reached)
    missing = tmp_path / "no-such-folder" / "out.json"
    rc = bench([command[0], "--trace", str(trace_file), *command[1:], "--json", str(missing)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--json {missing}: its folder" in err and len(err.strip().splitlines()) == 1, err
    assert not missing.parent.exists()
