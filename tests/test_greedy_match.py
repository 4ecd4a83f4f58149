"""The margin-aware greedy comparison (tests/greedy_match.py) on hand-made logprobs: it excuses only near-ties."""

from __future__ import annotations

import pytest
import torch

from greedy_match import check_greedy, tolerance


def _logprobs(margins: list[float], vocab: int = 8) -> torch.Tensor:
    """[1, n, vocab]: at position j token 0 is best and token 1 is `margins[j]` below it; the rest far below."""
    lp = torch.full((1, len(margins), vocab), -20.0)
    lp[0, :, 0] = -1.0
    lp[0, :, 1] = -1.0 - torch.tensor(margins)
    return lp


def test_tolerance_grows_like_two_scale_minus_one():
    assert tolerance(4.0) == pytest.approx(7 * tolerance(1.0))
    assert tolerance(2.0) == pytest.approx(3 * tolerance(1.0))
    assert tolerance(0.5) == pytest.approx(tolerance(1.0))   # s < 1: |1 - s| + s = 1


def test_argmax_everywhere_passes():
    report = check_greedy(torch.zeros(1, 200, dtype=torch.int64), _logprobs([1.0] * 200), cfg_scale=4.0)
    assert (report.near_ties, report.differing) == (0, 0)


def test_a_near_tie_may_go_either_way():
    margins = [1.0] * 200
    margins[150] = tolerance(4.0) / 3
    got = torch.zeros(1, 200, dtype=torch.int64)
    got[0, 150] = 1
    report = check_greedy(got, _logprobs(margins), cfg_scale=4.0)
    assert (report.near_ties, report.differing) == (1, 1)


def test_a_clear_margin_must_be_the_argmax():
    margins = [1.0] * 200
    margins[150] = 3 * tolerance(4.0)
    got = torch.zeros(1, 200, dtype=torch.int64)
    got[0, 150] = 1
    with pytest.raises(AssertionError, match="token 150 is 1"):
        check_greedy(got, _logprobs(margins), cfg_scale=4.0)
    with pytest.raises(AssertionError, match="token 150 is 1"):   # the same near-tie without guidance is clear
        check_greedy(got, _logprobs([tolerance(4.0) / 3 if j == 150 else 1.0 for j in range(200)]), cfg_scale=1.0)


def test_many_near_ties_fail_even_when_every_token_is_within_tolerance():
    got = torch.zeros(1, 200, dtype=torch.int64)
    with pytest.raises(AssertionError, match="near-ties"):
        check_greedy(got, _logprobs([0.0] * 10 + [1.0] * 190), cfg_scale=2.0)
