"""The worker's half of swap preemption (adsa_vllm/engine/swap.py): kept KV blocks to host memory and back.

Every ADSA layer's paged cache is indexed by physical block on dim 0 (all layouts of worker/kv_views.py), so a
request's blocks are one gather per layer into a [layers, n, ...] host tensor, and one scatter back into the fresh
blocks on resume. TopK-V's per-block summaries travel with them (worker/summaries.py), so the resumed sequence
scores exactly as before without re-reading its blocks. On the GPU the host tensors are pinned and the copies are
queued on the current stream, before the step's forward: the copy out reads the blocks before any new owner writes
them, the copy back lands before the forward reads them, and nothing waits on the device (the caching host
allocator keeps a pinned buffer alive until its copies are done). Block-id lists go to the device from pinned
memory too (worker/device_copy.py): a copy from pageable host memory synchronises the stream first, which under
async scheduling would make the host wait for the step in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adsa_vllm.worker.device_copy import on_device


@dataclass
class HostCopy:
    logical: list[int]               # logical blocks, in the order of the tensors' dim 1
    kv: torch.Tensor                 # [layers, n, ...] the blocks of every layer
    summaries: torch.Tensor | None   # [n, ...] their TopK-V summaries, if the sequence had any table
    done: torch.cuda.Event | None    # the device-to-host copies have landed (GPU only)


@dataclass
class HostKV:
    copies: dict[str, HostCopy] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0

    def swap_out(self, req_id: str, logical: list[int], physical: list[int], caches: list[torch.Tensor],
                 summaries: torch.Tensor | None) -> None:
        dev = caches[0].device
        pin = dev.type == "cuda"
        ids = on_device(physical, dev, torch.long)
        kv = torch.empty((len(caches), len(physical), *caches[0].shape[1:]), dtype=caches[0].dtype,
                         pin_memory=pin)
        for layer, cache in enumerate(caches):
            kv[layer].copy_(cache.index_select(0, ids), non_blocking=pin)
        summ = None
        if summaries is not None:
            summ = torch.empty((len(physical), *summaries.shape[1:]), dtype=summaries.dtype, pin_memory=pin)
            summ.copy_(summaries.index_select(0, ids), non_blocking=pin)
        done = None
        if pin:   # with async scheduling the swap-in may be queued before this step's copies ran
            done = torch.cuda.Event()
            done.record()
        self.copies[req_id] = HostCopy(list(logical), kv, summ, done)
        self.bytes_out += kv.numel() * kv.element_size()

    def swap_in(self, req_id: str, logical: list[int], physical: list[int], caches: list[torch.Tensor],
                summaries: torch.Tensor | None) -> None:
        """Copy the blocks `logical` (a subset of what went out: the rest were evicted meanwhile) into `physical`."""
        copy = self.copies.pop(req_id)
        where = {j: i for i, j in enumerate(copy.logical)}
        missing = [j for j in logical if j not in where]
        if missing:
            raise RuntimeError(f"swap-in of {req_id}: logical blocks {missing} were never swapped out")
        if copy.done is not None:
            copy.done.synchronize()   # the host tensor is complete (normally long since: it was steps ago)
        dev = caches[0].device
        nb = dev.type == "cuda"
        ids = on_device(physical, dev, torch.long)
        pick = None
        if [where[j] for j in logical] != list(range(len(copy.logical))):
            pick = on_device([where[j] for j in logical], dev, torch.long)
        for layer, cache in enumerate(caches):
            src = copy.kv[layer].to(dev, non_blocking=nb)   # pinned: asynchronous, the allocator keeps it alive
            cache.index_copy_(0, ids, src if pick is None else src.index_select(0, pick))
        if summaries is not None and copy.summaries is not None:
            src = copy.summaries.to(dev, non_blocking=nb)
            summaries.index_copy_(0, ids, src if pick is None else src.index_select(0, pick))
        self.bytes_in += len(logical) * copy.kv[0, 0].numel() * copy.kv.element_size() * len(caches)

    def discard(self, req_id: str) -> None:
        self.copies.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.copies
