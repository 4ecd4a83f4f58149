"""Janus-Pro text-to-image as a model family (adsa_vllm/family.py): its architecture, vLLM model, config, converter
and user tools (text prompts, VQ decoder)."""

from __future__ import annotations

from dataclasses import dataclass

from adsa_vllm.janus.config import ARCHITECTURE, JanusConfig


@dataclass(frozen=True)
class JanusFamily:
    architectures: tuple[str, ...] = (ARCHITECTURE,)
    model_cls: str = "adsa_vllm.janus.model:JanusForConditionalGeneration"
    converter: str = "adsa_vllm.janus.convert:main"
    text_prompts: str | None = "adsa_vllm.janus.prompts:text_prompts"
    image_decoder: str | None = "adsa_vllm.janus.images:decode_images"
    head_calibration: str | None = None   # not yet: adsa.heads by hand, or every head a sink head

    def load_config(self, hf_config: dict) -> JanusConfig:
        return JanusConfig.from_hf_dict(hf_config)


JANUS = JanusFamily()
