"""Worker-process ADSA state: the tracker slot of every live request, and the evictions to report.

Every live request's tracker state is one slot of a `SlotTrackers` (arrays, policy/slot_trackers.py), so a step is
planned in bulk. The attention metadata builder sees rows of block ids, not request ids. Where the model runner
exposes its batch order on the host (V1 runner: `input_batch.req_ids`; V2 runner: each step's InputBatch, see
worker/worker.py), rows are matched by request id; otherwise by the physical id of a row's first KV block (prefix
blocks are never evicted and prefix caching is off, so that id is unique among live requests), which costs one
small device-to-host copy per step. The worker feeds request lifecycle events from each SchedulerOutput
(`on_schedule`), binding request id, per-request settings and first block together. A request preempted by swap
(adsa_vllm/engine/swap.py) keeps its slot and selections while its kept blocks wait in host memory (`HostKV`), and
resumes on fresh blocks; one preempted otherwise restarts with a fresh slot.

Protocol with the scheduler (worker-authoritative, see adsa_vllm/engine/manager.py): the builder decides an
eviction *before* the forward that would have read the block, so the worker never reads it again; the eviction
rides back on this step's ModelRunnerOutput and the scheduler frees the block only after this step has finished.
A block can therefore never be reallocated while any worker still reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from adsa_vllm.policy import BlockLayout, BlockScorer, needs_query, resolve_scorers
from adsa_vllm.policy.slot_trackers import SlotTrackers
from adsa_vllm.policy.token_scores import TokenScorer
from adsa_vllm.settings import ADSASettings, request_overrides
from adsa_vllm.worker.failures import RequestFailures
from adsa_vllm.worker.host_kv import HostKV
from adsa_vllm.worker.new_requests import prompt_length
from adsa_vllm.worker.rank_agreement import RankAgreement
from adsa_vllm.worker.saved_queries import SavedQueries
from adsa_vllm.worker.summaries import BlockSummaries
from adsa_vllm.worker.token_gather import TokenSelections

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.distributed.parallel_state import GroupCoordinator


@dataclass
class LiveSequence:
    req_id: str
    first_block: int
    layout: BlockLayout
    scorer: BlockScorer
    params: SamplingParams | None = None   # kept so a resumed request keeps its per-request settings
    prompt_len: int | None = None          # its condition length (a t2i caption's rows), kept for a resume
    summarized: int = 0      # logical blocks below this one have a summary in BlockSummaries (TopK-V)
    slot: int = -1           # its row in the runtime's SlotTrackers
    token_scorer: TokenScorer | None = None        # granularity "token": the policy's per-head scorer, ...
    token_positions: torch.Tensor | None = None    # ... and each slot entry's position [layers, kv_heads, topk]


@dataclass
class ScoringBatch:
    """Sequences whose selection is scored for one step; every ADSA layer adds its scores into `acc` ([R, C] on
    device)."""
    sequences: list[LiveSequence]
    slots: np.ndarray            # [R] their SlotTrackers slots ...
    epochs: np.ndarray           # [R] ... and the slots' epochs (scores reach only the sequence that asked)
    at_pos: np.ndarray           # [R] the position each selection is decided at
    candidate_stops: np.ndarray  # [R] 1 + each sequence's last candidate's logical index
    host_index: np.ndarray       # [R, C] block_index on the host
    host_valid: np.ndarray       # [R, C] valid on the host
    block_ids: torch.Tensor      # [R, C] physical block ids (padding: the null block 0)
    block_index: torch.Tensor    # [R, C] logical block indices
    valid: torch.Tensor          # [R, C]
    positions: torch.Tensor      # [R]
    acc: torch.Tensor            # [R, C] float32
    groups: list                 # [(scorer, row selector)]: rows sharing a scorer are scored in one call
    layers_done: int = 0
    token_index: torch.Tensor | None = None   # [R] query-dependent: each sequence's row in the saved queries ...
    query_step: int | None = None             # ... of this plan (SavedQueries.step); None: query-free
    host_acc: torch.Tensor | None = None   # pinned copy of acc, valid once `ready` has fired
    ready: torch.cuda.Event | None = None  # CUDA event recorded after the copy (None on CPU: already done)
    started: torch.cuda.Event | None = None   # CUDA event recorded before the scoring kernels (device timing)


@dataclass
class PlannerStats:
    """Where ADSA's per-step time goes (benchmarks/throughput.py reports these per step)."""
    steps: int = 0              # metadata builds with at least one ADSA-managed row
    host_s: float = 0.0         # host time inside the builder's ADSA planning (incl. launching the scoring)
    scoring_s: float = 0.0      # device time of query-free scoring (CUDA events; host time on CPU)
    scored_rows: int = 0        # selections scored
    summarized_blocks: int = 0  # blocks summarised for TopK-V (each once per sequence)
    tp_checks: int = 0          # tensor-parallel eviction agreement checks (worker/rank_agreement.py)
    tp_mismatches: int = 0      # ... that found ranks disagreeing (each one also raised)


