"""LlamaGen's own text-to-image formulation, kept as the oracle of the compact one the project serves.

FoundationVision/LlamaGen `autoregressive/sample/sample_t2i.py` + `models/generate.py` (reimplemented): the T5
features [B, 120, C] come right-padded with emb_masks [B, 120]; they are turned into a left-padded caption (padding
rows first, zeroed), the null caption of CFG is `uncond_embedding` (all 120 rows), and attention is causal with the
padding columns removed for every query, except that each position still attends itself (the eye guard). Image
token i sits at position 120 + i. The compact form (adsa_vllm/reference/t2i.py) keeps only the v valid rows;
tests/test_t2i_reference.py checks that both give the same image-token logits.
"""

from __future__ import annotations

import torch

from adsa_vllm.reference.model import LlamaGenReference


def left_pad(features: torch.Tensor, emb_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_t2i.py's left padding: features [B, L, C] right-padded with emb_masks [B, L] (1 = valid) -> (captions
    [B, L, C] with the padding rows first and zeroed, masks [B, L] flipped to match)."""
    new_masks = torch.flip(emb_masks, dims=[-1])
    rows = []
    for emb, mask in zip(features, emb_masks):
        valid = int(mask.sum())
        rows.append(torch.cat([emb[valid:], emb[:valid]]))
    return torch.stack(rows) * new_masks[:, :, None].to(features.dtype), new_masks


def official_t2i_logits(model: LlamaGenReference, features: torch.Tensor, emb_masks: torch.Tensor,
                        idx: torch.Tensor, null: bool = False) -> torch.Tensor:
    """Teacher-forced logits the LlamaGen way: features [B, 120, C] and emb_masks [B, 120] as the T5 encoder gives
    them (right padding), image tokens idx [B, n] -> logits [B, n + 1, V], entry i predicting image token i.
    null=True runs the CFG null half: the caption replaced by `uncond_embedding`, masked with the same masks."""
    config = model.config
    T = config.cls_token_num
    captions, masks = left_pad(features.to(model.dtype), emb_masks)
    if null:
        captions = torch.zeros_like(captions) + model.cls_embedding.uncond_embedding
    cond = model.cls_embedding.cap_proj(captions)[:, :T]
    h = torch.cat([cond, model.tok_embeddings(idx)], dim=1)
    S = h.shape[1]
    mask = torch.tril(torch.ones(S, S, device=h.device)).repeat(h.shape[0], 1, 1)
    mask[:, :, :T] = mask[:, :, :T] * masks[:, None, :].to(mask)
    eye = torch.eye(S, device=h.device)
    mask = mask * (1 - eye) + eye
    logits = model.forward_hidden(h, torch.arange(S, device=h.device), mask=mask.bool()[:, None])
    return logits[:, T - 1:]


__all__ = ["left_pad", "official_t2i_logits"]
