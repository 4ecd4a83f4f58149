"""Load (issue 10, deliver 6): a few hundred mixed requests against ONE real CFG + ADSA server; nothing leaks.

`python -m vllm.entrypoints.openai.api_server` with guidance (scale 2) and ADSA on a random 10x10 model (100
tokens an image, 7 blocks of 16), the pool cut to 48 blocks so the admission gate queues requests and the pool
is reused many times over. tests/load_mix.py plans each request's ADSA settings, guidance, sampling and way of
being sent (a tenth are streamed and hung up mid-generation, a tenth posted and hung up); CLIENTS threads send
them over loopback. Asserted:
  * the engine never dies: every request not hung up answers 200 with grid² tokens, all in the codebook, and
    the same greedy request gives the same image before and after the load;
  * nothing leaks: afterwards /metrics shows no running request, no KV in use (vLLM's kv_cache_usage_perc,
    i.e. every block back in the pool) and no block held by ADSA;
  * ADSA's admission never preempts, and its per-policy request counters lie between completed and sent.
"""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlparse

import pytest

from adsa_vllm.client import ServerError, completion_token_ids, image_request, post_json, stream_token_ids
from adsa_vllm.config import POLICIES
from load_mix import plan
from metrics_util import wait_idle
from server_util import adsa_server

NUM_REQUESTS = 300
CLIENTS = 12
POOL_BLOCKS = 48
LOAD_DEADLINE_S = 150


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from adsa_server(tmp_path_factory, "load_server", {"adsa": {"budget": 0.5}, "cfg": {"scale": 2.0}},
                           "--num-gpu-blocks-override", str(POOL_BLOCKS))


def _send(base: str, req) -> tuple[str, list[int] | str]:
    """("done", tokens), ("dropped", "") or ("error", message). Hanging up = closing the socket."""
    if req.way.startswith("stream"):
        return _send_streamed(base, req)
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(req.body),
                     headers={"Content-Type": "application/json"})
        if req.way == "plain_drop":
            time.sleep(req.drop_after)
            return "dropped", ""
        resp = conn.getresponse()
        if resp.status != 200:
            return "error", f"HTTP {resp.status}: {resp.read()[:500]!r}"
        return "done", completion_token_ids(json.loads(resp.read()))
    finally:
        if conn.sock is not None:
            conn.sock.close()
        conn.close()


def _send_streamed(base: str, req) -> tuple[str, list[int] | str]:
    tokens: list[int] = []
    events = stream_token_ids(base, req.body, timeout=120)
    try:
        for n, ids in enumerate(events, 1):
            tokens += ids
            if req.way == "stream_drop" and n >= req.drop_after:
                return "dropped", ""
    except ServerError as e:
        return "error", str(e)
    finally:
        events.close()
    return "done", tokens


def _greedy_image(srv) -> list[int]:
    body = image_request(srv["config"], 3, temperature=0.0, model=srv["model"], adsa={"budget": 0.5})
    return completion_token_ids(post_json(f"{srv['base']}/v1/completions", body, timeout=120))


def test_mixed_load_keeps_the_engine_alive_and_returns_every_block(server):
    base, config = server["base"], server["config"]
    before_image = _greedy_image(server)
    before = wait_idle(base)
    requests_before = before.by_label("adsa:requests_total", "policy")
    assert before.total("vllm:kv_cache_usage_perc") == 0.0

    planned = plan(config, server["model"], NUM_REQUESTS, seed=0)
    outcomes: dict[int, tuple[str, object]] = {}
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        futures = {pool.submit(_send, base, r): r for r in planned}
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
    assert kinds["done"] >= NUM_REQUESTS * 0.7, kinds   # the drops are a fifth of the mix

    after = wait_idle(base)
    assert after.total("vllm:num_requests_running") == 0
    assert after.total("vllm:kv_cache_usage_perc") == 0.0, "KV blocks leaked: " + str(after.lines("vllm:kv_cache"))
    assert after.total("adsa:blocks_held") == 0, after.lines("adsa:")
    assert after.total("adsa:preemptions_total") == 0 and after.total("vllm:num_preemptions_total") == 0
    assert after.total("adsa:blocks_freed_total") > 0
    # Hung-up requests were aborted mid-generation, not run to the end: vLLM counts finished-by-length requests
    # (its 'abort' reason read 0 in our runs, see issue 10 item 7), which are the completed ones plus the greedy
    # image above plus only those hung up too late to matter (a POST dropped after its answer was computed).
    dropped = kinds["dropped"]
    ran_to_end_anyway = after.by_label("vllm:request_success_total", "finished_reason")["length"] - kinds["done"] - 1
    assert 0 <= ran_to_end_anyway <= dropped // 2, (ran_to_end_anyway, dropped)
    # Requests the engine registered, per policy: at least every completed one, at most every one sent (a
    # request hung up early may be aborted before it reaches the engine).
    counted = after.by_label("adsa:requests_total", "policy")
    done = Counter(r.policy for r in planned if outcomes[r.index][0] == "done")
    sent = Counter(r.policy for r in planned)
    for p in POLICIES:
        assert done[p] <= counted[p] - requests_before[p] <= sent[p], (p, done[p], counted[p], sent[p])

    assert _greedy_image(server) == before_image, "the same greedy request gave another image after the load"
    print(f"\n{NUM_REQUESTS} requests in {elapsed:.1f} s with {CLIENTS} clients: {dict(kinds)}; "
          f"adsa:admission_waits_total {after.total('adsa:admission_waits_total'):.0f}, "
          f"adsa:blocks_freed_total {after.total('adsa:blocks_freed_total'):.0f}; finished by reason "
          f"{after.by_label('vllm:request_success_total', 'finished_reason')}")
