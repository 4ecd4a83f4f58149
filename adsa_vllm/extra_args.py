"""Per-request settings objects in `SamplingParams.extra_args` (pure; no vLLM import).

Offline callers pass a dict; over HTTP vLLM 0.26's `vllm_xargs` only carries flat values, so the OpenAI server form
is a JSON string, e.g. ``"vllm_xargs": {"adsa": "{\\"budget\\": 0.25}"}`` (see adsa_vllm/client.py).
"""

from __future__ import annotations

import json


def extra_arg_object(extra_args: dict | None, key: str, error: type[Exception], example: str) -> dict | None:
    """extra_args[key] as a dict (decoding the JSON-string form), None when absent; `error` names the fix."""
    value = (extra_args or {}).get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise error(f'extra_args["{key}"] is not valid JSON ({e}); send e.g. '
                        f'"vllm_xargs": {{"{key}": {json.dumps(json.dumps(json.loads(example)))}}}') from None
    if value is not None and not isinstance(value, dict):
        raise error(f'SamplingParams.extra_args["{key}"] must be a dict (or its JSON string over HTTP), '
                    f'e.g. {{"{key}": {example}}}')
    return value
