"""Property (hypothesis): any JSON-ish per-request `adsa` / `cfg` value either validates to settings the worker can
use, or raises the plugin's SettingsError with a message; never another exception type (which, raised inside
EngineCore, would kill the engine for every user). Offline API only: adsa_vllm.request_validation, no vLLM.

"Usable" is checked by running what the worker runs on the result: the layout, the scorers it resolves scoring a
selection's candidates on random K/V, a few SequenceTracker steps, and the guided combination u + s (c - u) of
random fp32 logits, which must stay finite.
"""

from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adsa_vllm.config import ADSAConfig
from adsa_vllm.errors import SettingsError
from adsa_vllm.guidance.settings import GuidanceSettings
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import SequenceTracker, resolve_scorers
from adsa_vllm.request_validation import EngineLimits, validate_settings
from adsa_vllm.settings import ADSASettings, EngineSettings

MODEL = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
ENGINE = EngineSettings(adsa=ADSASettings(defaults=ADSAConfig(), block_size=16, cls_token_num=MODEL.cls_token_num,
                                          grid_size=MODEL.grid_size),
                        guidance=GuidanceSettings(enabled=True))
LIMITS = EngineLimits(model=MODEL, engine=ENGINE)

_numbers = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([0, 1, -1, 0.5, 1.0, 2**31, 2**32, 2**63, 1e300]))
_leaves = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8),
                    st.sampled_from(["topk_v", "streaming", "random", "attention_mass", "diverse", "similar", "3"]))
_json = st.recursive(_leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=6)
# Each real key takes a mostly plausible value or anything at all, so settings that pass are common and the
# combinations that matter (e.g. policy "random" with a string seed) come up; plus arbitrary JSON.
def _plausible(*values):
    likely = st.sampled_from(values)   # some of them wrong on purpose
    return st.integers(0, 7).flatmap(lambda i: _leaves if i == 0 else likely)   # 7:1 for the listed values


_adsa_object = st.fixed_dictionaries({}, optional={
    "budget": _plausible(0.5, 0.25, 1.0, 64, 10**30, None),
    "prefix": _plausible(None, 1, 17, 10**20),
    "local": _plausible(None, 2, 17),
    "policy": _plausible("topk_v", "streaming", "random", "attention_mass"),
    "keep": _plausible("diverse", "similar"),
    "refresh": _plausible(None, 1, 16, 10**9),
    "seed": _plausible(0, 3, 2**32 - 1, "3", 3.0),
    "granularity": _plausible("block", "token"),
})
_cfg_object = st.fixed_dictionaries({}, optional={
    "scale": _plausible(1.0, 2.0, 4, 0, 1e4, "4"),
    "interval": _plausible(-1, 0, 3, 10**12, 2.5),
})
_adsa = st.one_of(_adsa_object, _adsa_object, _json, st.dictionaries(st.text(max_size=6), _leaves, max_size=3))
_cfg = st.one_of(_cfg_object, _cfg_object, _json, st.dictionaries(st.text(max_size=6), _leaves, max_size=3))


def _maybe_json_string(value, as_string: bool):
    """The HTTP form (vllm_xargs carries a JSON string) or the offline dict; NaN/inf travel as JSON extensions."""
    return json.dumps(value) if as_string else value


def _exercise(settings) -> None:
    """What the worker does with a request's settings; raises on anything it could not use."""
    layout, guidance = settings.layout, settings.guidance
    scorer, _ = resolve_scorers(layout)   # the worker's scorers (and, under token granularity, its per-head one)
    tracker = SequenceTracker(layout, scorer)
    heads, bs, dim = 2 * MODEL.n_head, layout.block_size, MODEL.head_dim
    for pos in range(MODEL.cls_token_num, layout.seq_len - 1, 7):
        tracker.begin_step(pos)
        tracker.kept_blocks(pos)
        cands = tracker.scoring_request(pos)
        if cands is None:
            continue
        kv = torch.randn(len(cands), bs, heads, dim)
        tracker.score_layer(kv, kv, torch.randn(heads, dim), pos, scale=dim ** -0.5)
    c, u = torch.randn(2, 4, MODEL.codebook_size) * 30
    for index in (0, MODEL.image_tokens - 1):
        guided = u + guidance.scale_at(index) * (c - u)
        assert torch.isfinite(guided).all(), guidance


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adsa=st.one_of(st.none(), _adsa), cfg=st.one_of(st.none(), _cfg), as_string=st.booleans())
def test_any_settings_validate_to_usable_ones_or_raise_settings_error(adsa, cfg, as_string):
    extra = {k: _maybe_json_string(v, as_string) for k, v in (("adsa", adsa), ("cfg", cfg)) if v is not None}
    try:
        settings = validate_settings(extra or None, LIMITS)
    except SettingsError as e:
        assert str(e), "a SettingsError must say what is wrong"
        return
    _exercise(settings)


@settings(max_examples=200, deadline=None)
@given(extra=_json)
def test_any_extra_args_value_validates_or_raises_settings_error(extra):
    try:
        settings = validate_settings(extra, LIMITS)
    except SettingsError as e:
        assert str(e)
        return
    _exercise(settings)


def test_the_known_engine_killer_is_rejected():
    """Issue 10: a string seed passed validation and raised TypeError inside the worker (engine dead)."""
    for bad in ({"policy": "random", "seed": "3"}, {"policy": "random", "seed": 3.0}, {"seed": True},
                {"seed": 2**64}, {"seed": -1}):
        for form in (bad, json.dumps(bad)):
            try:
                validate_settings({"adsa": form}, LIMITS)
            except SettingsError as e:
                assert "adsa.seed" in str(e), e
            else:
                raise AssertionError(f"{bad} passed validation")
    for bad in ({"scale": float("nan")}, {"scale": "4"}, {"scale": True}, {"scale": math.inf}, {"scale": 1e300},
                {"interval": 1.5}):
        try:
            validate_settings({"cfg": json.dumps(bad)}, LIMITS)
        except SettingsError as e:
            assert "cfg" in str(e), e
        else:
            raise AssertionError(f"{bad} passed validation")
