"""ADSA selection policies (pure torch, no vLLM import): layout math, block scorers, per-sequence tracker."""

from adsa_vllm.policy.base import BlockScorer, ScoreInputs, make_scorer
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.tracker import SequenceTracker, top_blocks, top_blocks_rows

__all__ = ["BlockLayout", "BlockScorer", "ScoreInputs", "SequenceTracker", "make_scorer", "top_blocks", "top_blocks_rows"]
