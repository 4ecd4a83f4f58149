"""Attention-mass baseline (H2O-style, arXiv 2306.14048): keep the blocks the current query attends to most.

Per head, softmax of the scaled query-key logits over the candidate tokens; a block's mass is the sum over its
tokens, averaged over heads. Grouped-query heads share their KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.dense_attention import query_key_logits


@dataclass(frozen=True)
class AttentionMass(BlockScorer):
    name = "attention_mass"
    needs_query = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        r, c, bs = x.keys.shape[:3]
        return candidate_probs(x).reshape(r, -1, c, bs).sum(-1).mean(1)       # [R, H, C] block mass -> [R, C]


def candidate_probs(x: ScoreInputs) -> torch.Tensor:
    """[R, H, C*bs] float32: each query head's softmax probability of every candidate token under the current query
    (padding candidates 0); grouped-query heads share their KV head. The query-dependent block scorers
    (attention_mass, head_split, row_anchored) all start from it."""
    r, c, bs, hkv, d = x.keys.shape
    logits = query_key_logits(x.query, x.keys.reshape(r, c * bs, hkv, d), x.scale)   # [R, H, C*bs]
    tok_valid = x.valid[:, None, :, None].expand(r, 1, c, bs).reshape(r, 1, c * bs)
    return logits.masked_fill(~tok_valid, float("-inf")).softmax(-1)
