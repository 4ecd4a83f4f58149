"""Requests that failed inside the worker, to be finished with an error by the scheduler, alone.

vLLM 0.26 has no per-request error path out of the model runner: any exception on the step path kills EngineCore
and every request with it. Settings are validated in the API process first (adsa_vllm/request_validation.py);
this is the last line of defence: a runtime that cannot serve one request records it here and carries on with a
safe default, the worker ships the record on the step's ModelRunnerOutput (`adsa_failed`), and ADSAScheduler
finishes the request with FINISHED_ERROR.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class RequestFailures:
    def __init__(self):
        self._failed: dict[str, str] = {}

    def fail(self, req_id: str, error: BaseException) -> None:
        if req_id not in self._failed:
            logger.error("request %s fails in the worker (the engine keeps serving): %r", req_id, error)
            self._failed[req_id] = f"{type(error).__name__}: {error}"

    def drain(self) -> dict[str, str]:
        out, self._failed = self._failed, {}
        return out
