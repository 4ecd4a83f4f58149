"""Row-anchored eviction (after LineAR, arXiv 2512.04857): keep the first image rows (anchors) and the most recent
rows, evict the middle rows that receive the least attention. The unit is an image row, not a block.

Anchors and recent rows are the layout's: the prefix (condition + the first image row by default; `adsa.prefix`
widens it to more anchor rows) and the local window (one row + 1). This policy ranks the middle rows: under the
current query, per head, a row's mass is the softmax probability summed over its candidate tokens (a row cut by
the prefix or window counts only its candidate part).
  block: a block's score is the mean of its tokens' row masses (a block that straddles two rows gets the
         token-weighted mix), averaged over heads. Blocks stay the unit that is freed, with no copy; a row of the
         28x28 model is 28 tokens, 1.75 blocks of 16, so the top blocks are the high-mass rows, nearly whole.
  token: each (layer, KV head) rates every candidate token with its own row mass, so a head keeps whole rows of
         its own (ties inside a row go to the more recent token).
Both need the decode query, like attention_mass (worker/saved_queries.py). Rows come from the layout
(`cond_tokens`, `row_tokens`): image row of position p = (p - cond_tokens) // row_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.attention_mass import candidate_probs
from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.token_scores import TokenInputs, TokenScorer, query_probs


def _rows(positions: torch.Tensor, cond_tokens: int, row_tokens: int) -> torch.Tensor:
    if row_tokens <= 0:
        raise ValueError("row_anchored needs the image geometry (row_tokens > 0): build it from a BlockLayout")
    return (positions - cond_tokens).clamp(min=0) // row_tokens


def row_mass(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """p [..., N] attention probabilities, rows [..., N] (broadcast to p) int64 image rows -> [..., N]: the summed
    probability of each token's row."""
    rows = rows.expand_as(p)
    per_row = torch.zeros(*p.shape[:-1], int(rows.max()) + 1, dtype=p.dtype, device=p.device)
    return per_row.scatter_add_(-1, rows, p).gather(-1, rows)


@dataclass(frozen=True)
class RowAnchored(BlockScorer):
    name = "row_anchored"
    needs_query = True
    cond_tokens: int = 0
    row_tokens: int = 0

    def score(self, x: ScoreInputs) -> torch.Tensor:
        r, c, bs = x.keys.shape[:3]
        p = candidate_probs(x)                                                  # [R, H, C*bs]
        pos = (x.block_index[:, :, None] * bs + torch.arange(bs, device=x.block_index.device)).reshape(r, 1, c * bs)
        mass = row_mass(p, _rows(pos, self.cond_tokens, self.row_tokens))     # [R, H, C*bs]
        return mass.reshape(r, -1, c, bs).mean(dim=(1, 3))


@dataclass(frozen=True)
class TokenRowAnchored(TokenScorer):
    name = "row_anchored"
    needs_query = True
    reads = ("keys",)
    cond_tokens: int = 0
    row_tokens: int = 0

    def score(self, x: TokenInputs) -> torch.Tensor:
        r, n, hkv, _ = x.keys.shape
        p = query_probs(x)                                                       # [R, H, N]
        rep = p.shape[1] // hkv
        pos = x.positions.to(torch.int64)
        pos = pos.repeat_interleave(rep, dim=1) if pos.dim() == 3 else pos       # [N] or [R, H, N]
        mass = row_mass(p, _rows(pos, self.cond_tokens, self.row_tokens))
        return mass.reshape(r, hkv, rep, n).mean(2)
