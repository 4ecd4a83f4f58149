"""ADSA on a real server's /metrics (issue 10, deliver 4), scraped before, during and after a few generations.

One `python -m vllm.entrypoints.openai.api_server` with ADSA at a 50% budget on a random 16x16 model (256 tokens
an image: 16 blocks of 16, of which ADSA keeps 8 + 1 slack). The pool is cut to 24 blocks, less than three
requests' bound, so the admission gate must make some of the requests wait: every ADSA series moves.
The numbers travel EngineCore -> API process inside SchedulerStats (adsa_vllm/engine/stats.py) to the
stat-logger plugin (adsa_vllm/metrics.py), so this also proves that carrier survives the process boundary.
"""

from __future__ import annotations

import json
import time

import pytest

from adsa_vllm.client import completion_token_ids, image_request
from adsa_vllm.config import POLICIES, ADSAConfig
from hang_up import paused_engine, send_post, wait_for_log
from metrics_util import Scrape, assert_preemptions_were_swaps, scrape, wait_idle
from server_util import adsa_server

BUDGET = 0.5
POOL_BLOCKS = 24
POLICY_OF_REQUEST = ["topk_v", "topk_v", "streaming", "random", "attention_mass"]   # request i: [i % 5]
# Forty requests queue for a pool that runs two at a time: twenty waves of 256 steps, during nearly all of which a
# running request is past its first eviction.
REQUESTS_PER_ROUND = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for srv in adsa_server(tmp_path_factory, "metrics_server", {"adsa": {"budget": BUDGET}},
                           "--num-gpu-blocks-override", str(POOL_BLOCKS), "--enable-log-requests", grid_size=16,
                           env={"VLLM_SERVER_DEV_MODE": "1"}):   # /pause, /resume
        yield {**srv, "bound": _held_bound(srv["config"])}


def _held_bound(config) -> int:
    """The most blocks one request may hold at BUDGET (budget + slack)."""
    return ADSAConfig(budget=BUDGET).layout(block_size=16, cls_token_num=config.cls_token_num,
                                            grid_size=config.grid_size).held_bound


def test_adsa_stats_survive_the_engine_to_api_process_codec():
    """The carrier alone, through vLLM's own msgpack encoder and the client's decoder type (no server)."""
    import adsa_vllm_patches
    from vllm.v1.engine import EngineCoreOutputs, core_client
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from adsa_vllm.engine.stats import ADSAStats, with_adsa
    adsa_vllm_patches.apply_all()
    adsa = ADSAStats(blocks_freed=7, blocks_held=3, blocks_full_attention=6, admission_waits=2,
                     requests_by_policy={"random": 1}, finished_by_reason={"abort": 2, "length": 1},
                     preemptions_by_kind={"swap_out": 3, "swap_in": 2, "recomputed": 0},
                     swap_bytes={"out": 3 << 20, "in": 2 << 20}, blocks_on_host=4)
    sent = EngineCoreOutputs(scheduler_stats=with_adsa(SchedulerStats(num_running_reqs=2), adsa))
    frames = MsgpackEncoder().encode(sent)
    got = MsgpackDecoder(core_client.EngineCoreOutputs).decode(frames).scheduler_stats
    assert got.adsa == adsa and got.adsa.kept_ratio == 0.5 and got.num_running_reqs == 2
    # Without the patch the field is dropped: what the patch is for.
    assert not hasattr(MsgpackDecoder(EngineCoreOutputs).decode(frames).scheduler_stats, "adsa")
    plain = EngineCoreOutputs(scheduler_stats=SchedulerStats(num_running_reqs=1))
    assert MsgpackDecoder(core_client.EngineCoreOutputs).decode(MsgpackEncoder().encode(plain)).scheduler_stats.adsa \
        is None


def test_idle_server_exports_every_adsa_series_at_rest(server):
    m = scrape(server["base"])
    assert m.total("adsa:blocks_held") == 0 and m.total("adsa:full_attention_blocks") == 0
    assert m.total("adsa:kept_ratio") == 1.0
    for counter in ("adsa:blocks_freed_total", "adsa:admission_waits_total", "adsa:preemptions_total"):
        assert m.total(counter) == 0, counter
    assert m.by_label("adsa:requests_total", "policy") == {p: 0.0 for p in POLICIES}
    reasons = ("stop", "length", "abort", "error", "repetition")   # vLLM's FinishReason names
    assert m.by_label("adsa:requests_finished_total", "reason") == {r: 0.0 for r in reasons}
    assert m.by_label("adsa:preemption_events_total", "kind") == {"swap_out": 0, "swap_in": 0, "recomputed": 0}
    assert m.by_label("adsa:swap_bytes_total", "direction") == {"out": 0, "in": 0}
    assert m.total("adsa:blocks_on_host") == 0


