"""Engine-wide ADSA settings, read from ``--additional-config '{"adsa": {...}}'`` (duck-typed; no vLLM import).

Besides the `ADSAConfig` fields the "adsa" object takes:
  enabled        -- turn ADSA on (``--attention-backend adsa`` sets it);
  inner_backend  -- the paged kernel ADSA wraps (e.g. "FLASH_ATTN", "TRITON_ATTN"); default: the platform's choice.
  async_lag      -- set by the config hook, not by users: async scheduling returns evicted blocks one step later.
Per-request overrides use the same `ADSAConfig` keys under ``SamplingParams.extra_args["adsa"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.config import ADSAConfig, ADSAConfigError
from adsa_vllm.extra_args import extra_arg_object


@dataclass(frozen=True)
class ADSASettings:
    enabled: bool
    inner_backend: str | None
    defaults: ADSAConfig
    async_lag: bool = False

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "ADSASettings":
        raw = (additional_config or {}).get("adsa") or {}
        if not isinstance(raw, dict):
            raise ADSAConfigError('--additional-config "adsa" must be a JSON object, e.g. {"adsa": {"budget": 0.5}}')
        raw = dict(raw)
        enabled = bool(raw.pop("enabled", False))
        inner = raw.pop("inner_backend", None)
        lag = bool(raw.pop("async_lag", False))
        return cls(enabled=enabled, inner_backend=inner, defaults=ADSAConfig.from_dict(raw), async_lag=lag)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ADSASettings":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))


def request_overrides(extra_args: dict | None) -> dict | None:
    """The per-request "adsa" settings of SamplingParams.extra_args, or None.

    Offline callers pass a dict; over HTTP vLLM's `vllm_xargs` only carries flat values, so the OpenAI server form
    is a JSON string: ``"vllm_xargs": {"adsa": "{\"budget\": 0.25}"}`` (see adsa_vllm.client)."""
    return extra_arg_object(extra_args, "adsa", ADSAConfigError, '{"budget": 0.25}')
