"""Read a server's Prometheus /metrics (tests/test_metrics.py, tests/test_load.py). Standard library only."""

from __future__ import annotations

import re
import time
import urllib.request

_LABEL = re.compile(r'(\w+)="([^"]*)"')


class Scrape:
    """One /metrics answer: samples as (name, labels, value)."""

    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            self.samples.append((name, dict(_LABEL.findall(labels)), float(value)))

    def total(self, name: str) -> float:
        """The sum over label sets; a KeyError if the server does not export `name` at all."""
        values = [v for n, _, v in self.samples if n == name]
        if not values:
            raise KeyError(f"/metrics has no {name}")
        return sum(values)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for n, labels, v in self.samples:
            if n == name:
                out[labels[label]] = out.get(labels[label], 0.0) + v
        return out

    def lines(self, prefix: str) -> list[str]:
        """The sample lines whose metric name starts with `prefix` (for messages and the README example)."""
        return [line for line in self.text.splitlines() if line.startswith(prefix)]


def scrape(base: str) -> Scrape:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        return Scrape(r.read().decode())


def wait_idle(base: str, timeout: float = 60.0) -> Scrape:
    """The first scrape with nothing running or waiting (vLLM updates its gauges after each engine step)."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(base)
        if m.total("vllm:num_requests_running") == 0 and m.total("vllm:num_requests_waiting") == 0:
            return m
        assert time.monotonic() < deadline, f"requests still running after {timeout} s: " + \
            "; ".join(m.lines("vllm:num_requests"))
        time.sleep(0.2)


def assert_preemptions_were_swaps(m: Scrape, aborted: float = 0) -> None:
    """Average admission may preempt, but only by swap: none recomputed, every swap out came back unless its
    request was aborted while on the host (at most `aborted` of them), nothing is left there, and vLLM counted the
    same preemptions."""
    kinds = m.by_label("adsa:preemption_events_total", "kind")
    moved = m.by_label("adsa:swap_bytes_total", "direction")
    assert kinds["recomputed"] == 0, kinds
    assert kinds["swap_in"] <= kinds["swap_out"] <= kinds["swap_in"] + aborted, kinds
    assert m.total("adsa:preemptions_total") == kinds["swap_out"] == m.total("vllm:num_preemptions_total"), \
        m.lines("adsa:preempt") + m.lines("vllm:num_preempt")
    assert (moved["out"] > 0) == (kinds["swap_out"] > 0) and moved["in"] <= moved["out"], moved
    assert m.total("adsa:blocks_on_host") == 0, m.lines("adsa:")
