"""LlamaGen as a model family (adsa_vllm/family.py): its architecture, vLLM model, config and converter."""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.llamagen.config import ARCHITECTURE, LlamaGenConfig


@dataclass(frozen=True)
class LlamaGenFamily:
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    model_cls: str = "adsa_vllm.llamagen.model:LlamaGenForCausalLM"
    converter: str = "adsa_vllm.llamagen.convert:main"
    text_prompts: str | None = None     # class ids (a t2i caption is features, made by the user's T5)
    image_decoder: str | None = None    # adsa_vllm.images: grey levels or the VQ-16 decoder
    head_calibration: str | None = "adsa_vllm.llamagen.head_calibration:measure"

    def load_config(self, hf_config: dict) -> LlamaGenConfig:
        return LlamaGenConfig.from_hf_dict(hf_config)


LLAMAGEN = LlamaGenFamily()
