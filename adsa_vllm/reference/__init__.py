"""Plain-PyTorch LlamaGen reference (model, cached generation with CFG and ADSA masks). Never imports vLLM."""

from adsa_vllm.reference.generate import GenerationResult, generate, score_tokens
from adsa_vllm.reference.model import LlamaGenReference

__all__ = ["GenerationResult", "LlamaGenReference", "generate", "score_tokens"]
