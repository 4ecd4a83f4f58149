"""ADSA selection policies (pure torch, no vLLM import): layout math, block scorers, the per-sequence tracker, and
its batched form `SlotTrackers` (many sequences as arrays; `LockstepTrackers` drives it for rows at one position).

Each scorer module registers its class in `BlockScorer.registry` (token scorers: `TokenScorer.registry`) when
imported; importing them all here (and nowhere else) keeps the arrows one-way: scorers -> base, this package ->
scorers. `resolve_scorers` is the one rule for which scorers run for a setting: settings validation, the worker, its
CUDA-graph support and the reference decoders all ask it.
"""

from adsa_vllm.errors import ADSAConfigError
from adsa_vllm.policy import attention_mass, head_split, random_blocks, row_anchored, streaming, topk_v
from adsa_vllm.policy.base import BlockScorer, ScoreInputs, from_settings
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.lockstep import LockstepTrackers, selection_schedule
from adsa_vllm.policy.slot_trackers import SlotTrackers, pack_rows
from adsa_vllm.policy.token_scores import TokenScorer
from adsa_vllm.policy.token_select import OldestBlocks
from adsa_vllm.policy.tracker import SequenceTracker, top_blocks, top_blocks_rows

# imported for their registration
SCORER_MODULES = (attention_mass, head_split, random_blocks, row_anchored, streaming, topk_v)
POLICIES = tuple(sorted(BlockScorer.registry))        # the policy names settings accept, from the registry
KEEP_DIRECTIONS = topk_v.TopKV.KEEPS                  # TopK-V's `keep`, the only direction setting
# Each granularity's policy scorers (its keys are the granularities settings accept: adsa_vllm.config.GRANULARITIES).
SCORERS_BY_GRANULARITY = {"block": BlockScorer.registry, "token": TokenScorer.registry}


def make_scorer(policy: str, **settings) -> BlockScorer:
    """The scorer of `policy`, built from the settings it has fields for (e.g. keep=, seed=); others are ignored,
    so a caller can pass every policy setting it holds."""
    cls = BlockScorer.registry.get(policy)
    if cls is None:
        raise ValueError(f"unknown ADSA policy {policy!r}; choose one of {sorted(BlockScorer.registry)}")
    return from_settings(cls, settings)


def resolve_scorers(settings) -> tuple[BlockScorer, TokenScorer | None]:
    """(block scorer, token scorer or None): what runs for `settings`, an `ADSAConfig` or a `BlockLayout` (its
    policy, its settings and granularity; a layout adds the image geometry). Block granularity: the policy's block
    scorer alone. Token granularity: the blocks kept are the oldest candidates (`OldestBlocks`: the slots each head
    fills with its own winners, see worker/token_gather.py), and the policy's token scorer picks each head's tokens.
    Raises ADSAConfigError naming the fix when the policy has no scorer at that granularity, so no setting can pass
    validation and fail later."""
    policy, granularity = settings.policy, settings.granularity
    registry = SCORERS_BY_GRANULARITY[granularity]
    cls = registry.get(policy)
    if cls is None:
        elsewhere = [g for g, scorers in SCORERS_BY_GRANULARITY.items() if policy in scorers]
        fix = f', or keep {policy!r} with "granularity": "{elsewhere[0]}"' if elsewhere else ""
        raise ADSAConfigError(f"adsa.policy={policy!r} has no {granularity}-granularity scorer: with "
                              f'"granularity": "{granularity}" choose one of {", ".join(sorted(registry))}{fix}')
    scorer = from_settings(cls, dict(keep=settings.keep, seed=settings.seed, heads=settings.heads,
                                     cond_tokens=getattr(settings, "cond_tokens", 0),
                                     row_tokens=getattr(settings, "row_tokens", 0)))
    return (OldestBlocks(), scorer) if granularity == "token" else (scorer, None)


def needs_query(settings) -> bool:
    """Whether the scorers of `settings` score with the step's decode query, which each attention layer's forward
    must save for them (worker/saved_queries.py; request_validation.py says where it cannot)."""
    return any(s is not None and s.needs_query for s in resolve_scorers(settings))


__all__ = ["KEEP_DIRECTIONS", "POLICIES", "SCORERS_BY_GRANULARITY", "BlockLayout", "BlockScorer", "LockstepTrackers",
           "ScoreInputs", "SequenceTracker", "SlotTrackers", "make_scorer", "needs_query", "pack_rows",
           "resolve_scorers", "selection_schedule", "top_blocks", "top_blocks_rows"]