def _conclusive(m) -> bool:
    """A running request is past its first eviction: full attention would hold more blocks than are held."""
    return m.total("adsa:blocks_held") < m.total("adsa:full_attention_blocks")


def _round(server, seed: int):
    """REQUESTS_PER_ROUND requests handed to a paused engine, then scraped with the engine paused until one scrape
    is conclusive (then without); returns that scrape, or None if none was. Every scrape of the round must be a
    consistent state."""
    base, config = server["base"], server["config"]
    before = scrape(base)   # the previous round is over: these totals are final
    with paused_engine(base):   # nothing runs before every request is in the engine
        sent = []
        for i in range(REQUESTS_PER_ROUND):
            policy = POLICY_OF_REQUEST[i % len(POLICY_OF_REQUEST)]
            body = image_request(config, i % config.num_classes, adsa={"policy": policy}, seed=seed + i,
                                 temperature=1.0, top_k=100, model=server["model"])
            sent.append(send_post(base, body, request_id=f"metrics-{seed}-{i}"))
        for i in range(REQUESTS_PER_ROUND):
            wait_for_log(server["log"], f"Added request cmpl-metrics-{seed}-{i}-0", timeout=300)
    last_freed = before.total("adsa:blocks_freed_total")
    frozen = None
    deadline = time.monotonic() + 600
    while True:
        assert time.monotonic() < deadline, "generations did not finish in 600 s"
        if frozen is None or not _conclusive(frozen):
            with paused_engine(base):
                m = frozen = scrape(base)
        else:
            m = scrape(base)
        held, full = m.total("adsa:blocks_held"), m.total("adsa:full_attention_blocks")
        running, freed = m.total("vllm:num_requests_running"), m.total("adsa:blocks_freed_total")
        # One scrape is one consistent state: the stat loggers and /metrics share the API server's event loop.
        assert held <= full, m.lines("adsa:")
        assert held <= server["bound"] * running, (server["bound"], m.lines("adsa:"), running)
        assert held <= POOL_BLOCKS
        assert freed >= last_freed, "a counter went down"
        last_freed = freed
        finished = m.total("adsa:requests_finished_total") - before.total("adsa:requests_finished_total")
        assert finished <= REQUESTS_PER_ROUND, m.lines("adsa:requests_finished_total")
        if finished == REQUESTS_PER_ROUND:
            break
        time.sleep(0.05)
    for i, conn in enumerate(sent):   # each answer waits in its socket once its image is done
        resp = conn.getresponse()
        assert resp.status == 200, (i, resp.status)
        toks = completion_token_ids(json.loads(resp.read()))
        conn.close()
        assert len(toks) == config.image_tokens and all(0 <= t < config.codebook_size for t in toks), i
    return frozen if frozen is not None and _conclusive(frozen) else None


