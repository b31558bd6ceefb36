"""Transformers MoE models through the pipeline: generate() with experts served from the store gives the
resident model's tokens and logits, bit for bit, for every supported architecture.

Each checkpoint is written by `make-model --format hf` in its architecture's published layout; the
resident reference is transformers' own `from_pretrained` of that checkpoint (eager experts), so a
layout read wrongly anywhere (names, gate/up order, MXFP4 rows, dense layers) changes the logits.
The VRAM budget holds top_k + 1 experts: nearly every expert of every step is evicted and reloaded.
"""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from adapters.hf_models import ARCHS  # noqa: E402
from adapters.store import StoreCheckpoint  # noqa: E402
from pipeline.hf import load_offloaded  # noqa: E402
from pipeline.vram_arena import VramArena  # noqa: E402
from tests.helpers_models import make_tiny  # noqa: E402

PROMPT, NEW = 40, 32
# CUDA where there is one: the same comparison then runs the GPU's kernels on both sides
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARCH_EXTRA = {"deepseek_v3": ("--dense-layers", "1", "--shared-expert"), "qwen2_moe": ("--shards", "3"),
              "glm4_moe": ("--dense-layers", "1", "--shared-expert")}


def resident(model_dir):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    kw = {"quantization_config": Mxfp4Config(dequantize=True)} if ARCHS[_model_type(model_dir)].expert_layout == "mxfp4" \
        else {}
    return AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation="eager", device_map=DEVICE, **kw)


def _model_type(model_dir) -> str:
    import json

    return json.loads((model_dir / "config.json").read_text())["model_type"]


def pack(model_dir) -> None:
    """The store load_offloaded makes when given no store= (MODEL/expert_store)."""
    from pipeline.hf.load import default_store

    default_store(model_dir, ARCHS[_model_type(model_dir)], progress=False)


def tight_vram(model_dir) -> int:
    """top_k + 1 experts' VRAM slots (dense on the CPU): constant eviction."""
    store = StoreCheckpoint(model_dir / "expert_store")
    return (store.spec.top_k + 1) * VramArena.slot_bytes_for(store, "dense")


def greedy(model, ids, mask=None):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)


def assert_same(ref, got):
    assert torch.equal(ref.sequences, got.sequences)
    assert len(ref.logits) == len(got.logits) == NEW
    for step, (a, b) in enumerate(zip(ref.logits, got.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {a: make_tiny(root / a, "hf", "--arch", a, *ARCH_EXTRA.get(a, ())) for a in ARCHS}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_generate_matches_the_resident_model_bit_for_bit(checkpoints, arch):
    model_dir = checkpoints[arch]
    ref = resident(model_dir)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, ref.config.vocab_size, (1, PROMPT), generator=g)
    # a batch of 3 prompts of different lengths, left-padded
    lens = (PROMPT, PROMPT - 9, PROMPT - 23)
    batch = torch.zeros(3, PROMPT, dtype=torch.long)
    mask = torch.zeros(3, PROMPT, dtype=torch.long)
    for r, n in enumerate(lens):
        batch[r, PROMPT - n:] = torch.randint(2, ref.config.vocab_size, (n,), generator=g)
        mask[r, PROMPT - n:] = 1
    ids, batch, mask = ids.to(DEVICE), batch.to(DEVICE), mask.to(DEVICE)
    want_greedy, want_batch = greedy(ref, ids), greedy(ref, batch, mask)
    torch.manual_seed(11)
    want_sampled = ref.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.5,
                                pad_token_id=0, eos_token_id=None)

    pack(model_dir)
    # lookahead on (the defaults leave it off where RAM holds the store, as 64 MiB does): its scores
    # ride on the same host copy as the routing, and must not change a bit
    with load_offloaded(model_dir, vram=tight_vram(model_dir), ram="64MiB", progress=False, lookahead=True) as model:
        assert model.config._experts_implementation == "moe_cache"
        assert all(p.device.type == "meta" for n, p in model.named_parameters() if ".experts." in n)
        assert_same(want_greedy, greedy(model, ids))
        assert_same(want_batch, greedy(model, batch, mask))
        torch.manual_seed(11)
        got = model.generate(ids, max_new_tokens=NEW, do_sample=True, top_k=20, temperature=1.5,
                             pad_token_id=0, eos_token_id=None)
        assert torch.equal(want_sampled, got)
        st = model.moe_cache.stats()
    sched = st.pipeline.scheduler
    assert sched.evictions_vram > NEW, "the budget was meant to force evictions"
    assert st.lookahead and st.lookahead_recall is not None and 0 <= st.lookahead_recall <= 1


def test_the_lookahead_is_on_by_default_only_where_ram_cannot_hold_the_store(checkpoints):
    from pipeline.hf.load import lookahead_pays

    model_dir = checkpoints["qwen3_moe"]
    pack(model_dir)
    store = StoreCheckpoint(model_dir / "expert_store")
    every = store.spec.num_layers * store.spec.num_experts * store.index.max_read_length
    assert not lookahead_pays(store, every) and lookahead_pays(store, every - 1)
    ids = torch.tensor([[5, 6, 7, 8]], device=DEVICE)
    for ram, on in ((every, False), (every // 2, True)):
        with load_offloaded(model_dir, vram=tight_vram(model_dir), ram=ram, progress=False) as model:
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
            st = model.moe_cache.stats()
            predictor = model.moe_cache.pipeline.config.predictor
        assert st.lookahead is on and (st.lookahead_recall is not None) is on
        assert (predictor == "fusion") is on  # the predictor that reads the scores, only with them
    with pytest.raises(ValueError, match="lookahead='yes': True, False or 'auto'"):
        load_offloaded(model_dir, vram=tight_vram(model_dir), ram=every, progress=False, lookahead="yes")


def test_without_store_the_checkpoint_is_packed_first(tmp_path):
    model_dir = make_tiny(tmp_path / "m", "hf", "--arch", "mixtral")
    assert not (model_dir / "expert_store").exists()
    with load_offloaded(model_dir, vram="1MiB", ram="1MiB", progress=False) as model:
        out = model.generate(torch.tensor([[5, 6, 7]], device=DEVICE), max_new_tokens=3, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    assert (model_dir / "expert_store" / "store.json").is_file()
    assert out.shape == (1, 6)
    assert model.moe_cache.pipeline._closed  # `with` closed it


def test_gpt_oss_with_experts_kept_in_their_stored_mxfp4_form_decodes_the_same(checkpoints):
    """The form a GPU picks for an MXFP4 store (slots hold the MXFP4 bytes, decoded at use into
    top_k dense views), forced here: a prefill's 8 experts then run in groups of 2 views."""
    model_dir = checkpoints["gpt_oss"]
    pack(model_dir)
    ids = torch.randint(2, 512, (1, PROMPT), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    want = greedy(resident(model_dir), ids)
    from pipeline.decode_at_use import view_bytes_for

    store = StoreCheckpoint(model_dir / "expert_store")
    k = store.spec.top_k  # k dense views and k + 1 stored slots: eviction on most fetches
    vram = view_bytes_for(store, k) + (k + 1) * VramArena.slot_bytes_for(store, "stored")
    with load_offloaded(model_dir, vram=vram, ram="64MiB", progress=False, vram_form="stored") as model:
        assert model.moe_cache.stats().pipeline.vram_form == "stored"
        assert_same(want, greedy(model, ids))
