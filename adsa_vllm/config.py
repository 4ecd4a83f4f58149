"""ADSA settings: one validated dataclass, resolved per sequence into a `BlockLayout` (no vLLM import).

Global knobs come from ``--additional-config '{"adsa": {...}}'``; a request may override them with
``SamplingParams(extra_args={"adsa": {...}})``. Every error names the offending key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adsa_vllm.errors import ADSAConfigError
from adsa_vllm.policy import (KEEP_DIRECTIONS, POLICIES,   # names from the scorer registries (policy/ never imports us)
                              SCORERS_BY_GRANULARITY, resolve_scorers)

if TYPE_CHECKING:
    from adsa_vllm.policy.layout import BlockLayout


# The random policy hashes the seed in int64 arithmetic kept to 31 bits (policy/random_blocks.py): a seed past 32
# bits could overflow there, inside the worker.
MAX_SEED = 2**32 - 1
# What one selection decides: "block" keeps whole KV blocks, one decision for every layer and head (the vLLM path);
# "token" keeps single tokens, a decision per (layer, KV head) (adsa_vllm/policy/token_select.py).
GRANULARITIES = tuple(SCORERS_BY_GRANULARITY)


@dataclass(frozen=True)
class ADSAConfig:
    # Kept KV per sequence. int: tokens; float in (0, 1]: fraction of the image tokens; None: never evict.
    budget: int | float | None = 0.5
    # Tokens always kept from the start. None: the condition tokens plus the first image row (global style).
    prefix: int | None = None
    # Most recent tokens always kept. None: one image row + 1, so the token above the query is always present.
    local: int | None = None
    # How the older ("previous") blocks compete for the rest of the budget. Default "random": on the 10k-image
    # quality table (benchmarks/results/fashion_granularity_h200.md) it is the best or within 0.0016 bits/token of
    # the best at 25-75% and the fastest (TopK-V, the paper's policy, loses to it at every budget; still selectable).
    policy: str = "random"
    # topk_v only: keep the blocks whose values are least similar to the rest ("diverse", the paper's Eq. 4
    # as its reviewers read it) or the most similar ones ("similar", the paper's prose). Measure both.
    keep: str = "diverse"
    # Minimum decode steps between two selections. None: block_size (one selection per new block).
    refresh: int | None = None
    # Seed of the random policy.
    seed: int = 0
    # Unit of selection: "block" (one decision for all layers and heads) or "token" (each layer and KV head keeps
    # its own tokens in the kept blocks; adsa_vllm/worker/token_gather.py).
    granularity: str = "block"
    # head_split only: each attention head's class, "L" (local: keeps the window) or "S" (sink: keeps its
    # top-attended tokens), one character per head, layers separated by "/" (e.g. "LSLS/SSLL"); measured by
    # `adsa-vllm calibrate-heads MODEL_DIR`. None: every head a sink head (head_split then equals attention_mass).
    heads: str | None = None

    def __post_init__(self):
        b = self.budget
        if b is not None:
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise ADSAConfigError(f"adsa.budget={b!r}: use a token count (int), a fraction in (0, 1], or null")
            if isinstance(b, float) and not 0.0 < b <= 1.0:
                raise ADSAConfigError(f"adsa.budget={b}: a fractional budget must lie in (0, 1]; "
                                      "give larger budgets as a token count")
            if isinstance(b, int) and b <= 0:
                raise ADSAConfigError(f"adsa.budget={b}: a token budget must be positive")
        if self.policy not in POLICIES:
            raise ADSAConfigError(f"adsa.policy={self.policy!r} is unknown; choose one of {', '.join(POLICIES)}")
        if self.keep not in KEEP_DIRECTIONS:
            raise ADSAConfigError(f"adsa.keep={self.keep!r} is unknown; choose one of {', '.join(KEEP_DIRECTIONS)}")
        for name in ("prefix", "local", "refresh"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "prefix" else 1)):
                raise ADSAConfigError(f"adsa.{name}={v!r}: must be a positive token/step count or null")
        if self.granularity not in GRANULARITIES:
            raise ADSAConfigError(f"adsa.granularity={self.granularity!r} is unknown; choose one of "
                                  f"{', '.join(map(repr, GRANULARITIES))}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ADSAConfigError(f"adsa.seed={s!r}: use an integer in 0..{MAX_SEED} (the random policy's seed)")
        if self.heads is not None:
            rows = self.heads.split("/") if isinstance(self.heads, str) else None
            if not rows or any(not r or set(r) - {"L", "S"} for r in rows) or len(set(map(len, rows))) != 1:
                raise ADSAConfigError(f"adsa.heads={self.heads!r}: use one 'L' (local) or 'S' (sink) per head, the "
                                      "same count per layer, layers separated by '/' (`adsa-vllm calibrate-heads "
                                      "MODEL_DIR` measures it)")
        resolve_scorers(self)   # the policy has a scorer at this granularity (else the error names the fix)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ADSAConfig":
        return cls().merged(d)

    def merged(self, overrides: dict | None) -> "ADSAConfig":
        if not overrides:
            return self
        if not isinstance(overrides, dict):
            raise ADSAConfigError(f'"adsa" must be a JSON object, e.g. {{"adsa": {{"budget": 0.5}}}}, '
                                  f"got {type(overrides).__name__}")
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(map(repr, set(overrides) - valid))   # repr: keys may be of mixed types
        if unknown:
            raise ADSAConfigError(f"unknown adsa setting(s) [{', '.join(unknown)}]; valid keys are {sorted(valid)}")
        return dataclasses.replace(self, **overrides)

    def layout(self, *, block_size: int, cls_token_num: int, grid_size: int, lag: int = 0) -> BlockLayout:
        from adsa_vllm.policy.layout import BlockLayout   # lazy and one-way: policy/ never imports this module
        return BlockLayout.from_config(self, block_size=block_size, cls_token_num=cls_token_num, grid_size=grid_size,
                                       lag=lag)
