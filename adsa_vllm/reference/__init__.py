"""Plain-PyTorch LlamaGen reference (model, cached generation with CFG and ADSA masks). Never imports vLLM."""

from adsa_vllm.reference.batched import BatchedDecoder, score_tokens_batched
from adsa_vllm.reference.generate import GenerationResult, filter_logits, generate, score_tokens
from adsa_vllm.reference.model import LlamaGenReference
from adsa_vllm.reference.t2i import generate_t2i, score_tokens_t2i
from adsa_vllm.reference.t2i_official import official_t2i_logits

__all__ = ["BatchedDecoder", "GenerationResult", "LlamaGenReference", "filter_logits", "generate",
           "generate_t2i", "official_t2i_logits", "score_tokens", "score_tokens_batched", "score_tokens_t2i"]
