"""Load (issue 10, deliver 6): a few hundred mixed requests against ONE real CFG + ADSA server; nothing leaks; and
a client that hangs up aborts its request in the engine.

`python -m vllm.entrypoints.openai.api_server` with guidance (scale 2) and ADSA on a random 10x10 model (100
tokens an image, 7 blocks of 16), the pool cut to 48 blocks so the admission gate queues requests and the pool
is reused many times over. tests/load_mix.py plans each request's ADSA settings, guidance, sampling and way of
being sent (a tenth are streamed and hung up mid-generation, a tenth posted and hung up); CLIENTS threads send
them over loopback. Asserted, whatever the speed of the machine (a hang-up may land before or after its request
would have finished: that race is the clients' and the server's speed, not a property of the engine):
  * the engine never dies: every request not hung up answers 200 with grid² tokens, all in the codebook, and
    the same greedy request gives the same image before and after the load;
  * nothing leaks: afterwards /metrics shows no running request, no KV in use (vLLM's kv_cache_usage_perc,
    i.e. every block back in the pool) and no block held by ADSA;
  * the engine's books balance: every request it registered left by length or by abort, none by error; at least
    the completed ones by length, at most the hung-up ones by abort; ADSA preempts only by swap (exact), never
    by recompute.
That a hang-up really becomes an abort in the engine is the second test, made deterministic by pausing the engine
(vLLM's dev endpoint /pause) while the client hangs up (tests/hang_up.py).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest

from adsa_vllm.client import completion_token_ids, image_request, post_json
from adsa_vllm.config import POLICIES
from hang_up import hang_up, paused_engine, send_post, wait_for_log
from load_mix import plan, send
from metrics_util import assert_preemptions_were_swaps, wait_idle
from server_util import adsa_server

NUM_REQUESTS = 300
CLIENTS = 12
POOL_BLOCKS = 48
LOAD_DEADLINE_S = 600      # a hang, not a speed limit: 2 busy cores ran the load in 45-65 s


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Dev mode for /pause and /resume; request logging for the API process's "Request ... aborted." line.
    yield from adsa_server(tmp_path_factory, "load_server", {"adsa": {"budget": 0.5}, "cfg": {"scale": 2.0}},
                           "--num-gpu-blocks-override", str(POOL_BLOCKS), "--enable-log-requests",
                           env={"VLLM_SERVER_DEV_MODE": "1"})


def _greedy_image(srv) -> list[int]:
    body = image_request(srv["config"], 3, temperature=0.0, model=srv["model"], adsa={"budget": 0.5})
    return completion_token_ids(post_json(f"{srv['base']}/v1/completions", body, timeout=120))


def test_mixed_load_keeps_the_engine_alive_and_returns_every_block(server):
    base, config = server["base"], server["config"]
    before_image = _greedy_image(server)
    before = wait_idle(base)
    assert before.total("vllm:kv_cache_usage_perc") == 0.0

    planned = plan(config, server["model"], NUM_REQUESTS, seed=0)
    outcomes: dict[int, tuple[str, object]] = {}
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = {pool.submit(send, base, r): r for r in planned}
        for fut in as_completed(futures, timeout=LOAD_DEADLINE_S):
            outcomes[futures[fut].index] = fut.result()
    elapsed = time.monotonic() - t0

    kinds = Counter(kind for kind, _ in outcomes.values())
    errors = {i: v for i, (k, v) in outcomes.items() if k == "error"}
    assert not errors, f"{len(errors)} requests failed, e.g. {list(errors.items())[:3]}; log {server['log']}"
    for r in planned:
        kind, tokens = outcomes[r.index]
        if kind == "done":
            assert len(tokens) == config.image_tokens, (r.way, r.body, len(tokens))
            assert all(0 <= t < config.codebook_size for t in tokens), (r.way, r.body)
    # Only hang-ups may end without an image (a stream whose image ended before its hang-up counts as done).
    assert kinds["done"] >= sum(not r.way.endswith("_drop") for r in planned), kinds

    after = wait_idle(base)
    assert after.total("vllm:num_requests_running") == 0
    assert after.total("vllm:kv_cache_usage_perc") == 0.0, "KV blocks leaked: " + str(after.lines("vllm:kv_cache"))
    assert after.total("adsa:blocks_held") == 0, after.lines("adsa:")
    assert_preemptions_were_swaps(after, aborted=kinds["dropped"])
    assert after.total("adsa:blocks_freed_total") > 0
    # The engine's books (adsa:requests_total by policy in, adsa:requests_finished_total by reason out). A request
    # hung up early may never reach the engine; one hung up late has already finished by length.
    dropped = kinds["dropped"]
    finished = _delta(after, before, "adsa:requests_finished_total", "reason")
    registered = _delta(after, before, "adsa:requests_total", "policy")
    assert finished["error"] == 0 and finished["stop"] == 0 and finished["repetition"] == 0, finished
    assert finished["length"] + finished["abort"] == sum(registered.values()), (finished, registered)
    assert kinds["done"] <= finished["length"] <= kinds["done"] + dropped, (finished, kinds)
    assert finished["abort"] <= dropped, (finished, kinds)
    done = Counter(r.policy for r in planned if outcomes[r.index][0] == "done")
    sent = Counter(r.policy for r in planned)
    for p in POLICIES:
        assert done[p] <= registered[p] <= sent[p], (p, done[p], registered[p], sent[p])

    assert _greedy_image(server) == before_image, "the same greedy request gave another image after the load"
    print(f"\n{NUM_REQUESTS} requests in {elapsed:.1f} s with {CLIENTS} clients: {dict(kinds)}; finished in the "
          f"engine {dict(finished)}; adsa:admission_waits_total {after.total('adsa:admission_waits_total'):.0f}, "
          f"adsa:blocks_freed_total {after.total('adsa:blocks_freed_total'):.0f}")


def _delta(after, before, name: str, label: str) -> Counter:
    now, then = after.by_label(name, label), before.by_label(name, label)
    return Counter({k: int(v - then.get(k, 0.0)) for k, v in now.items()})


@pytest.mark.parametrize("way", ["stream", "plain"])
def test_a_client_that_hangs_up_aborts_its_request_in_the_engine(server, way):
    """A hang-up becomes an abort in the engine, deterministically: the engine is paused (no step runs, so the
    request cannot finish first, however slow the client), the request is sent and reaches the engine (the API
    process logs "Added request" after handing it over), the client hangs up, and the engine is resumed only once
    the API process logged the abort, which travels to the engine behind the request. The request must leave by
    abort, alone, with nothing held. (Under load a hang-up often lands after its image is done: on 2 busy cores
    the client process is starved while the engine runs; see the load test.) Aborts of requests mid-generation,
    blocks evicted, are the in-process tests' (test_vllm_adsa.py, test_cfg.py): a hang-up reaches the engine as the
    same abort call whether its request waits or runs."""
    base, log = server["base"], server["log"]
    before = wait_idle(base)
    request_id = f"hangup-{way}"
    body = image_request(server["config"], 5, seed=7, model=server["model"], adsa={"budget": 0.5})
    with paused_engine(base):
        conn = send_post(base, {**body, "stream": way == "stream"}, request_id=request_id)
        wait_for_log(log, f"Added request cmpl-{request_id}-0")
        hang_up(conn)
        wait_for_log(log, f"Request cmpl-{request_id}-0 aborted.")
    after = wait_idle(base)
    finished = _delta(after, before, "adsa:requests_finished_total", "reason")
    assert +finished == Counter(abort=1), finished
    assert sum(_delta(after, before, "adsa:requests_total", "policy").values()) == 1
    assert after.total("vllm:kv_cache_usage_perc") == 0.0 and after.total("adsa:blocks_held") == 0
    assert _greedy_image(server) == _greedy_image(server), "the engine no longer serves the same image twice"
