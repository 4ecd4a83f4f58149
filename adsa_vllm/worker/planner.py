"""Per-step ADSA planning on the worker: decide evictions, compact the block table, arrange scoring.

Scores come from one of two places, with identical values (candidate blocks are complete before the forward that
requests them, so their K/V no longer change):
  * query-free policies (TopK-V, streaming, random): scored here, at the build of the step that decides, from
    every layer's KV cache. The forward then runs no ADSA code at all, so full CUDA graphs can capture it.
  * policies that need the decode query (attention mass): scored inside each layer's forward (`score_layer`)
    into a `ScoringBatch`, decided at the next build; those engines run attention outside CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from adsa_vllm.policy import ScoreInputs
from adsa_vllm.worker.kv_views import check_cpu_layout, gather_blocks
from adsa_vllm.worker.runtime import ADSARuntime, ScoringBatch


@dataclass
class StepPlan:
    kept: dict[int, list[int]]      # row -> kept logical blocks (rows that attend to fewer than all their blocks)
    seq_lens: np.ndarray            # [num_reqs] seq_lens as the kernel must see them (compacted for kept rows)
    scoring: ScoringBatch | None    # rows scored inside this forward (query-dependent policies only)


def plan_step(runtime: ADSARuntime, cm: CommonAttentionMetadata, layers: list, backend: str) -> StepPlan:
    runtime.absorb_scores()
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1]
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                else cm.seq_lens.cpu())[:n].numpy().astype(np.int64)
    bt = cm.block_table_tensor
    first_blocks = bt[:n, 0].cpu().tolist()   # one small copy; on GPU this waits for the previous step

    rows = []   # (row, seq, pos) of decode rows of live ADSA sequences
    for row in range(n):
        if q_lens[row] != 1:
            continue  # prefill chunk: full causal attention (eviction starts at the first decode)
        seq = runtime.sequence_for(first_blocks[row])
        if seq is not None and seq.tracker.layout.evicts:
            rows.append((row, seq, int(seq_lens[row]) - 1))

    _score_due_now(rows, bt, layers, backend)
    kept, in_forward = {}, []
    bs = runtime.block_size
    for row, seq, pos in rows:
        tracker = seq.tracker
        runtime.record_evictions(seq, tracker.begin_step(pos))
        blocks = tracker.kept_blocks(pos)
        if len(blocks) < tracker.layout.num_blocks(pos):
            kept[row] = blocks
            seq_lens[row] = (len(blocks) - 1) * bs + pos % bs + 1
        cands = tracker.scoring_request(pos)
        if cands is not None and tracker.scorer.needs_query:
            in_forward.append((row, seq, pos, cands))
    scoring = _scoring_batch(cm, in_forward, int(qsl[0])) if in_forward else None
    if scoring is not None:
        runtime.pending.append(scoring)
    return StepPlan(kept, seq_lens, scoring)


def compacted_block_table(bt: torch.Tensor, kept: dict[int, list[int]], out: torch.Tensor) -> torch.Tensor:
    """Write bt with each kept row's blocks moved to the front into `out` (same shape); returns `out`."""
    if not kept:
        return out.copy_(bt)
    idx = np.broadcast_to(np.arange(bt.shape[1], dtype=np.int64), bt.shape).copy()
    for row, blocks in kept.items():
        idx[row, : len(blocks)] = blocks
        idx[row, len(blocks):] = 0          # never read: beyond the compacted seq_len
    return torch.gather(bt, 1, torch.from_numpy(idx).to(bt.device, non_blocking=True), out=out)


