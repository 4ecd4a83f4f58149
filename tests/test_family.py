"""The model-family contract (adsa_vllm/family.py): the registry resolves LlamaGen by its architecture name, and a
family registered here (a fake one, no folder, no weights) is what the config hook, the engine's settings, the ADSA
layout and the request checks read. tests/test_imports.py checks that the serving core imports no family folder."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from adsa_vllm.family import FAMILIES, ModelSpec, family_for, family_of, family_tool, load_config, model_spec
from adsa_vllm.llamagen.config import T2I, preset
from adsa_vllm.request_validation import EngineLimits, RequestFieldError, validate_request
from adsa_vllm.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[1]
FAKE_ARCH = "FakeImageForCausalLM"


@dataclass(frozen=True)
class FakeSpec:
    """A ModelSpec that no LlamaGen has: 3 condition ids, a 16x16 grid, 100 codes, 3 heads of 8."""
    cls_token_num: int = 3
    grid_size: int = 16
    codebook_size: int = 100
    n_head: int = 3
    n_layer: int = 2

    kv_heads = property(lambda self: self.n_head)
    head_dim = property(lambda self: 8)
    image_tokens = property(lambda self: self.grid_size ** 2)
    uses_prompt_embeds = property(lambda self: False)
    input_vocab_size = property(lambda self: self.codebook_size + 7)

    def check_prompt(self, ids):
        if len(ids) != self.cls_token_num:
            raise ValueError(f"a fake prompt is {self.cls_token_num} ids")

    def check_prompt_embeds(self, shape, floating=True):
        raise ValueError("a fake model takes ids")

    def prompt(self, class_id):
        return [self.codebook_size + class_id] * self.cls_token_num

    def null_prompt(self, ids):
        return self.prompt(0)


@dataclass(frozen=True)
class FakeFamily:
    architectures: tuple[str, ...] = (FAKE_ARCH,)
    model_cls: str = "tests.fake:FakeImageForCausalLM"
    converter: str = "tests.fake:convert"
    text_prompts: str | None = None
    image_decoder: str | None = None
    head_calibration: str | None = None

    def load_config(self, hf_config: dict) -> FakeSpec:
        return FakeSpec(**hf_config["fake"])


class _HFConfig(SimpleNamespace):
    def to_dict(self) -> dict:
        return self.config_json


def _params(**fields):
    """The SamplingParams fields the request checks read."""
    return SimpleNamespace(**{**dict(max_tokens=None, allowed_token_ids=None, logit_bias=None, stop_token_ids=None,
                                     logprob_token_ids=None, stop=None, bad_words=None, extra_args=None,
                                     prompt_logprobs=None), **fields})


def _vllm_config(additional_config: dict):
    """The VllmConfig fields the config hook and the request checks read (duck-typed, as they read it)."""
    hf = _HFConfig(architectures=[FAKE_ARCH], config_json={"architectures": [FAKE_ARCH], "fake": {}})
    model_config = SimpleNamespace(model="no-such-folder", hf_config=hf, hf_text_config=SimpleNamespace(),
                                   model_arch_config=SimpleNamespace(),
                                   skip_tokenizer_init=False, enable_prompt_embeds=False, disable_cascade_attn=False)
    return SimpleNamespace(
        model_config=model_config, additional_config=additional_config,
        attention_config=SimpleNamespace(backend=None),
        parallel_config=SimpleNamespace(worker_cls="auto", tensor_parallel_size=1),
        scheduler_config=SimpleNamespace(async_scheduling=None, scheduler_cls=None, max_num_seqs=8),
        cache_config=SimpleNamespace(block_size=128, user_specified_block_size=False, enable_prefix_caching=True),
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=None, cudagraph_capture_sizes=None,
                                           cudagraph_mode=None))


def test_the_registry_resolves_llamagen_by_its_architecture():
    family = family_of("LlamaGenForCausalLM")
    assert family is not None and "LlamaGenForCausalLM" in family.architectures
    assert family_of("LlamaForCausalLM") is None and family_for(SimpleNamespace(architectures=None)) is None
    config = preset("B", grid_size=4)
    hf = _HFConfig(architectures=["LlamaGenForCausalLM"], config_json=config.to_hf_dict())
    assert family_for(hf) is family and model_spec(SimpleNamespace(hf_config=hf)) == config
    assert isinstance(config, ModelSpec) and isinstance(FakeSpec(), ModelSpec)
    assert config.null_prompt(config.prompt(3)) == config.prompt(config.num_classes)
    assert preset("B", **T2I).null_prompt([]) is None
    assert preset("B", **T2I).uses_prompt_embeds and not config.uses_prompt_embeds
    # The converter the contract names is the one `adsa-convert` runs.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["adsa-convert"] == family.converter


def test_load_config_finds_the_family_of_a_model_folder(tmp_path):
    from adsa_vllm.default_model import SHIPPED_DIR
    from adsa_vllm.llamagen.convert import load_config as load_llamagen
    assert load_config(SHIPPED_DIR) == load_llamagen(SHIPPED_DIR)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ValueError, match=r"served by no adsa_vllm family; the families serve LlamaGenForCausalLM"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="has no config.json"):
        load_config(tmp_path / "missing")
    assert family_tool(SHIPPED_DIR, "text_prompts") is None and family_tool(SHIPPED_DIR, "image_decoder") is None


def test_a_registered_family_is_what_the_engine_reads(monkeypatch):
    from adsa_vllm.engine.config_hook import ADSAConfigHook

    monkeypatch.setitem(FAMILIES, FAKE_ARCH, FakeFamily())
    vc = _vllm_config({"adsa": {"enabled": True, "budget": 0.5}, "cfg": {"scale": 2.0}})
    ADSAConfigHook.verify_and_update_config(vc)

    settings = EngineSettings.from_vllm_config(vc).adsa
    assert (settings.cls_token_num, settings.grid_size, settings.block_size) == (3, 16, 16)
    layout = settings.layout()
    assert (layout.seq_len, layout.prefix_tokens) == (3 + 256, 3 + 16)   # the default prefix: condition + a row
    assert settings.layout(cls_token_num=2).seq_len == 2 + 256      # a request's own condition length
    # Guidance declares both branches' heads, from the spec's numbers.
    assert (vc.model_config.hf_config.num_attention_heads, vc.model_config.hf_config.head_dim) == (6, 8)
    assert vc.model_config.model_arch_config.total_num_kv_heads == 6
    assert vc.model_config.model_arch_config.vocab_size == 107      # the spec's served vocabulary

    limits = EngineLimits.from_vllm_config(vc)
    assert limits.model == FakeSpec()
    with pytest.raises(RequestFieldError, match=r"this model emits 1\.\.256 tokens \(16x16 grid\)"):
        validate_request(_params(max_tokens=257), limits)
    with pytest.raises(RequestFieldError, match=r"image tokens are 0\.\.99"):
        validate_request(_params(max_tokens=256, stop_token_ids=[100]), limits)
    assert validate_request(_params(max_tokens=256, stop_token_ids=[99]), limits).layout == layout
