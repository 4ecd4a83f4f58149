"""Classifier-free guidance settings (no vLLM import).

Engine-wide, ``--additional-config '{"cfg": {"scale": 4.0, "interval": -1}}'`` turns guidance on (``"cfg": true``
or ``{}`` too): the model then runs every request as a conditional/unconditional pair (see
adsa_vllm/llamagen/model.py). The object's keys are the defaults of every request; a request overrides them with
``SamplingParams.extra_args["cfg"]`` (a dict offline, its JSON string through the OpenAI server's `vllm_xargs`).

  scale     -- guided logits u + scale * (c - u); 1.0 = the conditional logits, no guidance. LlamaGen uses 1.5-4.
  interval  -- LlamaGen's --cfg-interval: -1 guides every token; n >= 0 guides image tokens 0..n+1 and uses the
               conditional logits afterwards (the official loop: the prefill token and decode steps i <= n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from adsa_vllm.errors import SettingsError
from adsa_vllm.extra_args import extra_arg_object

# Largest scale accepted: u + s (c - u) must stay a finite fp32 logit (|c - u| is at most a few hundred), else the
# sampler would see inf / NaN inside the worker. LlamaGen uses 1.5-4.
MAX_SCALE = 1e4


class GuidanceConfigError(SettingsError):
    """A bad classifier-free guidance setting; the message names the fix."""


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0
    interval: int = -1

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or not math.isfinite(self.scale) \
                or not 0 <= self.scale <= MAX_SCALE:
            raise GuidanceConfigError(f"cfg scale={self.scale!r}: use a finite number >= 0 and <= {MAX_SCALE:g} "
                                      "(1.0 = no guidance, LlamaGen uses 1.5-4)")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < -1:
            raise GuidanceConfigError(f"cfg interval={self.interval!r}: use -1 (guide every token) or an integer "
                                      ">= 0 (LlamaGen's --cfg-interval)")

    def scale_at(self, index: int) -> float:
        """The scale for image token `index` (0 = the token sampled after the prompt)."""
        return self.scale if self.interval < 0 or index <= self.interval + 1 else 1.0

    def merged(self, overrides: dict | None) -> "Guidance":
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(map(repr, set(overrides) - known))   # repr: keys may be of mixed types
        if unknown:
            raise GuidanceConfigError(f"unknown cfg setting(s) [{', '.join(unknown)}]; valid keys are {sorted(known)}")
        return replace(self, **overrides)


@dataclass(frozen=True)
class GuidanceSettings:
    enabled: bool
    defaults: Guidance = Guidance()

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "GuidanceSettings":
        raw = (additional_config or {}).get("cfg")
        if raw is None or raw is False:
            return cls(enabled=False)
        if raw is True:
            return cls(enabled=True)
        if not isinstance(raw, dict):
            raise GuidanceConfigError('--additional-config "cfg" must be true or a JSON object, e.g. '
                                      '{"cfg": {"scale": 4.0}}')
        return cls(enabled=True, defaults=Guidance().merged(raw))

    def for_request(self, extra_args: dict | None) -> Guidance:
        """The guidance of one request (its extra_args["cfg"] over the engine defaults); validates."""
        value = extra_arg_object(extra_args, "cfg", GuidanceConfigError, '{"scale": 4.0}')
        if value is None:
            return self.defaults
        if not self.enabled:
            raise GuidanceConfigError('this engine runs without classifier-free guidance, so extra_args["cfg"] '
                                      'cannot apply: start it with --additional-config \'{"cfg": {}}\' '
                                      '(offline: LLM(..., additional_config={"cfg": {}}))')
        return self.defaults.merged(value)
