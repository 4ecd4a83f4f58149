"""Tensor parallelism on CPU without an engine: every rank must decide the identical evictions, and a rank that does
not must stop the engine (worker/rank_agreement.py).

Two gloo processes, each with a stand-in for vLLM's TP GroupCoordinator (the part the runtime uses: `cpu_group`,
`world_size`, `all_reduce`), run three scenarios in one spawn (starting the processes dominates the time):
  * reduction: each rank holds the partial scores of half the heads; `ADSARuntime.ship_to_host` gives both the full
    sum, and a whole image decided through the runtime and SlotTrackers (absorb -> decide -> request -> ship) evicts
    on both ranks exactly what one process with all the heads evicts;
  * agree: the same evictions (recorded in a different order on each rank) pass every periodic check;
  * diverge: one rank evicts one other block at one step: both ranks raise at the next check, naming that step.
"""

from __future__ import annotations

import pickle
import re
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adsa_vllm.config import ADSAConfig
from adsa_vllm.policy import pack_rows
from adsa_vllm.settings import ADSASettings
from adsa_vllm.worker.rank_agreement import CHECK_EVERY, RankAgreement
from adsa_vllm.worker.runtime import ADSARuntime

WORLD, HEADS = 2, 4
SETTINGS = ADSASettings(ADSAConfig(budget=0.5, policy="streaming"), block_size=16, cls_token_num=1, grid_size=16)
STEPS, DIVERGE_AT = 100, 41     # agree / diverge: 100 steps hold 3 checks; the divergence is caught at the 2nd


class StandInTPGroup:
    """What the runtime uses of vLLM's GroupCoordinator; the default gloo group stands for the TP group."""

    def __init__(self):
        self.cpu_group = dist.group.WORLD
        self.world_size = dist.get_world_size()
        self.rank_in_group = dist.get_rank()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()        # GroupCoordinator.all_reduce returns the result, the input stays as it was
        dist.all_reduce(out)
        return out


def _head_scores(seq_len: int, width: int) -> torch.Tensor:
    """[HEADS, position, block] integer-valued scores: float sums are exact in any order, so "the full sum" is
    exact, and the heads disagree enough that half of them alone select differently."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 1000, (HEADS, seq_len + 1, width), generator=g).float()


def _decide_image(heads: slice, group) -> list[dict]:
    """Three staggered sequences through a whole image, the planner's order per step; per-step evictions."""
    rt = ADSARuntime(SETTINGS, tp_group=group)
    layout = SETTINGS.layout()
    table = _head_scores(layout.seq_len, layout.max_blocks)[heads]
    ids = ["a", "b", "c"]
    for i, rid in enumerate(ids):
        rt._start(rid, None, first_block=i + 1)
    seqs = [rt._by_req[r] for r in ids]
    slots = np.array([s.slot for s in seqs])
    tr = rt.trackers
    pos = np.array([1, 21, 46])
    log = []
    while pos.max() < layout.seq_len - 1:
        rt.absorb_scores()
        at = np.nonzero(pos >= tr.wake[slots])[0]
        if len(at):
            rows, blocks = tr.decide(slots[at], pos[at])
            for r in np.unique(rows):
                rt.record_evictions(seqs[at[r]], blocks[rows == r].tolist())
            asked, cand = tr.request(slots[at], pos[at])
            if len(asked):
                index = pack_rows(cand)
                valid = np.arange(index.shape[1])[None, :] < cand.sum(1)[:, None]
                at_pos = pos[at[asked]] + 1
                acc = table.sum(0)[torch.from_numpy(at_pos)[:, None], torch.from_numpy(index)]
                acc = acc * torch.from_numpy(valid)
                batch = SimpleNamespace(acc=acc, started=None, ready=None, host_acc=None, layers_done=rt.num_layers,
                                        slots=slots[at[asked]], epochs=tr.epoch[slots[at[asked]]], at_pos=at_pos,
                                        host_index=index, host_valid=valid)
                rt.ship_to_host(batch)
                rt.pending.append(batch)
        rt.end_plan_step()
        log.append(rt.drain_evictions())
        pos += 1
    return log


def scenario_reduction(rank: int, group) -> dict:
    per_rank = HEADS // WORLD
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    partial = torch.arange(35, dtype=torch.float32).reshape(5, 7) * (rank + 1)    # rank 0: x, rank 1: 2x
    batch = SimpleNamespace(acc=partial, started=None)
    ADSARuntime(SETTINGS, tp_group=group).ship_to_host(batch)
    return dict(shipped=batch.host_acc.tolist(), expected=(3 * torch.arange(35.0).reshape(5, 7)).tolist(),
                evictions=_decide_image(mine, group), single=_decide_image(slice(None), None))