def _score_due_now(rows, bt: torch.Tensor, layers: list, backend: str) -> None:
    """Query-free policies: score the candidates requested last step for this step, over every layer."""
    due = [(row, seq, pos) for row, seq, pos in rows
           if seq.tracker.pending_for(pos) and not seq.tracker.scorer.needs_query]
    if not due:
        return
    # Scored as of the step that requested them (pos - 1), exactly as an in-forward pass would have: the random
    # policy hashes that position, and the candidates' K/V have not changed since.
    batch = _scoring_batch_for(bt, [(row, seq, pos - 1, seq.tracker.pending_blocks) for row, seq, pos in due],
                               token_base=0, token_rows=None)
    for layer in layers:
        score_layer(batch, None, layer.kv_cache, backend, layer.head_size, layer.impl.scale)
    acc = batch.acc.cpu()
    for i, seq in enumerate(batch.sequences):
        seq.tracker.add_layer_scores(acc[i, : batch.num_candidates[i]])


def _scoring_batch(cm: CommonAttentionMetadata, scored, token_base: int) -> ScoringBatch:
    qsl = cm.query_start_loc_cpu
    return _scoring_batch_for(cm.block_table_tensor, scored, token_base, [int(qsl[row]) for row, *_ in scored])


def _scoring_batch_for(bt: torch.Tensor, scored, token_base: int, token_rows) -> ScoringBatch:
    dev = bt.device
    r, c = len(scored), max(len(cands) for *_, cands in scored)
    index = np.zeros((r, c), dtype=np.int64)
    valid = np.zeros((r, c), dtype=bool)
    for i, (*_, cands) in enumerate(scored):
        index[i, : len(cands)] = cands
        valid[i, : len(cands)] = True
    index_dev = torch.from_numpy(index).to(dev)
    valid_dev = torch.from_numpy(valid).to(dev)
    rows = torch.tensor([row for row, *_ in scored], device=dev)
    block_ids = torch.where(valid_dev, torch.gather(bt[rows].long(), 1, index_dev), 0)
    seqs = [seq for _, seq, _, _ in scored]
    token_index = torch.tensor([t - token_base for t in token_rows] if token_rows else [0] * r, device=dev)
    return ScoringBatch(
        sequences=seqs, num_candidates=[len(cands) for *_, cands in scored], token_index=token_index,
        block_ids=block_ids, block_index=index_dev, valid=valid_dev,
        positions=torch.tensor([pos for _, _, pos, _ in scored], device=dev),
        acc=torch.zeros(r, c, dtype=torch.float32, device=dev), groups=_groups_by_scorer(seqs, dev))


def score_layer(batch: ScoringBatch, query: torch.Tensor | None, kv_cache: torch.Tensor, backend: str,
                head_size: int, scale: float) -> None:
    """Add one layer's scores of every candidate block to `batch.acc` (one batched call per scorer)."""
    r, c = batch.block_ids.shape
    if backend == "CPU_ATTN":
        check_cpu_layout(_cpu_isa(kv_cache.dtype, kv_cache.shape[2], head_size), kv_cache.dtype,
                         kv_cache.shape[2], head_size)
    keys, values = gather_blocks(kv_cache, batch.block_ids.reshape(-1), backend, head_size)
    keys = keys.reshape((r, c) + tuple(keys.shape[1:]))
    values = values.reshape((r, c) + tuple(values.shape[1:]))
    for scorer, sel in batch.groups:
        x = ScoreInputs(keys=keys[sel], values=values[sel], valid=batch.valid[sel],
                        block_index=batch.block_index[sel], positions=batch.positions[sel],
                        query=query[batch.token_index[sel]] if scorer.needs_query else None, scale=scale)
        batch.acc[sel] += scorer.score(x)
    batch.layers_done += 1


def _groups_by_scorer(sequences, device):
    """Requests may override the policy: the rows of each scorer, scored in one call per layer."""
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, seq in enumerate(sequences):
        s = seq.tracker.scorer
        groups.setdefault(id(s), (s, []))[1].append(i)
    if len(groups) == 1:
        (scorer, _), = groups.values()
        return [(scorer, slice(None))]
    return [(s, torch.tensor(rows, device=device)) for s, rows in groups.values()]


_ISA: dict = {}


def _cpu_isa(dtype, block_size, head_size) -> str:
    key = (dtype, block_size, head_size)
    if key not in _ISA:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
        _ISA[key] = _get_attn_isa(dtype, block_size, head_size, "auto")
    return _ISA[key]
