"""Token granularity on the vLLM path (issue 12): every (layer, KV head) keeps its own best tokens.

The blocks a sequence holds stay data-independent: prefix, window, and its `topk_blocks` oldest aged blocks, the
*slots* (the block trackers score candidates with `OldestBlocks`, so admission, eviction, freeing and the compacted
tables are block mode's, unchanged). What a slot holds differs per (layer, KV head): at each selection every head
rates its candidates (its slot tokens + the newly aged blocks' tokens) with the policy's token scorer
(policy/token_scores.py) and keeps its `topk_tokens` best: each new token that wins overwrites a slot entry that
lost (`replacements`), so a selection moves at most a block's worth of tokens per head, not the whole budget; the
trackers then free every other candidate block. K is cached after RoPE, so a moved token keeps its position, and
the paged kernel attends to the slots like any block (in any order). Semantics: policy/token_select.py (the
reference's `TokenTrackers`).

Timing, as the reference's (requested at step p, decided at step p + 1):
  * `request` (build of step p): remember each sequence's candidates. A query-dependent scorer (attention mass)
    scores them from this step's saved queries (worker/saved_queries.py) at the start of step p + 1, every layer
    in a few calls (`TokenScoring.score_saved`), into a device buffer.
  * `decide` (build of step p + 1, right after the trackers evicted): read what the scorer needs of the
    candidates, score them (query-free scorers: their K/V no longer change, so the scores equal step p's), and
    copy each head's winning new tokens over its losing slot entries, every layer in one kernel on a GPU
    (worker/token_copy.py). These kernels run before step p + 1's forward and before the freed blocks reach the
    pool (the evictions ride back on this step's output), so no freed block is read or written.
  * each sequence keeps `token_positions` [layers, kv_heads, topk_tokens], the position of every slot entry (the
    random and streaming scores and the tie-break use positions).
CFG: a pair is one sequence whose layer holds [conditional heads, null heads]. Both halves are scored as rows of
their own, as in the reference, and decide together by the sum of their scores (the reference's "shared").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from adsa_vllm.policy.token_scores import TokenInputs
from adsa_vllm.policy.token_select import replacements
from adsa_vllm.worker.layer_gather import gather_part_all_layers
from adsa_vllm.worker.token_copy import copy_tokens_all_layers

SCRATCH_BYTES = 256 << 20   # temporary device memory for scoring one chunk of layers (see _query_free_scores)


@dataclass
class TokenRequest:
    """One sequence's selection, requested at step at_pos - 1 and decided at at_pos."""
    seq: object                      # its LiveSequence
    at_pos: int
    blocks: np.ndarray               # [C] logical indices of its candidate blocks, ascending (slots first)
    scores: torch.Tensor | None = None   # [layers, kv_heads, C * bs] from the saved queries (query-dependent)
    layers_scored: int = 0


@dataclass
class TokenScoring:
    """The query-dependent requests of one step, scored from its saved queries by every layer (in layer order)."""
    requests: list[TokenRequest]
    token_index: torch.Tensor        # [R] each row's query in the saved queries (SavedQueries)
    block_ids: torch.Tensor          # [R, C] physical candidate blocks
    positions: torch.Tensor          # [R, layers, kv_heads, C * bs]
    query_pos: torch.Tensor          # [R]
    branches: int
    tp_rank: int = 0
    query_step: int = 0              # the plan whose saved queries these are

    @property
    def sequences(self) -> list:
        return [req.seq for req in self.requests]

    def score_saved(self, layers: list, stacked: torch.Tensor, backend: str) -> None:
        """Every layer's scores of these requests from the saved queries `stacked` [layers, rows, heads, D]
        (worker/query_scoring.py)."""
        r, num_layers, n = len(self.requests), len(layers), self.positions.shape[-1]
        kv_heads = layers[0].kv_cache.shape[1]
        positions = self.positions.expand(-1, -1, kv_heads, -1).transpose(0, 1).reshape(-1, kv_heads, n)
        scores = scores_by_layer(self.requests[0].seq.token_scorer, layers, self.block_ids, positions, self.query_pos,
                                 stacked[:, self.token_index], backend, self.branches, self.tp_rank)
        scores = scores.reshape(num_layers, r, kv_heads, n)
        for i, req in enumerate(self.requests):
            req.scores = scores[:, i]                                          # [layers, H, N]
            req.layers_scored = num_layers


