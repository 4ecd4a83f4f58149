"""The host buffer of swap preemption (adsa_vllm/worker/host_kv.py) on plain tensors: blocks come back bit for bit
into other physical blocks, through fragmented slots, with a subset evicted while swapped, and slots are reused."""

import pytest
import torch

from adsa_vllm.worker.host_kv import HostKV, SlotPool, runs

LAYERS, BLOCKS, SHAPE = 3, 40, (2, 4, 2, 8)   # [num_blocks, 2 (K/V), block_size, heads, head_dim] per layer


def _caches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BLOCKS, *SHAPE, generator=g) for _ in range(LAYERS)]


def _host(caches, slots: int) -> HostKV:
    block_gib = sum(c[0].numel() * c.element_size() for c in caches) / (1 << 30)
    host = HostKV()
    host.reserve(caches, swap_space_gib=slots * block_gib)
    assert host.slots.size == slots
    return host


def test_runs_group_consecutive_slots():
    assert runs([(5, 10), (3, 7), (4, 9), (9, 1)]) == [(3, 3, [7, 9, 10]), (9, 1, [1])]


def test_slot_pool_prefers_one_run_and_refuses_beyond_its_size():
    pool = SlotPool(8)
    a, b = pool.take(3), pool.take(2)
    pool.give(a)
    assert pool.take(4) == [0, 1, 2, 5]   # free 0..2 and 5..7: no run of 4, so the lowest four
    pool = SlotPool(8)
    a, b, c = pool.take(3), pool.take(2), pool.take(3)
    pool.give(b)
    assert pool.take(2) == [3, 4]   # the hole fits exactly
    with pytest.raises(RuntimeError, match="swap space exhausted"):
        pool.take(1)


def test_blocks_come_back_exactly_through_fragmented_slots():
    caches = _caches()
    before = [c.clone() for c in caches]
    host = _host(caches, slots=10)
    host.swap_out("a", [0, 1, 2], [4, 5, 6], caches, None)
    host.swap_out("b", [0, 1], [7, 8], caches, None)
    host.swap_out("c", [0, 1, 2], [9, 10, 11], caches, None)
    host.swap_in("b", [0, 1], [30, 31], caches, None)   # slots 3, 4 free again, and 8, 9
    host.swap_out("d", [0, 2, 3, 5], [12, 13, 14, 15], caches, None)   # 4 blocks: no run of 4 is free
    assert sorted(host.copies["d"].slots) == [3, 4, 8, 9]
    for c in caches:   # new owners overwrite every swapped block
        c[4:16].normal_()
    host.swap_in("d", [0, 3, 5], [20, 22, 21], caches, None)   # block 2 was evicted while swapped
    host.swap_in("a", [0, 1, 2], [25, 24, 23], caches, None)
    host.swap_in("c", [0, 1, 2], [26, 27, 28], caches, None)
    for c, old in zip(caches, before):
        assert torch.equal(c[[30, 31]], old[[7, 8]])
        assert torch.equal(c[[20, 22, 21]], old[[12, 14, 15]])
        assert torch.equal(c[[25, 24, 23]], old[[4, 5, 6]])
        assert torch.equal(c[[26, 27, 28]], old[[9, 10, 11]])
    assert not host.copies and len(host.slots.free) == 10
    assert host.bytes_out == 12 * host._block_bytes() and host.bytes_in == 11 * host._block_bytes()


def test_summaries_travel_with_their_blocks():
    caches = _caches()
    table = torch.randn(BLOCKS, 5)
    old = table.clone()
    host = _host(caches, slots=4)
    host.swap_out("a", [0, 1, 2], [3, 9, 1], caches, table)
    table.zero_()
    table[5] = 7.0
    host.swap_out("b", [0], [5], caches, table)     # into the same host summary buffer, other slots
    buffer = host.summaries
    host.swap_in("a", [0, 2], [11, 12], caches, table)
    assert torch.equal(table[[11, 12]], old[[3, 1]])
    host.swap_out("c", [0, 1], [7, 8], caches, old)    # a's slots again: b's summary stays
    host.swap_in("b", [0], [13], caches, table)
    assert torch.equal(table[13], torch.full((5,), 7.0)) and host.summaries is buffer   # pinned once, not per swap


def test_discard_returns_slots_and_a_missing_block_is_named():
    caches = _caches()
    host = _host(caches, slots=4)
    host.swap_out("a", [0, 1], [3, 4], caches, None)
    host.discard("a")
    assert len(host.slots.free) == 4 and "a" not in host
    host.swap_out("b", [0, 1], [3, 4], caches, None)
    with pytest.raises(RuntimeError, match=r"logical blocks \[7\] were never swapped out"):
        host.swap_in("b", [0, 7], [5, 6], caches, None)


def test_swap_out_before_reserve_is_refused():
    with pytest.raises(RuntimeError, match="HostKV.reserve"):
        HostKV().swap_out("a", [0], [1], _caches(), None)
