"""The decode queries that query-dependent policies score with (adsa_vllm/worker/saved_queries.py), pure torch.

What a CUDA graph replays is the copy alone: `rows` and the buffers keep their addresses, rows not asked read query
row 0 (in range for any batch), and an engine that captures the copy runs it on every step. The vLLM path's scores
equal the reference's through this buffer (tests/test_vllm_adsa.py, tests/test_frontier_policies.py);
tests/test_worker_failures.py covers a forward that saved nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adsa_vllm.worker.saved_queries import SavedQueries

HEADS, DIM = 3, 4


def _query(tokens: int, step: int) -> torch.Tensor:
    return torch.arange(tokens * HEADS * DIM, dtype=torch.float32).reshape(tokens, HEADS, DIM) + 1000 * step


def _step(saved: SavedQueries, asks: list, tokens: int, layers: int = 2):
    """One plan (asks: lists of query rows) and its forward; -> the saved rows each ask got, and the query."""
    saved.begin_step()
    got = [saved.ask(np.array(a), "cpu") for a in asks]
    saved.commit("cpu")
    q = _query(tokens, saved.step)
    for layer in range(layers):
        saved.save(layer, q)
    return got, q


def test_asked_rows_are_saved_in_order_for_every_layer():
    saved = SavedQueries(num_layers=2, max_rows=8, in_graphs=False)
    (first, second), q = _step(saved, [[5, 2], [7]], tokens=9)
    assert first.tolist() == [0, 1] and second.tolist() == [2]
    for layer in range(2):
        assert torch.equal(saved.stacked[layer][first], q[[5, 2]])
        assert torch.equal(saved.stacked[layer][second], q[[7]])
    assert saved.saved(saved.step) and not saved.saved(saved.step - 1)


def test_an_engine_without_captured_copies_saves_only_when_asked():
    saved = SavedQueries(num_layers=2, max_rows=8, in_graphs=False)
    _step(saved, [], tokens=4)
    assert saved.stacked is None              # nothing asked yet: no memory, no copy
    _step(saved, [[1]], tokens=4)
    before = saved.stacked[0].clone()
    _step(saved, [], tokens=4)                # a step that asks nothing copies nothing
    assert torch.equal(saved.stacked[0], before) and not saved.saved(saved.step)


def test_a_captured_copy_runs_every_step_and_survives_smaller_batches():
    """in_graphs: the profiling forward (no metadata) allocates before any capture; every later forward copies,
    and after a step that asked rows the next commit resets them, so a smaller (replayed) batch never indexes past
    its tokens."""
    saved = SavedQueries(num_layers=1, max_rows=6, in_graphs=True)
    saved.save(0, _query(64, 0), planned=False)    # vLLM's profiling run
    buffer, rows = saved.stacked[0], saved.rows
    assert buffer.shape == (6, HEADS, DIM) and not buffer.any()
    (got,), q = _step(saved, [[40, 3]], tokens=48, layers=1)
    assert torch.equal(buffer[got], q[[40, 3]])
    _, q = _step(saved, [], tokens=2, layers=1)    # row 40 would be out of range here
    assert saved.rows.tolist() == [0] * 6 and torch.equal(buffer, q[[0] * 6])
    assert saved.stacked[0].data_ptr() == buffer.data_ptr() and saved.rows is rows   # the addresses captured
    assert saved.saved(saved.step - 5)              # a replay updates no Python state: always taken as saved


def test_more_rows_than_a_step_can_hold_is_an_error():
    saved = SavedQueries(num_layers=1, max_rows=2, in_graphs=False)
    saved.begin_step()
    saved.ask(np.array([0, 1]), "cpu")
    with pytest.raises(RuntimeError, match="at most 2"):
        saved.ask(np.array([2]), "cpu")


@pytest.mark.parametrize("num_layers,per_layer,limit", [(36, 100, 1000), (36, 5000, 1000), (7, 1, 1 << 30)])
def test_layer_chunks_cover_every_layer_once_within_the_scratch(num_layers, per_layer, limit, monkeypatch):
    """Query scoring runs a chunk of layers per scorer call (worker/query_scoring.py, token_gather.py)."""
    import adsa_vllm.worker.token_gather as token_gather
    monkeypatch.setattr(token_gather, "SCRATCH_BYTES", limit)
    chunks = token_gather.layer_chunks(num_layers, per_layer)
    assert [i for c in chunks for i in c] == list(range(num_layers))
    assert all(len(c) * per_layer <= limit or len(c) == 1 for c in chunks)
    assert len(chunks) == -(-num_layers // max(1, limit // per_layer))
