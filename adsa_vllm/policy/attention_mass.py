"""Attention-mass baseline (H2O-style, arXiv 2306.14048): keep the blocks the current query attends to most.

Per head, softmax of the scaled query-key logits over the candidate tokens; a block's mass is the sum over its
tokens, averaged over heads. Grouped-query heads share their KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs


@dataclass(frozen=True)
class AttentionMass(BlockScorer):
    name = "attention_mass"
    needs_query = True

    def score(self, x: ScoreInputs) -> torch.Tensor:
        n, bs, hkv, d = x.keys.shape
        q = x.query.float()                                             # [H, D]
        k = x.keys.float().reshape(n * bs, hkv, d)
        k = k.repeat_interleave(q.shape[0] // hkv, dim=1)               # [n*bs, H, D]
        logits = torch.einsum("hd,thd->ht", q, k) * x.scale             # [H, n*bs]
        mass = logits.softmax(dim=-1).reshape(-1, n, bs).sum(-1)        # [H, n]
        return mass.mean(0)
