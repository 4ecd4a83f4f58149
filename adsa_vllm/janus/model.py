"""Janus-Pro image generation as a vLLM 0.26 model: `JanusForConditionalGeneration` (transformers' checkpoint layout).

vLLM's own LLaMA decoder layers (`LlamaDecoderLayer`: RMSNorms, `LlamaMLP`), with what Janus adds around them:
  * embedding by id (adsa_vllm/janus/config.py says why the ids are laid out this way): ids < codebook_size are image
    codes -> generation_embeddings -> generation_aligner (an MLP into the LM's width); larger ids are text tokens
    (id - codebook_size) -> the LM's embed_tokens. Chosen per token, so prompts and image tokens share a batch.
  * logits from the generation head (proj_out, act, vision_head) over the codebook; the text columns get -inf, so
    sampling never emits them. The text lm_head, the SigLIP vision tower and the VQ model are not loaded (VQ decoding:
    adsa_vllm/janus/images.py).
  * attention (`JanusAttention`, passed to LlamaDecoderLayer as its attention type): vLLM's LlamaAttention with the
    plugin's layer (`make_attention`: ADSA when on) and, under classifier-free guidance, both branches' heads in it.
  * classifier-free guidance as in adsa_vllm/llamagen/model.py: a request is a cond/uncond pair in one sequence,
    each token row run twice (interleaved [2T, hidden], so one token's q/k/v of both branches are adjacent and
    [T, 2H, D] is plain attention over 2H heads); the uncond branch reads the padded prompt
    (`JanusConfig.null_prompt`, computed per token: pad unless BOS / image start / an image code), and
    `compute_logits` returns u + s * (c - u) with each request's scale (adsa_vllm/guidance/runtime.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import nn
from transformers.activations import ACT2FN
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer

from adsa_vllm.guidance.runtime import image_logits, make_guidance_runtime
from adsa_vllm.janus.config import JanusConfig
from adsa_vllm.worker.layer import make_attention, make_runtime
from adsa_vllm.worker.served_model import ServedImageModel

# transformers names -> vLLM's fused parameters (as LlamaModel.hf_to_vllm_mapper).
STACKED = ((".qkv_proj.", ".q_proj.", "q"), (".qkv_proj.", ".k_proj.", "k"), (".qkv_proj.", ".v_proj.", "v"),
           (".gate_up_proj.", ".gate_proj.", 0), (".gate_up_proj.", ".up_proj.", 1))
LOADED = ("model.language_model.", "model.generation_")   # lm_head, vision tower, aligner and VQ model are not


class JanusAttention(nn.Module):
    """LlamaAttention's projections and RoPE around the plugin's attention layer (2H heads under guidance). Built
    by LlamaDecoderLayer with its keyword arguments; the plugin's are bound with functools.partial."""

    def __init__(self, *, config, hidden_size: int, num_heads: int, num_kv_heads: int, max_position_embeddings: int,
                 bias: bool, bias_o_proj: bool, prefix: str, vllm_config: VllmConfig, runtime, branches: int, **_):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.num_heads, self.num_kv_heads = num_heads // tp, max(1, num_kv_heads // tp)
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.branches = branches
        self.qkv_proj = QKVParallelLinear(hidden_size, self.head_dim, num_heads, num_kv_heads, bias=bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, bias=bias_o_proj,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(self.head_dim, max_position=max_position_embeddings, is_neox_style=True,
                                   rope_parameters=getattr(config, "rope_parameters", None))
        self.attn = make_attention(branches * self.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   branches * self.num_kv_heads, vllm_config=vllm_config, runtime=runtime,
                                   prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)           # [branches * T, ...], a token's branches on adjacent rows
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.branches > 1:                           # -> [T, branches * heads * D]
            q, k, v = (t.reshape(-1, self.branches * t.shape[-1]) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v).reshape(hidden_states.shape[0], self.q_size))
        return out


