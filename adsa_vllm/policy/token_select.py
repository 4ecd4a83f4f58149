"""Token-level, per-(layer, KV head) selection (`ADSAConfig.granularity="token"`), for R sequences in lockstep.
Pure torch, no vLLM. The reference (adsa_vllm/reference/token_decoder.py) runs it as the oracle; the vLLM path
(adsa_vllm/worker/token_gather.py) makes the same decisions with `winners` and `OldestBlocks` below.

Semantics (issue 12, step 1):
  * When: the block-mode event schedule, unchanged. A `SequenceTracker` decides when a selection happens (the
    scores are requested in the forward at p, the selection is made at p + 1, `refresh` steps apart) and which
    positions are aged (out of the prefix and the local window). Every head keeps exactly `topk_tokens` aged
    tokens after a selection and gains one block of newly aged tokens per block of decoding, so a head's candidates
    always number block mode's candidate blocks x block_size and the schedule is the same (`selection_schedule`).
  * Prefix and local window: the layout's, in whole blocks (prefix_blocks * bs tokens from the start; the window
    from the block of t - local + 1 on), so block and token modes always keep the same prefix and window. With
    `layout.token_edges` (budgets below whole prefix and window blocks, policy/layout.py) both modes attend only
    the prefix and window tokens of those blocks (`BlockLayout.attended`, applied by the decoders' masks); the
    aged range, hence this selection, is the same.
  * Budget: topk_tokens = layout.topk_blocks * block_size per (layer, KV head), so both modes keep the same number
    of KV entries per head (with token edges too: the rest of the budget below a whole block is not used).
  * What: at each selection, for every (row, layer, KV head) separately, the candidates are the head's kept aged
    tokens plus the newly aged ones; it keeps the `topk_tokens` best by its own score (token_scores.py) and evicts
    the rest for good, as freed blocks never come back. Ties go to the more recent token (`select`), as block
    mode's go to the more recent block; so block-constant scores keep exactly block mode's blocks.
  * CFG: each half of a pair is its own row. With pairs = 0 its heads select for themselves ("separate"); with
    pairs = B, rows r and r + B are one pair and share every decision ("shared"): head h of layer l of both
    halves keeps the tokens best by the sum of the two halves' scores of that head (block mode's shared selection
    sums scores over both halves' heads the same way).
"""

from __future__ import annotations

import torch

from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.layout import BlockLayout
from adsa_vllm.policy.lockstep import selection_schedule
from adsa_vllm.policy.token_scores import TokenInputs, TokenScorer
from adsa_vllm.policy.tracker import top_blocks_rows


