"""LlamaGen as a model family (adsa_vllm/family.py): its architecture, vLLM model, config and converter."""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.llamagen.config import ARCHITECTURE, LlamaGenConfig


@dataclass(frozen=True)
class LlamaGenFamily:
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    model_cls: str = "adsa_vllm.llamagen.model:LlamaGenForCausalLM"
    converter: str = "adsa_vllm.llamagen.convert:main"

    def load_config(self, hf_config: dict) -> LlamaGenConfig:
        return LlamaGenConfig.from_hf_dict(hf_config)


LLAMAGEN = LlamaGenFamily()
