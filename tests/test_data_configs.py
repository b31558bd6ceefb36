"""The example configurations in data/configs load as they are, and open a pipeline on the store
`make bench` builds (data/generated/default-replay-store) where their device is present."""
from __future__ import annotations

import pytest

from pipeline import ExpertPipeline, load_config
from pipeline.bench.default_cmd import GENERATED, MODEL_ARGS
from tests.conftest import ROOT, _has_cuda

CONFIGS = sorted((ROOT / "data" / "configs").glob("*.toml"))
STORE = GENERATED / "default-replay-store"


@pytest.fixture(scope="module")
def default_store():
    """The store `make bench` builds, built the same way when it is not there yet."""
    if not (STORE / "store.json").is_file():
        from adapters.cli.make_model import main as make_model
        from adapters.precompute.cli import main as precompute

        model = GENERATED / "default-replay-gpt-oss"
        if not (model / "original" / "config.json").exists():
            assert make_model([*MODEL_ARGS, "--out", str(model)]) == 0
        assert precompute(["--model", str(model), "--out", str(STORE), "--dtype", "mxfp4", "--workers", "0",
                           "--no-progress"]) == 0
    return STORE


def test_there_is_an_edge_box_a_single_h100_and_a_cpu_only_config():
    assert [p.name for p in CONFIGS] == ["cpu-only.toml", "edge-box.toml", "single-h100.toml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_loads_and_names_the_default_store(path):
    cfg = load_config(path)
    assert (ROOT / "data" / "configs" / cfg.store).resolve() == STORE.resolve()
    assert cfg.vram_bytes > 0 and cfg.ram_bytes >= cfg.vram_bytes


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_config_opens_a_pipeline_as_it_is(path, default_store):
    if load_config(path).device == "cuda" and not _has_cuda():
        pytest.skip("this configuration names a CUDA device")
    with ExpertPipeline.open_config(path) as pipe:
        tensors = pipe.fetch(0, [0, 1])
        assert len(tensors) == 2 and pipe.stats().vram_slots >= 2
