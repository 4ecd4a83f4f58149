"""LlamaGen (FoundationVision/LlamaGen, c2i and t2i) as a vLLM 0.26 model: `LlamaGenForCausalLM`.

Same building blocks as vLLM's Llama (fused QKV, merged gate/up, fused residual RMSNorm, torch.compile), so its
throughput can be compared with a plain Llama of the same shape. What differs from Llama:
  * embedding: ids < codebook_size are image tokens (tok_embeddings); larger ids are condition tokens
    (codebook_size + class_id -> cls_embedding row class_id; the last row is the null class). Chosen per token,
    so prefill and decode rows can share a batch (LlamaGen's own vLLM fork switched per batch).
  * 2D RoPE with zeroed condition positions (rope2d.py).
  * text-to-image (model_type "t2i"): the prompt is caption features (`prompt_embeds`); caption.py embeds them
    and gives every token its official position whatever the caption length.
  * logits: only the codebook is scored; the condition ids get -inf, so sampling can never emit them.
  * attention: `adsa_vllm.worker.layer.make_attention` returns the ADSA layer when ADSA is enabled.
  * classifier-free guidance (``--additional-config '{"cfg": {...}}'``): every request is a conditional /
    unconditional *pair inside one sequence*. Each token row is run twice (branch 0 with the class, branch 1 with
    the null class at the condition positions; the image tokens are the same), interleaved as rows [2T, dim], so
    that one token's q/k/v of both branches sit side by side: [T, 2H, D] is plain multi-head attention over 2H
    heads, i.e. two independent attentions, and the paged cache holds both branches' K/V in the same block. The
    scheduler therefore admits, preempts, aborts and finishes the pair as one request, both branches always see
    the same sampled token, and ADSA makes one selection for the pair from both branches' heads.
    `compute_logits` returns u + s * (c - u) with the request's scale (adsa_vllm/guidance/runtime.py).
Weights keep the official names (config.json + safetensors written by `adsa_vllm.llamagen.convert`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from adsa_vllm.guidance.runtime import image_logits, make_guidance_runtime
from adsa_vllm.llamagen.caption import CaptionEmbedder, caption_positions, embed_image_tokens
from adsa_vllm.llamagen.rope2d import apply_rope_2d, rope_2d_table
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.worker.layer import make_attention, make_runtime
from adsa_vllm.worker.served_model import ServedImageModel


class LlamaGenAttention(nn.Module):
    def __init__(self, config: LlamaGenConfig, vllm_config: VllmConfig, runtime, branches: int, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads = config.n_head // tp
        self.num_kv_heads = max(1, config.kv_heads // tp)
        self.head_dim = config.head_dim
        self.branches = branches
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.wqkv = QKVParallelLinear(config.dim, self.head_dim, config.n_head, config.kv_heads, bias=False,
                                      prefix=f"{prefix}.wqkv")
        self.wo = RowParallelLinear(config.n_head * self.head_dim, config.dim, bias=False, prefix=f"{prefix}.wo")
        # Under CFG the layer attends over both branches' heads: [conditional heads, unconditional heads].
        self.attn = make_attention(branches * self.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   branches * self.num_kv_heads, vllm_config=vllm_config, runtime=runtime,
                                   prefix=f"{prefix}.attn")

    def forward(self, cos_sin: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.wqkv(x)                        # [branches * T, ...], a token's branches on adjacent rows
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.branches > 1:                        # -> [T, branches * heads * D]
            q, k, v = (t.reshape(-1, self.branches * t.shape[-1]) for t in (q, k, v))
        q, k = apply_rope_2d(q, cos_sin), apply_rope_2d(k, cos_sin)
        out, _ = self.wo(self.attn(q, k, v).reshape(x.shape[0], self.q_size))
        return out


class LlamaGenFeedForward(nn.Module):
    def __init__(self, config: LlamaGenConfig, prefix: str):
        super().__init__()
        self.w13 = MergedColumnParallelLinear(config.dim, [config.ffn_hidden] * 2, bias=False, prefix=f"{prefix}.w13")
        self.w2 = RowParallelLinear(config.ffn_hidden, config.dim, bias=False, prefix=f"{prefix}.w2")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.w13(x)
        x, _ = self.w2(self.act(x))
        return x


class LlamaGenBlock(nn.Module):
    def __init__(self, config: LlamaGenConfig, vllm_config: VllmConfig, runtime, branches: int, prefix: str):
        super().__init__()
        self.attention = LlamaGenAttention(config, vllm_config, runtime, branches, f"{prefix}.attention")
        self.feed_forward = LlamaGenFeedForward(config, f"{prefix}.feed_forward")
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, cos_sin, h, residual):
        if residual is None:
            residual, h = h, self.attention_norm(h)
        else:
            h, residual = self.attention_norm(h, residual)
        h = self.attention(cos_sin, h)
        h, residual = self.ffn_norm(h, residual)
        return self.feed_forward(h), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class LlamaGenTransformer(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = LlamaGenConfig.from_hf_dict(vllm_config.model_config.hf_config.to_dict())
        self.config = config
        self.runtime = make_runtime(vllm_config, config)
        self.guidance = make_guidance_runtime(vllm_config, config)
        self.branches = 1 if self.guidance is None else 2
        self.tok_embeddings = VocabParallelEmbedding(config.codebook_size, config.dim)
        self.cls_embedding = (CaptionEmbedder(config) if config.is_t2i
                              else VocabParallelEmbedding(config.num_classes + 1, config.dim))
        self.layers = nn.ModuleList(
            LlamaGenBlock(config, vllm_config, self.runtime, self.branches, f"{prefix}.layers.{i}")
            for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.register_buffer("rope", rope_2d_table(config.grid_size, config.head_dim, config.rope_base,
                                                   config.cls_token_num), persistent=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.is_t2i:   # rows of vLLM's inputs_embeds buffer, beside the caption rows
            return embed_image_tokens(self.tok_embeddings, input_ids, self.config.caption_dim)
        n = self.config.codebook_size
        is_cond = input_ids >= n
        img = self.tok_embeddings(torch.where(is_cond, 0, input_ids))
        cond = self.cls_embedding(torch.where(is_cond, input_ids - n, 0))
        return torch.where(is_cond[:, None], cond, img)

    def embed_pair(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [2T, dim]: each token's conditional row, then its unconditional row (null class)."""
        cond = self.embed_input_ids(input_ids)
        null = self.cls_embedding(torch.full_like(input_ids[:1], self.config.num_classes))
        uncond = torch.where((input_ids >= self.config.codebook_size)[:, None], null, cond)
        return torch.stack([cond, uncond], dim=1).reshape(-1, cond.shape[-1])

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if positions.dim() == 2:      # t2i: vLLM's M-RoPE positions, three equal rows (caption.py)
            positions = positions[0]
        if self.config.is_t2i:
            h = self.cls_embedding.embed(inputs_embeds, positions, self.branches)
        elif self.branches > 1:
            h = self.embed_pair(input_ids)
        else:
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        cos_sin = self.rope[positions]
        residual = None
        for layer in self.layers:
            h, residual = layer(cos_sin, h, residual)
        h, _ = self.norm(h, residual)
        return h.reshape(positions.shape[0], -1)     # under CFG [T, 2 * dim]: both branches of a token


