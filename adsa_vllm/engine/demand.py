"""`DemandProfile`: how many KV blocks the running requests will hold at every future step, kept incrementally.

An image request grows one token per step until its final length and then frees everything, so the blocks request r
holds after the step that is `t` steps from now are exactly
    held_r(t) = min(bound_r, cdiv(len_r + t + 1, bs))   while len_r + t + 1 < final_r, else 0
(a request of final length L stores L - 1 tokens: its last sampled token is never fed back). Admission asks for
max_t of the sum over the running requests plus the candidate (see ADSAScheduler). Recomputing that sum costs
O(running x horizon) per check; here each request's curve is added once, on an absolute step axis, when it starts
running and subtracted when it stops, so a check costs O(horizon) and a step O(running) integer compares.

A request that did not advance exactly one token per step (not scheduled in a step, a multi-token chunk, a resumed
request) is re-based: its remaining curve is subtracted and added again from its real length, so the profile is
always the exact sum the formula gives (tests/test_policy.py checks it against the direct sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESUME_HORIZON = 64   # steps a swapped request must fit for before it resumes (ADSASchedulerMixin._stays_resumed)


def held_curve(length: int, final: int, bound: int, steps: int, block_size: int) -> np.ndarray:
    """held_r(t) for t in [0, steps)."""
    tokens = length + 1 + np.arange(steps, dtype=np.int64)
    return np.where(tokens < final, np.minimum(bound, -(-tokens // block_size)), 0)


@dataclass
class _Curve:
    start: int      # absolute step of t = 0
    length: int     # tokens the request had at `start`
    final: int
    bound: int

    @property
    def steps(self) -> int:
        return max(0, self.final - self.length - 1)


class DemandProfile:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.now = 0                                 # absolute step being scheduled
        self._base = 0                               # absolute step of _sum[0]
        self._sum = np.zeros(1024, dtype=np.int64)   # demand per absolute step, from _base on
        self._curves: dict[str, _Curve] = {}

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._curves

    def __len__(self) -> int:
        return len(self._curves)

    # ---- updates ----
    def add(self, req_id: str, length: int, final: int, bound: int) -> None:
        self.remove(req_id)
        c = _Curve(self.now, length, final, bound)
        self._curves[req_id] = c
        self._span(c.start + c.steps)
        i = c.start - self._base
        self._sum[i: i + c.steps] += held_curve(length, final, bound, c.steps, self.block_size)

    def remove(self, req_id: str) -> None:
        """Subtract what is left of the request's curve (from now on)."""
        c = self._curves.pop(req_id, None)
        if c is None:
            return
        skip = self.now - c.start
        if skip < c.steps:
            i = self.now - self._base
            self._sum[i: i + c.steps - skip] -= held_curve(c.length + skip, c.final, c.bound, c.steps - skip,
                                                           self.block_size)

    def advance(self, lengths: dict[str, int]) -> None:
        """Start the next step; `lengths`: every tracked request's tokens now. Off-schedule curves are re-based."""
        self.now += 1
        for req_id, length in lengths.items():
            c = self._curves.get(req_id)
            if c is not None and c.length + (self.now - c.start) != length:
                self.remove(req_id)
                self.add(req_id, length, c.final, c.bound)
        if self.now - self._base > len(self._sum) // 2:   # drop the past, keep the array small
            shift = self.now - self._base
            self._sum = np.concatenate([self._sum[shift:], np.zeros(shift, dtype=np.int64)])
            self._base = self.now

    # ---- queries ----
    def peak_with(self, length: int, final: int, bound: int, horizon: int | None = None) -> int:
        """max over t >= 0 (t < horizon, if given) of the running demand plus one more request's curve."""
        steps = max(1, final - length - 1)
        if horizon is not None:
            steps = min(steps, max(1, horizon))
        self._span(self.now + steps)
        i = self.now - self._base
        extra = held_curve(length, final, bound, steps, self.block_size)
        peak = int((self._sum[i: i + steps] + extra).max())
        rest = self._sum[i + steps: None if horizon is None else i + max(steps, horizon)]
        return max(peak, int(rest.max())) if len(rest) else peak

    def _span(self, end: int) -> None:
        need = end - self._base
        if need > len(self._sum):
            self._sum = np.concatenate([self._sum, np.zeros(max(need, 2 * len(self._sum)) - len(self._sum),
                                                             dtype=np.int64)])


def life_average(length: int, final: int, bound: int, block_size: int) -> float:
    """Mean of held_r(t) over the request's remaining life: what it occupies on average once requests are staggered
    (a request at 50% ramps up to its bound over the first half of the image, so this is about 3/4 of the bound)."""
    steps = max(1, final - length - 1)
    return float(held_curve(length, final, bound, steps, block_size).mean())