def select(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """scores [..., N], valid [..., N] bool -> keep mask [..., N]: the k best valid entries of every row (all of
    them if fewer), ties to the higher index (the more recent token), exactly `top_blocks_rows`' rule."""
    shape = scores.shape
    n = shape[-1]
    index = torch.where(valid, torch.arange(n, device=scores.device), -1).reshape(-1, n)
    k_rows = torch.full((index.shape[0],), k, dtype=torch.int64, device=scores.device)
    return top_blocks_rows(index, scores.reshape(-1, n), k_rows).reshape(shape)


def winners(scores: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """scores, positions [..., N] (every entry a candidate) -> [..., k] the column indices of the k best, in column
    order; ties go to the later position, as `select`'s go to the higher index. The vLLM path's per-head choice:
    its candidates are not in one position range, so the positions themselves break the ties."""
    shape, n = scores.shape, scores.shape[-1]
    k_rows = torch.full((scores.numel() // n,), k, dtype=torch.int64, device=scores.device)
    keep = top_blocks_rows(positions.reshape(-1, n), scores.reshape(-1, n), k_rows)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)    # kept columns first, in column order
    return order[:, :k].reshape(*shape[:-1], k)


def replacements(scores: torch.Tensor, positions: torch.Tensor, k: int):
    """scores, positions [..., N] whose first k entries are a head's slots (its kept tokens) and the rest newly aged
    tokens -> (dst, src, valid), each [..., min(k, N - k)]: the slot entries that the k best (as `winners` picks
    them) no longer hold, ascending, each paired with a new token that joins them (src, a column >= k, ascending);
    `valid` marks real pairs (as many as new tokens win). Overwriting dst with src leaves the slots holding exactly
    `winners`' tokens while moving only the newcomers (the vLLM path's copy; the order in the slots is free, as
    attention does not depend on it and K carries its position)."""
    shape, n = scores.shape, scores.shape[-1]
    k_rows = torch.full((scores.numel() // n,), k, dtype=torch.int64, device=scores.device)
    keep = top_blocks_rows(positions.reshape(-1, n), scores.reshape(-1, n), k_rows)
    w = min(k, n - k)
    dst = torch.argsort(keep[:, :k].to(torch.uint8), dim=1, stable=True)[:, :w]       # slot entries that lose
    src = torch.argsort((~keep[:, k:]).to(torch.uint8), dim=1, stable=True)[:, :w] + k   # new tokens that win
    valid = torch.arange(w, device=scores.device) < keep[:, k:].sum(1, keepdim=True)
    return tuple(t.reshape(*shape[:-1], w) for t in (dst, src, valid))


class OldestBlocks(BlockScorer):
    """The block decision under token granularity: keep the oldest candidates. Those are the sequence's top-k
    *slot* blocks (right after the prefix), into which each (layer, head) has copied its own best tokens by the time
    the decision frees the other candidates (adsa_vllm/worker/token_gather.py). Internal: not a policy name."""
    reads_kv = False

    def score(self, x: ScoreInputs) -> torch.Tensor:
        return -x.block_index.to(torch.float32)


class TokenTrackers:
    """Token-mode state of `rows` sequences at the same position, consulted from position `first` on:
      1. `begin_step(pos)`: select if the scores requested for `pos` arrived from every layer, else drop them.
      2. `evicted` [rows, layers, kv_heads, positions] bool: what each head no longer attends to.
      3. `scoring_request(pos)` -> the aged range (lo, hi) if a selection is due at pos + 1, else None; then
         `score_layer` for every layer inside this forward.
    """

    def __init__(self, layout: BlockLayout, scorer: TokenScorer, rows: int, layers: int, kv_heads: int, *,
                 first: int = 0, pairs: int = 0, device: torch.device | str | None = None):
        if pairs and rows != 2 * pairs:
            raise ValueError(f"pairs={pairs}: a CFG batch has 2 x pairs rows (conditional, then null), got {rows}")
        self.layout, self.scorer, self.pairs = layout, scorer, pairs
        self.schedule = selection_schedule(layout, first)
        self.topk_tokens = layout.topk_blocks * layout.block_size
        width = layout.num_blocks(layout.seq_len - 1) * layout.block_size
        self.evicted = torch.zeros(rows, layers, kv_heads, width, dtype=torch.bool, device=device)
        self.selections = 0
        self._pending: tuple[int, int, int] | None = None      # (position it decides at, lo, hi)
        self._scores: torch.Tensor | None = None                # [rows, layers, kv_heads, hi - lo]
        self._scored: set[int] = set()                          # layers that added scores

    # 1.
    def begin_step(self, pos: int) -> None:
        pend, self._pending = self._pending, None
        if pend is None or pend[0] != pos or len(self._scored) != self.evicted.shape[1]:
            return
        _, lo, hi = pend
        valid, scores = self.candidates(lo, hi), self._scores
        if self.pairs:   # one decision per pair: both halves hold the same candidates (checked), scores summed
            b = self.pairs
            if not torch.equal(valid[:b], valid[b:]):
                raise RuntimeError("the halves of a CFG pair hold different candidates under a shared selection")
            scores = (scores[:b] + scores[b:]).repeat(2, 1, 1, 1)
        keep = select(scores, valid, self.topk_tokens)
        self.evicted[..., lo:hi] |= valid & ~keep
        self.selections += 1

    # 3.
    def scoring_request(self, pos: int) -> tuple[int, int] | None:
        if pos not in self.schedule:
            return None
        lay, nxt = self.layout, pos + 1
        lo, hi = lay.prefix_blocks * lay.block_size, lay.local_start(nxt) * lay.block_size
        counts = self.candidates(lo, hi).sum(-1)
        want = self.schedule[pos] * lay.block_size
        if not bool((counts == want).all()):   # the schedule argument in the module docstring, checked
            raise RuntimeError(f"position {pos}: a head holds {counts.min()}..{counts.max()} candidate tokens, "
                               f"block mode's schedule says {want}")
        self._pending = (nxt, lo, hi)
        self._scores = torch.full((*self.evicted.shape[:3], hi - lo), float("-inf"), device=self.evicted.device)
        self._scored = set()
        return lo, hi

    def candidates(self, lo: int, hi: int) -> torch.Tensor:
        """[rows, layers, kv_heads, hi - lo] bool: each head's tokens of the aged range it still holds."""
        return ~self.evicted[..., lo:hi]

    def score_layer(self, layer: int, keys, values, query, pos: int, scale: float) -> None:
        """keys/values [rows, N, Hkv, D] of the requested range [lo, hi) in this layer; query [rows, H, D]."""
        _, lo, hi = self._pending
        x = TokenInputs(keys=keys, values=values, valid=self.candidates(lo, hi)[:, layer],
                        positions=torch.arange(lo, hi, device=keys.device), query_pos=pos, query=query,
                        scale=scale, layer=layer)
        self._scores[:, layer] = self.scorer.score(x).float()
        self._scored.add(layer)
