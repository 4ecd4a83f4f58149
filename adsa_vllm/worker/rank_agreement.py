"""Under tensor parallelism every rank must evict the identical blocks at every step: checked, not assumed.

Each rank decides its evictions itself (worker/planner.py, from all-reduced scores), but only rank 0's report reaches
the scheduler, which frees those blocks for reuse. A rank that decided differently would keep attending to a block
the scheduler has handed to another request, or skip one it still needs: silently wrong images, no error. So every
rank folds the evictions it decides into a running digest, and the ranks compare digests.

  * Digest: per planning step, the sorted (request id, logical block) pairs it evicted are hashed (blake2b, 64 bits)
    together with the step number and the running value, so the order of records within a step does not matter but
    which step evicted what does. Steps without evictions cost nothing.
  * Check: every CHECK_EVERY planning steps (a count every rank advances identically, never rank-local data, so the
    collective is entered by all ranks or by none) the ranks all-gather (step count, digest, and the running digest
    after each step of the window) over the TP group's gloo `cpu_group`. On a mismatch every rank raises the same
    RuntimeError naming the first step of the window whose digests differ: continuing would corrupt outputs.
    `PlannerStats.tp_checks` / `tp_mismatches` count them.
  * From outside: `llm.collective_rpc("adsa_rank_digest")` (ADSAWorkerMixin.adsa_rank_digest) returns
    {"steps", "digest", "checks", "mismatches"} of every rank, e.g. for a GPU script to compare after a run; the
    digest covers every step, also those after the last periodic check. Digests compare ranks of one engine, not
    runs: vLLM's internal request ids carry a random suffix.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

CHECK_EVERY = 32   # planning steps between checks: one small gloo all-gather, ~1/32 of steps pay a host round trip


class RankAgreement:
    def __init__(self):
        self.steps = 0        # planning steps ended
        self.digest = 0       # running digest (signed 64-bit, as it travels in an int64 tensor)
        self.checks = 0
        self.mismatches = 0
        self._step: list = []     # (req_id, logical block) evicted in the step being planned
        self._window: list = []   # running digest after each step since the last check

    def record(self, req_id: str, blocks: list[int]) -> None:
        self._step.extend((req_id, int(b)) for b in blocks)

    def end_step(self, tp_group=None, stats=None) -> None:
        """Fold this step's evictions in; every CHECK_EVERY steps compare with the other ranks of `tp_group`."""
        self.steps += 1
        if self._step:
            h = hashlib.blake2b(digest_size=8)
            h.update(f"{self.digest}:{self.steps}:".encode())
            h.update(repr(sorted(self._step)).encode())
            self.digest = int.from_bytes(h.digest(), "little", signed=True)
            self._step = []
        self._window.append(self.digest)
        if self.steps % CHECK_EVERY:
            return
        window, self._window = self._window, []
        if tp_group is None or tp_group.world_size <= 1:
            return
        self.checks += 1
        if stats is not None:
            stats.tp_checks += 1
        try:
            self._compare(tp_group, window)
        except RuntimeError:
            self.mismatches += 1
            if stats is not None:
                stats.tp_mismatches += 1
            raise

    def _compare(self, tp_group, window: list) -> None:
        mine = torch.tensor([self.steps, self.digest, *window], dtype=torch.int64)
        rows = [torch.empty_like(mine) for _ in range(tp_group.world_size)]
        dist.all_gather(rows, mine, group=tp_group.cpu_group)
        # Every rank sees the same rows, so every rank takes the same branch and raises the same message.
        for rank, row in enumerate(rows[1:], 1):
            if torch.equal(row, rows[0]):
                continue
            s0, s1 = int(rows[0][0]), int(row[0])
            if s0 != s1:
                raise RuntimeError(f"ADSA tensor-parallel ranks planned different numbers of steps (rank 0: {s0}, "
                                   f"rank {rank}: {s1}); their evictions cannot be checked and the ranks would read "
                                   "different KV blocks. This is a correctness bug; stopping rather than corrupt "
                                   "outputs.")
            first = int((rows[0][2:] != row[2:]).nonzero()[0])
            step = s0 - (len(row) - 2) + first + 1
            raise RuntimeError(f"ADSA tensor-parallel ranks evicted different blocks at planning step {step} "
                               f"(evictions digest rank 0: {_hex(rows[0][2 + first])}, rank {rank}: "
                               f"{_hex(row[2 + first])}; checked at step {s0}). The ranks would read different KV "
                               "blocks. This is a correctness bug; stopping rather than corrupt outputs.")

    def report(self) -> dict:
        return {"steps": self.steps, "digest": _hex(self.digest), "checks": self.checks,
                "mismatches": self.mismatches}


def _hex(value) -> str:
    return f"{int(value) & (2**64 - 1):016x}"
