"""`ADSASpec`: the KV-cache spec of ADSA layers. Registered with `ADSAManager` (see adsa_vllm/plugin.py).

It is a FullAttentionSpec (same page layout, grouped with full attention) that carries the engine-wide
`ADSASettings` (frozen, so the spec stays hashable and picklable): all the scheduler side needs to resolve a
request's `BlockLayout`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import FullAttentionSpec

from adsa_vllm.settings import ADSASettings


@dataclass(frozen=True, kw_only=True)
class ADSASpec(FullAttentionSpec):
    adsa: ADSASettings

    def layout(self, overrides: dict | None = None, cls_token_num: int | None = None):
        return self.adsa.layout(overrides, cls_token_num)

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, adsa: ADSASettings):
        fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)}
        return cls(**fields, adsa=adsa)

    @classmethod
    def merge(cls, specs: list["ADSASpec"]) -> "ADSASpec":
        # FullAttentionSpec.merge rebuilds with a fixed field list and would drop ours.
        settings = {s.adsa for s in specs}
        if len(settings) != 1:
            raise ValueError(f"all ADSA layers of one KV cache group must share their settings, got {settings}")
        return cls.from_full(FullAttentionSpec.merge(specs), settings.pop())  # type: ignore[arg-type]

    def max_memory_usage_bytes(self, vllm_config) -> int:
        # What one request can ever hold: the startup check and the logged max concurrency use it.
        layout = self.layout()
        max_len = min(vllm_config.model_config.max_model_len, layout.seq_len)
        return min(layout.held_bound, cdiv(max_len, self.block_size)) * self.page_size_bytes
