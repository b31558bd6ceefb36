"""Bad input to the transformers integration: each is one line naming the thing and the fix, raised before
a pipeline or a model is built; and `prefetch-bench generate` end to end on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from pipeline.hf import load_offloaded  # noqa: E402
from pipeline.hf.load import default_store  # noqa: E402
from adapters.hf_models import ARCHS  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.helpers_models import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-errors")
    a = make_tiny(root / "a", "hf", "--arch", "qwen3_moe", seed=1)
    b = make_tiny(root / "b", "hf", "--arch", "qwen3_moe", seed=2)
    default_store(a, ARCHS["qwen3_moe"], progress=False)
    return a, b


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg
    return msg


def test_a_store_made_from_another_checkpoint_names_its_source(two_models):
    a, b = two_models
    with pytest.raises(ValueError) as e:
        load_offloaded(b, store=a / "expert_store", vram="1MiB", ram="1MiB", progress=False)
    msg = one_line(e.value)
    assert f"was made from {a.resolve()}" in msg and str(b) in msg and "precompute --model" in msg


def test_a_model_without_moe_layers_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                       "num_hidden_layers": 2}))
    with pytest.raises(ValueError) as e:
        load_offloaded(tmp_path, vram="1MiB", ram="1MiB")
    msg = one_line(e.value)
    assert "'llama' is not a Mixture-of-Experts model" in msg and "supported: gpt_oss, mixtral" in msg


def test_an_unsupported_moe_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "num_experts": 16}))
    with pytest.raises(ValueError) as e:
        load_offloaded(tmp_path, vram="1MiB", ram="1MiB")
    assert "'jamba' is not a supported MoE architecture; supported: gpt_oss, mixtral, qwen2_moe" in one_line(e.value)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json; give the folder of a transformers checkpoint"):
        load_offloaded(tmp_path, vram="1MiB", ram="1MiB")


@pytest.mark.parametrize("version", ["5.10.0", "6.0.0", "4.57.1"])
def test_a_transformers_version_outside_the_range_is_refused(two_models, monkeypatch, version):
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(ImportError) as e:
        load_offloaded(two_models[0], vram="1MiB", ram="1MiB")
    msg = one_line(e.value)
    assert f"transformers {version} is outside the tested range >=5.17,<6" in msg and "pip install" in msg


def test_a_budget_below_one_layers_working_set_is_refused_with_the_numbers(two_models):
    from adapters.store import StoreCheckpoint

    store = StoreCheckpoint(two_models[0] / "expert_store")
    one_expert = store.spec.expert_bytes + 4096
    with pytest.raises(ValueError) as e:
        load_offloaded(two_models[0], vram=one_expert, ram="1MiB", progress=False)
    msg = one_line(e.value)
    assert f"top-{store.spec.top_k} working set" in msg and "give vram at least" in msg


def test_make_model_hf_needs_an_arch_and_names_the_valid_ones(tmp_path):
    from adapters.cli.make_model import main

    assert main(["--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert main(["--format", "hf", "--arch", "bert", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_benchmark_runs_every_method_on_the_cpu(two_models, tmp_path, bin_env):
    out = tmp_path / "gen.json"
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "prefetch-bench"), "generate", "--model", str(two_models[0]),
                        "--vram", "1.0", "--vram", "0.5", "--ram", "1.0", "--prompt-tokens", "12", "--new-tokens", "4",
                        "--batch", "1", "--baselines", "--repeat", "2", "--json", str(out)],
                       capture_output=True, text=True, env=bin_env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["vram"] for row in report["rows"]] == ["0.5"] * 5 + ["1.0"] * 5  # smallest budget first
    half = {row["method"]: row for row in report["rows"][:5]}
    full = {row["method"]: row for row in report["rows"][5:]}
    # --ram 1.0 holds the store, so ours' defaults leave the lookahead off and the baseline turns it on
    assert set(half) == {"resident", "ours", "ours-lookahead", "on-demand", "accelerate"}
    assert half["accelerate"]["status"].startswith("skipped: accelerate offloads to a GPU")
    assert full["accelerate"]["status"].startswith("skipped: the budget holds every expert")
    assert full["on-demand"]["measured_at_vram"] == "0.5"  # budget-free: run once
    assert full["ours"]["vram_hit_rate"] == 1.0  # a share of 1.0 holds every expert
    for rows in (half, full):
        for name in ("resident", "ours", "ours-lookahead", "on-demand"):
            row = rows[name]
            assert row["status"] == "ok", row["status"]
            for field in ("prefill_s", "decode_tok_s", "peak_rss_bytes", "tokens_equal_resident", "vs_resident"):
                assert row[field] is not None, (name, field)
            assert len(row["decode_tok_s_runs"]) == len(row["vs_resident_runs"]) == 2  # two interleaved rounds
            assert row["peak_vram_bytes"] is None  # no GPU
            assert row["tokens_equal_resident"] is True
            assert len(row["tokens"]) == 1 and len(row["tokens"][0]) == 4
        assert rows["resident"]["vs_resident"] == 1.0 and rows["resident"]["decode_ms"] is None
    for name in ("ours", "ours-lookahead", "on-demand"):
        row = half[name]
        assert row["bytes_moved"] > 0 and row["vram_hit_rate"] is not None
        assert row["stall_s"] >= 0
        d = row["decode_ms"]
        assert d["step"] > 0 and d["fetch"] > 0 and d["math"] > 0 and d["fetch"] >= d["stall"] >= 0
        assert abs(d["step"] - (d["routing_wait"] + d["lookahead"] + d["fetch"] + d["math"] + d["rest"])) < 1e-6
    assert half["ours-lookahead"]["lookahead_recall"] is not None and half["ours"]["lookahead_recall"] is None
    assert "decode tok/s" in r.stdout and "ours-lookahead" in r.stdout and "routing wait" in r.stdout
    assert "round 2/2" in r.stderr


def test_generate_refuses_a_budget_below_top_k_with_the_fix(two_models, tmp_path, bin_env):
    r = subprocess.run([sys.executable, str(ROOT / "bin" / "prefetch-bench"), "generate", "--model", str(two_models[0]),
                        "--vram", "1.5"], capture_output=True, text=True, env=bin_env, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "--vram 1.5 holds 0 experts" in r.stderr and "or a fraction >=" in r.stderr


@pytest.mark.parametrize("views", [0, 1])
def test_fewer_dense_views_than_top_k_is_refused(tmp_path, views):
    model = make_tiny(tmp_path / "m", "hf", "--arch", "gpt_oss")  # an MXFP4 store: slots can hold the stored form
    with pytest.raises(ValueError) as e:
        load_offloaded(model, vram="1MiB", ram="1MiB", progress=False, vram_form="stored", vram_views=views)
    assert one_line(e.value).startswith(f"vram_views={views}: transformers' experts compute on dense tensors and one token "
                                        "needs top_k=2 of them at once")


def test_a_store_of_another_architecture_is_refused_by_its_files(two_models, tmp_path):
    other = make_tiny(tmp_path / "mixtral", "hf", "--arch", "mixtral")
    with pytest.raises(ValueError) as e:
        load_offloaded(other, store=two_models[0] / "expert_store", vram="1MiB", ram="1MiB", progress=False)
    assert "(model.safetensors differs)" in one_line(e.value)


@pytest.mark.parametrize("damage", ["missing", "reshaped"])
def test_a_checkpoint_lacking_or_misshaping_a_non_expert_tensor_names_it(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    model = make_tiny(tmp_path / "m", "hf", "--arch", "qwen3_moe")
    default_store(model, ARCHS["qwen3_moe"], progress=False)
    weights = load_file(model / "model.safetensors")
    if damage == "missing":
        del weights["model.norm.weight"]
    else:
        weights["model.norm.weight"] = weights["model.norm.weight"][:-1].clone()
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    # the experts' bytes are untouched, but the file changed: pass its store explicitly past the
    # source check by rebuilding it
    import shutil

    shutil.rmtree(model / "expert_store")
    default_store(model, ARCHS["qwen3_moe"], progress=False)
    with pytest.raises(ValueError) as e:
        load_offloaded(model, vram="1MiB", ram="1MiB", progress=False)
    msg = one_line(e.value)
    if damage == "missing":
        assert "tensor model.norm.weight missing for the model's model.norm.weight" in msg
    else:
        assert "model.norm.weight has shape [63], the model's model.norm.weight needs [64]" in msg


def test_an_experts_module_not_prepared_by_offload_experts_says_how(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.hf.experts import register

    model = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "m", "hf", "--arch", "olmoe"))
    model.set_experts_implementation(register())
    with pytest.raises(RuntimeError, match=r"OlmoeExperts runs the 'moe_cache' experts implementation but was not "
                                           r"prepared by pipeline.hf.offload_experts"):
        model(torch.tensor([[3, 4]]))


def test_a_method_that_fails_to_load_drops_out_with_its_reason_and_the_others_still_run(two_models, tmp_path):
    from pipeline.bench.generate_method import MethodRun
    from pipeline.bench.generate_rounds import run_budget

    model = two_models[0]
    base = dict(model=str(model), vram_bytes=1 << 30, ram=str(1 << 30), prompt_tokens=8, new_tokens=3, batch=1)
    said = []
    resident, broken = run_budget([MethodRun(method="resident", store=str(model / "expert_store"), **base),
                                   MethodRun(method="ours", store=str(tmp_path / "no-store"), **base)],
                                  rounds=2, say=said.append)
    assert resident.status == "ok" and len(resident.decode_tok_s_runs) == 2
    assert broken.status.startswith("failed (exit 1): ") and "no-store" in broken.status
    assert said[0] == "loaded resident" and len(said) == 3
