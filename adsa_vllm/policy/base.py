"""A block scorer rates candidate KV blocks; higher = keep. Pure torch, no vLLM.

Scorers work on a batch of R sequences at once (the vLLM worker scores every sequence due for a selection in one
call per layer; the reference passes R=1). Candidates are padded to C blocks per row; `valid` marks real ones.
A scorer returns one float32 score per (row, candidate), averaged over heads; the tracker sums them over layers
(one block id spans every layer, so one decision serves them all). Subclasses implement only `score()`
(kvpress style); `BlockScorer.registry` maps config names to classes. A scorer that reads no K/V (`reads_kv`
False: streaming, random) is scored once per selection instead of once per layer; a scorer whose score of one
layer is a function of per-block summaries may also offer `summarize` / `score_summaries` (TopK-V), so the worker
reads each block's K/V once in its lifetime instead of at every selection.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ScoreInputs:
    keys: torch.Tensor | None    # [R, C, block_size, num_kv_heads, head_dim] candidate blocks of one layer (post-RoPE);
    values: torch.Tensor | None  # [R, C, block_size, num_kv_heads, head_dim]   None for scorers with reads_kv False
                                 #   and for query-dependent ones (they read keys and the query)
    valid: torch.Tensor          # [R, C] bool, False on padding
    block_index: torch.Tensor    # [R, C] int64 logical block indices
    positions: torch.Tensor      # [R] int64 position of each row's query
    query: torch.Tensor | None   # [R, num_heads, head_dim] decode queries (post-RoPE); None unless needs_query
    scale: float                 # softmax scale of the attention
    layer: int | torch.Tensor = 0   # the layer scored, or [R] int64 one per row (head_split's head classes)


def from_settings(cls: type, settings: dict):
    """An instance of the scorer dataclass `cls` built from the settings it has fields for (e.g. keep=, seed=);
    the others are ignored, so a caller can pass every policy setting it holds."""
    return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})


class BlockScorer:
    name: ClassVar[str]
    needs_query: ClassVar[bool] = False   # scored with the decode query (saved by the forward)
    reads_kv: ClassVar[bool] = True       # False: the score depends on positions only; computed once, not per layer
    registry: ClassVar[dict[str, type["BlockScorer"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if getattr(cls, "name", None):
            BlockScorer.registry[cls.name] = cls

    def score(self, x: ScoreInputs) -> torch.Tensor:
        """[R, C] float32 scores; higher means keep. Entries where `valid` is False are ignored by the caller."""
        raise NotImplementedError
