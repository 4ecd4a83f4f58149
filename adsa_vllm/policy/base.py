"""A block scorer rates candidate KV blocks of one layer; higher = keep. Pure torch, no vLLM.

Every scorer sees the same inputs (shapes below) and returns one float32 score per candidate block, averaged over
heads. The tracker sums the scores over layers (one block id spans every layer, so one decision serves them all).
Subclasses implement only `score()` (kvpress style); `registry` maps config names to classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ScoreInputs:
    keys: torch.Tensor           # [n, block_size, num_kv_heads, head_dim], candidate blocks of one layer
    values: torch.Tensor         # [n, block_size, num_kv_heads, head_dim]
    query: torch.Tensor | None   # [num_heads, head_dim], the decode query (post-RoPE); None unless needs_query
    block_index: torch.Tensor    # [n] int64 logical block indices
    position: int                # position of the query
    scale: float                 # softmax scale of the attention


class BlockScorer:
    name: ClassVar[str]
    needs_query: ClassVar[bool] = False
    registry: ClassVar[dict[str, type["BlockScorer"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "name", None):
            BlockScorer.registry[cls.name] = cls

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """[n] float32 scores for the n candidate blocks of one layer; higher means keep."""
        raise NotImplementedError


def make_scorer(policy: str, *, keep: str = "diverse", seed: int = 0) -> BlockScorer:
    # Import the policy modules so their classes are registered.
    from adsa_vllm.policy import attention_mass, random_blocks, streaming, topk_v  # noqa: F401
    cls = BlockScorer.registry.get(policy)
    if cls is None:
        raise ValueError(f"unknown ADSA policy {policy!r}; choose one of {sorted(BlockScorer.registry)}")
    if policy == "topk_v":
        return cls(keep=keep)
    if policy == "random":
        return cls(seed=seed)
    return cls()
