"""Scoring of the query-dependent policies (attention_mass, head_split, row_anchored) from the saved queries.

At the start of step p + 1 (before its schedule's swap-ins can write a block, worker/worker.py) the requests of step
p are scored from the queries its forward saved (worker/saved_queries.py): block requests into their ScoringBatch
(shipped to the host, absorbed at the build), token requests into their TokenRequests (read at the decision).

All layers are scored together: the candidate keys of a chunk of layers are gathered in one kernel on a GPU
(worker/layer_gather.py), then the scorer runs once over rows = layers x requests (layer-major), as many layers per
call as keep its float32 copies within SCRATCH_BYTES; the per-layer scores are then added in layer order, as the
reference's trackers add them. (Against scoring layer by layer this changed no measured throughput,
benchmarks/results/throughput_query_h100.md: the ~1.3 ms per step is reading the keys, not launching kernels; it
does launch far fewer.)
"""

from __future__ import annotations

import time

import torch

from adsa_vllm.policy import ScoreInputs
from adsa_vllm.worker.kv_views import check_layout
from adsa_vllm.worker.layer_gather import gather_part_all_layers
from adsa_vllm.worker.runtime import ADSARuntime, ScoringBatch
from adsa_vllm.worker.token_gather import TokenScoring, layer_chunks


@torch.inference_mode()   # called before the runner's own inference mode, on tensors made inside it
def score_saved_queries(runtime: ADSARuntime) -> None:
    """Score every query-dependent request of the last forward; fail those whose forward saved no query."""
    batches = [b for b in runtime.pending if b.query_step is not None and b.layers_done == 0]
    token_scoring, runtime.token_scoring = runtime.token_scoring, []
    if not (batches or token_scoring):
        return
    t0 = time.perf_counter()
    queries = runtime.queries
    stale = [job for job in batches + token_scoring if not queries.saved(job.query_step)]
    for job in stale:
        for seq in job.sequences:
            runtime.fail(seq.req_id, RuntimeError(
                f"policy {seq.layout.policy!r} scores with the decode query, which this engine's forward did not "
                "save (its attention ran in a CUDA graph that has no copy of it: the engine's default policy needs "
                "no query); start the engine with this policy as its default, or with --enforce-eager"))
    batches = [b for b in batches if b not in stale]
    token_scoring = [t for t in token_scoring if t not in stale]
    started = None
    if batches and batches[0].acc.is_cuda:
        started = torch.cuda.Event(enable_timing=True)
        started.record()
    for job in batches + token_scoring:
        try:
            if isinstance(job, TokenScoring):
                job.score_saved(runtime.layers, queries.stacked, runtime.backend)
            else:
                _score_blocks(runtime, job, queries.stacked)
        except Exception as e:  # noqa: BLE001 - fail these requests, not the engine
            for seq in job.sequences:
                runtime.fail(seq.req_id, e)
            if not isinstance(job, TokenScoring):
                job.layers_done = -1   # never absorbed: the trackers ask again (the requests fail anyway)
    for batch in batches:
        if batch.layers_done == runtime.num_layers:
            batch.started = started
            runtime.ship_to_host(batch)
            runtime.stats.scored_rows += len(batch.sequences)
    if started is None:
        runtime.stats.scoring_s += time.perf_counter() - t0


def _score_blocks(runtime: ADSARuntime, batch: ScoringBatch, stacked: torch.Tensor) -> None:
    """Every layer's scores of a block batch into `batch.acc`, one scorer call per (scorer, layer chunk)."""
    layers, backend = runtime.layers, runtime.backend
    layer0 = layers[0]
    check_layout(layer0.kv_cache, backend, layer0.head_size)
    query = stacked[:, batch.token_index]                                   # [L, R, H, D]
    c = batch.block_ids.shape[1]
    for scorer, sel in batch.groups:
        ids = batch.block_ids[sel]
        r = ids.shape[0]
        heads = query.shape[2]   # float32 keys off CUDA (policy/dense_attention.py) and ~3 float32 [heads] per token
        per_layer = 4 * r * c * runtime.block_size * heads * (layer0.head_size + 3)
        for chunk in layer_chunks(len(layers), per_layer):
            n = len(chunk)
            keys = gather_part_all_layers([layers[i].kv_cache for i in chunk], ids.reshape(-1), "keys", backend,
                                          layer0.head_size)                 # [n * r * c, bs, kv heads, D]
            keys = keys.reshape(n * r, c, *keys.shape[1:])
            x = ScoreInputs(keys=keys, values=None, valid=batch.valid[sel].repeat(n, 1),
                            block_index=batch.block_index[sel].repeat(n, 1), positions=batch.positions[sel].repeat(n),
                            query=query[chunk.start:chunk.stop][:, sel].reshape(n * r, *query.shape[2:]),
                            scale=layers[chunk.start].impl.scale,
                            layer=torch.arange(chunk.start, chunk.stop, device=ids.device).repeat_interleave(r))
            scores = scorer.score(x).reshape(n, r, c)
            for s in scores:   # in layer order, as the reference adds them
                batch.acc[sel] += s
    batch.layers_done = len(layers)