class LlamaGenForCausalLM(ServedImageModel):
    # vLLM's SupportsMRoPE protocol; only t2i configs turn M-RoPE on (an "mrope_section", model_config.py).
    supports_mrope: ClassVar[Literal[True]] = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.model = LlamaGenTransformer(vllm_config=vllm_config, prefix="model")
        config = self.model.config
        self.config = config
        self.output = ParallelLMHead(config.codebook_size, config.dim, prefix="output")
        self.logits_processor = LogitsProcessor(config.codebook_size)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        return caption_positions(len(input_tokens), self.config)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        n = hidden_states.shape[0]
        logits = self.logits_processor(self.output, hidden_states.reshape(n * self.model.branches, -1))
        if logits is None:
            return None
        return image_logits(logits, n, self.model.guidance, self.config.codebook_size, self.config.input_vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        q, kv = self.config.n_head * self.config.head_dim, self.config.kv_heads * self.config.head_dim
        for name, w in weights:
            for target, shards in _route(name, q, kv, w):
                p = params[target]
                loader = getattr(p, "weight_loader", default_weight_loader)
                for shard_id, piece in shards:
                    loader(p, piece) if shard_id is None else loader(p, piece, shard_id)
                loaded.add(target)
        return loaded


def _route(name: str, q: int, kv: int, w: torch.Tensor):
    """Official LlamaGen weight name -> [(parameter name, [(shard id, tensor)])]; [] for buffers we recompute."""
    if name.endswith(("freqs_cis", "causal_mask")) or ".kv_cache." in name:
        return []
    if name == "output.weight":
        return [("output.weight", [(None, w)])]
    if name == "cls_embedding.embedding_table.weight":
        return [("model.cls_embedding.weight", [(None, w)])]
    if name.endswith("attention.wqkv.weight"):
        qw, kw, vw = w.split([q, kv, kv], dim=0)
        return [("model." + name, [("q", qw), ("k", kw), ("v", vw)])]
    if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
        shard = 0 if ".w1." in name else 1
        return [("model." + name.replace(".w1.", ".w13.").replace(".w3.", ".w13."), [(shard, w)])]
    return [("model." + name, [(None, w)])]
