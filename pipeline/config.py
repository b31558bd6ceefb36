"""The pipeline's configuration: a frozen, validated struct, also loadable from TOML or JSON.

Sizes are bytes or strings with a unit (`"6GiB"`, `"512MiB"`, `"24GB"`); budgets are
checked against the store when the pipeline opens (`PipelineConfig.check_budgets`), so an
impossible budget fails with the numbers before anything is allocated.
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import msgspec

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEVICES = ("auto", "cuda", "cpu")
# "auto" and the forms a slot can hold (pipeline.vram_arena.FORMS; not imported: this module needs no torch)
VRAM_FORMS = ("auto", "dense", "stored")


def parse_size(value: int | str, what: str = "size") -> int:
    """`6GiB` -> 6442450944; plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} {value!r} does not parse; write bytes or a number with a unit "
                             f"such as 512MiB, 6GiB, 24GB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n == 0 and float(m.group(1)) > 0:  # e.g. "0.5": a fraction of all experts, meant for prefetch-bench
            raise ValueError(f"{what} {value!r} is less than one byte; give bytes or a size such as 512MiB or 6GiB "
                             f"(fractions of all experts are prefetch-bench's --vram/--ram)")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


class PipelineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    store: str  # packed expert store directory (bin/precompute)
    vram: int | str  # VRAM budget for expert slots
    ram: int | str  # pinned host RAM budget for expert slots
    policy: str = "nextuse"
    # A predictor spec, "name" or "name:key=value,...", as prefetch-bench takes it; the default is
    # the registry's (policies.cache.registry.DEFAULT_PREDICTOR, what the benchmarks call ours);
    # None for policies that take none.
    predictor: str | None = "ewma:alpha=0.05"
    predictor_options: dict[str, float | int | str] = {}
    # Fields of the policy's config (its config_type), e.g. {"prefetch_min_prob": 0.2} for
    # nextuse; the budgets and the model's shape come from vram, ram and the store.
    policy_options: dict[str, float | int | str | bool] = {}
    device: str = "auto"  # auto: CUDA when available, else the VRAM tier lives on the CPU
    # What a VRAM slot holds for an mxfp4 store (pipeline/vram_arena.py): "dense", the decoded
    # bf16 tensors (decoded once per copy), or "stored", the MXFP4 bytes as stored, 3.8x more
    # experts in the same budget, each decoded at use into one of top_k dense views (whose
    # bytes come out of the budget). No difference for bf16/fp16 stores. "auto" (default):
    # stored on a CUDA device with Triton when it holds more experts than dense and dense
    # cannot hold them all, else dense (pipeline.assembly.resolve_vram_form; the H100 replay
    # measured stored 1.4x dense at 10% and 25% budgets). stats().vram_form says which.
    vram_form: str = "auto"
    # vram_form="stored": how many dense views, i.e. the most experts one fetch may ask for
    # (a prefill fetching the union of its rows' experts needs more than top_k); None = top_k.
    # 0: no dense views and no decode: fetch hands out each expert's stored tensors (MXFP4
    # blocks and scales, biases: views of its VRAM slot), for math that reads MXFP4 itself
    # (pipeline/kernels/mxfp4_kernel.py); the whole budget is slots.
    vram_views: int | None = None
    readers: int | None = None  # reader processes; None = the pool's default for the disk
    read_timeout_s: float = 10.0  # a read taking longer kills and replaces its reader
    read_attempts: int = 3  # tries of one read (fresh reader each time) before it is an error
    verify_checksums: bool = True  # readers check each expert's crc32 against store.json
    # Read the store with O_DIRECT (default): disk reads cost what they cost, and the page
    # cache keeps no second copy of experts the RAM tier already holds. False reads through the
    # page cache, for a store read again and again with memory to hold it twice (a benchmark
    # that opens a pipeline per method on a RAM tier holding every expert). The bytes are the
    # same either way; stats().readers.reads_o_direct says which reads used O_DIRECT.
    o_direct: bool = True
    prefetch_reads: int = 8  # prefetch disk reads in flight at once (credits)
    prefetch_copies: int = 4  # prefetch H2D copies in flight at once (credits)
    actor_queue: int = 256  # activation events queued for the policy actor (events)
    # Run the policy actor in a process of its own (policies.process_actor), not on the
    # pipeline's loop thread: there its work, and the loop's wake-up for every event, take the
    # GIL the decode loop needs. On an H200 host (replay, qwen1.5 at full size, MXFP4 math,
    # --vram 0.1) ours ran 116.4 tok/s in a process against 75.8 on the loop thread. Costs a
    # process start at open (~0.3 s) and a socket hop per event and plan. False: in-process
    # (what tests that reach into the policy object need).
    policy_process: bool = True
    close_timeout_s: float = 10.0  # close() returns within about this, whatever is in flight
    # The pipeline's loop thread (scheduler, policy actor) shares the GIL with the decode loop;
    # Python hands the GIL to a waiting thread only every switch interval (5 ms by default),
    # so a fetch could wait that long behind a policy computation. open() sets this
    # process-wide value while the pipeline is open and restores the old one at close;
    # None leaves the interpreter's setting alone.
    gil_switch_interval_s: float | None = 0.0002

    def __post_init__(self) -> None:
        parse_size(self.vram, "vram")
        parse_size(self.ram, "ram")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} unknown; valid: {', '.join(DEVICES)}")
        if self.vram_form not in VRAM_FORMS:
            raise ValueError(f"vram_form {self.vram_form!r} unknown; valid: {', '.join(VRAM_FORMS)}")
        if self.gil_switch_interval_s is not None and not 0 < self.gil_switch_interval_s <= 1:
            raise ValueError(f"gil_switch_interval_s must be in (0, 1] seconds or None, got {self.gil_switch_interval_s}")
        for name in ("read_timeout_s", "close_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("read_attempts", "prefetch_reads", "prefetch_copies", "actor_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vram_views is not None and self.vram_views < 0:
            raise ValueError(f"vram_views must be >= 0 (0: hand out the stored tensors) or None (top_k), "
                             f"got {self.vram_views}")
        if self.readers is not None and self.readers < 1:
            raise ValueError(f"readers must be >= 1, got {self.readers}")

    @property
    def vram_bytes(self) -> int:
        return parse_size(self.vram, "vram")

    @property
    def ram_bytes(self) -> int:
        return parse_size(self.ram, "ram")


def load_config(path: str | Path, **overrides) -> PipelineConfig:
    """Read a PipelineConfig from a .toml or .json file; keyword overrides win. A relative `store`
    in the file is taken from the file's folder (data/configs/ names the store `make bench` builds)."""
    path = Path(path)
    try:
        text = path.read_bytes()
        data = tomllib.loads(text.decode()) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read pipeline config ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: pipeline config must be a table/object")
    if isinstance(data.get("store"), str) and not Path(data["store"]).is_absolute():
        data["store"] = str(path.parent / data["store"])  # a relative store is found from the file's folder
    data.update(overrides)
    for key in ("vram", "ram"):
        if isinstance(data.get(key), float):  # e.g. vram = 0.1: a share of experts is a benchmark's notion
            raise ValueError(f"{path}: {key} = {data[key]} is a fraction; the pipeline's budgets are bytes or a "
                             f"size string, e.g. {key} = \"6GiB\" (fractions of all experts are prefetch-bench's "
                             f"--{key})")
    try:
        return msgspec.convert(data, PipelineConfig)
    except (msgspec.ValidationError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
