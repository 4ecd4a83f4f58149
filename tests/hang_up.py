"""Clients that hang up, and a way to hold the engine still while they do (tests/test_load.py, test_fuzz_server.py).

Hanging up = closing the socket: vLLM's API server sees the disconnect (`with_cancellation` for a plain POST,
StreamingResponse for a stream) and aborts the request in the engine. Whether a hang-up lands before the request
would have finished anyway depends on how fast each side runs, so a test that needs "aborted, not finished" for
sure pauses the engine first (`paused_engine`: vLLM's dev endpoint /pause?mode=keep freezes scheduling, while
aborts are still taken from the engine's input queue) and only resumes it once the API process logged the abort.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from adsa_vllm.client import stream_token_ids


def stream(base: str, body: dict, hang_up_after: int | None = None, timeout: float = 120) -> tuple[list[int], bool]:
    """Stream `body`: (its token ids, whether we hung up). With hang_up_after, hang up after that many events
    unless the stream ended first. A server error event raises ServerError."""
    ids: list[int] = []
    events = stream_token_ids(base, body, timeout=timeout)
    try:
        for n, new in enumerate(events, 1):
            ids += new
            if hang_up_after is not None and n >= hang_up_after:
                return ids, True
    finally:
        events.close()   # hang up without reading the rest
    return ids, False


def send_post(base: str, body: dict, request_id: str | None = None) -> http.client.HTTPConnection:
    """POST `body` (not streamed) and return without reading the answer; `hang_up(conn)` closes it."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    headers = {"Content-Type": "application/json", **({"X-Request-Id": request_id} if request_id else {})}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    return conn


def hang_up(conn: http.client.HTTPConnection) -> None:
    if conn.sock is not None:
        conn.sock.close()
    conn.close()


def post_and_hang_up(base: str, body: dict, after_s: float) -> None:
    """POST `body` and hang up after `after_s` seconds without reading the answer."""
    conn = send_post(base, body)
    try:
        time.sleep(after_s)
    finally:
        hang_up(conn)


def _post_empty(base: str, path: str) -> None:
    req = urllib.request.Request(f"{base}{path}", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200, (path, r.status)


@contextmanager
def paused_engine(base: str):
    """Scheduling frozen inside the block (needs VLLM_SERVER_DEV_MODE=1 on the server); resumed on exit.
    clear_cache=false: vLLM's default clears the prefix cache by preempting every running request."""
    _post_empty(base, "/pause?mode=keep&clear_cache=false")
    try:
        yield
    finally:
        _post_empty(base, "/resume")


def wait_for_log(log: Path, text: str, timeout: float = 60.0) -> None:
    """Until the server log holds `text` (the API process logs each abort with --enable-log-requests)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} not in {log} after {timeout} s"
        time.sleep(0.05)


__all__ = ["hang_up", "paused_engine", "post_and_hang_up", "send_post", "stream", "wait_for_log"]
