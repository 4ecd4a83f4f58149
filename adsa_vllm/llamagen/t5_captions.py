"""Caption prompts for text-to-image LlamaGen: T5 features -> the compact prompt the model is served.

LlamaGen encodes a caption with flan-t5-xl into [120, 2048] features and a mask (1 = a real token; T5 pads on the
right), then left-pads and masks. Here a prompt is the valid rows only, `features[mask.bool()]` [v, 2048]
(adsa_vllm/llamagen/config.py says why that is the same computation); send it as vLLM `prompt_embeds`.

`encode_captions` runs the encoder exactly as LlamaGen's `T5Embedder.get_text_embeddings` does
(FoundationVision/LlamaGen language/t5.py). Pure torch; `transformers` is imported only by the functions that need it.
"""

from __future__ import annotations

import torch

MAX_LENGTH = 120   # the official caption length (t5_feature_max_len)


def caption_prompt(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """features [L, C] and mask [L] (nonzero = valid) -> the valid rows [v, C], in order; v >= 1."""
    if features.dim() != 2 or mask.shape != features.shape[:1]:
        raise ValueError(f"caption_prompt takes one caption: features [L, C] and mask [L]; got features "
                         f"{list(features.shape)} and mask {list(mask.shape)} (for a batch use caption_prompts)")
    if not features.is_floating_point():
        raise ValueError(f"caption features must be floating point (the text encoder's output), got {features.dtype}")
    keep = mask.bool()
    if not keep.any():
        raise ValueError("the caption mask selects no row: an empty caption still has T5's end-of-sequence token; "
                         "pass the attention mask the tokenizer returned")
    return features[keep.to(features.device)]


def caption_prompts(features: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """features [B, L, C] and mask [B, L] -> B prompts, each [v_b, C] (see caption_prompt)."""
    if features.dim() != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"caption_prompts takes a batch: features [B, L, C] and mask [B, L]; got features "
                         f"{list(features.shape)} and mask {list(mask.shape)}")
    return [caption_prompt(f, m) for f, m in zip(features, mask)]


@torch.no_grad()
def encode_captions(texts: list[str], encoder, tokenizer, max_length: int = MAX_LENGTH
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 features of `texts` as LlamaGen computes them -> (features [B, max_length, C], mask [B, max_length]).

    encoder: a transformers T5EncoderModel; tokenizer: its tokenizer (appends "</s>", pads on the right). Captions
    longer than max_length tokens are truncated, as in LlamaGen."""
    if isinstance(texts, str):
        raise ValueError("encode_captions takes a list of captions; wrap a single one: [text]")
    tok = tokenizer(list(texts), max_length=max_length, padding="max_length", truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    features = encoder(input_ids=ids, attention_mask=mask)["last_hidden_state"]
    return features, mask


def load_t5(path: str, device="cpu", dtype: torch.dtype = torch.bfloat16):
    """(encoder, tokenizer) from a local flan-t5-xl folder (config.json, weights, tokenizer files), in eval mode.

    LlamaGen runs the encoder in bfloat16 (its default --precision); nothing is downloaded."""
    from pathlib import Path

    from transformers import AutoTokenizer, T5EncoderModel
    if not Path(path).is_dir():
        raise ValueError(f"{path}: not a folder; pass the local flan-t5-xl folder (e.g. a snapshot of "
                         "google/flan-t5-xl holding config.json, the weights and the tokenizer files)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(path, dtype=dtype, local_files_only=True)
    return encoder.to(device).eval(), tokenizer


__all__ = ["MAX_LENGTH", "caption_prompt", "caption_prompts", "encode_captions", "load_t5"]
