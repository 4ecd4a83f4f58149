"""StreamingLLM (arXiv 2309.17453): prefix ("attention sinks") + the most recent blocks, nothing chosen by content.

With the same budget as the other policies the top-k slots go to the newest candidates, i.e. a longer window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs


@dataclass(frozen=True)
class Streaming(BlockScorer):
    name = "streaming"
    reads_kv = False

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return x.block_index.to(torch.float32)
