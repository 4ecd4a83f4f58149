"""Token edges on the vLLM path (issue 24): the prefix and the window at token granularity, for budgets below what
whole prefix and window blocks need (policy/layout.py, `BlockLayout.token_edges`; 28x28 at 10%).

The blocks a sequence holds are block mode's, unchanged (prefix, window, top-k survivors: the trackers, the
compacted tables, admission and freeing do not know about edges). What differs is which of their tokens the query
attends: `BlockLayout.attended` drops the tokens of the prefix and window blocks outside the prefix and window. A
paged kernel attends every token of a block but the tail's unwritten ones, so it cannot leave them out; for the
rows that have such tokens, `EdgeRows.attend` recomputes the attention after the kernel, over exactly the attended
tokens, and overwrites those rows' output.

Cost, only for sequences whose layout has token edges (every other setting plans nothing here and runs no code in
the forward): per step and layer, a gather of each such row's kept blocks (budget_blocks + slack at most, e.g. 7
blocks = 112 tokens at 28x28 10%) and a dense masked attention over them in PyTorch, on top of the kernel's
attention for those rows (which is thrown away); per step, a few host operations and two small host-to-device
copies to build the masks. The forward runs Python, so an engine whose default layout has token edges keeps
attention out of CUDA graphs (worker/backend.py), and other engines that capture it refuse requests whose layout
has them (request_validation.py), as for query-dependent policies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adsa_vllm.policy.dense_attention import masked_attention
from adsa_vllm.worker.device_copy import on_device
from adsa_vllm.worker.kv_views import gather_blocks


@dataclass
class EdgeRows:
    """The decode rows of one step whose kept blocks hold tokens they must not attend."""
    token_index: torch.Tensor   # [R] each row's decode query in the batch
    block_ids: torch.Tensor     # [R, n] physical kept blocks (padding: any block, masked out)
    mask: torch.Tensor          # [R, n * block_size] bool: the tokens each row attends

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, output: torch.Tensor, backend: str,
               head_size: int, scale: float) -> None:
        """Overwrite the rows' attention output (after the kernel wrote it; this layer's K/V of the step are
        cached): the reference's masked attention over the masked kept tokens, in float32."""
        r = self.block_ids.shape[0]
        keys, values = gather_blocks(kv_cache, self.block_ids.reshape(-1), backend, head_size)   # [R n, bs, H, D]
        keys, values = (t.reshape(r, -1, *t.shape[2:]).transpose(1, 2).float() for t in (keys, values))  # [R,H,N,D]
        q = query.reshape(query.shape[0], -1, head_size)[self.token_index].float()[:, :, None]  # [R, Hq, 1, D]
        out = masked_attention(q, keys, values, self.mask[:, None, None, :], scale=scale)[:, :, 0]
        output.view(-1, q.shape[1], head_size)[self.token_index] = out.to(output.dtype)


def plan_edges(trackers, bt: torch.Tensor, sequences: list, rows: np.ndarray, slots: np.ndarray, pos: np.ndarray,
               token_rows: np.ndarray, block_size: int) -> EdgeRows | None:
    """Live decode rows whose layout has token edges (`rows`, with their tracker slots, positions and query rows)
    -> the EdgeRows of those whose kept blocks hold a token they do not attend (the window has left the prefix),
    or None."""
    layouts = [sequences[r].layout for r in rows]
    due = np.array([p - lay.local_tokens + 1 > lay.prefix_tokens for p, lay in zip(pos, layouts)], dtype=bool)
    if not due.any():
        return None
    rows, slots, pos, token_rows = rows[due], slots[due], pos[due], token_rows[due]
    layouts = [lay for lay, d in zip(layouts, due) if d]
    num_blocks = pos // block_size + 1
    kept = trackers.kept_count(slots, num_blocks)
    width = int(kept.max())
    index = trackers.kept_index(slots, num_blocks, width)                               # [R, n] logical blocks
    positions = (index[:, :, None] * block_size + np.arange(block_size)).reshape(len(rows), -1)
    real = np.repeat(np.arange(width)[None, :] < kept[:, None], block_size, axis=1)
    mask = np.stack([lay.attended(int(p), positions[i]) for i, (p, lay) in enumerate(zip(pos, layouts))])
    mask &= real & (positions <= pos[:, None])
    dev = bt.device   # pinned copies: a pageable one would make the host wait for the step in flight
    rows_dev = on_device(rows, dev, torch.long)
    block_ids = torch.gather(bt[rows_dev].long(), 1, on_device(index, dev, torch.long))
    return EdgeRows(token_index=on_device(token_rows, dev, torch.long), block_ids=block_ids,
                    mask=on_device(mask, dev))
