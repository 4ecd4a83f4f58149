"""Text-to-image LlamaGen in vLLM: the caption embedder and the positions that keep image tokens official.

A t2i prompt is the caption's valid rows only, [v, caption_dim] with 1 <= v <= cls_token_num, sent as vLLM
`prompt_embeds` (adsa_vllm/llamagen/config.py says why that equals LlamaGen's left padding + mask). Two things follow:
  * Rows of `inputs_embeds` are of two kinds: caption features (caption_dim wide) at condition positions, and image
    tokens, which the model embeds itself (`embed_image_tokens`, zero-padded to caption_dim because vLLM keeps one
    inputs_embeds buffer of `projection_dim` columns). A row's position tells which it is.
  * Positions: vLLM numbers a sequence 0, 1, ...; LlamaGen puts image token i at cls_token_num + i. The config asks
    vLLM for per-request positions (an "mrope_section", vLLM's M-RoPE path: `get_mrope_input_positions` once per
    request, then a constant offset for generated tokens), and `caption_positions` shifts the whole sequence by
    cls_token_num - v. The three M-RoPE rows are equal; the model reads the first.
Why prompt embeds and not vLLM's multimodal path: the caption already is an embedding sequence that the user's
encoder computed; the multimodal path would add a processor, placeholder token ids and an encoder step for features
that arrive finished, and prompt embeds already travel offline (a tensor) and over HTTP (base64 of torch.save).
Under classifier-free guidance the unconditional branch takes LlamaGen's learned null caption at the same positions
(`uncond_embedding[cls_token_num - v:]`, what LlamaGen's mask leaves of it), and the same image tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import ReplicatedLinear

from adsa_vllm.llamagen.config import LlamaGenConfig


class CaptionEmbedder(nn.Module):
    """Official names: cls_embedding.cap_proj.fc1 / fc2 (no bias, GELU tanh), cls_embedding.uncond_embedding."""

    def __init__(self, config: LlamaGenConfig):
        super().__init__()
        self.cap_proj = CaptionMLP(config.caption_dim, config.dim)
        self.uncond_embedding = nn.Parameter(torch.empty(config.cls_token_num, config.caption_dim),
                                             requires_grad=False)
        self.cls_token_num, self.dim = config.cls_token_num, config.dim

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, branches: int) -> torch.Tensor:
        """[T, caption_dim] mixed rows -> [branches * T, dim]: under guidance each token's conditional row, then its
        unconditional row (null caption at condition positions, the same image token elsewhere)."""
        is_caption = (positions < self.cls_token_num)[:, None]
        image = inputs_embeds[:, : self.dim]
        cond = torch.where(is_caption, self.cap_proj(inputs_embeds), image)
        if branches == 1:
            return cond
        null = self.cap_proj(self.uncond_embedding.to(inputs_embeds.dtype))       # [cls_token_num, dim]
        uncond = torch.where(is_caption, null[positions.clamp(max=self.cls_token_num - 1)], image)
        return torch.stack([cond, uncond], dim=1).reshape(-1, cond.shape[-1])


class CaptionMLP(nn.Module):
    def __init__(self, caption_dim: int, dim: int):
        super().__init__()
        # Replicated on every tensor-parallel rank: small (caption_dim x dim + dim x dim) and run on few rows.
        self.fc1 = ReplicatedLinear(caption_dim, dim, bias=False)
        self.fc2 = ReplicatedLinear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        h, _ = self.fc2(F.gelu(h, approximate="tanh"))
        return h


def embed_image_tokens(embedding: nn.Module, input_ids: torch.Tensor, width: int) -> torch.Tensor:
    """Image-token rows for vLLM's inputs_embeds buffer: [T, dim] zero-padded to [T, width]."""
    rows = embedding(input_ids)
    return F.pad(rows, (0, width - rows.shape[-1]))


def caption_positions(num_prompt_rows: int, config: LlamaGenConfig) -> tuple[torch.Tensor, int]:
    """vLLM's M-RoPE hook: the prompt's positions [3, v] and the offset of every later token, so that image token i
    sits at cls_token_num + i for a caption of v rows (`LlamaGenConfig.position_offset`)."""
    offset = config.position_offset(num_prompt_rows)
    return torch.arange(offset, offset + num_prompt_rows).expand(3, -1).clone(), offset
