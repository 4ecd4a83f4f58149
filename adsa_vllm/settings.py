"""Engine-wide ADSA settings, read from ``--additional-config '{"adsa": {...}}'`` (duck-typed; no vLLM import).

Besides the `ADSAConfig` fields the "adsa" object takes:
  enabled        -- turn ADSA on (``--attention-backend adsa`` sets it);
  inner_backend  -- the paged kernel ADSA wraps (e.g. "FLASH_ATTN", "TRITON_ATTN"); default: the platform's choice.
Per-request overrides use the same `ADSAConfig` keys under ``SamplingParams.extra_args["adsa"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.config import ADSAConfig, ADSAConfigError

ENGINE_KEYS = ("enabled", "inner_backend")


@dataclass(frozen=True)
class ADSASettings:
    enabled: bool
    inner_backend: str | None
    defaults: ADSAConfig

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "ADSASettings":
        raw = (additional_config or {}).get("adsa") or {}
        if not isinstance(raw, dict):
            raise ADSAConfigError('--additional-config "adsa" must be a JSON object, e.g. {"adsa": {"budget": 0.5}}')
        raw = dict(raw)
        enabled = bool(raw.pop("enabled", False))
        inner = raw.pop("inner_backend", None)
        return cls(enabled=enabled, inner_backend=inner, defaults=ADSAConfig.from_dict(raw))

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ADSASettings":
        return cls.from_additional_config(getattr(vllm_config, "additional_config", None))


def request_overrides(extra_args: dict | None) -> dict | None:
    """The per-request "adsa" object of SamplingParams.extra_args, or None."""
    if not extra_args:
        return None
    value = extra_args.get("adsa")
    if value is not None and not isinstance(value, dict):
        raise ADSAConfigError('SamplingParams.extra_args["adsa"] must be a dict of ADSA settings, '
                              'e.g. {"adsa": {"budget": 0.25}}')
    return value
