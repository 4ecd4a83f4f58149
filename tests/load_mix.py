"""The request mix of tests/test_load.py: a seeded, reproducible list of image requests for a CFG + ADSA server.

Every request is a full image (grid² tokens) with its own ADSA settings (policy, budget, TopK-V direction, random
seed), guidance (scale, interval), sampling (greedy / temperature, top-k, top-p, seed) and a way of being sent:
  "plain"        POST, read the whole answer;
  "stream"       streamed, read to the end;
  "stream_drop"  streamed, hang up after `drop_after` events (vLLM aborts it mid-generation);
  "plain_drop"   POST, hang up after `drop_after` seconds without reading the answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from adsa_vllm.client import ServerError, completion_token_ids, image_request, post_json
from adsa_vllm.config import POLICIES
from hang_up import post_and_hang_up, stream

# Budgets on a 10x10 image (100 tokens, 7 blocks of 16; prefix + local need 3 blocks): 50% (3 blocks), 75% and
# 64 tokens (4 blocks) evict, None never does.
BUDGETS = (0.5, 0.75, 64, None)
WAYS = ("plain",) * 7 + ("stream", "stream_drop", "plain_drop")


@dataclass
class PlannedRequest:
    index: int
    way: str
    body: dict
    policy: str
    drop_after: float = 0.0   # events (stream_drop) or seconds (plain_drop)


def plan(config, model: str, count: int, seed: int = 0) -> list[PlannedRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        policy = rng.choice(POLICIES)
        adsa: dict = {"policy": policy, "budget": rng.choice(BUDGETS)}
        if policy == "topk_v":
            adsa["keep"] = rng.choice(("diverse", "similar"))
        if policy == "random":
            adsa["seed"] = rng.randrange(1000)
        greedy = rng.random() < 0.3
        body = image_request(
            config, rng.randrange(config.num_classes), adsa=adsa, model=model,
            seed=None if greedy or rng.random() < 0.2 else rng.randrange(1 << 20),
            temperature=0.0 if greedy else rng.choice((0.7, 1.0, 1.3)),
            top_k=0 if greedy else rng.choice((0, 1, 20, 200)),
            top_p=1.0 if greedy else rng.choice((1.0, 0.9)),
            cfg_scale=rng.choice((1.0, 2.0, 4.0)), cfg_interval=rng.choice((-1, 20)))
        way = rng.choice(WAYS)
        drop_after = rng.randint(1, 60) if way == "stream_drop" else rng.uniform(0.01, 1.0)
        out.append(PlannedRequest(i, way, body, policy, drop_after if way.endswith("_drop") else 0.0))
    return out


def send(base: str, req: PlannedRequest) -> tuple[str, list[int] | str]:
    """Send one planned request its way: ("done", tokens), ("dropped", "") or ("error", message)."""
    try:
        if req.way == "plain_drop":
            post_and_hang_up(base, req.body, req.drop_after)
            return "dropped", ""
        if req.way.startswith("stream"):
            tokens, hung_up = stream(base, req.body, int(req.drop_after) if req.way == "stream_drop" else None)
            return ("dropped", "") if hung_up else ("done", tokens)
        return "done", completion_token_ids(post_json(f"{base}/v1/completions", req.body, timeout=120))
    except ServerError as e:
        return "error", str(e)
