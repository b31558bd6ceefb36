"""`precompute validate|stats|clean --model DIR` find the store where `precompute --model DIR` put it,
and validating against another checkpoint names the source the store records."""
from __future__ import annotations

from adapters.precompute.cli import main
from tests.helpers_models import make_tiny


def test_subcommands_find_the_default_store_of_a_model(tmp_path, capsys):
    model = make_tiny(tmp_path / "m", "mixtral")
    assert main(["--model", str(model), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["validate", "--model", str(model), "--no-progress"]) == 0
    assert f"store {model / 'expert_store'}: OK" in capsys.readouterr().out
    assert main(["stats", "--model", str(model)]) == 0
    assert "MoE layers" in capsys.readouterr().out
    assert main(["clean", "--model", str(model), "--force"]) == 0
    assert not (model / "expert_store" / "store.json").exists()


def test_a_subcommand_without_store_or_model_says_both(capsys):
    assert main(["stats"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("precompute stats: error: give --store DIR, or --model DIR for the store precompute made "
                   "there (DIR/expert_store)")


def test_validate_against_another_checkpoint_names_the_recorded_source(tmp_path, capsys):
    a = make_tiny(tmp_path / "a", "mixtral", seed=1)
    b = make_tiny(tmp_path / "b", "mixtral", seed=2)  # same shapes and names, other weights
    q = make_tiny(tmp_path / "q", "qwen-moe", seed=1)  # another format altogether
    assert main(["--model", str(a), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    store = str(a / "expert_store")
    assert main(["validate", "--store", store, "--model", str(b), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"differs from the source {b} (the store was made from {a.resolve()}, not from it)" in err
    assert main(["validate", "--store", store, "--model", str(q), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"was made from {a.resolve()} (mixtral); {q} does not open as that format" in err
    assert err.count("\n") == 1
