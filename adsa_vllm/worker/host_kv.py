"""The worker's half of swap preemption (adsa_vllm/engine/swap.py): kept KV blocks to host memory and back.

Every ADSA layer's paged cache is indexed by physical block on dim 0 (all layouts of worker/kv_views.py). Swapped
blocks live in one host buffer of `swap_space_gib`, [layers, slots, ...], reserved when the KV cache is (a preempting
admission rule only; `reserve`): pinning host memory costs about 3 GB/s of wall time (measured on an H100: 9-19 ms for
30 MB), which per swap, inside a step, cost more than the copy itself. A swap-out takes slots (few runs of
consecutive slots), gathers each layer's blocks and copies each run into its slots; a swap-in copies them back into
the fresh blocks and returns the slots. (PyTorch's caching host allocator rounds a pinned allocation up to a power
of two of bytes: docs/settings.md tells users to pick 4, 8, 16 or 32 GiB.) TopK-V's per-block summaries travel with
the blocks (worker/summaries.py), so the resumed sequence scores exactly as before without re-reading its blocks:
they sit in a second host buffer with the same slots, 1/32 of the first (a block's [L, H, D] summary against its
[L, 2, 16, H, D] keys and values), pinned once at the first swap-out that has a summary table.

On the GPU every copy is queued on the current stream, before the step's forward: the copy out reads the blocks
before any new owner writes them, the copy back lands before the forward reads them, and a slot returned at a
swap-in is rewritten only by copies queued after it. Nothing waits on the device. Block-id lists go to the device
from pinned memory too (worker/device_copy.py): a copy from pageable host memory synchronises the stream first,
which under async scheduling would make the host wait for the step in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adsa_vllm.worker.device_copy import on_device


@dataclass
class HostCopy:
    logical: list[int]               # logical blocks ...
    slots: list[int]                 # ... and the host slot holding each
    summaries: bool                  # their TopK-V summaries are in HostKV.summaries (a table existed at swap-out)


class SlotPool:
    """Free host slots; `take` prefers one run of consecutive slots (one copy per layer), else the lowest free."""

    def __init__(self, n: int):
        self.free = set(range(n))
        self.size = n

    def take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"swap space exhausted: {n} blocks to swap out, {len(self.free)} of {self.size} host "
                               "slots free (the scheduler bounds blocks on the host by swap_space_gib; this is a bug)")
        order = sorted(self.free)
        for i in range(len(order) - n + 1):   # first fit of a whole run
            if order[i + n - 1] - order[i] == n - 1:
                run = order[i:i + n]
                break
        else:
            run = order[:n]
        self.free.difference_update(run)
        return run

    def give(self, slots: list[int]) -> None:
        self.free.update(slots)


def runs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """(slot, block) pairs -> (first slot, count, blocks) per run of consecutive slots."""
    out: list[tuple[int, int, list[int]]] = []
    for slot, block in sorted(pairs):
        if out and out[-1][0] + out[-1][1] == slot:
            first, count, blocks = out[-1]
            out[-1] = (first, count + 1, blocks + [block])
        else:
            out.append((slot, 1, [block]))
    return out


@dataclass
class HostKV:
    copies: dict[str, HostCopy] = field(default_factory=dict)
    kv: torch.Tensor | None = None    # [layers, slots, ...] pinned on a GPU worker; None until reserved
    summaries: torch.Tensor | None = None   # [slots, L, H, D] TopK-V summaries; None until a swap-out needs it
    slots: SlotPool | None = None
    bytes_out: int = 0
    bytes_in: int = 0

    def reserve(self, caches: list[torch.Tensor], swap_space_gib: float) -> None:
        """The host buffer: as many slots as the scheduler's bound on blocks on the host (ADSAScheduler.swap_blocks,
        the same division). Once; a CPU worker's buffer is plain memory, touched only where swaps write."""
        if self.kv is not None or not caches:
            return
        block_bytes = sum(c[0].numel() * c.element_size() for c in caches)
        n = int(swap_space_gib * (1 << 30)) // block_bytes
        pin = caches[0].device.type == "cuda"
        self.kv = torch.empty((len(caches), n, *caches[0].shape[1:]), dtype=caches[0].dtype, pin_memory=pin)
        self.slots = SlotPool(n)

    def swap_out(self, req_id: str, logical: list[int], physical: list[int], caches: list[torch.Tensor],
                 summaries: torch.Tensor | None) -> None:
        if self.kv is None:
            raise RuntimeError("swap-out before the host buffer was reserved (HostKV.reserve)")
        dev = caches[0].device
        nb = dev.type == "cuda"
        slots = self.slots.take(len(physical))
        if summaries is not None and self.summaries is None:
            self.summaries = torch.empty((self.slots.size, *summaries.shape[1:]), dtype=summaries.dtype,
                                         pin_memory=nb)
        for first, count, blocks in runs(list(zip(slots, physical))):
            ids = on_device(blocks, dev, torch.long)
            for layer, cache in enumerate(caches):
                self.kv[layer, first:first + count].copy_(cache.index_select(0, ids), non_blocking=nb)
            if summaries is not None:
                self.summaries[first:first + count].copy_(summaries.index_select(0, ids), non_blocking=nb)
        self.copies[req_id] = HostCopy(list(logical), slots, summaries is not None)
        self.bytes_out += len(physical) * self._block_bytes()

    def swap_in(self, req_id: str, logical: list[int], physical: list[int], caches: list[torch.Tensor],
                summaries: torch.Tensor | None) -> None:
        """Copy the blocks `logical` (a subset of what went out: the rest were evicted meanwhile) into `physical`."""
        copy = self.copies.pop(req_id)
        where = {j: i for i, j in enumerate(copy.logical)}
        missing = [j for j in logical if j not in where]
        if missing:
            raise RuntimeError(f"swap-in of {req_id}: logical blocks {missing} were never swapped out")
        dev = caches[0].device
        nb = dev.type == "cuda"
        with_summaries = summaries is not None and copy.summaries
        for first, count, blocks in runs([(copy.slots[where[j]], p) for j, p in zip(logical, physical)]):
            ids = on_device(blocks, dev, torch.long)
            for layer, cache in enumerate(caches):
                cache.index_copy_(0, ids, self.kv[layer, first:first + count].to(dev, non_blocking=nb))
            if with_summaries:
                summaries.index_copy_(0, ids, self.summaries[first:first + count].to(dev, non_blocking=nb))
        self.slots.give(copy.slots)   # later copies into them are queued after these reads
        self.bytes_in += len(logical) * self._block_bytes()

    def discard(self, req_id: str) -> None:
        copy = self.copies.pop(req_id, None)
        if copy is not None:
            self.slots.give(copy.slots)

    def _block_bytes(self) -> int:
        return self.kv[:, 0].numel() * self.kv.element_size()

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.copies
