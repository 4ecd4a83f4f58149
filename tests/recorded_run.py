"""One batched vllm.LLM.generate of labelled requests with a HeldRecorder around it, and the engine state the ADSA
tests read afterwards (tests/test_vllm_adsa.py, test_token_edges.py): tokens per label, held blocks per step and
request, the scheduler's ADSA stats, the block pool before and after."""

from __future__ import annotations

import torch

from adsa_vllm.engine.observe import SchedulerWatch, engine_scheduler


def scheduler(llm):
    return engine_scheduler(llm)


def manager(llm):
    return scheduler(llm).adsa_managers[0]


def sampling_params(n, extra=None):
    from vllm import SamplingParams
    return SamplingParams(temperature=0.0, max_tokens=n, detokenize=False,
                          extra_args=None if extra is None else {"adsa": extra})


def generate(llm, config, requests, n=None):
    """requests: [(label, class_id, overrides|None)] -> ({label: token tensor}, outputs) (one batched call)."""
    prompts = [{"prompt_token_ids": config.prompt(c)} for _, c, _ in requests]
    params = [sampling_params(config.image_tokens if n is None else n, ov) for _, _, ov in requests]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == len(requests)
    return {label: torch.tensor(list(o.outputs[0].token_ids)) for (label, _, _), o in zip(requests, outs)}, outs


def internal_ids(llm_outs, sched_ids):
    """RequestOutput.request_id (external) -> the scheduler's internal id ('<external>-<suffix>')."""
    out = {}
    for o in llm_outs:
        match = [r for r in sched_ids if r == o.request_id or r.startswith(o.request_id + "-")]
        assert len(match) == 1, (o.request_id, sched_ids)
        out[o.request_id] = match[0]
    return out


class HeldRecorder:
    """After every schedule() (a SchedulerWatch callback): held blocks and the bound of each running request (the
    moment a sequence holds most: this step's tail is allocated, this step's evictions not yet applied)."""

    def __init__(self, llm):
        self.sched, self.m = scheduler(llm), manager(llm)
        self.log: dict[str, list[int]] = {}
        self.bound: dict[str, int] = {}
        self.layout: dict[str, object] = {}
        self.watch = SchedulerWatch(self.sched, on_step=self._record)

    def _record(self, sched):
        for r in sched.running:
            rid = r.request_id
            entry = self.m.requests[rid]
            self.layout[rid] = entry.layout
            self.bound[rid] = entry.layout.budget_blocks + entry.layout.slack_blocks
            counted = sum(not b.is_null for b in self.m.req_to_blocks.get(rid, ()))
            assert self.m.held_blocks(rid) == counted, "the manager's O(1) held count drifted"
            self.log.setdefault(rid, []).append(counted)

    def remove(self):
        self.watch.close()


def recorded_run(llm, config, requests) -> dict:
    """Generate `requests` ([(label, class_id, overrides|None)]) recording held blocks -> tokens ({'label/class':
    tensor}), rec (the HeldRecorder), labels (internal request id -> 'label/class'), stats (adsa_stats()), the
    pool's free blocks before and after, blocks freed by eviction, the manager's and scheduler's requests left."""
    m, sched = manager(llm), scheduler(llm)
    free_before, freed_before = m.block_pool.get_num_free_blocks(), m.total_freed
    rec = HeldRecorder(llm)
    try:
        tokens, outs = generate(llm, config, [(f"{lab}/{c}", c, ov) for lab, c, ov in requests])
    finally:
        rec.remove()
    ids = internal_ids(outs, list(rec.log))
    labels = {ids[o.request_id]: f"{lab}/{c}" for (lab, c, _), o in zip(requests, outs)}
    return dict(tokens=tokens, rec=rec, labels=labels, stats=sched.adsa_stats(), free_before=free_before,
                free_after=m.block_pool.get_num_free_blocks(), freed=m.total_freed - freed_before,
                live_after=dict(m.requests), sched_requests_after=dict(sched.requests),
                num_blocks=m.block_pool.num_gpu_blocks)
