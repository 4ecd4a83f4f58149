"""Reference text-to-image generation on compact captions: the test oracle of the vLLM t2i path.

A t2i prompt is a caption's valid rows [v, caption_dim], 1 <= v <= cls_token_num (adsa_vllm/llamagen/t5_captions.py). The
sequence is [v caption rows, image tokens], sequence index s turning by RoPE row (cls_token_num - v) + s: caption
rows have zero angle wherever they sit, image token i keeps its official row cls_token_num + i. This equals LlamaGen's
left padding + attention mask (adsa_vllm/reference/t2i_official.py). Under CFG the null half of a caption of v rows
is the last v rows of `uncond_embedding`. ADSA runs on the compact sequence: its layout has cls_token_num = v (so the
default prefix is v + grid_size tokens, block j = sequence indices [j*bs, (j+1)*bs)).

Captions of different lengths run as separate groups, one per length, through the c2i decoders (reference/generate.py
`decode`), in order of first appearance; a seeded sampler draws group after group.
"""

from __future__ import annotations

import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.reference.generate import GenerationResult, check_run, decode, sampler
from adsa_vllm.reference.model import LlamaGenReference


def _groups(captions) -> dict[int, list[int]]:
    """{caption length: indices of the captions of that length}, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for b, c in enumerate(captions):
        groups.setdefault(c.shape[0], []).append(b)
    return groups


def _run_t2i(model, captions, n, *, cfg_scale, force_cfg, adsa, block_size, choose_for, want_logprobs,
             cfg_interval, cfg_selection, batched) -> GenerationResult:
    config = model.config
    if not config.is_t2i:
        raise ValueError("this is a class-to-image LlamaGen: use reference.generate(model, class_ids)")
    if not captions:
        raise ValueError("no captions given")
    for c in captions:
        config.check_prompt_embeds(tuple(c.shape), c.is_floating_point())
    scales = check_run(config, n, cfg_scale, cfg_interval, cfg_selection)
    guided = cfg_scale > 1.0 or force_cfg
    dev = model.tok_embeddings.weight.device
    B = len(captions)
    tokens = torch.zeros(B, n, dtype=torch.int64, device=dev)
    logprobs = torch.zeros(B, n, config.codebook_size, device=dev) if want_logprobs else None
    cond_trackers, null_trackers = [None] * B, [None] * B
    for rows in _groups(captions).values():
        x = torch.stack([captions[b] for b in rows]).to(dev)
        cond = model.embed_caption(x)
        if guided:
            cond = torch.cat([cond, model.embed_caption(x, null=True)])
        res = decode(model, cond, n, guided=guided, scales=scales, adsa=adsa, block_size=block_size,
                     choose=choose_for(rows), want_logprobs=want_logprobs, cfg_selection=cfg_selection,
                     batched=batched)
        tokens[rows] = res.tokens
        if want_logprobs:
            logprobs[rows] = res.logprobs
        for k, tr in enumerate(res.trackers or []):   # B rows, or 2B under CFG with separate selection
            (cond_trackers if k < len(rows) else null_trackers)[rows[k % len(rows)]] = tr
    separate_halves = guided and cfg_selection == "separate"
    trackers = cond_trackers + (null_trackers if separate_halves else [])
    return GenerationResult(tokens, logprobs, trackers if any(t is not None for t in trackers) else None)


@torch.no_grad()
def generate_t2i(model: LlamaGenReference, captions: list[torch.Tensor], *, max_new_tokens: int | None = None,
                 cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, seed: int | None = None, adsa: ADSAConfig | None = None,
                 block_size: int = 16, return_logprobs: bool = False, force_cfg: bool = False,
                 cfg_interval: int = -1, cfg_selection: str = "shared", batched: bool = False) -> GenerationResult:
    """`generate` for a t2i model: captions, each [v_b, caption_dim] (the valid rows) -> GenerationResult, tokens
    [B, n] in caption order.

    Arguments as in `generate`, except cfg_selection defaults to "shared" (the vLLM path: a CFG pair makes one
    selection). trackers: one per caption (shared or no CFG) or per row (2B, conditional rows first, under CFG with
    "separate"), None in the slot of a caption whose layout never evicts, None overall when none evicts.
    """
    n = model.config.image_tokens if max_new_tokens is None else max_new_tokens
    choose = sampler(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     device=model.tok_embeddings.weight.device)
    return _run_t2i(model, captions, n, cfg_scale=cfg_scale, force_cfg=force_cfg, adsa=adsa, block_size=block_size,
                    choose_for=lambda _rows: choose, want_logprobs=return_logprobs, cfg_interval=cfg_interval,
                    cfg_selection=cfg_selection, batched=batched)


@torch.no_grad()
def score_tokens_t2i(model: LlamaGenReference, captions: list[torch.Tensor], tokens: torch.Tensor, *,
                     adsa: ADSAConfig | None = None, block_size: int = 16, cfg_scale: float = 1.0,
                     force_cfg: bool = False, return_result: bool = False, cfg_interval: int = -1,
                     cfg_selection: str = "shared"):
    """Teacher-forced twin of `generate_t2i` (as `score_tokens` is of `generate`): logprobs [B, n, V] of tokens
    [B, n]; with return_result=True the whole GenerationResult."""
    tokens = tokens.to(model.tok_embeddings.weight.device, torch.int64)
    if tokens.shape[0] != len(captions):
        raise ValueError(f"tokens has {tokens.shape[0]} rows for {len(captions)} captions")
    res = _run_t2i(model, captions, tokens.shape[1], cfg_scale=cfg_scale, force_cfg=force_cfg, adsa=adsa,
                   block_size=block_size, choose_for=lambda rows: (lambda i, _logits: tokens[rows, i]),
                   want_logprobs=True, cfg_interval=cfg_interval, cfg_selection=cfg_selection, batched=False)
    return res if return_result else res.logprobs


__all__ = ["generate_t2i", "score_tokens_t2i"]
