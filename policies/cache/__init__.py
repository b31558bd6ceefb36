"""Cache policies: where each expert should be (VRAM / RAM / disk).

- `base.CachePolicy`: the interface (`on_activation`, `access`, `complete`, `where`,
  `used_bytes`, `check`) and the byte-counted two-tier book; `base.CacheConfig`.
- `registry.make_policy(name, predictor=None, **config)`, `policy_names()`;
  `DEFAULT_POLICY` / `DEFAULT_PREDICTOR` are the pair the simulator recommends.
- Policies: `lru`, `lru-per-layer`, `lfu` (no predictor), `watermark` and `nextuse`
  (predictor-driven; `nextuse` is the default).
- `belady.belady_min(accesses, capacity_experts) -> (hits, loads)`: the offline optimum.
"""
