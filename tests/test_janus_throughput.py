"""benchmarks/janus_throughput.py without a GPU (seconds): the 1B / 7B presets read as the plugin reads a Janus
config.json and take both ADSA budgets of the default modes, the prompts are valid Janus prompts, and the transformers
mode runs its loop on the tiny preset."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import janus_throughput as jt  # noqa: E402

from adsa_vllm.config import ADSAConfig  # noqa: E402
from adsa_vllm.janus.config import JanusConfig  # noqa: E402


@pytest.mark.parametrize("preset, hidden, layers, heads", [("1B", 2048, 24, 16), ("7B", 4096, 30, 32)])
def test_presets_are_janus_pro_shapes_and_take_the_default_budgets(preset, hidden, layers, heads):
    config = jt.janus_config(preset, 48)
    spec = JanusConfig.from_hf_dict(config.to_dict())
    assert (spec.hidden_size, spec.n_layer, spec.n_head, spec.kv_heads, spec.head_dim) == \
        (hidden, layers, heads, heads, 128)
    assert config.text_config.intermediate_size == {"1B": 5632, "7B": 11008}[preset]
    assert (spec.text_vocab_size, spec.codebook_size, spec.grid_size, spec.gen_embed_dim) == (102400, 16384, 24, 8)
    assert spec.max_prompt_tokens == 48
    for budget in (0.5, 0.25):   # prefix 48 + 24 and window 25 fit 144 tokens
        layout = ADSAConfig.from_dict({"budget": budget, "policy": "random"}).layout(
            block_size=16, cls_token_num=spec.cls_token_num, grid_size=spec.grid_size)
        assert layout.evicts
    for ids in jt.prompts(config, 3, 48):
        assert len(ids) == 48
        spec.check_prompt(spec.text_ids(ids))
        assert all(i < jt.BOS for i in ids[1:-1])


def test_hf_mode_runs_transformers_loop_on_the_tiny_preset():
    args = argparse.Namespace(dtype="float32", cfg_scale=5.0, hf_batches=[2], prompt_tokens=12)
    res = jt.run_hf(args, jt.janus_config("tiny", 12))
    assert res["best_batch"] == 2 and res["images_per_s"] > 0 and res["oom_at"] is None
    assert jt.ratios_of({"cfg": {"images_per_s": 2.0}, "hf": res, "adsa:random:0.5:cfg": {"images_per_s": 3.0}}) \
        == {"adsa:random:0.5:cfg_over_cfg_images": 1.5, "cfg_over_hf_images": 2.0 / res["images_per_s"]}
