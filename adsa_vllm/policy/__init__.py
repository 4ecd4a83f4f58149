"""ADSA selection policies (pure torch, no vLLM import): layout math, block scorers, the per-sequence tracker, and
its batched form `SlotTrackers` (many sequences as arrays; `LockstepTrackers` drives it for rows at one position).

Each scorer module registers its class in `BlockScorer.registry` when imported; importing them all here (and
nowhere else) keeps the arrows one-way: scorers -> base, this package -> scorers.
"""

from adsa_vllm.policy import attention_mass, random_blocks, streaming, topk_v
from adsa_vllm.policy.base import BlockScorer, ScoreInputs, from_settings
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.lockstep import LockstepTrackers, selection_schedule
from adsa_vllm.policy.slot_trackers import SlotTrackers, pack_rows
from adsa_vllm.policy.tracker import SequenceTracker, top_blocks, top_blocks_rows

SCORER_MODULES = (attention_mass, random_blocks, streaming, topk_v)   # imported for their registration
POLICIES = tuple(sorted(BlockScorer.registry))        # the policy names settings accept, from the registry
KEEP_DIRECTIONS = topk_v.TopKV.KEEPS                  # TopK-V's `keep`, the only direction setting


def make_scorer(policy: str, **settings) -> BlockScorer:
    """The scorer of `policy`, built from the settings it has fields for (e.g. keep=, seed=); others are ignored,
    so a caller can pass every policy setting it holds."""
    cls = BlockScorer.registry.get(policy)
    if cls is None:
        raise ValueError(f"unknown ADSA policy {policy!r}; choose one of {sorted(BlockScorer.registry)}")
    return from_settings(cls, settings)


__all__ = ["KEEP_DIRECTIONS", "POLICIES", "BlockLayout", "BlockScorer", "LockstepTrackers", "ScoreInputs",
           "SequenceTracker", "SlotTrackers", "make_scorer", "pack_rows", "selection_schedule", "top_blocks",
           "top_blocks_rows"]
