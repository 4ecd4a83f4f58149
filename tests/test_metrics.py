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
from metrics_util import assert_preemptions_were_swaps, scrape, wait_idle
from server_util import adsa_server

BUDGET = 0.5
POOL_BLOCKS = 24
POLICY_OF_REQUEST = ["topk_v", "topk_v", "streaming", "random", "attention_mass"]   # request i: [i % 5]
# Forty requests queue for a pool that runs two at a time: twenty waves of 256 steps, during nearly all of which a
# running request is past its first eviction.
REQUESTS_PER_ROUND = 40
ROUNDS = 3   # see test_gauges_move_during_generation_and_return_to_idle: a round may be inconclusive, never wrong


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for srv in adsa_server(tmp_path_factory, "metrics_server", {"adsa": {"budget": BUDGET}},
                           "--num-gpu-blocks-override", str(POOL_BLOCKS), "--enable-log-requests", grid_size=16,
                           env={"VLLM_SERVER_DEV_MODE": "1"}):   # /pause, /resume
        config = srv["config"]
        layout = ADSAConfig(budget=BUDGET).layout(block_size=16, cls_token_num=config.cls_token_num,
                                                  grid_size=config.grid_size)
        yield {**srv, "bound": layout.held_bound}


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
    is conclusive (then without); returns that scrape, or the last paused one. Every scrape of the round must be a
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
    return frozen


def test_gauges_move_during_generation_and_return_to_idle(server):
    """Scrape while forty requests run, and with the engine frozen mid-eviction.

    Polling alone cannot promise a scrape between the first eviction and the last finish: on a loaded 2-core box
    the engine can finish a whole round before a /metrics answer or a /pause reaches it (seen: 40 requests still
    being taken in while the first ones ran, a 6 s scrape, a pause landing after the last finish, in every round).
    So the engine only moves while the client lets it: the requests are handed to a paused engine (vLLM's /pause,
    dev mode; the API process logs "Added request" for each), and it is paused again around every scrape until one
    is conclusive. A paused engine's last step's stats stay on /metrics, one consistent state. A state is
    conclusive when a running request is past its first eviction; every ADSA gauge must then show it. Forty
    requests queue for 24 blocks (two requests' bounds at a time): thousands of steps. If the engine still
    finishes the round between two pauses, a working engine can produce that, so the round is run again; one that
    never shows an eviction fails every round.
    """
    base, config = server["base"], server["config"]
    for rounds in range(1, ROUNDS + 1):
        frozen = _round(server, seed=rounds * 1000)
        held, full = frozen.total("adsa:blocks_held"), frozen.total("adsa:full_attention_blocks")
        if held < full:
            break
    assert held < full, f"no frozen scrape in {ROUNDS} rounds had a request past its first eviction: " + \
        str(frozen.lines("adsa:") + frozen.lines("vllm:num_requests"))
    assert held > 0, "adsa:blocks_held is 0 while requests hold blocks: " + str(frozen.lines("adsa:"))
    assert frozen.total("adsa:kept_ratio") == pytest.approx(held / full), frozen.lines("adsa:")
    assert frozen.total("adsa:blocks_freed_total") > 0, "adsa:blocks_freed_total was still 0 mid-eviction"

    m = wait_idle(base)
    assert m.total("adsa:blocks_held") == 0 and m.total("adsa:full_attention_blocks") == 0, m.lines("adsa:")
    assert m.total("adsa:kept_ratio") == 1.0
    assert m.total("vllm:kv_cache_usage_perc") == 0.0
    # Each finished image allocated cdiv(256, 16) = 16 logical blocks and never held more than its bound.
    full_blocks = -(-(config.cls_token_num + config.image_tokens - 1) // 16)
    assert m.total("adsa:blocks_freed_total") >= REQUESTS_PER_ROUND * rounds * (full_blocks - server["bound"])
    per_round = [POLICY_OF_REQUEST[i % len(POLICY_OF_REQUEST)] for i in range(REQUESTS_PER_ROUND)]
    sent = {p: float(per_round.count(p) * rounds) for p in POLICIES}
    assert m.by_label("adsa:requests_total", "policy") == sent
    finished = m.by_label("adsa:requests_finished_total", "reason")
    assert finished["length"] == sum(sent.values()) and finished["abort"] == 0, finished
    # 24 blocks hold two requests' bounds, not forty: the gate must have said "not yet". Average admission may run a
    # third and preempt when their ramps meet: every preemption is then a swap that came back (exact), none a
    # recompute, and nothing is left on the host.
    assert m.total("adsa:admission_waits_total") > 0
    assert_preemptions_were_swaps(m)
    print("\n".join(m.lines("adsa:")))
