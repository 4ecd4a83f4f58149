"""The ADSA attention backend: the platform's paged kernel, fed only the blocks a sequence keeps.

`make_adsa_backend(inner)` subclasses the inner backend (CPU_ATTN, FLASH_ATTN, TRITON_ATTN; pattern of vLLM's
ChunkedLocalAttention), so `get_name()` and the KV layout stay the inner ones:
  * Builder.build: for each single-token (decode) row, ask the request's tracker which logical blocks it keeps,
    hand the inner builder a compacted block table [kept blocks...] and compacted seq_lens (every kept block is
    full except the tail, which is all a paged kernel needs; K/V writes still go to the positional slot).
    Rows due for a selection get a `ScoringBatch` attached to the metadata.
  * Impl.forward: run the inner kernel, then let the scorer rate the candidate blocks of this layer
    (accumulated over layers; the next build turns the sums into evictions).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, CommonAttentionMetadata

from adsa_vllm.policy import ScoreInputs
from adsa_vllm.worker.kv_views import check_cpu_layout, gather_blocks
from adsa_vllm.worker.runtime import ADSARuntime, ScoringBatch


@functools.lru_cache
def make_adsa_backend(inner: type[AttentionBackend]) -> type[AttentionBackend]:
    inner_builder, inner_impl = inner.get_builder_cls(), inner.get_impl_cls()
    backend_name = inner.get_name()

    class ADSAMetadataBuilder(inner_builder):  # type: ignore[misc, valid-type]
        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
            # The compacted block table changes shape every step; piecewise CUDA graphs still cover the rest.
            return AttentionCGSupport.NEVER

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False):
            runtime = _runtime(self.vllm_config, self.layer_names)
            cm, scoring = plan_step(runtime, common_attn_metadata, self.kv_cache_spec.block_size)
            metadata = super().build(common_prefix_len, cm, fast_build)
            metadata.adsa_scoring = scoring
            return metadata

    class ADSAImpl(inner_impl):  # type: ignore[misc, valid-type]
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            scoring = getattr(attn_metadata, "adsa_scoring", None)
            if scoring is not None:
                score_layer(scoring, query, kv_cache, backend_name, self.head_size, self.scale)
            return out

    class ADSABackend(inner):  # type: ignore[misc, valid-type]
        @staticmethod
        def get_builder_cls():
            return ADSAMetadataBuilder

        @staticmethod
        def get_impl_cls():
            return ADSAImpl

    ADSABackend.__name__ = ADSABackend.__qualname__ = f"ADSA_{inner.__name__}"
    return ADSABackend


def _runtime(vllm_config, layer_names) -> ADSARuntime:
    layer = vllm_config.compilation_config.static_forward_context[layer_names[0]]
    return layer.adsa_runtime


def plan_step(runtime: ADSARuntime, cm: CommonAttentionMetadata, block_size: int):
    """Apply last step's scores, choose this step's blocks, and return (compacted metadata, ScoringBatch|None)."""
    runtime.absorb_scores()
    n = cm.num_reqs
    qsl = cm.query_start_loc_cpu[: n + 1]
    q_lens = (qsl[1:] - qsl[:-1]).tolist()
    seq_lens = (cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None
                else cm.seq_lens.cpu())[:n].tolist()
    first_blocks = cm.block_table_tensor[:n, 0].cpu().tolist()   # one small copy; on GPU this syncs once a step

    kept_rows: dict[int, list[int]] = {}
    scored = []
    for row in range(n):
        if q_lens[row] != 1:
            continue  # prefill chunk: full causal attention (trackers start at the first decode)
        seq = runtime.sequence_for(first_blocks[row])
        if seq is None or not seq.tracker.layout.evicts:
            continue
        pos = seq_lens[row] - 1
        tracker = seq.tracker
        runtime.record_evictions(seq, tracker.begin_step(pos))
        kept = tracker.kept_blocks(pos)
        if len(kept) < tracker.layout.num_blocks(pos):
            kept_rows[row] = kept
        cands = tracker.scoring_request(pos)
        if cands is not None:
            scored.append((row, seq, pos, cands))

    scoring = _scoring_batch(runtime, cm, scored, int(qsl[0])) if scored else None
    if scoring is not None:
        runtime.pending.append(scoring)
    if not kept_rows:
        return cm, scoring
    return _compact(cm, kept_rows, seq_lens, block_size), scoring


def _compact(cm: CommonAttentionMetadata, kept_rows: dict[int, list[int]], seq_lens: list[int], bs: int):
    bt = cm.block_table_tensor
    idx = np.broadcast_to(np.arange(bt.shape[1], dtype=np.int64), bt.shape).copy()
    new_lens = np.asarray(seq_lens, dtype=np.int64)
    for row, kept in kept_rows.items():
        idx[row, : len(kept)] = kept
        idx[row, len(kept):] = 0          # never read: beyond the compacted seq_len
        new_lens[row] = (len(kept) - 1) * bs + (seq_lens[row] - 1) % bs + 1
    lens_cpu = torch.from_numpy(new_lens).to(cm.seq_lens.dtype)
    seq_lens = cm.seq_lens.clone()
    seq_lens[: len(new_lens)] = lens_cpu.to(seq_lens.device, non_blocking=True)
    upper = cm.seq_lens_cpu_upper_bound
    if upper is not None:
        upper = upper.clone()
        upper[: len(new_lens)] = lens_cpu.to(upper.dtype)
    new_bt = torch.gather(bt, 1, torch.from_numpy(idx).to(bt.device, non_blocking=True))
    return cm.replace(block_table_tensor=new_bt, seq_lens=seq_lens, max_seq_len=int(new_lens.max()),
                      seq_lens_cpu_upper_bound=upper, _seq_lens_cpu=None, _num_computed_tokens_cpu=None,
                      _num_computed_tokens_cache=None)


def _scoring_batch(runtime: ADSARuntime, cm: CommonAttentionMetadata, scored, token_base: int) -> ScoringBatch:

    bt = cm.block_table_tensor
    dev = bt.device
    c = max(len(cands) for *_, cands in scored)
    r = len(scored)
    index = torch.zeros(r, c, dtype=torch.int64)
    valid = torch.zeros(r, c, dtype=torch.bool)
    rows = torch.tensor([row for row, *_ in scored])
    for i, (_, _, _, cands) in enumerate(scored):
        index[i, : len(cands)] = torch.tensor(cands)
        valid[i, : len(cands)] = True
    index_dev = index.to(dev)
    block_ids = torch.gather(bt[rows.to(dev)].long(), 1, index_dev)
    block_ids = torch.where(valid.to(dev), block_ids, 0)
    qsl = cm.query_start_loc_cpu
    token_index = torch.tensor([int(qsl[row]) - token_base for row, *_ in scored], device=dev)
    seqs = [seq for _, seq, _, _ in scored]
    return ScoringBatch(
        sequences=seqs, num_candidates=[len(cands) for *_, cands in scored], token_index=token_index,
        block_ids=block_ids, block_index=index_dev, valid=valid.to(dev),
        positions=torch.tensor([pos for _, _, pos, _ in scored], device=dev),
        acc=torch.zeros(r, c, dtype=torch.float32, device=dev), groups=_groups_by_scorer(seqs, dev))


def score_layer(batch: ScoringBatch, query: torch.Tensor, kv_cache: torch.Tensor, backend: str,
                head_size: int, scale: float) -> None:
    """Add this layer's scores of every candidate block to `batch.acc` (one batched call per scorer)."""
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


@functools.lru_cache
def _cpu_isa(dtype, block_size, head_size) -> str:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    return _get_attn_isa(dtype, block_size, head_size, "auto")