def test_gauges_move_during_generation_and_return_to_idle(server):
    """Scrape while forty requests run, then at rest: every scrape is one consistent state, the totals add up.

    The requests are handed to a paused engine (vLLM's /pause, dev mode; the API process logs "Added request" for
    each) and the engine is paused around every scrape until one catches a running request past its first eviction;
    every ADSA gauge must then show it. A scrape can only catch that state if the API process answers while the
    engine works, and on a loaded 2-core box it may not: the API process falls behind the EngineCore's outputs and
    answers /resume, /pause and /metrics only once the engine has run out of work (seen: a /resume answered 10 s
    late, after all forty images). So this test does not require the catch. The mid-eviction state is asserted for
    sure in-process by test_gauges_show_a_request_mid_eviction; the stats' trip over the process boundary by
    test_adsa_stats_survive_the_engine_to_api_process_codec and by the totals below, which only the EngineCore has.
    """
    base, config = server["base"], server["config"]
    caught = _round(server, seed=1000)
    if caught is not None:
        held, full = caught.total("adsa:blocks_held"), caught.total("adsa:full_attention_blocks")
        assert held > 0, "adsa:blocks_held is 0 while requests hold blocks: " + str(caught.lines("adsa:"))
        assert caught.total("adsa:kept_ratio") == pytest.approx(held / full), caught.lines("adsa:")
        assert caught.total("adsa:blocks_freed_total") > 0, "adsa:blocks_freed_total was still 0 mid-eviction"
    print(f"\nmid-eviction scrape caught: {caught is not None}")

    m = wait_idle(base)
    assert m.total("adsa:blocks_held") == 0 and m.total("adsa:full_attention_blocks") == 0, m.lines("adsa:")
    assert m.total("adsa:kept_ratio") == 1.0
    assert m.total("vllm:kv_cache_usage_perc") == 0.0
    # Each finished image allocated cdiv(256, 16) = 16 logical blocks and never held more than its bound.
    full_blocks = -(-(config.cls_token_num + config.image_tokens - 1) // 16)
    assert m.total("adsa:blocks_freed_total") >= REQUESTS_PER_ROUND * (full_blocks - server["bound"])
    per_round = [POLICY_OF_REQUEST[i % len(POLICY_OF_REQUEST)] for i in range(REQUESTS_PER_ROUND)]
    sent = {p: float(per_round.count(p)) for p in POLICIES}
    assert m.by_label("adsa:requests_total", "policy") == sent
    finished = m.by_label("adsa:requests_finished_total", "reason")
    assert finished["length"] == sum(sent.values()) and finished["abort"] == 0, finished
    # 24 blocks hold two requests' bounds, not forty: the gate must have said "not yet". Average admission may run a
    # third and preempt when their ramps meet: every preemption is then a swap that came back (exact), none a
    # recompute, and nothing is left on the host.
    assert m.total("adsa:admission_waits_total") > 0
    assert_preemptions_were_swaps(m)
    print("\n".join(m.lines("adsa:")))


def test_gauges_show_a_request_mid_eviction(model16):
    """The exported gauges at a step where a running request is past its first eviction equal the scheduler's own
    count. In-process (vLLM's LLMEngine with ADSAStatLogger, the class the server loads through the entry point,
    as its stat logger) and stepped by the test, so the state is reached for sure whatever the machine's load; the
    text is prometheus_client's, what /metrics serves."""
    from prometheus_client import REGISTRY, generate_latest
    from vllm import EngineArgs, SamplingParams
    from vllm.v1.engine.llm_engine import LLMEngine

    from adsa_vllm.engine.observe import engine_scheduler
    from adsa_vllm.metrics import ADSAStatLogger
    model_dir, config = model16
    engine = LLMEngine.from_engine_args(
        EngineArgs(model=str(model_dir), dtype="float32", enforce_eager=True, block_size=16, skip_tokenizer_init=True,
                   attention_backend="adsa", additional_config={"adsa": {"budget": BUDGET}},
                   num_gpu_blocks_override=POOL_BLOCKS, disable_log_stats=False),
        stat_loggers=[ADSAStatLogger])
    try:
        sched = engine_scheduler(engine)
        for i in range(3):   # three bounds exceed the 24 blocks: the gate holds one back for a while
            engine.add_request(f"mid-{i}", {"prompt_token_ids": config.prompt(i)},
                               SamplingParams(max_tokens=config.image_tokens, detokenize=False,
                                              extra_args={"adsa": {"policy": POLICY_OF_REQUEST[i]}}))
        truth = None
        for _ in range(3 * config.image_tokens):
            engine.step()
            truth = sched.adsa_step_stats()
            if truth.blocks_held < truth.blocks_full_attention:
                break
        assert truth is not None and truth.blocks_held < truth.blocks_full_attention, \
            f"no running request was past its first eviction in {3 * config.image_tokens} steps: {truth}"
        m = Scrape(generate_latest(REGISTRY).decode())
        assert m.total("adsa:blocks_held") == truth.blocks_held > 0, m.lines("adsa:")
        assert m.total("adsa:full_attention_blocks") == truth.blocks_full_attention, m.lines("adsa:")
        assert m.total("adsa:kept_ratio") == pytest.approx(truth.blocks_held / truth.blocks_full_attention)
        assert m.total("adsa:blocks_freed_total") == truth.blocks_freed > 0, m.lines("adsa:")
        assert truth.blocks_held <= _held_bound(config) * len(sched.running) <= POOL_BLOCKS
        assert m.total("adsa:admission_waits_total") == truth.admission_waits > 0, m.lines("adsa:")
        assert m.by_label("adsa:requests_total", "policy") == \
            {p: float(truth.requests_by_policy.get(p, 0)) for p in POLICIES}, m.lines("adsa:requests")
        while engine.has_unfinished_requests():
            engine.step()
        assert sched.adsa_step_stats().blocks_held == 0
    finally:
        engine.engine_core.shutdown()
