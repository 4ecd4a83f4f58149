"""The engine's settings: one frozen, validated `EngineSettings`, built once by the config hook (duck-typed; no
vLLM import).

Users give them with ``--additional-config '{"adsa": {...}, "cfg": {...}}'``. Besides the `ADSAConfig` fields the
"adsa" object takes:
  enabled        -- turn ADSA on (``--attention-backend adsa`` sets it);
  inner_backend  -- the paged kernel ADSA wraps (e.g. "FLASH_ATTN", "TRITON_ATTN"); default: the platform's choice;
  admission      -- "peak" (default): reserve each request's peak, never preempt; "overcommit": vLLM's own rule
                    (blocks free now) and preempt by swap, exactly; "average": admit by life-average footprint,
                    preempt by swap (adsa_vllm/engine/swap.py says what each buys, measured);
  swap_space_gib -- host memory for swapped requests' kept blocks (per worker; default 4; pinned at startup under a
                    preempting admission rule, worker/host_kv.py).
Per-request overrides use the same `ADSAConfig` keys under ``SamplingParams.extra_args["adsa"]``.

How every process gets the same object: vLLM runs the config hook once, where the VllmConfig is built (the API
server or the offline LLM's process), then pickles the config to EngineCore and the workers. Some settings are
decided only there and cannot be recomputed later (ADSA on through ``--attention-backend adsa``, which the hook then
resets to the inner kernel; the async lag, tied to the scheduler class the hook picks). So the hook leaves the
user's dict untouched and sets `VllmConfig.additional_config` to a copy carrying the resolved settings, as plain
JSON (vLLM hashes additional_config with json.dumps), under the private key `ENGINE_KEY`. Every reader (worker,
request validation, metrics, guidance API) decodes that with `EngineSettings.from_vllm_config`: a decode, nothing
resolved again. The scheduler side gets `ADSASettings` through the layers' `ADSASpec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adsa_vllm.config import ADSAConfig
from adsa_vllm.errors import ADSAConfigError
from adsa_vllm.extra_args import extra_arg_object
from adsa_vllm.guidance.settings import Guidance, GuidanceSettings

if TYPE_CHECKING:
    from adsa_vllm.policy.layout import BlockLayout

ENGINE_KEY = "_adsa_engine"             # additional_config key of the resolved settings (set by the config hook)
SWITCHES = ("enabled", "inner_backend", "admission", "swap_space_gib")  # "adsa" keys that are not ADSAConfig fields
ADMISSIONS = ("peak", "overcommit", "average")


@dataclass(frozen=True)
class ADSASettings:
    """Engine-wide ADSA: the default settings and what turns them, with a request's overrides, into its layout.
    Validated on construction (the defaults' layout is built), so a bad setting fails at startup."""
    defaults: ADSAConfig
    block_size: int
    cls_token_num: int
    grid_size: int
    lag: int = 0            # async scheduling returns evicted blocks one step later (see BlockLayout.lag)
    admission: str = "peak"
    swap_space_gib: float = 4.0

    def __post_init__(self):
        if self.admission not in ADMISSIONS:
            raise ADSAConfigError(f"adsa.admission={self.admission!r}: use one of {', '.join(ADMISSIONS)}")
        if isinstance(self.swap_space_gib, bool) or not isinstance(self.swap_space_gib, int | float) \
                or not 0 <= self.swap_space_gib < float("inf"):
            raise ADSAConfigError(f"adsa.swap_space_gib={self.swap_space_gib!r}: use a number of GiB >= 0 "
                                  "(0: no swap, a preempted request is recomputed)")
        self.layout()

    def config_for(self, overrides: dict | None) -> ADSAConfig:
        return self.defaults.merged(overrides)

    def layout_of(self, config: ADSAConfig, cls_token_num: int | None = None) -> BlockLayout:
        """cls_token_num: this request's condition length (a t2i caption's rows; default the model's)."""
        return config.layout(block_size=self.block_size, cls_token_num=cls_token_num or self.cls_token_num,
                             grid_size=self.grid_size, lag=self.lag)

    def layout(self, overrides: dict | None = None, cls_token_num: int | None = None) -> BlockLayout:
        """The layout of a request with these overrides (its extra_args["adsa"]) and condition length (its prompt
        length; default the model's cls_token_num); raises ADSAConfigError."""
        return self.layout_of(self.config_for(overrides), cls_token_num)


@dataclass(frozen=True)
class UserSettings:
    """What ``--additional-config`` asks for, validated (the config hook's input)."""
    adsa_enabled: bool
    inner_backend: str | None
    adsa_defaults: ADSAConfig
    guidance: GuidanceSettings
    admission: str = "peak"
    swap_space_gib: float = 4.0

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "UserSettings":
        raw = (additional_config or {}).get("adsa") or {}
        fields = {k: v for k, v in raw.items() if k not in SWITCHES} if isinstance(raw, dict) else raw
        defaults = ADSAConfig.from_dict(fields)   # checks that "adsa" is a JSON object
        return cls(adsa_enabled=bool(raw.get("enabled", False)), inner_backend=raw.get("inner_backend"),
                   adsa_defaults=defaults, guidance=GuidanceSettings.from_additional_config(additional_config),
                   admission=raw.get("admission", "peak"), swap_space_gib=raw.get("swap_space_gib", 4.0))


@dataclass(frozen=True)
class EngineSettings:
    adsa: ADSASettings | None    # None: ADSA off
    guidance: GuidanceSettings

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EngineSettings":
        """The settings the config hook resolved; all off for an engine the hook did not configure (another
        model)."""
        stored = (getattr(vllm_config, "additional_config", None) or {}).get(ENGINE_KEY)
        return cls.from_json(stored) if stored is not None else cls(adsa=None, guidance=GuidanceSettings(False))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "EngineSettings":
        adsa, g = d["adsa"], d["guidance"]
        if adsa is not None:
            adsa = ADSASettings(**{**adsa, "defaults": ADSAConfig(**adsa["defaults"])})
        return cls(adsa=adsa, guidance=GuidanceSettings(enabled=g["enabled"], defaults=Guidance(**g["defaults"])))


def request_overrides(extra_args: dict | None) -> dict | None:
    """The per-request "adsa" settings of SamplingParams.extra_args, or None.

    Offline callers pass a dict; over HTTP vLLM's `vllm_xargs` only carries flat values, so the OpenAI server form
    is a JSON string: ``"vllm_xargs": {"adsa": "{\"budget\": 0.25}"}`` (see adsa_vllm.client)."""
    return extra_arg_object(extra_args, "adsa", ADSAConfigError, '{"budget": 0.25}')
