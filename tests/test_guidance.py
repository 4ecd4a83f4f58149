"""Guidance settings and the reference's CFG options (pure: no vLLM)."""

from __future__ import annotations

import pytest
from adsa_vllm.config import ADSAConfig
from adsa_vllm.guidance import Guidance, GuidanceConfigError, GuidanceSettings
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.reference.generate import generate
from adsa_vllm.reference.model import LlamaGenReference


def test_interval_follows_llamagen():
    # Official loop: the prefill token (index 0) is guided, decode step i yields token i + 1 and is guided
    # while i <= cfg_interval.
    g = Guidance(scale=4.0, interval=2)
    assert [g.scale_at(i) for i in range(6)] == [4.0, 4.0, 4.0, 4.0, 1.0, 1.0]
    assert Guidance(scale=4.0).scale_at(10_000) == 4.0
    assert Guidance(scale=4.0, interval=0).scale_at(1) == 4.0 and Guidance(scale=4.0, interval=0).scale_at(2) == 1.0


@pytest.mark.parametrize("raw,enabled,scale", [(None, False, 1.0), (False, False, 1.0), (True, True, 1.0),
                                               ({}, True, 1.0), ({"scale": 2.5}, True, 2.5)])
def test_engine_settings(raw, enabled, scale):
    s = GuidanceSettings.from_additional_config({"cfg": raw})
    assert s.enabled is enabled and s.defaults.scale == scale


@pytest.mark.parametrize("extra,match", [
    ({"cfg": {"scale": float("nan")}}, "finite number"),
    ({"cfg": {"scale": True}}, "finite number"),
    ({"cfg": {"interval": 1.5}}, "interval=1.5"),
    ({"cfg": {"sclae": 2}}, r"unknown cfg setting\(s\) \['sclae'\]"),
    ({"cfg": "{bad json"}, "not valid JSON"),
    ({"cfg": 3}, "must be a dict"),
])
def test_request_errors_name_the_fix(extra, match):
    with pytest.raises(GuidanceConfigError, match=match):
        GuidanceSettings(enabled=True).for_request(extra)


def test_request_overrides_and_json_form():
    s = GuidanceSettings.from_additional_config({"cfg": {"scale": 4.0, "interval": 10}})
    assert s.for_request(None) == Guidance(4.0, 10)
    assert s.for_request({"cfg": {"scale": 2.0}}) == Guidance(2.0, 10)
    assert s.for_request({"cfg": '{"interval": -1}'}) == Guidance(4.0, -1)   # vllm_xargs carries JSON strings


def test_cfg_request_on_engine_without_guidance_names_the_fix():
    with pytest.raises(GuidanceConfigError, match="--additional-config '{\"cfg\": {}}'"):
        GuidanceSettings.from_additional_config({}).for_request({"cfg": {"scale": 2.0}})
    with pytest.raises(GuidanceConfigError, match="must be true or a JSON object"):
        GuidanceSettings.from_additional_config({"cfg": "yes"})


def test_reference_shared_selection_uses_one_tracker_per_pair():
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
    m = LlamaGenReference(config).init_random_(0, 0.1)
    adsa = ADSAConfig(budget=0.5, policy="topk_v")   # value-dependent: separate halves differ
    shared = generate(m, [1, 4], greedy=True, cfg_scale=3.0, adsa=adsa, cfg_selection="shared")
    separate = generate(m, [1, 4], greedy=True, cfg_scale=3.0, adsa=adsa, cfg_selection="separate")
    assert len(shared.trackers) == 2 and len(separate.trackers) == 4
    assert all(t.evicted for t in shared.trackers)
    # Separate trackers decide from different heads, so the two halves of a pair evict different blocks.
    assert any(separate.trackers[i].evicted != separate.trackers[i + 2].evicted for i in range(2))
    with pytest.raises(ValueError, match="cfg_selection='both'"):
        generate(m, [1], max_new_tokens=2, cfg_scale=2.0, cfg_selection="both")
