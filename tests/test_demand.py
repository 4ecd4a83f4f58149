"""DemandProfile (the scheduler's incremental lookahead) against the direct sum it replaces."""

from __future__ import annotations

import random

import numpy as np
import pytest

from adsa_vllm.engine.demand import DemandProfile, held_curve

BS = 16


def direct_peak(running: dict, new, window: int | None = None) -> int:
    """The old O(running x horizon) computation: max over t (t < window, if given) of the sum of every request's
    held blocks."""
    reqs = list(running.values()) + [new]
    horizon = max(1, max(final - length - 1 for length, final, _ in reqs))
    if window is not None:
        horizon = min(horizon, window)
    return int(sum(held_curve(length, final, bound, horizon, BS) for length, final, bound in reqs).max())


@pytest.mark.parametrize("seed", range(8))
def test_incremental_peak_equals_direct_sum(seed):
    rng = random.Random(seed)
    profile, running = DemandProfile(BS), {}   # running: id -> [length, final, bound]
    next_id = 0
    for _step in range(400):
        # Requests advance one token per step, except now and then one that is skipped or jumps (a chunk).
        for rid, r in running.items():
            r[0] += rng.choice([0, 2, 17]) if rng.random() < 0.05 else 1
        running = {rid: r for rid, r in running.items() if r[0] < r[1] - 1}   # finished
        for rid in [rid for rid in profile._curves if rid not in running]:
            profile.remove(rid)
        if running and rng.random() < 0.03:                                  # preempted / aborted
            victim = rng.choice(list(running))
            del running[victim]
            profile.remove(victim)
        profile.advance({rid: r[0] for rid, r in running.items()})
        final = rng.choice([257, 577, 1025])
        cand = (0, final, rng.randint(3, -(-final // BS)))
        snapshot = {k: tuple(v) for k, v in running.items()}
        assert profile.peak_with(*cand) == direct_peak(snapshot, cand)
        window = rng.choice([1, 16, 256, 2000])   # the resume hysteresis' horizon
        assert profile.peak_with(*cand, horizon=window) == direct_peak(snapshot, cand, window)
        if rng.random() < 0.3:
            running[next_id] = list(cand)
            profile.add(next_id, *cand)
            next_id += 1


def test_held_curve_matches_the_formula():
    c = held_curve(length=30, final=100, bound=4, steps=80, block_size=BS)
    tokens = 31 + np.arange(80)
    want = [min(4, -(-t // BS)) if t < 100 else 0 for t in tokens]
    assert c.tolist() == want
