"""Fuzz the real server (issue 10): no single request may take the engine down.

One `python -m vllm.entrypoints.openai.api_server` with CFG (scale 2) + ADSA (75%: one top-k block among the
older ones) on a small random 10x10 model: 100 tokens an image, so the good request after each of the ~110 cases
keeps the module near 2 minutes on 2 CPU cores.
First a good image is generated and checked against the plain-PyTorch reference (margin-aware, see
greedy_match.py); it is then the oracle: after every case of the table in fuzz_cases.py (wrong types, out-of-range
values, unknown keys, huge numbers, wrong prompt shapes, JSON that is not an object), after streamed requests and
after requests whose client hangs up mid-generation, the same request must return exactly that image (same server,
same machine, one request at a time, so the same arithmetic). At the end /metrics shows nothing running and no KV
in use.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import pytest

from adsa_vllm.client import completion_token_ids, image_request, post_json
from adsa_vllm.config import ADSAConfig
from adsa_vllm.llamagen.convert import load_reference
from fuzz_cases import cases, encode
from greedy_match import assert_greedy_matches_reference
from hang_up import post_and_hang_up, stream
from metrics_util import wait_idle
from server_util import adsa_server

GOOD_CLASS = 1


BUDGET = 0.75


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    for srv in adsa_server(tmp_path_factory, "fuzz_server", {"adsa": {"budget": BUDGET}, "cfg": {"scale": 2.0}}):
        srv["good_body"] = image_request(srv["config"], GOOD_CLASS, temperature=0.0, model=srv["model"])
        good = _good_image(srv)
        assert_greedy_matches_reference([good], load_reference(srv["model_dir"]), [GOOD_CLASS], cfg_scale=2.0,
                                        adsa=ADSAConfig(budget=BUDGET), cfg_selection="shared")
        srv["good"] = good
        yield srv


def _send(srv, raw: bytes, path="/v1/completions", timeout=120) -> tuple[int, object]:
    u = urlparse(srv["base"])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode(errors="replace")


def _message(payload) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))
    return str(payload)


def _good_image(srv) -> list[int]:
    return completion_token_ids(post_json(f"{srv['base']}/v1/completions", srv["good_body"], timeout=120))


def _assert_still_serving(srv, after: str) -> None:
    got = _good_image(srv)
    assert got == srv["good"], f"after {after!r} the good request returned another image"


def test_table_of_bad_requests_each_fails_alone(fuzz_server):
    table = cases(fuzz_server["config"])
    assert len(table) >= 60
    wrong = []
    for name, body, status, text in table:
        if isinstance(body, dict) and "model" not in body:
            body = {**body, "model": fuzz_server["model"]}
        got, payload = _send(fuzz_server, encode(body))
        if got != status or (text is not None and text not in _message(payload)):
            wrong.append(f"{name}: HTTP {got} {_message(payload)[:300]!r} (want {status}, {text!r})")
        elif status == 200:
            assert len(payload["choices"][0]["token_ids"]) == int(body["max_tokens"]), name
        wait_idle(fuzz_server["base"])
        _assert_still_serving(fuzz_server, name)
    assert not wrong, "\n".join(wrong)


def test_logprobs_over_http_name_tokens_by_id(fuzz_server):
    body = {**fuzz_server["good_body"], "logprobs": 3}
    status, payload = _send(fuzz_server, encode(body))
    assert status == 200, _message(payload)
    choice = payload["choices"][0]
    assert choice["token_ids"] == fuzz_server["good"]
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in fuzz_server["good"]]
    assert all(len(top) >= 3 and max(top.values()) == v for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    _assert_still_serving(fuzz_server, "logprobs")


def test_sampled_n2_and_streaming(fuzz_server):
    body = {**fuzz_server["good_body"], "n": 2, "temperature": 1.0, "seed": 5, "max_tokens": 16}
    status, payload = _send(fuzz_server, encode(body))
    assert status == 200, _message(payload)
    assert [len(c["token_ids"]) for c in payload["choices"]] == [16, 16]
    streamed, _ = stream(fuzz_server["base"], fuzz_server["good_body"])
    assert streamed == fuzz_server["good"]
    wait_idle(fuzz_server["base"])
    _assert_still_serving(fuzz_server, "streaming")


def test_clients_hanging_up_mid_generation(fuzz_server):
    srv = fuzz_server
    for stop_after in (1, 5, 40):   # streamed: hang up after a few events
        stream(srv["base"], srv["good_body"], hang_up_after=stop_after)
        wait_idle(srv["base"])
        _assert_still_serving(srv, f"stream hung up after {stop_after} events")
    for delay in (0.05, 0.5):        # not streamed: hang up before the answer
        post_and_hang_up(srv["base"], srv["good_body"], after_s=delay)
        wait_idle(srv["base"])
        _assert_still_serving(srv, f"client hung up after {delay} s")


def test_metrics_show_an_idle_engine_at_the_end(fuzz_server):
    m = wait_idle(fuzz_server["base"])
    assert m.total("vllm:kv_cache_usage_perc") == 0.0, m.lines("vllm:kv_cache")
    _assert_still_serving(fuzz_server, "the whole module")
