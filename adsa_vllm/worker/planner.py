"""Per-step ADSA planning on the worker: decide evictions, compact the block table, arrange scoring.

A selection at position p+1 is requested at step p and decided at step p+1 (`SequenceTracker`'s protocol, run for
all rows at once by the runtime's `SlotTrackers`).
Its scores come from one of two places, with identical values (the candidates were complete before step p-1
finished, so their K/V no longer change):
  * query-free policies (TopK-V, streaming, random): launched here, at the build of step p, over every layer's
    KV cache, and copied to pinned memory behind an event; the build of step p+1 picks them up. Nothing waits on
    the GPU in between (async scheduling stays overlapped) and the forward runs no ADSA code, so full CUDA graphs
    capture it.
  * policies that need the decode query (attention mass, head_split, row_anchored): the forward of step p saves
    the query rows named here (worker/saved_queries.py: one copy a CUDA graph replays), and
    worker/query_scoring.py scores them from there at the start of step p + 1, before anything writes a block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from adsa_vllm.policy import ScoreInputs, pack_rows
from adsa_vllm.worker.kv_views import check_layout, gather_blocks
from adsa_vllm.worker.runtime import ADSARuntime, ScoringBatch
from adsa_vllm.worker.query_scoring import score_saved_queries
from adsa_vllm.worker.token_edges import EdgeRows, plan_edges


@dataclass
class StepPlan:
    rows: np.ndarray                # [k] batch rows that attend to fewer than all their blocks
    offsets: np.ndarray | None      # [k] their runner's seq_len minus their compacted seq_len
    seq_lens: np.ndarray            # [num_reqs] seq_lens as the kernel must see them (compacted for those rows)
    edges: EdgeRows | None = None   # rows whose kept blocks hold tokens they do not attend (worker/token_edges.py)
    # Equal keys on two steps: equal compacted tables (`key`, given the same runner table) / offsets (`offset_key`).
    # None: not comparable (a row ADSA does not manage, or a prefill chunk): always rebuilt.
    key: bytes | None = None
    offset_key: bytes | None = None
    _index_of: tuple = ()           # (SlotTrackers, row slots, row block counts, width), for `kept_index`

    def kept_index(self) -> np.ndarray | None:
        """[k, width] the rows' kept logical blocks, in order (0 beyond the kept ones). Built on demand: a step
        whose kept tables are unchanged never needs it."""
        return self._index_of[0].kept_index(*self._index_of[1:]) if len(self.rows) else None


def plan_step(runtime: ADSARuntime, cm: CommonAttentionMetadata, layers: list, backend: str) -> StepPlan:
    """Decide the selections due at this step, request the next ones, and compact the kept blocks, for all rows at
    once (SlotTrackers); only rows at or past their `wake` position take part in the first two."""
    runtime.backend = backend
    score_saved_queries(runtime)   # normally done at the start of the step; here for builds outside execute_model
    runtime.absorb_scores()
    runtime.queries.begin_step()
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1].numpy()
    seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
    bt = cm.block_table_tensor
    sequences, slots = runtime.row_sequences(n, bt)
    trackers = runtime.trackers
    # Prefill chunks attend causally to everything (eviction starts at the first decode).
    live = (slots >= 0) & (qsl[1:] - qsl[:-1] == 1)
    live_slots = np.where(live, slots, 0)
    pos = seq_lens - 1
    at_event = np.nonzero(live & (pos >= trackers.wake[live_slots]))[0]
    if len(at_event):
        _events(runtime, bt, qsl, sequences, at_event, slots[at_event], pos[at_event], layers, backend)
    runtime.queries.commit(bt.device)

    bs = runtime.block_size
    edges = None
    edge_rows = np.nonzero(live & trackers.token_edges[live_slots])[0]
    if len(edge_rows):   # only layouts with token edges: one vectorised test per step for every other setting
        edges = plan_edges(trackers, bt, sequences, edge_rows, slots[edge_rows], pos[edge_rows],
                           qsl[edge_rows] - qsl[0], bs)
    rows = np.nonzero(live & (trackers.num_evicted[live_slots] > 0))[0]
    offsets, index_of = None, ()
    if len(rows):
        index_of = (trackers, slots[rows], pos[rows] // bs + 1, bt.shape[1])
        compacted = (trackers.kept_count(*index_of[1:3]) - 1) * bs + pos[rows] % bs + 1
        offsets = seq_lens[rows] - compacted
        seq_lens[rows] = compacted
    key = offset_key = None
    if live.all():
        offset_key = slots.tobytes() + trackers.version[slots].tobytes()
        key = offset_key + (pos // bs).tobytes()
    # Every TP rank plans every step (same SchedulerOutput), so this count, the cadence of the ranks' eviction
    # check (a collective), advances identically on all of them.
    runtime.end_plan_step()
    return StepPlan(rows, offsets, seq_lens, edges, key, offset_key, index_of)


def _events(runtime: ADSARuntime, bt: torch.Tensor, qsl: np.ndarray, sequences: list, rows: np.ndarray,
            slots: np.ndarray, pos: np.ndarray, layers: list, backend: str):
    """Rows at an event: decide (evictions to the outbox), then request; query-free scores are launched now,
    query-dependent ones ride on the forward (returned: block scores, token scores)."""
    trackers = runtime.trackers
    evict_rows, evict_blocks = trackers.decide(slots, pos)
    tokens = runtime.tokens
    if tokens.pending:   # token granularity: each head's winners go into the slots before the blocks are freed
        check_layout(layers[0].kv_cache, backend, layers[0].head_size)
        tokens.decide(bt, sequences, rows, pos, np.isin(np.arange(len(rows)), evict_rows), layers, backend,
                      runtime.fail)
    if len(evict_rows):
        bounds = np.flatnonzero(np.diff(evict_rows)) + 1
        for r, blocks in zip(evict_rows[np.r_[0, bounds]].tolist(), np.split(evict_blocks, bounds)):
            runtime.record_evictions(sequences[rows[r]], blocks.tolist())
    asked, cand = trackers.request(slots, pos)
    if not len(asked):
        return
    queries = runtime.queries
    by_token = np.array([sequences[r].token_scorer is not None for r in rows[asked]])
    if by_token.any():
        i = asked[by_token]
        runtime.token_scoring += tokens.request(bt, sequences, rows[i], pos[i], cand[by_token],
                                                qsl[rows[i]] - qsl[0], runtime.num_layers,
                                                lambda q: queries.ask(q, bt.device), queries.step)
    needs_query = np.array([sequences[r].scorer.needs_query for r in rows[asked]])
    for with_query in (False, True):
        part = needs_query == with_query
        if not part.any():
            continue
        i = asked[part]
        batch = scoring_batch(bt, rows[i], [sequences[r] for r in rows[i]], slots[i], trackers.epoch[slots[i]],
                              pos[i], cand[part])
        if with_query:
            batch.token_index = queries.ask(qsl[rows[i]] - qsl[0], bt.device)
            batch.query_step = queries.step
            runtime.pending.append(batch)
        else:
            _launch_scoring(runtime, bt, batch, layers, backend)


def _launch_scoring(runtime: ADSARuntime, bt: torch.Tensor, batch: ScoringBatch, layers: list, backend: str) -> None:
    """Score query-free candidates now (all layers at once); the next build reads the result without waiting."""
    t0 = time.perf_counter()
    if bt.is_cuda:
        batch.started = torch.cuda.Event(enable_timing=True)
        batch.started.record()
    for scorer, sel in batch.groups:
        try:
            _score_group(runtime, batch, scorer, sel, layers, backend)
        except Exception as e:  # noqa: BLE001 - fail the requests of this scorer, not the engine
            for seq in batch.sequences:
                if seq.scorer is scorer:
                    runtime.fail(seq.req_id, e)
    batch.layers_done = runtime.num_layers
    runtime.ship_to_host(batch)
    runtime.pending.append(batch)
    runtime.stats.scored_rows += len(batch.sequences)
    if not bt.is_cuda:
        runtime.stats.scoring_s += time.perf_counter() - t0


def _score_group(runtime: ADSARuntime, batch: ScoringBatch, scorer, sel, layers: list, backend: str) -> None:
    if not scorer.reads_kv:        # position-only scores: once per selection, no KV read
        batch.acc[sel] += scorer.score(_inputs(batch, sel, None, None, 0.0))
    elif hasattr(scorer, "score_summaries"):
        _summarize_new_blocks(runtime, batch, scorer, layers, backend)
        per_call = runtime.summaries.rows_per_chunk(batch.acc.shape[1])
        parts = [sel]                  # usually one call; more only when the rows would overflow the scratch memory
        if (batch.acc.shape[0] if isinstance(sel, slice) else len(sel)) > per_call:
            parts = torch.arange(batch.acc.shape[0], device=batch.acc.device)[sel].split(per_call)
        for part in parts:
            batch.acc[part] += scorer.score_summaries(runtime.summaries.read(batch.block_ids[part]),
                                                      batch.valid[part], runtime.block_size)
    else:                          # any other KV-reading scorer: every layer's candidates, layer by layer
        for i, layer in enumerate(layers):
            score_layer(batch, layer.kv_cache, backend, layer.head_size, layer.impl.scale, scorer, sel, i)


def _summarize_new_blocks(runtime: ADSARuntime, batch: ScoringBatch, scorer, layers, backend) -> None:
    """Summarise the candidates that no earlier selection of their sequence has seen (each block once).
    Which ones is known on the host (no device sync); only their physical ids are gathered on the device."""
    check_layout(layers[0].kv_cache, backend, layers[0].head_size)
    mine = np.array([seq.scorer is scorer for seq in batch.sequences])
    first_new = np.array([seq.summarized for seq in batch.sequences], dtype=np.int64)
    fresh = batch.host_valid & (batch.host_index >= first_new[:, None]) & mine[:, None]
    r, c = np.nonzero(fresh)
    dev = batch.block_ids.device
    ids = batch.block_ids[torch.from_numpy(r).to(dev, non_blocking=True),
                          torch.from_numpy(c).to(dev, non_blocking=True)]
    runtime.summaries.write(scorer, ids, layers, backend)
    runtime.stats.summarized_blocks += len(r)
    for seq, stop, m in zip(batch.sequences, batch.candidate_stops.tolist(), mine):
        if m:
            seq.summarized = max(seq.summarized, stop)


def scoring_batch(bt: torch.Tensor, rows: np.ndarray, sequences: list, slots: np.ndarray, epochs: np.ndarray,
                  pos: np.ndarray, cand: np.ndarray) -> ScoringBatch:
    """Rows requesting a selection at pos + 1, with their candidate masks [R, W] -> padded candidate tensors (each
    row's candidates ascending, then padding) on bt's device."""
    dev = bt.device
    counts = cand.sum(1)
    index = pack_rows(cand)
    valid = np.arange(index.shape[1])[None, :] < counts[:, None]
    index_dev = torch.from_numpy(index).to(dev, non_blocking=True)
    valid_dev = torch.from_numpy(valid).to(dev, non_blocking=True)
    rows_dev = torch.from_numpy(rows).to(dev, non_blocking=True)
    block_ids = torch.where(valid_dev, torch.gather(bt[rows_dev].long(), 1, index_dev), 0)
    return ScoringBatch(
        sequences=sequences, slots=slots, epochs=epochs, at_pos=pos + 1,
        candidate_stops=index[np.arange(len(rows)), counts - 1] + 1, host_index=index, host_valid=valid,
        block_ids=block_ids,
        block_index=index_dev, valid=valid_dev, positions=torch.from_numpy(pos.copy()).to(dev, non_blocking=True),
        acc=torch.zeros(index.shape, dtype=torch.float32, device=dev), groups=groups_by_scorer(sequences, dev))


def score_layer(batch: ScoringBatch, kv_cache: torch.Tensor, backend: str, head_size: int, scale: float, scorer,
                sel, layer: int) -> None:
    """Add one layer's scores of the candidate blocks of rows `sel` (those of `scorer`, a query-free scorer that
    reads K/V and has no summaries) to `batch.acc`."""
    r, c = batch.block_ids.shape
    check_layout(kv_cache, backend, head_size)
    keys, values = gather_blocks(kv_cache, batch.block_ids.reshape(-1), backend, head_size)
    keys = keys.reshape((r, c) + tuple(keys.shape[1:]))[sel]
    values = values.reshape((r, c) + tuple(values.shape[1:]))[sel]
    batch.acc[sel] += scorer.score(_inputs(batch, sel, keys, values, scale, layer))


def _inputs(batch: ScoringBatch, sel, keys, values, scale, layer: int = 0) -> ScoreInputs:
    return ScoreInputs(keys=keys, values=values, valid=batch.valid[sel], block_index=batch.block_index[sel],
                       positions=batch.positions[sel], query=None, scale=scale, layer=layer)


def groups_by_scorer(sequences, device):
    """Requests may override the policy: the rows of each scorer, scored in one call per layer."""
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, seq in enumerate(sequences):
        s = seq.scorer
        groups.setdefault(id(s), (s, []))[1].append(i)
    if len(groups) == 1:
        (scorer, _), = groups.values()
        return [(scorer, slice(None))]
    return [(s, torch.tensor(rows).to(device, non_blocking=True)) for s, rows in groups.values()]
