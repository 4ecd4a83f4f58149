"""Which logical KV blocks of a sequence are prefix, local window, or candidates for top-k eviction.

Block j holds positions [j*bs, (j+1)*bs). At a decode step the query sits at position t and its own K/V is written
into the *tail* block t // bs before attention, so the tail is always kept. Everything here is integer math on
positions, identical for the vLLM path and the plain-PyTorch reference.

Token edges (issue 24): a budget counts attended tokens, prefix + local window + top-k. Whole blocks are the unit
of memory, and normally of attention too: every token of a kept block is attended. When the budget is too small for
the prefix and window rounded up to whole blocks (28x28 at 10%: 78 tokens, while 2 prefix + 3 window blocks are 80),
the layout turns `token_edges` on: the prefix is exactly `prefix_tokens` and the window exactly the last
`local_tokens` positions, and the tokens of the prefix and window blocks outside them are held but not attended
(`attended`); top-k gets the whole blocks that the rest of the budget pays for, (budget - prefix - local) // bs,
attended whole. The blocks held are still prefix_blocks + local_blocks + topk_blocks (+ slack): each holds an
attended token, and every block without one is freed, as before. Settings whose block-rounded prefix and window
fit keep `token_edges` off and attend exactly what they did before. A budget below prefix + local tokens is
refused (ADSAConfigError naming both the budget of whole blocks and the least budget).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adsa_vllm.errors import ADSAConfigError

if TYPE_CHECKING:   # only for the annotation: adsa_vllm.config builds layouts, so it must not be imported here
    from adsa_vllm.config import ADSAConfig

SUPPORTED_BLOCK_SIZES = (16, 32)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    block_size: int
    prefix_tokens: int
    local_tokens: int
    budget_blocks: int     # most blocks kept right after a selection (prefix + local + top-k)
    refresh: int           # minimum decode steps between two selections
    seq_len: int           # longest sequence (condition + image tokens)
    policy: str
    keep: str
    seed: int
    lag: int = 0           # steps between a selection and the pool getting the blocks back, beyond the first
    granularity: str = "block"   # "token": each (layer, KV head) keeps its own tokens in the top-k blocks
    token_edges: bool = False    # prefix and window at token granularity (module docstring); set by from_config
    cond_tokens: int = 0         # condition tokens before the image, and tokens per image row: where the rows lie
    row_tokens: int = 0          #   (row_anchored scores rows); 0 where unknown
    heads: str | None = None     # head_split's head classes (ADSAConfig.heads)

    @classmethod
    def from_config(cls, config: "ADSAConfig", *, block_size: int, cls_token_num: int, grid_size: int,
                    lag: int = 0) -> "BlockLayout":
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ADSAConfigError(f"block size {block_size} is not supported by ADSA; use --block-size 16 or 32 "
                                  "(one block is the unit of eviction)")
        image_tokens = grid_size * grid_size
        seq_len = cls_token_num + image_tokens
        prefix = config.prefix if config.prefix is not None else cls_token_num + grid_size
        local = config.local if config.local is not None else grid_size + 1
        if prefix < cls_token_num:
            raise ADSAConfigError(f"adsa.prefix={prefix} would evict condition tokens; use at least "
                                  f"{cls_token_num} (the condition length)")
        if local < 2:
            raise ADSAConfigError(f"adsa.local={local}: the window must hold at least the query and its predecessor")
        max_blocks = cdiv(seq_len - 1, block_size)
        if config.budget is None:
            budget_tokens = seq_len
        elif isinstance(config.budget, float):  # a fraction of the image; 1.0 keeps everything
            budget_tokens = seq_len if config.budget >= 1.0 else int(config.budget * image_tokens)
        else:
            budget_tokens = config.budget
        # A budget that covers the whole sequence keeps every block (no rounding down to whole blocks).
        budget_blocks = max_blocks if budget_tokens >= seq_len else budget_tokens // block_size
        refresh = config.refresh if config.refresh is not None else block_size
        layout = cls(block_size=block_size, prefix_tokens=prefix, local_tokens=local, budget_blocks=budget_blocks,
                     refresh=refresh, seq_len=seq_len, policy=config.policy, keep=config.keep, seed=config.seed,
                     lag=lag, granularity=config.granularity, cond_tokens=cls_token_num, row_tokens=grid_size,
                     heads=config.heads)
        if layout.evicts and layout.topk_blocks < 0:   # whole blocks do not fit: prefix and window at token edges
            topk_tokens = budget_tokens - prefix - local
            if topk_tokens < 0:
                least = prefix + local
                raise ADSAConfigError(
                    f"adsa.budget={config.budget!r} gives {layout.budget_blocks} blocks of {block_size} tokens, fewer "
                    f"than prefix ({layout.prefix_blocks} blocks for {prefix} tokens) + local window "
                    f"({layout.local_blocks} blocks for {local} tokens); raise the budget to at least "
                    f"{(layout.prefix_blocks + layout.local_blocks) * block_size} tokens (whole blocks), or to at "
                    f"least {least} tokens ({least / image_tokens:.3f} of the {image_tokens} image tokens: the "
                    f"prefix and window cut at token edges), or shrink prefix/local")
            blocks = layout.prefix_blocks + layout.local_blocks + topk_tokens // block_size
            # A sequence too short for that many blocks to evict anything keeps them all, attended whole.
            layout = dataclasses.replace(layout, budget_blocks=min(blocks, max_blocks), token_edges=blocks < max_blocks)
        return layout

    # ---- static sizes ----
    # Sizes are cached: the worker asks for them for every running sequence at every step.
    @functools.cached_property
    def prefix_blocks(self) -> int:
        return cdiv(self.prefix_tokens, self.block_size)

    @functools.cached_property
    def local_blocks(self) -> int:
        """Most blocks the window [t-local+1, t] can touch (it includes the tail)."""
        return cdiv(self.local_tokens - 1, self.block_size) + 1

    @functools.cached_property
    def topk_blocks(self) -> int:
        return self.budget_blocks - self.prefix_blocks - self.local_blocks

    @functools.cached_property
    def max_blocks(self) -> int:
        """Blocks of a whole sequence: positions 0..seq_len-2 (the last image token is emitted, never fed back)."""
        return cdiv(self.seq_len - 1, self.block_size)

    @functools.cached_property
    def evicts(self) -> bool:
        return self.budget_blocks < self.max_blocks

    @functools.cached_property
    def slack_blocks(self) -> int:
        """Blocks a sequence may hold above the budget: the new tail block allocated by the scheduler in the step
        whose selection evicts (returned one step later), plus the blocks that can enter the candidate set between
        two selections when refresh > block_size, plus one block per step of `lag` (async scheduling)."""
        return max(1, cdiv(self.refresh, self.block_size)) + self.lag

    @functools.cached_property
    def held_bound(self) -> int:
        """Upper bound on the KV blocks a sequence ever holds (what admission reserves)."""
        return min(self.max_blocks, self.budget_blocks + self.slack_blocks) if self.evicts else self.max_blocks

    # ---- per position ----
    def num_blocks(self, pos: int) -> int:
        """Logical blocks in use once position `pos` is written."""
        return pos // self.block_size + 1

    def local_start(self, pos: int) -> int:
        """First logical block of the local window of a query at `pos`."""
        return max(0, pos - self.local_tokens + 1) // self.block_size

    def candidate_range(self, pos: int) -> range:
        """Blocks that compete for the top-k slots when the query is at `pos`: complete, not prefix, not local."""
        return range(self.prefix_blocks, max(self.prefix_blocks, self.local_start(pos)))

    def attended(self, pos, positions):
        """Whether the query at `pos` attends to the tokens at `positions` that its kept blocks hold (ints, numpy
        arrays or tensors, broadcast): all of them without `token_edges`; with them, the prefix tokens, the window
        (t - local, t] and every token of a candidate block (complete, not prefix, not window; those are attended
        whole, kept or not yet selected), so the tokens of the prefix and window blocks outside the prefix and the
        window are not. Causality is the caller's (positions past `pos` are unwritten)."""
        if not self.token_edges:
            return positions == positions   # all True, in the caller's type and shape
        block = positions // self.block_size
        local_start = (pos - self.local_tokens + 1) // self.block_size   # below 0 (no candidate) while pos < local
        return (positions < self.prefix_tokens) | (positions > pos - self.local_tokens) \
            | ((block >= self.prefix_blocks) & (block < local_start))
