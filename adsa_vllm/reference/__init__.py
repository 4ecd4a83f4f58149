"""Plain-PyTorch LlamaGen reference (model, cached generation with CFG and ADSA masks). Never imports vLLM."""

from adsa_vllm.reference.batched import BatchedDecoder, score_tokens_batched
from adsa_vllm.reference.generate import GenerationResult, filter_logits, generate, score_tokens
from adsa_vllm.reference.model import LlamaGenReference

__all__ = ["BatchedDecoder", "GenerationResult", "LlamaGenReference", "filter_logits", "generate", "score_tokens",
           "score_tokens_batched"]
