"""The worker's view of the batch order on the host, for both of vLLM's model runners (the V2 one runs on GPUs
only, so it is represented here by an object with its interface: `prepare_inputs` returning an InputBatch with
`req_ids`, and `req_states`)."""

from __future__ import annotations

from types import SimpleNamespace

from adsa_vllm.worker.worker import _batch_order


def test_v1_runner_order_is_its_persistent_input_batch():
    batch = SimpleNamespace(req_ids=["a", "b", "c"])
    order = _batch_order(SimpleNamespace(input_batch=batch))
    assert order(2) == ["a", "b"]
    batch.req_ids[:] = ["c", "a"]          # condensed / reordered in place by the runner
    assert order(5) == ["c", "a"]


def test_v2_runner_order_is_the_last_prepared_batch_and_forgotten_before_each_step():
    class V2Runner:
        req_states = object()

        def __init__(self):
            self.next_ids = []

        def prepare_inputs(self, scheduler_output, batch_desc):
            return SimpleNamespace(req_ids=list(self.next_ids), marker=(scheduler_output, batch_desc))

    runner = V2Runner()
    order = _batch_order(runner)
    assert order(4) == []                                   # nothing prepared yet (profiling, graph capture)
    runner.next_ids = ["x", "y", "z"]
    batch = runner.prepare_inputs("so", "desc")
    assert batch.marker == ("so", "desc") and batch.req_ids == ["x", "y", "z"]   # the runner's own result
    assert order(2) == ["x", "y"] and order(8) == ["x", "y", "z"]
    order.forget()                                          # the worker does this before every step
    assert order(3) == []                                   # a dummy batch never looks like the last real one


def test_unknown_runner_has_no_order():
    assert _batch_order(SimpleNamespace()) is None
