"""ADSA on a real server's /metrics (issue 10, deliver 4), scraped before, during and after a few generations.

One `python -m vllm.entrypoints.openai.api_server` with ADSA at a 50% budget on a random 16x16 model (256 tokens
an image: 16 blocks of 16, of which ADSA keeps 8 + 1 slack). The pool is cut to 24 blocks, less than three
requests' bound, so the admission gate must make some of the five requests wait: every ADSA series moves.
The numbers travel EngineCore -> API process inside SchedulerStats (adsa_vllm/engine/stats.py) to the
stat-logger plugin (adsa_vllm/metrics.py), so this also proves that carrier survives the process boundary.
"""

from __future__ import annotations

import threading
import time

import pytest

from adsa_vllm.client import completion_token_ids, image_request, post_json, stream_token_ids
from adsa_vllm.config import POLICIES, ADSAConfig
from metrics_util import scrape, wait_idle
from server_util import adsa_server

BUDGET = 0.5
POOL_BLOCKS = 24
POLICY_OF_REQUEST = ["topk_v", "topk_v", "streaming", "random", "attention_mass"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for srv in adsa_server(tmp_path_factory, "metrics_server", {"adsa": {"budget": BUDGET}},
                           "--num-gpu-blocks-override", str(POOL_BLOCKS), grid_size=16):
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
                     requests_by_policy={"random": 1})
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


def test_gauges_move_during_generation_and_return_to_idle(server):
    """Scrape while five requests run, and once at a moment known to lie mid-eviction.

    Polling alone cannot promise a scrape between the first eviction and the last finish: on a loaded 2-core box a
    scrape can wait seconds for the API server's event loop (seen: 2.7 s gaps; one CI run missed every eviction).
    So request 0 streams, and the other four are sent only once it has received 3/4 of its tokens: by then it has
    been evicting for ~50 steps (a step's stats are recorded right after its tokens are queued for the client) and
    holds its bound, and four queued images keep blocks held for seconds after the next scrape is sent.
    """
    base, config = server["base"], server["config"]
    images: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    anchor = config.image_tokens * 3 // 4
    assert -(-(config.cls_token_num + anchor) // 16) > server["bound"], "the anchor must lie past the first eviction"
    evicting = threading.Event()

    def body(i: int, policy: str) -> dict:
        return image_request(config, i % config.num_classes, adsa={"policy": policy}, seed=i, temperature=1.0,
                             top_k=100, model=server["model"])

    def generate(i: int, policy: str) -> None:
        try:
            images[i] = completion_token_ids(post_json(f"{base}/v1/completions", body(i, policy), timeout=300))
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    def stream(i: int, policy: str) -> None:
        try:
            images[i] = []
            for ids in stream_token_ids(base, body(i, policy), timeout=300):
                images[i] += ids
                if len(images[i]) >= anchor:
                    evicting.set()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            evicting.set()   # never leave the main thread waiting

    first = threading.Thread(target=stream, args=(0, POLICY_OF_REQUEST[0]))
    rest = [threading.Thread(target=generate, args=(i, p)) for i, p in enumerate(POLICY_OF_REQUEST) if i > 0]
    first.start()
    seen = {"held": 0.0, "ratio": 1.0, "freed_while_held": False}
    last_freed = 0.0
    deadline = time.monotonic() + 300
    while first.is_alive() or any(t.is_alive() for t in rest) or not rest[0].ident:
        assert time.monotonic() < deadline, "generations did not finish in 300 s"
        if evicting.is_set() and not rest[0].ident:
            for t in rest:
                t.start()
        m = scrape(base)
        held, full = m.total("adsa:blocks_held"), m.total("adsa:full_attention_blocks")
        running, freed = m.total("vllm:num_requests_running"), m.total("adsa:blocks_freed_total")
        # One scrape is one consistent state: the stat loggers and /metrics share the API server's event loop.
        assert held <= full, m.lines("adsa:")
        assert held <= server["bound"] * running, (server["bound"], m.lines("adsa:"), running)
        assert held <= POOL_BLOCKS
        assert freed >= last_freed, "a counter went down"
        if held > 0:
            seen["held"] = max(seen["held"], held)
            seen["ratio"] = min(seen["ratio"], m.total("adsa:kept_ratio"))
            seen["freed_while_held"] |= freed > 0
        last_freed = freed
        time.sleep(0.3)
    for t in [first, *rest]:
        t.join()
    assert not errors, errors
    assert seen["held"] > 0, "adsa:blocks_held never rose above 0 while requests were generating"
    assert seen["freed_while_held"], "adsa:blocks_freed_total was still 0 mid-eviction (exported only at the end?)"
    assert seen["ratio"] < 1.0, "adsa:kept_ratio stayed at 1 although ADSA evicts at a 50% budget"

    for i, toks in images.items():
        assert len(toks) == config.image_tokens and all(0 <= t < config.codebook_size for t in toks), i

    m = wait_idle(base)
    assert m.total("adsa:blocks_held") == 0 and m.total("adsa:full_attention_blocks") == 0, m.lines("adsa:")
    assert m.total("adsa:kept_ratio") == 1.0
    assert m.total("vllm:kv_cache_usage_perc") == 0.0
    # Each finished image allocated cdiv(256, 16) = 16 logical blocks and never held more than its bound.
    full_blocks = -(-(config.cls_token_num + config.image_tokens - 1) // 16)
    assert m.total("adsa:blocks_freed_total") >= len(POLICY_OF_REQUEST) * (full_blocks - server["bound"])
    sent = {p: float(POLICY_OF_REQUEST.count(p)) for p in POLICIES}
    assert m.by_label("adsa:requests_total", "policy") == sent
    # 24 blocks hold two requests' bounds, not five: the gate must have said "not yet", and nothing was preempted.
    assert m.total("adsa:admission_waits_total") > 0
    assert m.total("adsa:preemptions_total") == 0 and m.total("vllm:num_preemptions_total") == 0
    print("\n".join(m.lines("adsa:")))
