"""Offline helper: `generate_images(llm, class_ids, cfg_scale=..., seed=...)` on a `vllm.LLM` built with guidance on.

    llm = LLM(model=DIR, attention_backend="adsa", additional_config={"cfg": {"scale": 4.0}, "adsa": {"budget": 0.5}})
    images = generate_images(llm, [207, 360, 387], cfg_scale=4.0, seed=0, top_k=1000)
    images.tokens  # [3, grid**2] int64 image-token ids, one row per class id

With `seed`, image i uses seed + i (so the images differ and the same seed gives the same images again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adsa_vllm.guidance.settings import Guidance, GuidanceConfigError
from adsa_vllm.settings import EngineSettings


@dataclass
class GeneratedImages:
    tokens: np.ndarray     # [B, n] int64 image-token ids
    outputs: list          # the vLLM RequestOutputs (logprobs, metrics), in class-id order


def image_params(model_cfg, *, cfg_scale: float | None = None, cfg_interval: int | None = None,
                 seed: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, adsa: dict | None = None, logprobs: int | None = None,
                 max_tokens: int | None = None):
    """SamplingParams for one image; cfg_scale / cfg_interval None = the engine's defaults."""
    from vllm import SamplingParams
    cfg = {k: v for k, v in (("scale", cfg_scale), ("interval", cfg_interval)) if v is not None}
    Guidance().merged(cfg)  # validate here, with the caller's names in the message
    extra = {k: v for k, v in (("cfg", cfg or None), ("adsa", adsa)) if v is not None}
    return SamplingParams(max_tokens=model_cfg.image_tokens if max_tokens is None else max_tokens,
                          temperature=0.0 if greedy else temperature, top_k=top_k if top_k > 0 else 0,
                          top_p=top_p, seed=seed, logprobs=logprobs, extra_args=extra or None)


def generate_images(llm, class_ids: list[int], *, cfg_scale: float | None = None, cfg_interval: int | None = None,
                    seed: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    greedy: bool = False, adsa: dict | None = None, logprobs: int | None = None,
                    use_tqdm: bool = False) -> GeneratedImages:
    """One guided image per class id, batched by vLLM (continuous batching; each pair is one request)."""
    from adsa_vllm.family import model_spec
    vllm_config = llm.llm_engine.vllm_config
    if not EngineSettings.from_vllm_config(vllm_config).guidance.enabled:
        raise GuidanceConfigError('this LLM runs without classifier-free guidance: create it with '
                                  'LLM(..., additional_config={"cfg": {"scale": 4.0}}) (the model then runs each '
                                  'request as a conditional/unconditional pair)')
    model_cfg = model_spec(vllm_config.model_config)
    prompts = [{"prompt_token_ids": model_cfg.prompt(c)} for c in class_ids]
    params = [image_params(model_cfg, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                           seed=None if seed is None else seed + i, temperature=temperature, top_k=top_k,
                           top_p=top_p, greedy=greedy, adsa=adsa, logprobs=logprobs)
              for i in range(len(class_ids))]
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    tokens = np.array([list(o.outputs[0].token_ids) for o in outputs], dtype=np.int64)
    return GeneratedImages(tokens=tokens, outputs=outputs)
