"""Reference generation for LlamaGen with a static KV cache, classifier-free guidance and ADSA by attention masks.

Mirrors the official sampling loop (FoundationVision/LlamaGen `autoregressive/models/generate.py`): prefill the
condition tokens at positions [0, T), then one image token per step at position T + i, RoPE rows taken as
`freqs_cis[pos]`. Under CFG the batch is doubled with the null class (conditional rows first, then the null rows),
logits = u + s * (c - u), and the chosen token is fed to both halves. `cfg_interval` is the official --cfg-interval.

Under CFG with ADSA, `cfg_selection` says who decides evictions: "shared" (the vLLM path: a pair is one sequence, so
one tracker per pair scores both halves' heads together, conditional heads first, and both halves keep the same
blocks) or "separate" (one tracker per row, as if the two halves were independent requests).

ADSA is emulated exactly as the vLLM path does it, but with masks instead of freed blocks: every row owns a
`SequenceTracker`; each single-token forward calls begin_step -> kept_blocks (the mask) -> scoring_request, and the
requested candidates are scored in every layer, in layer order, right after that layer's K/V are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adsa_vllm.config import ADSAConfig
from adsa_vllm.guidance.settings import Guidance
from adsa_vllm.policy import SequenceTracker, make_scorer
from adsa_vllm.reference.model import LlamaGenReference


@dataclass
class GenerationResult:
    tokens: torch.Tensor                          # [B, n] int64 image-token ids in [0, codebook_size)
    logprobs: torch.Tensor | None = None          # [B, n, V] float32 log_softmax of the guided logits
    trackers: list[SequenceTracker] | None = None  # one per row: B, or 2B under CFG (conditional rows first),
    #                                                B under CFG with shared selection; None when nothing is
    #                                                evicted (no adsa, budget None or large)


class _Decoder:
    """Owns the static cache and the trackers of R rows; every forward returns float32 logits [R, V]."""

    def __init__(self, model: LlamaGenReference, conds: list[int], length: int, adsa: ADSAConfig | None,
                 block_size: int, pairs: int = 0):
        """pairs > 0: rows r and r + pairs are the halves of one CFG pair and share one tracker."""
        cfg = model.cfg
        self.model, self.bs, self.T = model, block_size, cfg.cls_token_num
        dev = model.tok_embeddings.weight.device
        self.cond = torch.tensor(conds, dtype=torch.int64, device=dev)
        self.L = length                                                   # cache slots: positions [0, L)
        shape = (len(conds), cfg.kv_heads, length, cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=model.dtype, device=dev),
                        torch.zeros(shape, dtype=model.dtype, device=dev)) for _ in range(cfg.n_layer)]
        self.slots = torch.arange(length, device=dev)
        self.trackers: list[SequenceTracker] | None = None
        # budget None means "never evict": no layout at all (BlockLayout floors a None budget to whole blocks,
        # which can still evict one block or even reject small grids).
        layout = None if adsa is None or adsa.budget is None else adsa.layout(
            block_size=block_size, cls_token_num=cfg.cls_token_num, grid_size=cfg.grid_size)
        self.pairs = pairs
        if layout is not None and layout.evicts:
            self.trackers = [SequenceTracker(layout, make_scorer(layout.policy, keep=layout.keep, seed=layout.seed))
                             for _ in range(pairs or len(conds))]
        self._requests: list[tuple[int, SequenceTracker, torch.Tensor]] = []
        self._pos = 0

    def prefill(self) -> torch.Tensor:
        h = self.model.embed_cond(self.cond)                              # [R, T, dim]
        if self.T == 1:
            return self._single(h, 0)
        # Multi-token prefill: plain causal attention, the trackers are not consulted (as in the vLLM path).
        pos = torch.arange(self.T, device=h.device)
        mask = (self.slots[None, :] <= pos[:, None])[None, None]          # [1, 1, T, L]
        return self.model.forward_hidden(h, pos, self.caches, mask)[:, -1]

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens: [R] ids fed at position `pos` -> logits [R, V] predicting position pos + 1."""
        return self._single(self.model.tok_embeddings(tokens)[:, None], pos)

    def _single(self, h: torch.Tensor, pos: int) -> torch.Tensor:
        causal = self.slots <= pos                                        # [L]
        self._requests, self._pos = [], pos
        if self.trackers is None:
            mask = causal[None, None, None].expand(h.shape[0], 1, 1, self.L)
        else:
            rows = []
            for r, tr in enumerate(self.trackers):
                tr.begin_step(pos)
                keep = torch.zeros(self.L // self.bs + 1, dtype=torch.bool, device=h.device)
                keep[tr.kept_blocks(pos)] = True
                rows.append(keep[self.slots // self.bs] & causal)
                cands = tr.scoring_request(pos)
                if cands is not None:
                    idx = (torch.tensor(cands, device=h.device)[:, None] * self.bs
                           + torch.arange(self.bs, device=h.device)).flatten()    # [n * bs] token positions
                    self._requests.append((r, tr, idx))
            if self.pairs:
                rows = rows + rows                                        # both halves keep the same blocks
            mask = torch.stack(rows)[:, None, None]                       # [R, 1, 1, L]
        pos_t = torch.tensor([pos], device=h.device)
        hook = self._score if self._requests else None
        return self.model.forward_hidden(h, pos_t, self.caches, mask, hook=hook)[:, -1]

    def _score(self, layer: int, q: torch.Tensor) -> None:
        """Layer hook: q [R, H, 1, D] post-RoPE; the layer's K/V for this position are already cached."""
        k_cache, v_cache = self.caches[layer]
        scale = self.model.cfg.head_dim ** -0.5
        hd = k_cache.shape[-1]
        for r, tr, idx in self._requests:
            if layer and not tr.scorer.reads_kv:
                continue  # a position-only score is added once per selection, not once per layer (as in vLLM)
            n = idx.numel() // self.bs
            rows = [r, r + self.pairs] if self.pairs else [r]             # a pair: [cond heads, uncond heads]

            def blocks(cache):  # [heads, n*bs, D] -> [n, bs, heads, D], the paged-cache layout the scorers expect
                return torch.cat([cache[i][:, idx] for i in rows]).transpose(0, 1).reshape(n, self.bs, -1, hd)
            tr.score_layer(blocks(k_cache), blocks(v_cache), torch.cat([q[i, :, 0] for i in rows]), self._pos,
                           scale=scale)


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
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


def _run(model, class_ids, n, *, cfg_scale, force_cfg, adsa, block_size, choose, want_logprobs,
         cfg_interval=-1, cfg_selection="separate"):
    cfg = model.cfg
    for c in class_ids:
        cfg.class_token(c)  # validates the id (num_classes itself = unconditional)
    if not 1 <= n <= cfg.image_tokens:
        raise ValueError(f"{n} image tokens requested; the model's grid holds 1..{cfg.image_tokens}")
    guided = cfg_scale > 1.0 or force_cfg
    if cfg_selection not in ("shared", "separate"):
        raise ValueError(f"cfg_selection={cfg_selection!r}: choose 'shared' or 'separate'")
    scales = Guidance(cfg_scale, cfg_interval)          # validates scale and interval
    B = len(class_ids)
    conds = list(class_ids) + ([cfg.num_classes] * B if guided else [])
    dec = _Decoder(model, conds, cfg.cls_token_num + n, adsa, block_size,
                   pairs=B if guided and cfg_selection == "shared" else 0)
    toks, lps = [], []
    logits = dec.prefill()
    for i in range(n):
        if i:
            fed = toks[-1].repeat(2) if guided else toks[-1]
            logits = dec.step(fed, cfg.cls_token_num + i - 1)
        if guided:
            c, u = logits[:B], logits[B:]
            logits = u + scales.scale_at(i) * (c - u)
        if want_logprobs:
            lps.append(F.log_softmax(logits.float(), dim=-1))
        toks.append(choose(i, logits))
    logprobs = torch.stack(lps, dim=1) if want_logprobs else None
    return GenerationResult(torch.stack(toks, dim=1), logprobs, dec.trackers)


@torch.no_grad()
def generate(model: LlamaGenReference, class_ids: list[int], *, max_new_tokens: int | None = None,
             cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, seed: int | None = None, adsa: ADSAConfig | None = None, block_size: int = 16,
             return_logprobs: bool = False, force_cfg: bool = False, cfg_interval: int = -1,
             cfg_selection: str = "separate") -> GenerationResult:
    """Sample `max_new_tokens` (default grid**2) image tokens per class id -> GenerationResult, tokens [B, n].

    CFG (batch doubled with the null class) runs when cfg_scale > 1 as in the official code, or always with
    force_cfg; cfg_interval and cfg_selection as in the module docstring. logprobs are of the guided logits
    before temperature / top-k / top-p (the model's distribution).
    adsa: emulate ADSA eviction with per-row trackers (block_size tokens per block); None = full attention.
    """
    n = model.cfg.image_tokens if max_new_tokens is None else max_new_tokens
    dev = model.tok_embeddings.weight.device
    gen = None if seed is None else torch.Generator(device=dev).manual_seed(seed)

    def choose(_i, logits):
        if greedy:
            return logits.argmax(-1)
        probs = _filter(logits.float() / max(temperature, 1e-5), top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    return _run(model, class_ids, n, cfg_scale=cfg_scale, force_cfg=force_cfg, adsa=adsa, block_size=block_size,
                choose=choose, want_logprobs=return_logprobs, cfg_interval=cfg_interval, cfg_selection=cfg_selection)


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


__all__ = ["GenerationResult", "generate", "score_tokens"]
