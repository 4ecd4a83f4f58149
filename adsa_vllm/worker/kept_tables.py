"""The compacted block table and seq_lens the inner kernel reads, kept in persistent device buffers.

Persistent, because a CUDA graph captured their addresses. Rewritten only when they can have changed: a row's
compacted entries change when its kept set changes (an eviction, see SlotTrackers.version) or when it starts a
new block, and its seq_len is always the runner's minus a fixed offset between two events ((blocks dropped) x
block size). So a step where no row had an event and none started a block costs one device op (the subtraction)
instead of a table copy, two host-to-device copies and three indexing kernels — at batch 1 that is 13 to 15
steps in 16 (a new block, a selection requested and one decided change the key).
"""

from __future__ import annotations

import numpy as np
import torch


def compacted_block_table(bt: torch.Tensor, rows: np.ndarray, kept_index: np.ndarray | None,
                          out: torch.Tensor) -> torch.Tensor:
    """Write bt with each listed row's kept blocks moved to the front into `out` (same shape); returns `out`.
    One copy of the row indices and one of the kept index to the device, one gather."""
    out.copy_(bt)
    if len(rows) == 0:
        return out
    dev = bt.device
    rows_dev = torch.from_numpy(rows).to(dev, non_blocking=True)
    out[rows_dev] = torch.gather(bt[rows_dev], 1, torch.from_numpy(kept_index).to(dev, non_blocking=True))
    return out


class KeptTables:
    def __init__(self):
        self.table: torch.Tensor | None = None      # [rows, max blocks] compacted block table
        self.seq_lens: torch.Tensor | None = None   # [rows] compacted seq_lens
        self.offset: torch.Tensor | None = None     # [rows] runner's seq_len - compacted seq_len
        self._table_key = self._offset_key = None

    def update(self, bt: torch.Tensor, seq_lens: torch.Tensor, plan, min_rows: int):
        """-> (compacted table [bt rows], compacted seq_lens [seq_lens rows]) for this step's plan."""
        if self.table is None or self.table.shape[1] != bt.shape[1] or self.table.shape[0] < bt.shape[0] \
                or self.seq_lens.shape[0] < seq_lens.shape[0]:
            rows = max(bt.shape[0], seq_lens.shape[0], min_rows)
            self.table = torch.zeros(rows, bt.shape[1], dtype=bt.dtype, device=bt.device)
            self.seq_lens = torch.zeros(rows, dtype=seq_lens.dtype, device=seq_lens.device)
            self.offset = torch.zeros(rows, dtype=seq_lens.dtype, device=seq_lens.device)
            self._table_key = self._offset_key = None
        table, m = self.table[: bt.shape[0]], seq_lens.shape[0]
        key = None if plan.key is None else (plan.key, bt.shape[0], bt.data_ptr())
        if key is None or key != self._table_key:
            compacted_block_table(bt, plan.rows, plan.kept_index(), table)
            self._table_key = key
        key = None if plan.offset_key is None else (plan.offset_key, m)
        if key is None or key != self._offset_key:
            offset = np.zeros(m, dtype=np.int64)
            if len(plan.rows):
                offset[plan.rows] = plan.offsets
            self.offset[:m].copy_(torch.from_numpy(offset).to(self.offset.dtype), non_blocking=True)
            self._offset_key = key
        torch.sub(seq_lens, self.offset[:m], out=self.seq_lens[:m])
        return table, self.seq_lens[:m]