def scores_by_layer(scorer, layers: list, block_ids: torch.Tensor, positions: torch.Tensor, query_pos: torch.Tensor,
                    query: torch.Tensor | None, backend: str, branches: int, tp_rank: int) -> torch.Tensor:
    """[L * R, H, N] scores of R requests' candidates [R, C] in every layer, rows layer-major (row l * R + i is
    request i's layer l), given each candidate's position per row [L * R, H, N], the requesting steps [R] and the
    saved queries [L, R, Hq, D] (None for query-free scorers): as many layers per scorer call as keep its float32
    copies within SCRATCH_BYTES."""
    r, n = block_ids.shape[0], positions.shape[-1]
    kv_heads, head_size = layers[0].kv_cache.shape[1], layers[0].head_size
    heads = kv_heads if query is None else max(kv_heads, query.shape[2])
    parts = []
    for chunk in layer_chunks(len(layers), 4 * r * n * heads * (head_size * len(scorer.reads) + 3)):
        caches = [layers[i].kv_cache for i in chunk]
        keys, values = (None if part not in scorer.reads else   # [chunk * R, N, H, D], layer-major
                        gather_part_all_layers(caches, block_ids.reshape(-1), part, backend, head_size)
                        .reshape(len(chunk) * r, n, kv_heads, head_size) for part in ("keys", "values"))
        q = None if query is None else query[chunk.start:chunk.stop].reshape(-1, *query.shape[2:])
        layer_of = torch.arange(chunk.start, chunk.stop, device=block_ids.device).repeat_interleave(r)
        parts.append(head_scores(scorer, keys, values, positions[chunk.start * r:chunk.stop * r],
                                 query_pos.repeat(len(chunk)), q, layers[chunk.start].impl.scale, layer_of, branches,
                                 head_offset(tp_rank, kv_heads, branches)))
    return torch.cat(parts)


