"""What the planner reads for every running sequence at every step, as arrays indexed by a slot per sequence.

A `SequenceTracker` is the truth, but asking 1024 of them one by one costs milliseconds of Python per step. Between
two events (a selection requested or decided) a tracker's answer for any position follows from three numbers and a
short list (`SequenceTracker.wake` / `kept_runs`), so they are mirrored here after each event and the planner
handles every idle row with a few numpy operations; only rows at an event (about one in `refresh`) call their
tracker. tests/test_planner.py checks the mirror against the trackers themselves at every step.
"""

from __future__ import annotations

import numpy as np

from adsa_vllm.policy import SequenceTracker

NEVER = np.iinfo(np.int64).max


class SlotTable:
    def __init__(self, capacity: int = 64, head_width: int = 8):
        self.wake = np.full(capacity, NEVER, dtype=np.int64)    # first position at which the tracker has work
        self.tail_from = np.zeros(capacity, dtype=np.int64)     # every block from here on is kept (0: none evicted)
        self.head_len = np.zeros(capacity, dtype=np.int64)      # kept blocks below tail_from ...
        self.head = np.zeros((capacity, head_width), dtype=np.int64)   # ... and which they are
        self.version = np.zeros(capacity, dtype=np.int64)       # changes whenever the slot is synced
        self._free = list(range(capacity - 1, -1, -1))
        self._versions = 0

    def add(self, tracker: SequenceTracker) -> int:
        if not self._free:
            self._grow_rows()
        slot = self._free.pop()
        self.sync(slot, tracker)
        return slot

    def remove(self, slot: int) -> None:
        self.wake[slot], self.tail_from[slot], self.head_len[slot] = NEVER, 0, 0
        self._free.append(slot)

    def sync(self, slot: int, tracker: SequenceTracker) -> None:
        """Mirror the tracker after anything that may have changed it (start, eviction, request)."""
        self.wake[slot] = tracker.wake() if tracker.layout.evicts else NEVER
        head, self.tail_from[slot] = tracker.kept_runs()
        if len(head) > self.head.shape[1]:
            self.head = np.pad(self.head, ((0, 0), (0, max(len(head), 2 * self.head.shape[1]) - self.head.shape[1])))
        self.head_len[slot] = len(head)
        self.head[slot, : len(head)] = head
        self._versions += 1
        self.version[slot] = self._versions

    def kept_count(self, slots: np.ndarray, num_blocks: np.ndarray) -> np.ndarray:
        """len(tracker.kept_blocks(pos)) for all rows at once."""
        return self.head_len[slots] + num_blocks - self.tail_from[slots]

    def kept_index(self, slots: np.ndarray, num_blocks: np.ndarray, width: int) -> np.ndarray:
        """For sequences with evictions: [k, width] logical index of each kept block (0 beyond), i.e.
        `tracker.kept_blocks(pos)` padded, for all rows at once."""
        tail_from, head_len = self.tail_from[slots], self.head_len[slots]
        kept = head_len + num_blocks - tail_from
        cols = np.arange(width)[None, :]
        head = np.zeros((len(slots), width), dtype=np.int64)
        w = min(width, self.head.shape[1])
        head[:, :w] = self.head[slots, :w]
        index = np.where(cols < head_len[:, None], head, (tail_from - head_len)[:, None] + cols)
        return np.where(cols < kept[:, None], index, 0)

    def _grow_rows(self) -> None:
        n = len(self.wake)
        self.wake = np.concatenate([self.wake, np.full(n, NEVER, dtype=np.int64)])
        self.tail_from = np.concatenate([self.tail_from, np.zeros(n, dtype=np.int64)])
        self.head_len = np.concatenate([self.head_len, np.zeros(n, dtype=np.int64)])
        self.head = np.concatenate([self.head, np.zeros_like(self.head)])
        self.version = np.concatenate([self.version, np.zeros(n, dtype=np.int64)])
        self._free.extend(range(2 * n - 1, n - 1, -1))
