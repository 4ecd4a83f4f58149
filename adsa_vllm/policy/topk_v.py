"""TopK-V (ADSA, arXiv 2506.18226 Eqs. 2-5): rate tokens by the cosine similarity of their value vectors.

A token's redundancy is its mean cosine similarity to the candidate tokens. With unit values v̂ this is
v̂_i · mean_j(v̂_j), so the paper's O(N²) pairwise matrix reduces to one mean vector per head: O(N).
A block's similarity is the mean over its tokens and the heads. The paper is ambiguous about the direction:
keep="diverse" keeps the least similar blocks (Eq. 4 as read by its reviewers), keep="similar" the most similar.

The score decomposes over blocks: with S_b = sum over block b's tokens of v̂ (one [H, D] summary per block and
layer), mean = sum_b S_b / tokens and sim_b = S_b · mean / (block_size * H). So `summarize` reduces a block once,
when it first becomes a candidate, and `score_summaries` rates all candidates of all layers from the summaries
alone (the vLLM worker keeps them per physical block); `score` is the direct formula, the reference's oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs


@dataclass(frozen=True)
class TopKV(BlockScorer):
    name = "topk_v"
    KEEPS: ClassVar[tuple[str, ...]] = ("diverse", "similar")   # the directions `keep` may take
    keep: str = "diverse"

    def __post_init__(self):
        if self.keep not in self.KEEPS:
            raise ValueError(f"keep={self.keep!r}: choose one of {', '.join(self.KEEPS)}")

    def score(self, x: ScoreInputs) -> torch.Tensor:
        v = torch.nn.functional.normalize(x.values.float(), dim=-1)            # [R, C, bs, H, D]
        w = x.valid.to(v.dtype)[:, :, None, None, None]
        count = (x.valid.sum(1).clamp(min=1) * v.shape[2]).to(v.dtype)         # tokens per row
        mean = (v * w).sum(dim=(1, 2)) / count[:, None, None]                   # [R, H, D]
        sim = (v * mean[:, None, None]).sum(-1).mean(dim=(2, 3))                # [R, C]
        return -sim if self.keep == "diverse" else sim

    @staticmethod
    def summarize(values: torch.Tensor) -> torch.Tensor:
        """values [n, block_size, H, D] of one layer -> [n, H, D] float32: the sum of the unit value vectors."""
        return torch.nn.functional.normalize(values.float(), dim=-1).sum(1)

    def score_summaries(self, summaries: torch.Tensor, valid: torch.Tensor, block_size: int) -> torch.Tensor:
        """summaries [R, C, L, H, D] of the candidates in every layer -> [R, C] float32, equal to `score` summed
        over the L layers."""
        s = summaries.float()
        w = valid.to(s.dtype)[:, :, None, None, None]
        count = (valid.sum(1).clamp(min=1) * block_size).to(s.dtype)            # tokens per row
        mean = (s * w).sum(1) / count[:, None, None, None]                      # [R, L, H, D]
        sim = torch.einsum("rclhd,rlhd->rc", s, mean) / (block_size * s.shape[3])
        return -sim if self.keep == "diverse" else sim