def layer_chunks(num_layers: int, bytes_per_layer: int) -> list[range]:
    """Consecutive layer ranges, as many layers each as keep a scorer's float32 copies within SCRATCH_BYTES (at
    least one)."""
    step = max(1, SCRATCH_BYTES // max(1, bytes_per_layer))
    return [range(l0, min(num_layers, l0 + step)) for l0 in range(0, num_layers, step)]


def head_offset(tp_rank: int, kv_heads: int, branches: int) -> int:
    """The model's index of this rank's first KV head of a branch, from the KV heads of a layer's cache here
    (LlamaGen is MHA: tensor parallelism splits the heads evenly, never replicates them)."""
    return tp_rank * (kv_heads // branches)


def head_scores(scorer, keys, values, positions, query_pos, query, scale: float, layer, branches: int,
                head_offset: int = 0) -> torch.Tensor:
    """keys/values [R, N, H, D] (None where the scorer does not read them), positions [R, H, N], query [R, Hq, D]
    or None, query_pos [R], layer an int or [R] -> [R, H, N] float32 scores; under CFG (branches 2: heads
    [conditional, null]) each half is scored as its own row and the pair's scores summed. head_offset: the model's
    index of this rank's first KV head of a branch (tensor parallelism)."""
    r, h, n = positions.shape
    if branches == 2:
        def halves(t, dim):
            return None if t is None else torch.cat(t.chunk(2, dim=dim), 0)
        keys, values, positions, query = halves(keys, 2), halves(values, 2), halves(positions, 1), halves(query, 1)
        query_pos = torch.cat([query_pos, query_pos])
        layer = torch.cat([layer, layer]) if isinstance(layer, torch.Tensor) else layer
    valid = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    s = scorer.score(TokenInputs(keys=keys, values=values, valid=valid, positions=positions, query_pos=query_pos,
                                 query=query, scale=scale, layer=layer, head_offset=head_offset)).float()
    if branches == 2:
        s = (s[:r] + s[r:]).repeat(1, 2, 1)
    return s


@dataclass
class TokenSelections:
    """Pending token-granularity selections of the live sequences, by request id."""
    block_size: int
    branches: int = 1
    tp_rank: int = 0      # under tensor parallelism each rank selects for its own heads, with their model indices
    pending: dict = field(default_factory=dict)

    def request(self, bt: torch.Tensor, sequences: list, rows: np.ndarray, pos: np.ndarray, cand: np.ndarray,
                token_rows: np.ndarray, num_layers: int, ask_queries, query_step: int) -> list[TokenScoring]:
        """Rows (batch rows of token-granularity sequences) requesting a selection at pos + 1, with their candidate
        masks [R, W] and query rows in this step's forward -> the TokenScorings of the query-dependent ones, one per
        (scorer, candidate count); `ask_queries(query rows)` has those rows saved (-> their saved rows)."""
        groups: dict = {}
        for i, r in enumerate(rows):
            seq = sequences[r]
            req = TokenRequest(seq, int(pos[i]) + 1, np.flatnonzero(cand[i]))
            self.pending[seq.req_id] = req
            if seq.token_scorer.needs_query:
                groups.setdefault((id(seq.token_scorer), len(req.blocks)), []).append((i, req))
        out, dev = [], bt.device
        for members in groups.values():
            idx = np.array([i for i, _ in members])
            reqs = [req for _, req in members]
            block_ids, positions = self._inputs(bt, rows[idx], reqs, num_layers)
            out.append(TokenScoring(reqs, ask_queries(token_rows[idx]), block_ids, positions,
                                    torch.from_numpy(pos[idx].astype(np.int64)).to(dev), self.branches,
                                    self.tp_rank, query_step))
        return out

    def decide(self, bt: torch.Tensor, sequences: list, rows: np.ndarray, pos: np.ndarray, decided: np.ndarray,
               layers: list, backend: str, fail) -> None:
        """Rows at a decision (build of step pos): for each one whose trackers just decided (`decided`) and whose
        token request is due now, copy every head's winners into its slots. A request whose selection was not
        decided is dropped (the trackers ask again). An error fails the requests of its group (`fail(req_id, e)`),
        not the engine."""
        due = []
        for i, r in enumerate(rows):
            seq = sequences[r]
            req = self.pending.get(seq.req_id)
            if req is None or req.at_pos != pos[i] or req.seq is not seq:
                continue
            del self.pending[seq.req_id]
            if decided[i]:
                due.append((i, req))
        groups: dict = {}
        for i, req in due:   # one batched copy per (scorer, candidate count, slot count)
            key = (id(req.seq.token_scorer), len(req.blocks), req.seq.layout.topk_blocks)
            groups.setdefault(key, []).append((i, req))
        for members in groups.values():
            idx = np.array([i for i, _ in members])
            reqs = [req for _, req in members]
            try:
                self._copy_winners(bt, rows[idx], pos[idx], reqs, layers, backend)
            except Exception as e:  # noqa: BLE001 - fail these requests, not the engine
                for req in reqs:
                    fail(req.seq.req_id, e)

    def drop(self, req_id: str) -> None:
        self.pending.pop(req_id, None)

    def _inputs(self, bt, rows, reqs, num_layers):
        """-> physical candidate blocks [R, C] and each candidate's position per layer and head [R, L, H, C*bs]
        (slot entries from the sequence's map, the others where they were written)."""
        dev, bs = bt.device, self.block_size
        blocks = np.stack([req.blocks for req in reqs])
        natural = (blocks[:, :, None] * bs + np.arange(bs)).reshape(len(reqs), -1)
        positions = torch.from_numpy(natural).to(dev)[:, None, None, :]
        slots = [req.seq.token_positions for req in reqs]
        have = [r for r, t in enumerate(slots) if t is not None]
        heads = slots[have[0]].shape[1] if have else 1
        positions = positions.expand(len(reqs), num_layers, heads, natural.shape[1])
        if have:
            positions = positions.clone()
            if len(have) == len(reqs) and all(t.shape == slots[0].shape for t in slots):   # one copy for all
                positions[..., :slots[0].shape[2]] = torch.stack(slots)
            else:
                for r in have:
                    positions[r, :, :, :slots[r].shape[2]] = slots[r]
        rows_dev = torch.from_numpy(rows.astype(np.int64)).to(dev)
        block_ids = bt[rows_dev[:, None], torch.from_numpy(blocks).to(dev)].long()
        return block_ids, positions

    def _query_free_scores(self, scorer, block_ids, positions, pos, layers, backend) -> torch.Tensor:
        """[L * R, H, N] scores of every layer's candidates (rows layer-major), a chunk of layers per call: as many
        as keep the float32 copies the scorer makes within SCRATCH_BYTES (at least one layer)."""
        query_pos = torch.from_numpy(pos.astype(np.int64) - 1).to(block_ids.device)   # the step that requested
        return scores_by_layer(scorer, layers, block_ids, positions, query_pos, None, backend, self.branches,
                               self.tp_rank)

    def _copy_winners(self, bt, rows, pos, reqs, layers, backend) -> None:
        """Score every layer's candidates at once (rows = layers x requests), pick each head's replacements at once,
        then copy the winning new tokens over the losing slot entries in every layer at once."""
        k_blocks, bs = reqs[0].seq.layout.topk_blocks, self.block_size
        for req in reqs:   # the trackers keep the oldest candidates: the slots, right after the request's prefix
            prefix = req.seq.layout.prefix_blocks
            slots = np.arange(prefix, prefix + k_blocks)
            if not np.array_equal(req.blocks[:k_blocks], slots):
                raise RuntimeError(f"request {req.seq.req_id}: candidate blocks {req.blocks.tolist()} do not start "
                                   f"with its top-k slots {slots.tolist()}")
        block_ids, positions = self._inputs(bt, rows, reqs, len(layers))
        scorer, k = reqs[0].seq.token_scorer, k_blocks * bs
        if k == 0:                       # no slot: the trackers' decision is all there is
            return
        dev, r, n_layers, heads = bt.device, len(reqs), len(layers), layers[0].kv_cache.shape[1]
        n = positions.shape[-1]
        # rows in layer-major order: row l * R + i is request i's layer l
        positions = positions.expand(r, n_layers, heads, n).transpose(0, 1).reshape(-1, heads, n).clone()
        if scorer.needs_query:
            if any(req.layers_scored != n_layers for req in reqs):
                raise RuntimeError(
                    f"policy {reqs[0].seq.layout.policy!r}: the scores of this selection were not computed (its "
                    "forward's queries were not saved); start the engine with this policy as its default, or with "
                    "--enforce-eager")
            scores = torch.stack([req.scores for req in reqs], 1).reshape(-1, heads, n)
        else:
            scores = self._query_free_scores(scorer, block_ids, positions, pos, layers, backend)
        dst, src, valid = replacements(scores, positions, k)                  # [L * R, H, W]
        positions.scatter_(2, dst, torch.where(valid, positions.gather(2, src), positions.gather(2, dst)))
        # Where each pair comes from and goes; pairs that are not real go to the null block 0, which no kernel
        # reads (shapes stay data-independent: nothing waits for the device). One copy over all layers
        # (worker/token_copy.py).
        w = dst.shape[-1]
        r_idx = torch.arange(r, device=dev).repeat(n_layers)[:, None, None].expand(-1, heads, w)
        h_idx = torch.arange(heads, device=dev)[None, :, None].expand_as(r_idx)
        dst_block = torch.where(valid, block_ids[r_idx, dst // bs], 0)

        def per_layer(t):
            return t.reshape(n_layers, -1)
        copy_tokens_all_layers([layer.kv_cache for layer in layers], per_layer(block_ids[r_idx, src // bs]),
                               per_layer(src % bs), per_layer(h_idx), per_layer(dst_block), per_layer(dst % bs),
                               backend, layers[0].head_size)
        kept = positions.reshape(n_layers, r, heads, n)[..., :k].transpose(0, 1).contiguous()   # one copy
        for req, slots in zip(reqs, kept.unbind(0)):
            req.seq.token_positions = slots