@dataclass
class ADSARuntime:
    settings: ADSASettings                       # the engine's (resolved by the config hook)
    num_layers: int = 1                          # a ScoringBatch counts only once every layer has scored it
    branches: int = 1                            # 2 under CFG: a layer's KV heads are [conditional, null]
    tp_group: GroupCoordinator | None = None     # all-reduce group for scores under tensor parallelism
    max_rows: int = 256                          # decode rows in one step at most (max_num_seqs)
    batch_req_ids: Callable[[int], list] | None = None   # n -> the first n request ids in batch order, if known
    _by_req: dict = field(default_factory=dict)
    _by_block: dict = field(default_factory=dict)
    _layouts: dict = field(default_factory=dict)
    _resume: dict = field(default_factory=dict)  # preempted request id -> (params, prompt_len) until it resumes
    _parked: dict = field(default_factory=dict)  # swapped-out request id -> its LiveSequence, until it resumes
    host: HostKV = field(default_factory=HostKV)   # their kept blocks
    layers: list = field(default_factory=list)     # this worker's ADSA attention layers (registered at build)
    _scorers: dict = field(default_factory=dict)
    _outbox: dict = field(default_factory=dict)
    failures: RequestFailures = field(default_factory=RequestFailures)
    pending: list = field(default_factory=list)  # ScoringBatches of the last forward, absorbed by the next build
    token_scoring: list = field(default_factory=list)   # TokenScorings asked of the last forward's saved queries
    queries: SavedQueries | None = None          # the decode queries query-dependent policies score (post_init)
    backend: str = ""                            # the inner attention backend's name (set by each plan)
    summaries: BlockSummaries = field(default_factory=BlockSummaries)
    trackers: SlotTrackers = field(default_factory=SlotTrackers)
    stats: PlannerStats = field(default_factory=PlannerStats)
    agreement: RankAgreement = field(default_factory=RankAgreement)   # digest of the evictions decided here
    tokens: TokenSelections | None = None        # token granularity's pending selections (built in post_init)
    _generation: int = 0                         # bumped by every start / drop (invalidates `_rows`)
    _rows: tuple = (None, None)                  # ((generation, batch ids), (sequences, slots)) of the last step

    def __post_init__(self):
        rank = 0 if self.tp_group is None else self.tp_group.rank_in_group
        self.tokens = TokenSelections(self.block_size, self.branches, rank)
        self.queries = SavedQueries(self.num_layers, self.max_rows, needs_query(self.settings.defaults))

    @property
    def block_size(self) -> int:
        return self.settings.block_size

    def layout_for(self, extra_args: dict | None, prompt_len: int | None = None) -> BlockLayout:
        """`ADSASettings.layout` of the request (the parse the API process and the scheduler run), cached."""
        key = (self.settings.config_for(request_overrides(extra_args)), prompt_len)
        if key not in self._layouts:   # one layout per distinct setting, shared by the requests that use it
            self._layouts[key] = self.settings.layout_of(*key)
        return self._layouts[key]

    def _scorers_of(self, layout: BlockLayout) -> tuple:
        """`resolve_scorers(layout)`: (block scorer, token scorer or None). One instance per setting, so the
        builder can score all rows sharing it in one batched call (the key: every layout field a scorer reads)."""
        key = (layout.policy, layout.keep, layout.seed, layout.granularity, layout.heads, layout.cond_tokens,
               layout.row_tokens)
        if key not in self._scorers:
            self._scorers[key] = resolve_scorers(layout)
        return self._scorers[key]

    # ---- lifecycle, from SchedulerOutput ----
    def on_schedule(self, so) -> None:
        swaps = getattr(so, "adsa_swaps", None)   # touchpoint scheduler-output-swaps
        for rid in so.finished_req_ids:
            self._drop(rid)
            self._resume.pop(rid, None)
        for rid, (logical, physical) in (swaps.out.items() if swaps else ()):
            if rid not in so.finished_req_ids:
                self._park(rid, logical, physical)   # first: the forward of this step may write these blocks
        for rid in so.preempted_req_ids or ():
            if rid in self._parked or rid in self.host:
                continue   # swapped: it keeps its sequence
            seq = self._by_req.get(rid)
            if seq is not None:   # a preempted request resumes later with its own settings and condition length
                self._resume[rid] = (seq.params, seq.prompt_len)
            self._drop(rid)
        into = swaps.into if swaps else {}
        for nr in so.scheduled_new_reqs:   # the V2 runner sends a resumed request as a new one
            if nr.req_id in into:
                self._unpark(nr.req_id, *into[nr.req_id])
            else:
                self._start(nr.req_id, nr.sampling_params, nr.block_ids[0][0], prompt_length(nr))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if rid in into:
                self._unpark(rid, *into[rid])
            elif rid in cached.resumed_req_ids and cached.new_block_ids[i]:
                params, prompt_len = self._resume.pop(rid, (None, None))
                self._start(rid, params, cached.new_block_ids[i][0][0], prompt_len)

    # ---- swap preemption ----
    def _caches(self) -> list:
        return [layer.kv_cache for layer in self.layers]

    def reserve_swap_space(self) -> None:
        """Reserve the host buffer of swapped blocks (worker/host_kv.py), once the KV caches exist, where the
        admission rule may preempt by swap."""
        if self.settings.admission != "peak" and self.settings.swap_space_gib > 0:
            self.host.reserve(self._caches(), self.settings.swap_space_gib)

    def _park(self, req_id: str, logical: list[int], physical: list[int]) -> None:
        """Copy the kept blocks out and keep the sequence (slot, selections, watermarks) for its resume."""
        with torch.inference_mode():   # the summary table was made inside the forward's inference mode
            self.host.swap_out(req_id, logical, physical, self._caches(), self.summaries.table)
        seq = self._by_req.pop(req_id, None)
        if seq is None:
            return
        self._parked[req_id] = seq
        self._generation += 1
        if self._by_block.get(seq.first_block) is seq:
            del self._by_block[seq.first_block]

    def _unpark(self, req_id: str, logical: list[int], physical: list[int]) -> None:
        with torch.inference_mode():
            self.host.swap_in(req_id, logical, physical, self._caches(), self.summaries.table)
        seq = self._parked.pop(req_id, None)
        if seq is None:
            return
        seq.first_block = physical[logical.index(0)]   # block 0 is a prefix block: never evicted, always swapped
        self._by_req[req_id] = seq
        self._by_block[seq.first_block] = seq
        self._generation += 1

    def _start(self, req_id: str, params, first_block: int, prompt_len: int | None = None) -> None:
        self._drop(req_id)
        try:
            layout = self.layout_for(getattr(params, "extra_args", None), prompt_len)
            scorer, token_scorer = self._scorers_of(layout)
        except Exception as e:  # noqa: BLE001 - validated in the API process; this is the last line of defence
            self.fail(req_id, e)
            layout = self.layout_for(None)   # the forward of this step still needs a valid row
            scorer, token_scorer = self._scorers_of(layout)
        seq = LiveSequence(req_id, first_block, layout, scorer, params, prompt_len, token_scorer=token_scorer)
        seq.slot = self.trackers.add(layout)
        self._generation += 1
        self._by_req[req_id] = seq
        self._by_block[first_block] = seq

    def _drop(self, req_id: str) -> None:
        self.tokens.drop(req_id)
        self.host.discard(req_id)
        seq = self._by_req.pop(req_id, None) or self._parked.pop(req_id, None)
        if seq is None:
            return
        self.trackers.remove(seq.slot)
        self._generation += 1
        if self._by_block.get(seq.first_block) is seq:
            del self._by_block[seq.first_block]

    def row_sequences(self, n: int, block_table: torch.Tensor) -> tuple[list, np.ndarray]:
        """The live sequence of each of the first n batch rows (None for rows ADSA does not manage) and its slot
        (-1 for those). Decode batches keep their order for many steps: the answer is reused while the batch's
        request ids and the set of live sequences are unchanged (one tuple compare instead of n dict lookups)."""
        if self.batch_req_ids is None:
            seqs = [self._by_block.get(b) for b in block_table[:n, 0].cpu().tolist()]
            return seqs, _slots_of(seqs)
        key = (self._generation, n, tuple(self.batch_req_ids(n)))
        if self._rows[0] != key:
            seqs = [self._by_req.get(rid) for rid in key[2]]
            seqs += [None] * (n - len(seqs))   # rows padded for a CUDA graph size hold no request
            self._rows = (key, (seqs, _slots_of(seqs)))
        return self._rows[1]

    # ---- scores ----
    def ship_to_host(self, batch: ScoringBatch) -> None:
        """Reduce across tensor-parallel ranks, then start the device-to-host copy without waiting for it."""
        acc = batch.acc if self.tp_group is None else self.tp_group.all_reduce(batch.acc)
        if acc.is_cuda:
            batch.host_acc = torch.empty(acc.shape, dtype=acc.dtype, pin_memory=True)
            batch.host_acc.copy_(acc, non_blocking=True)
            batch.ready = torch.cuda.Event(enable_timing=batch.started is not None)
            batch.ready.record()
        else:
            batch.host_acc = acc

    def absorb_scores(self) -> None:
        """Hand the scores computed last step to the trackers (they decide at this step's build)."""
        for batch in self.pending:
            if batch.layers_done != self.num_layers:
                continue  # not scored (its requests failed): the trackers ask again next step
            if batch.host_acc is None:
                self.ship_to_host(batch)
            if batch.ready is not None:
                batch.ready.synchronize()  # normally long done: recorded before the previous forward
                if batch.started is not None:
                    self.stats.scoring_s += batch.started.elapsed_time(batch.ready) / 1e3
            self.trackers.add_scores(batch.slots, batch.epochs, batch.at_pos, batch.host_index, batch.host_valid,
                                     batch.host_acc.numpy())
        self.pending = []

    def fail(self, req_id: str, error: BaseException) -> None:
        self.failures.fail(req_id, error)

    # ---- evictions to report ----
    def record_evictions(self, seq: LiveSequence, blocks: list[int]) -> None:
        if blocks:
            self._outbox.setdefault(seq.req_id, []).extend(blocks)
            self.agreement.record(seq.req_id, blocks)

    def end_plan_step(self) -> None:
        """Called once per planning step on every rank: under tensor parallelism the ranks' evictions are compared
        every few steps (rank_agreement.py)."""
        self.agreement.end_step(self.tp_group, self.stats)

    def drain_evictions(self) -> dict[str, list[int]]:
        out, self._outbox = self._outbox, {}
        return out


def _slots_of(sequences: list) -> np.ndarray:
    return np.fromiter((-1 if seq is None else seq.slot for seq in sequences), dtype=np.int64, count=len(sequences))
