"""Random baseline: a uniform random subset of the candidates at each selection, reproducible from the seed.

The score is an integer hash of (seed, block index, position), so the same choice comes out on any device, in any
batch order, and in the reference and the vLLM path alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs

_MASK = (1 << 31) - 1


@dataclass(frozen=True)
class RandomBlocks(BlockScorer):
    name = "random"
    reads_kv = False
    seed: int = 0

    def score(self, x: ScoreInputs) -> torch.Tensor:
        h = x.block_index.to(torch.int64) * 2654435761 + (x.positions.to(torch.int64)[:, None] * 40503
                                                          + self.seed * 97 + 12345)
        for _ in range(3):  # xorshift-multiply rounds, kept in 31 bits so int64 never overflows
            h = (h ^ (h >> 13)) & _MASK
            h = (h * 1103515245 + 12345) & _MASK
        return h.to(torch.float32) / _MASK