def _record_steps(rt: ADSARuntime, rank: int, diverge: bool) -> None:
    for step in range(1, STEPS + 1):
        pairs = [(f"r{step % 5}", [step % 17, 40 + step % 3]), (f"r{(step + 2) % 5}", [step % 11])]
        if step % 4 == 0:
            pairs = []                                   # steps without evictions take part too
        if rank == 1:                                    # the order of records within a step does not matter
            pairs = [(rid, blocks[::-1]) for rid, blocks in pairs[::-1]]
        if diverge and rank == 1 and step == DIVERGE_AT:
            pairs = [(pairs[0][0], [pairs[0][1][0] + 1] + pairs[0][1][1:])] + pairs[1:]
        for rid, blocks in pairs:
            rt.record_evictions(SimpleNamespace(req_id=rid), blocks)
        rt.end_plan_step()


def _agreement_run(rank: int, group, diverge: bool) -> dict:
    rt = ADSARuntime(SETTINGS, tp_group=group)
    error = None
    try:
        _record_steps(rt, rank, diverge)
    except RuntimeError as e:
        error = str(e)
    return dict(error=error, report=rt.agreement.report(), stats=vars(rt.stats))


def scenario_agree(rank: int, group) -> dict:
    return _agreement_run(rank, group, diverge=False)


def scenario_diverge(rank: int, group) -> dict:
    return _agreement_run(rank, group, diverge=True)


SCENARIOS = {"reduction": scenario_reduction, "agree": scenario_agree, "diverge": scenario_diverge}


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=20))
    results = {}
    for name, run in SCENARIOS.items():
        try:
            results[name] = run(rank, StandInTPGroup())
        except Exception as e:  # noqa: BLE001 - reported to the parent, which names the scenario
            results[name] = {"crashed": f"{type(e).__name__}: {e}"}
        dist.barrier()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("tp")
    mp.spawn(_rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [pickle.loads((tmp / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def _results(ranks: list[dict], scenario: str) -> list[dict]:
    for r, res in enumerate(ranks):
        assert "crashed" not in res[scenario], f"rank {r}: {res[scenario]['crashed']}"
    return [res[scenario] for res in ranks]


def test_scores_are_reduced_and_every_rank_selects_as_one_process_with_all_heads(ranks):
    a, b = _results(ranks, "reduction")
    assert a["shipped"] == b["shipped"] == a["expected"]
    single = a["single"]
    assert sum(len(blocks) for step in single for blocks in step.values()) > 20, "too few evictions to tell"
    assert a["evictions"] == single, "rank 0 selected otherwise than one process with all heads"
    assert b["evictions"] == single, "rank 1 selected otherwise than one process with all heads"


def test_identical_evictions_pass_every_check(ranks):
    a, b = _results(ranks, "agree")
    assert a["error"] is None and b["error"] is None
    assert a["report"] == b["report"]
    assert a["report"]["checks"] == STEPS // CHECK_EVERY > 0 and a["report"]["steps"] == STEPS
    assert a["stats"]["tp_checks"] == STEPS // CHECK_EVERY and a["stats"]["tp_mismatches"] == 0


def test_a_divergent_rank_stops_every_rank_at_the_next_check_naming_the_step(ranks):
    caught = -(-DIVERGE_AT // CHECK_EVERY) * CHECK_EVERY
    results = _results(ranks, "diverge")
    for r, res in enumerate(results):
        assert res["error"] is not None, f"rank {r} did not notice"
        assert f"planning step {DIVERGE_AT} " in res["error"] and f"checked at step {caught}" in res["error"]
        assert "different KV" in res["error"]
        assert res["report"]["steps"] == caught, "the error must come at the first check after the divergence"
        assert res["stats"]["tp_mismatches"] == 1 and res["stats"]["tp_checks"] == caught // CHECK_EVERY
    assert results[0]["error"] == results[1]["error"]
    named = re.findall(r"rank \d: ([0-9a-f]{16})", results[0]["error"])
    assert len(named) == 2 and named[0] != named[1], "the message must name both ranks' digests"
    assert results[0]["report"]["digest"] != results[1]["report"]["digest"]


def test_the_digest_ignores_order_within_a_step_but_not_the_step():
    def digest(steps):
        ag = RankAgreement()
        for pairs in steps:
            for rid, blocks in pairs:
                ag.record(rid, blocks)
            ag.end_step()
        return ag.digest

    base = digest([[("a", [3, 4]), ("b", [5])], []])
    assert base == digest([[("b", [5]), ("a", [4]), ("a", [3])], []])
    assert base != digest([[], [("a", [3, 4]), ("b", [5])]])       # the same blocks one step later
    assert base != digest([[("a", [3, 5]), ("b", [4])], []])       # the same blocks, other requests


def test_without_tensor_parallelism_nothing_is_exchanged():
    single = SimpleNamespace(world_size=1, cpu_group=None)    # a collective on it would fail
    ag = RankAgreement()
    for _ in range(2 * CHECK_EVERY):
        ag.record("a", [1])
        ag.end_step(single)
    assert ag.checks == 0 and ag.steps == 2 * CHECK_EVERY
