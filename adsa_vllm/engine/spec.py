"""`ADSASpec`: the KV-cache spec of ADSA layers. Registered with `ADSAManager` (see adsa_vllm/plugin.py).

It is a FullAttentionSpec (same page layout, grouped with full attention) that carries the engine-wide ADSA
settings as a JSON string (specs are hashed and pickled, so fields must be hashable) plus what the manager
needs to resolve a request's `BlockLayout`: condition length and grid size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec

from adsa_vllm.config import ADSAConfig


@dataclass(frozen=True, kw_only=True)
class ADSASpec(FullAttentionSpec):
    adsa_settings: str          # JSON of the engine-wide ADSAConfig
    cls_token_num: int
    grid_size: int
    lag: int = 0                # async scheduling returns evicted blocks one step later (see BlockLayout.lag)

    @property
    def defaults(self) -> ADSAConfig:
        return ADSAConfig(**json.loads(self.adsa_settings))

    def layout(self, overrides: dict | None = None):
        return self.defaults.merged(overrides).layout(block_size=self.block_size, cls_token_num=self.cls_token_num,
                                                      grid_size=self.grid_size, lag=self.lag)

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, defaults: ADSAConfig, cls_token_num: int, grid_size: int,
                  lag: int = 0):
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**fields, adsa_settings=json.dumps(dataclasses.asdict(defaults), sort_keys=True),
                   cls_token_num=cls_token_num, grid_size=grid_size, lag=lag)

    @classmethod
    def merge(cls, specs: list["ADSASpec"]) -> "ADSASpec":
        # FullAttentionSpec.merge rebuilds with a fixed field list and would drop ours.
        extra = {(s.adsa_settings, s.cls_token_num, s.grid_size, s.lag) for s in specs}
        if len(extra) != 1:
            raise ValueError(f"all ADSA layers of one KV cache group must share their settings, got {extra}")
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        settings, cls_token_num, grid_size, lag = extra.pop()
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**fields, adsa_settings=settings, cls_token_num=cls_token_num, grid_size=grid_size, lag=lag)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # What one request can ever hold: the startup check and the logged max concurrency use it.
        layout = self.layout()
        max_len = min(vllm_config.model_config.max_model_len, layout.seq_len)
        return min(layout.held_bound, cdiv(max_len, self.block_size)) * self.page_size_bytes