class GenerationMLP(nn.Module):
    """transformers' JanusVQVAEAlignerMLP (fc1, then act + Linear per hidden layer) and, with `head=True`,
    JanusVQVAEHead (proj_out, act, vision_head). Replicated on every tensor-parallel rank: small next to the LM."""

    def __init__(self, dims: list[int], act: str, names: list[str]):
        super().__init__()
        self.act = ACT2FN[act]
        self.names = names
        for name, (d_in, d_out) in zip(names, zip(dims, dims[1:])):
            self.add_module(name, ReplicatedLinear(d_in, d_out, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, name in enumerate(self.names):
            x, _ = getattr(self, name)(self.act(x) if i else x)
        return x


def aligner(config: JanusConfig) -> GenerationMLP:
    return GenerationMLP([config.gen_embed_dim] + [config.gen_aligner_dim] * config.gen_aligner_layers, config.gen_act,
                         ["fc1"] + [f"hidden_layers_{i}" for i in range(config.gen_aligner_layers - 1)])


class LanguageModel(nn.Module):
    """Parameter holder named as transformers' LlamaModel (embed_tokens, layers, norm)."""

    def __init__(self, vllm_config: VllmConfig, config: JanusConfig, runtime, branches: int, prefix: str):
        super().__init__()
        # The config hook declares both branches' heads on hf_text_config; the layers are built with the model's own.
        declared = vllm_config.model_config.hf_text_config
        text_config = type(declared)(**{**declared.to_dict(), "num_attention_heads": config.n_head,
                                        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim})
        self.embed_tokens = VocabParallelEmbedding(config.text_vocab_size, config.hidden_size)
        attention = partial(JanusAttention, vllm_config=vllm_config, runtime=runtime, branches=branches)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}", config=text_config, attn_layer_type=attention)
            for i in range(config.n_layer))
        self.norm = RMSNorm(config.hidden_size, eps=text_config.rms_norm_eps)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": -1, "inputs_embeds": 0})
class JanusImageModel(nn.Module):
    """Names as transformers' JanusModel: language_model, generation_embeddings, generation_aligner,
    generation_head."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = JanusConfig.from_hf_dict(vllm_config.model_config.hf_config.to_dict())
        self.config = config
        self.runtime = make_runtime(vllm_config, config)
        self.guidance = make_guidance_runtime(vllm_config, config)
        self.branches = 1 if self.guidance is None else 2
        self.language_model = LanguageModel(vllm_config, config, self.runtime, self.branches,
                                            f"{prefix}.language_model")
        self.generation_embeddings = VocabParallelEmbedding(config.codebook_size, config.gen_embed_dim)
        self.generation_aligner = aligner(config)
        self.generation_head = GenerationMLP([config.hidden_size, config.gen_aligner_dim, config.codebook_size],
                                             config.gen_act, ["proj_out", "vision_head"])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = self.config.codebook_size
        is_text = input_ids >= n
        text = self.language_model.embed_tokens(torch.where(is_text, input_ids - n, 0))
        image = self.generation_aligner(self.generation_embeddings(torch.where(is_text, 0, input_ids)))
        return torch.where(is_text[:, None], text, image.to(text.dtype))

    def embed_pair(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [2T, hidden]: each token's conditional row, then its unconditional row (the padded prompt)."""
        bos, boi = self.config.null_kept_ids
        keep = (input_ids < self.config.codebook_size) | (input_ids == bos) | (input_ids == boi)
        null = torch.where(keep, input_ids, self.config.null_pad_id)
        return self.embed_input_ids(torch.stack([input_ids, null], dim=1).reshape(-1))

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.branches > 1:
            h = self.embed_pair(input_ids)
        else:
            h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.language_model.layers:
            h, residual = layer(positions, h, residual)
        h, _ = self.language_model.norm(h, residual)
        return h.reshape(positions.shape[0], -1)     # under CFG [T, 2 * hidden]: both branches of a token


class JanusForConditionalGeneration(ServedImageModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.model = JanusImageModel(vllm_config=vllm_config, prefix="model")
        self.config = self.model.config

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[0]
        logits = self.model.generation_head(hidden_states.reshape(n * self.model.branches, -1))
        return image_logits(logits, n, self.model.guidance, self.config.codebook_size, self.config.input_vocab_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in weights:
            if not name.startswith(LOADED):
                continue
            name = name.replace("generation_aligner.hidden_layers.", "generation_aligner.hidden_layers_")
            for fused, part, shard in STACKED:
                if part in name:
                    target = name.replace(part, fused)
                    params[target].weight_loader(params[target], w, shard)
                    break
            else:
                target = name
                p = params[target]
                getattr(p, "weight_loader", default_weight_loader)(p, w)
            loaded.add(target)
        return loaded
