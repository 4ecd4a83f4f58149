"""Reference generation for LlamaGen with a static KV cache, classifier-free guidance and ADSA by attention masks.

Mirrors the official sampling loop (FoundationVision/LlamaGen `autoregressive/models/generate.py`): prefill the
condition tokens at positions [0, T), then one image token per step at position T + i, RoPE rows taken as
`freqs_cis[pos]`. Under CFG the batch is doubled with the null class (conditional rows first, then the null rows),
logits = u + s * (c - u), and the chosen token is fed to both halves. `cfg_interval` is the official --cfg-interval.

Under CFG with ADSA, `cfg_selection` says who decides evictions: "shared" (the vLLM path: a pair is one sequence, so
one tracker per pair scores both halves' heads together, conditional heads first, and both halves keep the same
blocks) or "separate" (one tracker per row, as if the two halves were independent requests).

ADSA is emulated exactly as the vLLM path does it, but with masks instead of freed blocks: every row (or pair) owns
a `SequenceTracker` (adsa_vllm/reference/decoder.py). `generate(batched=True)` makes the same decisions for all rows
at once (adsa_vllm/reference/batched.py): the same tokens, much faster for many rows. With
adsa.granularity="token" every row (or pair) selects per layer and KV head
(adsa_vllm/reference/token_decoder.py).

`decode` is the loop itself, on condition embeddings: `generate` gives it class embeddings, the text-to-image
`generate_t2i` (adsa_vllm/reference/t2i.py) compact caption embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adsa_vllm.config import ADSAConfig
from adsa_vllm.guidance.settings import Guidance
from adsa_vllm.policy import SequenceTracker
from adsa_vllm.reference.batched import BatchedDecoder
from adsa_vllm.reference.decoder import TrackerDecoder
from adsa_vllm.reference.model import LlamaGenReference
from adsa_vllm.reference.token_decoder import TokenDecoder


@dataclass
class GenerationResult:
    tokens: torch.Tensor                          # [B, n] int64 image-token ids in [0, codebook_size)
    logprobs: torch.Tensor | None = None          # [B, n, V] float32 log_softmax of the guided logits
    trackers: list[SequenceTracker] | None = None  # one per row: B, or 2B under CFG (conditional rows first),
    #                                                B under CFG with shared selection; None when nothing is
    #                                                evicted (no adsa, budget None or large) or when batched


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering of [B, V] logits (the official semantics; at least one token survives)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum > top_p
        drop[..., 1:] = drop[..., :-1].clone()   # shift right: keep the token that crosses the threshold
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def check_run(config, n: int, cfg_scale: float, cfg_interval: int, cfg_selection: str) -> Guidance:
    """Validate what every generation run shares; returns the guidance schedule."""
    if not 1 <= n <= config.image_tokens:
        raise ValueError(f"{n} image tokens requested; the model's grid holds 1..{config.image_tokens}")
    if cfg_selection not in ("shared", "separate"):
        raise ValueError(f"cfg_selection={cfg_selection!r}: choose 'shared' or 'separate'")
    return Guidance(cfg_scale, cfg_interval)          # validates scale and interval


def _run(model, class_ids, n, *, cfg_scale, force_cfg, adsa, block_size, choose, want_logprobs,
         cfg_interval=-1, cfg_selection="separate", batched=False):
    config = model.config
    for c in class_ids:
        config.class_token(c)  # validates the id (num_classes itself = unconditional)
    scales = check_run(config, n, cfg_scale, cfg_interval, cfg_selection)
    guided = cfg_scale > 1.0 or force_cfg
    conds = list(class_ids) + ([config.num_classes] * len(class_ids) if guided else [])
    cond = model.embed_cond(torch.as_tensor(conds, dtype=torch.int64, device=model.tok_embeddings.weight.device))
    return decode(model, cond, n, guided=guided, scales=scales, adsa=adsa, block_size=block_size, choose=choose,
                  want_logprobs=want_logprobs, cfg_selection=cfg_selection, batched=batched)


def decode(model: LlamaGenReference, cond: torch.Tensor, n: int, *, guided: bool, scales: Guidance,
           adsa: ADSAConfig | None, block_size: int, choose, want_logprobs: bool, cfg_selection: str = "separate",
           batched: bool = False) -> GenerationResult:
    """The generation loop on condition embeddings cond [R, T, dim] (R = B, or 2B under CFG: conditional rows
    then null rows): n image tokens per conditional row, `choose(i, guided logits [B, V]) -> [B]` picking them."""
    B = cond.shape[0] // 2 if guided else cond.shape[0]
    T = cond.shape[1]
    pairs = B if guided and cfg_selection == "shared" else 0
    if adsa is not None and adsa.granularity == "token":
        # One decoder for both paths: step by step (batched or not) it is the exact token-mode oracle.
        dec = TokenDecoder(model, cond, T + n, adsa, block_size, pairs=pairs)
    else:
        decoder = BatchedDecoder if batched else TrackerDecoder
        dec = decoder(model, cond, T + n, adsa, block_size, pairs=pairs)
    toks, lps = [], []
    logits = dec.prefill()
    for i in range(n):
        if i:
            fed = toks[-1].repeat(2) if guided else toks[-1]
            logits = dec.step(fed, T + i - 1)
        if guided:
            c, u = logits[:B], logits[B:]
            logits = u + scales.scale_at(i) * (c - u)
        if want_logprobs:
            lps.append(F.log_softmax(logits.float(), dim=-1))
        toks.append(choose(i, logits))
    logprobs = torch.stack(lps, dim=1) if want_logprobs else None
    return GenerationResult(torch.stack(toks, dim=1), logprobs, dec.trackers)


def sampler(*, greedy: bool, temperature: float, top_k: int, top_p: float, seed: int | None, device):
    """`choose(i, logits [B, V]) -> [B]`: argmax, or a draw from the filtered, tempered distribution."""
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    def choose(_i, logits):
        if greedy:
            return logits.argmax(-1)
        probs = filter_logits(logits.float() / max(temperature, 1e-5), top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]
    return choose


@torch.no_grad()
def generate(model: LlamaGenReference, class_ids: list[int], *, max_new_tokens: int | None = None,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, seed: int | None = None, adsa: ADSAConfig | None = None, block_size: int = 16,
             return_logprobs: bool = False, force_cfg: bool = False, cfg_interval: int = -1,
             cfg_selection: str = "separate", batched: bool = False) -> GenerationResult:
    """Sample `max_new_tokens` (default grid**2) image tokens per class id -> GenerationResult, tokens [B, n].

    CFG (batch doubled with the null class) runs when cfg_scale > 1 as in the official code, or always with
    force_cfg; cfg_interval and cfg_selection as in the module docstring. logprobs are of the guided logits
    before temperature / top-k / top-p (the model's distribution).
    adsa: emulate ADSA eviction with per-row trackers (block_size tokens per block); None = full attention.
    batched: decide every row's evictions at once (`BatchedDecoder`; the same tokens, no trackers in the result).
    """
    n = model.config.image_tokens if max_new_tokens is None else max_new_tokens
    choose = sampler(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                     device=model.tok_embeddings.weight.device)
    return _run(model, class_ids, n, cfg_scale=cfg_scale, force_cfg=force_cfg, adsa=adsa, block_size=block_size,
                choose=choose, want_logprobs=return_logprobs, cfg_interval=cfg_interval, cfg_selection=cfg_selection,
                batched=batched)


@torch.no_grad()
def score_tokens(model: LlamaGenReference, class_ids: list[int], tokens: torch.Tensor, *,
                 adsa: ADSAConfig | None = None, block_size: int = 16, cfg_scale: float = 1.0,
                 force_cfg: bool = False, return_result: bool = False, cfg_interval: int = -1,
                 cfg_selection: str = "separate"):
    """Teacher-forced twin of `generate`: feeds tokens [B, n] through the same cached, tracker-driven path.

    Returns logprobs [B, n, V] (entry i is the distribution of token i given tokens[:, :i]); with
    return_result=True the whole GenerationResult (tokens, logprobs, trackers) instead.
    """
    tokens = tokens.to(model.tok_embeddings.weight.device, torch.int64)
    if tokens.shape[0] != len(class_ids):
        raise ValueError(f"tokens has {tokens.shape[0]} rows for {len(class_ids)} class ids")
    res = _run(model, class_ids, tokens.shape[1], cfg_scale=cfg_scale, force_cfg=force_cfg, adsa=adsa,
               block_size=block_size, choose=lambda i, _logits: tokens[:, i], want_logprobs=True,
               cfg_interval=cfg_interval, cfg_selection=cfg_selection)
    return res if return_result else res.logprobs


__all__ = ["GenerationResult", "check_run", "decode", "filter_logits", "generate", "sampler", "score_tokens"]
