"""Policies by name: `make_policy(name, predictor=None, **config)`.

Config keywords are validated (types, unknown fields) by converting them to the policy's
frozen config struct; an unknown policy name raises `UnknownNameError` (a KeyError) that
lists the valid names.
"""
from __future__ import annotations

import importlib

import msgspec

from adapters.errors import UnknownNameError

from ..predictors.base import Predictor
from .base import CachePolicy

# name -> "module:Class", imported lazily so listing names stays cheap.
POLICIES: dict[str, str] = {
    "lru": "policies.cache.lru:LRUPolicy",
    "lru-per-layer": "policies.cache.lru:LRUPerLayerPolicy",
    "lfu": "policies.cache.lfu:LFUPolicy",
    "watermark": "policies.cache.watermark:WatermarkPolicy",
    "nextuse": "policies.cache.nextuse:NextUsePolicy",
    "lru-lookahead": "policies.cache.lru_lookahead:LRULookaheadPolicy",
    "hawkeye": "policies.cache.hawkeye:HawkeyePolicy",
}
DEFAULT_POLICY = "nextuse"
# The default pair: EWMA with a slow decay, blended in `nextuse` with the long-run frequency
# (alpha 0.05 / frequency_weight 0.2 beat the registry's alpha 0.2 on all three real traces).
DEFAULT_PREDICTOR = "ewma:alpha=0.05"


def policy_class(name: str) -> type[CachePolicy]:
    if name not in POLICIES:
        raise UnknownNameError("policy", name, list(POLICIES))
    module, cls = POLICIES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_policy(name: str, predictor: Predictor | None = None, **config) -> CachePolicy:
    """Build policy `name` from keyword config (see its `config_type`); ValueError if invalid."""
    cls = policy_class(name)
    try:
        cfg = msgspec.convert(config, type=cls.config_type)
    except msgspec.ValidationError as e:
        raise ValueError(f"policy {name!r}: bad config: {e}") from None
    return cls(cfg, predictor)


def parse_predictor_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name:key=value,key=value` -> (name, options); values are numbers or text."""
    return _parse_spec(spec, "predictor", "ewma:alpha=0.05")


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """`name` or `name:key=value,...`: options are fields of the policy's config."""
    return _parse_spec(spec, "policy", "nextuse:prefetch_min_prob=0.2")


def fixed_options(base: dict, options: dict) -> list[str]:
    """The names in `options` that `base` already sets and a caller may not override: the
    model's shape, the budgets and the timing come from the store or trace and the flags.
    `containment` and `vram_headroom` are defaults derived from the budgets, which a policy
    option may change."""
    return sorted(set(options) & (set(base) - {"containment", "vram_headroom"}))


def _parse_spec(spec: str, kind: str, example: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"{kind} spec {spec!r}: option {item!r} is not key=value (e.g. {example})")
        try:
            options[key] = int(value)
        except ValueError:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = value
    return name, options


def policy_names() -> list[str]:
    return sorted(POLICIES)


def uses_predictor(name: str) -> bool:
    return policy_class(name).uses_predictor
