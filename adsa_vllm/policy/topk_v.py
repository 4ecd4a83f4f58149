"""TopK-V (ADSA, arXiv 2506.18226 Eqs. 2-5): rate tokens by the cosine similarity of their value vectors.

A token's redundancy is its mean cosine similarity to the candidate tokens. With unit values v̂ this is
v̂_i · mean_j(v̂_j), so the paper's O(N²) pairwise matrix reduces to one mean vector per head: O(N).
A block's similarity is the mean over its tokens and the heads. The paper is ambiguous about the direction:
keep="diverse" keeps the least similar blocks (Eq. 4 as read by its reviewers), keep="similar" the most similar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs


@dataclass(frozen=True)
class TopKV(BlockScorer):
    name = "topk_v"
    keep: str = "diverse"

    def __post_init__(self):
        if self.keep not in ("diverse", "similar"):
            raise ValueError(f"keep={self.keep!r}: choose 'diverse' or 'similar'")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        v = torch.nn.functional.normalize(x.values.float(), dim=-1)            # [R, C, bs, H, D]
        w = x.valid.to(v.dtype)[:, :, None, None, None]
        count = (x.valid.sum(1).clamp(min=1) * v.shape[2]).to(v.dtype)         # tokens per row
        mean = (v * w).sum(dim=(1, 2)) / count[:, None, None]                   # [R, H, D]
        sim = (v * mean[:, None, None]).sum(-1).mean(dim=(2, 3))                # [R, C]
        return -sim if self.keep == "diverse" else sim
