"""ADSA's quality cost on a LlamaGen trained on real images (Fashion-MNIST pixel tokens, issue #5).

(a) Teacher-forced bits/token on test images for full attention and every policy (topk_v keep=diverse,
    topk_v keep=similar, streaming, random, attention_mass) at budgets 0.10/0.25/0.50/0.75 of the image tokens.
    Every policy keeps the same number of blocks at a budget; budgets below prefix + local window are invalid
    (ADSAConfigError) and reported as skipped with the reason.
(b) CFG samples for full attention and each policy at --sample-budget (0.5): FID between classifier features
    (benchmarks/classifier.py) of the samples and of the test images, and classifier accuracy on the intended class.
(c) <out-dir>/<tag>.json, <tag>.md (tables), <tag>_bits.png (bits/token vs budget, one line per policy) and
    <tag>_samples.png (rows: full attention then each policy, columns: classes).

Selection code. The reference `score_tokens` / `generate` (adsa_vllm/reference/generate.py) drive one
`SequenceTracker` per row in Python at every step: exact, but ~10k rows x 784 steps x 16 configurations is hours
even on an H100. This file runs the same decisions batched (`BatchedADSA`): the same `BlockLayout`, the same
registered scorers called on [R, C] candidate batches (as the vLLM worker calls them), the same layer-order score
sums and the same top-k rule as `top_blocks` (best score, ties to the more recent block). All rows of a batch sit
at the same position, so *when* a selection happens and how many blocks it evicts is the same for every row; that
schedule comes from driving one real `SequenceTracker`. Between two selections nothing changes, so teacher forcing
feeds all positions up to the next scoring step in one chunked forward (keys/values are identical to the
one-token-per-step path; only the matmul shapes differ). tests/test_fashion.py checks logprobs, evicted sets and
sampled tokens against the reference; `--check-exact N` repeats that check on N test images of the model being
measured (reported in the JSON), and `--exact` uses the reference functions for everything (slow).

  # GPU: the committed run (benchmarks/results/fashion_quality_h200.*), on one H200 in 387 s: full attention 6 s,
  # 10-17 s per ADSA configuration for the 10k test images (float32), 12-13 s per row of 1000 CFG samples (bf16;
  # the first row 63 s, warm-up included), exact check 46 s. Default model: the shipped one (adsa_vllm/assets/).
  ADSA_FASHION_MNIST_DIR=... python benchmarks/quality.py --device cuda --tag fashion_quality_h200
  # A run that may not fit one time-limited call: measure in parts, then merge (tables and plots of the union)
  python benchmarks/quality.py --parts bits --tag q_bits && python benchmarks/quality.py --parts samples --tag q_s
  python benchmarks/quality.py --merge benchmarks/results/q_bits.json benchmarks/results/q_s.json --tag q
  # CPU smoke run (~2 min on 2 cores)
  python benchmarks/quality.py --device cpu --limit 64 --policies random --samples-per-policy 10 --out-dir /tmp/q
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from adsa_vllm.config import ADSAConfig, ADSAConfigError  # noqa: E402
from adsa_vllm.convert import load_reference  # noqa: E402
from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.policy import BlockLayout, ScoreInputs, SequenceTracker, make_scorer  # noqa: E402
from adsa_vllm.reference import generate, score_tokens  # noqa: E402
from adsa_vllm.reference.model import LlamaGenReference  # noqa: E402

# The package re-exports the function `generate`, which shadows the submodule of the same name.
_gen_mod = importlib.import_module("adsa_vllm.reference.generate")
LN2 = math.log(2.0)
# (label, ADSAConfig fields) of every policy measured; labels are the JSON / table / plot keys.
POLICIES = {"topk_v_diverse": dict(policy="topk_v", keep="diverse"),
            "topk_v_similar": dict(policy="topk_v", keep="similar"),
            "streaming": dict(policy="streaming"),
            "random": dict(policy="random"),
            "attention_mass": dict(policy="attention_mass")}
BUDGETS = (0.10, 0.25, 0.50, 0.75)


# ---------------------------------------------------------------------------------------------------------------
# Batched ADSA: the reference's per-row trackers, vectorised over rows that share their positions.
# ---------------------------------------------------------------------------------------------------------------
def selection_schedule(layout: BlockLayout, cls_token_num: int, n: int) -> dict[int, int]:
    """{position p: number of candidates} for every forward position at which the trackers request scores (the
    selection itself happens at p + 1). Driven through a real SequenceTracker: whether a selection is due depends
    only on positions and on how many candidates survive, never on which ones, so one tracker fed dummy scores
    has the schedule of every row."""
    proto = SequenceTracker(layout, scorer=None)
    out = {}
    # The reference consults trackers from the first single-token forward: position 0 when the condition is one
    # token, else position T (a multi-token prefill is plain causal); the last fed position is T + n - 2.
    for pos in range(0 if cls_token_num == 1 else cls_token_num, cls_token_num + n - 1):
        proto.begin_step(pos)
        cands = proto.scoring_request(pos)
        if cands is not None:
            out[pos] = len(cands)
            proto.add_layer_scores(torch.zeros(len(cands)))
    return out


class BatchedADSA:
    """Static KV cache + ADSA state of R rows decoded in lockstep. `forward(h, start)` runs positions
    [start, start + S) in one forward; the caller must end a chunk at every scoring position (`schedule`)."""

    def __init__(self, model: LlamaGenReference, conds: torch.Tensor, length: int, adsa: ADSAConfig | None,
                 block_size: int, n: int, pairs: int = 0):
        """pairs > 0: rows r and r + pairs are the halves of one CFG pair and make one shared selection from both
        halves' heads (conditional first), as the vLLM path does (reference: cfg_selection="shared")."""
        cfg = model.cfg
        self.pairs = pairs
        self.model, self.bs, self.T = model, block_size, cfg.cls_token_num
        dev = model.tok_embeddings.weight.device
        self.cond = conds.to(dev)
        R = len(conds)
        shape = (R, cfg.kv_heads, length, cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=model.dtype, device=dev),
                        torch.zeros(shape, dtype=model.dtype, device=dev)) for _ in range(cfg.n_layer)]
        self.slots = torch.arange(length, device=dev)
        self.L = length
        # As the reference: budget None (or one covering the sequence) never evicts.
        layout = None if adsa is None or adsa.budget is None else adsa.layout(
            block_size=block_size, cls_token_num=cfg.cls_token_num, grid_size=cfg.grid_size)
        self.layout = layout if layout is not None and layout.evicts else None
        self.schedule = {} if self.layout is None else selection_schedule(self.layout, self.T, n)
        self.scorer = None if self.layout is None else make_scorer(self.layout.policy, keep=self.layout.keep,
                                                                   seed=self.layout.seed)
        self.evicted = torch.zeros(R, length // block_size + 1, dtype=torch.bool, device=dev)
        self._pending: tuple[int, torch.Tensor, torch.Tensor | None] | None = None   # (pos, cands [R,C], acc)
        self._req: tuple[int, torch.Tensor, torch.Tensor] | None = None              # this forward's request
        self.selections = 0

    def _select(self, pos: int) -> None:
        if self._pending is None or self._pending[0] != pos:
            self._pending = None
            return
        _, cand, acc = self._pending
        self._pending = None
        if acc is None:
            return
        deciders = self.evicted[: self.pairs] if self.pairs else self.evicted   # a view: updated in place
        cand = cand[: deciders.shape[0]]
        # top_blocks: order by block index descending, then a stable sort by score descending -> ties go to the
        # more recent block. cand is ascending, so flipping gives the first order.
        order = torch.sort(acc.flip(1), dim=1, descending=True, stable=True).indices[:, : self.layout.topk_blocks]
        keep = cand.flip(1).gather(1, order)
        deciders.scatter_(1, cand, True)
        deciders.scatter_(1, keep, False)
        if self.pairs:
            self.evicted[self.pairs:] = deciders
        self.selections += 1

    def _request(self, pos: int) -> None:
        self._req = None
        if pos not in self.schedule:
            return
        rng = self.layout.candidate_range(pos + 1)
        alive = ~self.evicted[:, rng.start:rng.stop]
        counts = alive.sum(1)
        C = self.schedule[pos]
        if not bool((counts == C).all()):
            raise AssertionError(f"rows disagree on the candidate count at {pos}: expected {C}")
        ids = torch.arange(rng.start, rng.stop, device=alive.device).expand_as(alive)[alive].view(-1, C)
        tok = (ids[:, :, None] * self.bs + torch.arange(self.bs, device=ids.device)).flatten(1)   # [R, C*bs]
        self._req = (pos, ids, tok)
        self._pending = (pos + 1, ids, None)

    def _score(self, layer: int, q: torch.Tensor) -> None:
        """Layer hook: q [R, H, S, D] post-RoPE; this layer's K/V of the chunk are already cached. The scoring
        query is the chunk's last position (the reference's single-token forward at that position)."""
        pos, ids, tok = self._req
        k_cache, v_cache = self.caches[layer]
        R, hkv, _, d = k_cache.shape
        C = ids.shape[1]
        gi = tok[:, None, :, None].expand(R, hkv, tok.shape[1], d)
        # [R, Hkv, C*bs, D] -> [R, C, bs, Hkv, D], the paged-cache block layout the scorers expect.
        keys = k_cache.gather(2, gi).permute(0, 2, 1, 3).reshape(R, C, self.bs, hkv, d)
        values = v_cache.gather(2, gi).permute(0, 2, 1, 3).reshape(R, C, self.bs, hkv, d)
        query = q[:, :, -1]
        if self.pairs:   # one decider per pair, over [conditional heads, unconditional heads]
            P = self.pairs
            keys, values = (torch.cat([t[:P], t[P:]], dim=3) for t in (keys, values))
            query, ids, R = torch.cat([query[:P], query[P:]], dim=1), ids[:P], P
        x = ScoreInputs(keys=keys, values=values, valid=torch.ones_like(ids, dtype=torch.bool), block_index=ids,
                        positions=torch.full((R,), pos, dtype=torch.int64, device=ids.device),
                        query=query if self.scorer.needs_query else None,
                        scale=self.model.cfg.head_dim ** -0.5)
        s = self.scorer.score(x).detach().to(torch.float32)
        p_pos, p_ids, acc = self._pending
        self._pending = (p_pos, p_ids, s if acc is None else acc + s)

    def forward(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """h [R, S, dim] at positions [start, start + S) -> float32 logits [R, S, V]."""
        S = h.shape[1]
        end = start + S - 1
        if any(start <= p < end for p in self.schedule):
            raise ValueError(f"chunk [{start}, {end}] crosses a scoring position; split it there")
        if self.layout is not None:
            self._select(start)
            self._request(end)
        pos = torch.arange(start, start + S, device=h.device)
        # Attend over the written slots [0, end] only: views of the static cache (the model writes through them),
        # so a step reads ~half the cache on average instead of all of it. Slots past `end` are masked out in the
        # reference, i.e. contribute exactly zero there, so this changes no result.
        n = end + 1
        slots = self.slots[:n]
        keep_tok = (~self.evicted)[:, slots // self.bs]                                     # [R, n]
        mask = keep_tok[:, None, None, :] & (slots[None, :] <= pos[:, None])[None, None]    # [R, 1, S, n]
        caches = [(k[:, :, :n], v[:, :, :n]) for k, v in self.caches]
        hook = self._score if self._req is not None else None
        return self.model.forward_hidden(h, pos, caches, mask, hook=hook)

    def evicted_sets(self) -> list[set[int]]:
        return [set(torch.nonzero(row).flatten().tolist()) for row in self.evicted.cpu()]


def _chunks(first: int, last: int, cuts, max_len: int):
    """Split positions [first, last] into chunks ending at every cut and no longer than max_len."""
    bounds, s = [], first
    for c in sorted(p for p in cuts if first <= p < last) + [last]:
        while c - s + 1 > max_len:
            bounds.append((s, s + max_len - 1))
            s += max_len
        bounds.append((s, c))
        s = c + 1
    return bounds


@torch.no_grad()
def fast_score(model: LlamaGenReference, class_ids, tokens: torch.Tensor, *, adsa: ADSAConfig | None = None,
               block_size: int = 16, max_chunk: int = 128, return_state: bool = False):
    """Batched twin of `score_tokens` (no CFG): logprobs [B, n, V] float32 of tokens [B, n] given their prefix."""
    dev = model.tok_embeddings.weight.device
    tokens = tokens.to(dev, torch.int64)
    B, n = tokens.shape
    T = model.cfg.cls_token_num
    cond = torch.as_tensor(class_ids, dtype=torch.int64, device=dev)
    dec = BatchedADSA(model, cond, T + n, adsa, block_size, n)
    h_all = torch.cat([model.embed_cond(cond), model.tok_embeddings(tokens[:, : n - 1])], dim=1)  # [B, T+n-1, dim]
    out = []
    for s, e in _chunks(0, T + n - 2, dec.schedule, max_chunk):
        logits = dec.forward(h_all[:, s:e + 1], s)
        keep_from = max(s, T - 1)                       # position p predicts image token p - (T - 1)
        if keep_from <= e:
            out.append(F.log_softmax(logits[:, keep_from - s:], dim=-1))
    lp = torch.cat(out, dim=1)
    return (lp, dec) if return_state else lp


@torch.no_grad()
def fast_generate(model: LlamaGenReference, class_ids, *, cfg_scale: float = 1.0, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0, seed: int | None = None, adsa: ADSAConfig | None = None,
                  block_size: int = 16, return_state: bool = False, cfg_selection: str = "shared"):
    """Batched twin of `generate` (same sampling and RNG use): tokens [B, grid**2]. Under CFG with ADSA a pair
    shares one selection by default, like the vLLM path (cfg_selection as in adsa_vllm/reference/generate.py)."""
    cfg = model.cfg
    dev = model.tok_embeddings.weight.device
    n, T, B = cfg.image_tokens, cfg.cls_token_num, len(class_ids)
    guided = cfg_scale > 1.0
    conds = torch.as_tensor(list(class_ids) + ([cfg.num_classes] * B if guided else []), dtype=torch.int64)
    pairs = B if guided and cfg_selection == "shared" else 0
    dec = BatchedADSA(model, conds, T + n, adsa, block_size, n, pairs=pairs)
    gen = None if seed is None else torch.Generator(device=dev).manual_seed(seed)
    toks = []
    h = model.embed_cond(dec.cond)
    logits = None
    for s, e in _chunks(0, T - 1, dec.schedule, T):   # prefill (one chunk unless a scoring position falls in it)
        logits = dec.forward(h[:, s:e + 1], s)[:, -1]
    for i in range(n):
        if i:
            fed = toks[-1].repeat(2) if guided else toks[-1]
            logits = dec.forward(model.tok_embeddings(fed)[:, None], T + i - 1)[:, -1]
        if guided:
            c, u = logits[:B], logits[B:]
            logits = u + cfg_scale * (c - u)
        probs = _gen_mod._filter(logits.float() / max(temperature, 1e-5), top_k, top_p).softmax(-1)
        toks.append(torch.multinomial(probs, 1, generator=gen)[:, 0])
    out = torch.stack(toks, dim=1)
    return (out, dec) if return_state else out


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------
def token_nll(model, class_ids, tokens, adsa, *, block_size=16, batch=1000, exact=False) -> torch.Tensor:
    """[N] mean NLL in bits per token of each image (teacher-forced, conditional on class_ids)."""
    per_image = []
    for i in range(0, len(tokens), batch):
        t = tokens[i:i + batch]
        c = [int(x) for x in class_ids[i:i + batch]]
        lp = (score_tokens(model, c, t, adsa=adsa, block_size=block_size) if exact
              else fast_score(model, c, t, adsa=adsa, block_size=block_size))
        nll = -lp.gather(-1, t.to(lp.device, torch.int64)[..., None])[..., 0]
        per_image.append(nll.mean(1).double().cpu() / LN2)
    return torch.cat(per_image)


def bits_per_token(model, class_ids, tokens, adsa=None, **kw) -> float:
    """Teacher-forced NLL / ln 2 averaged over all tokens of all images (every image has the same length)."""
    return float(token_nll(model, class_ids, tokens, adsa, **kw).mean())


def adsa_config(policy_label: str, budget) -> ADSAConfig:
    return ADSAConfig(budget=budget, **POLICIES[policy_label])


def check_layout(adsa: ADSAConfig, cfg, block_size: int) -> str | None:
    """None if the budget is usable, else the reason it is not (the ADSAConfigError message)."""
    try:
        adsa.layout(block_size=block_size, cls_token_num=cfg.cls_token_num, grid_size=cfg.grid_size)
    except ADSAConfigError as e:
        return str(e)
    return None


def sample_tokens(model, class_ids, adsa, a, exact: bool) -> torch.Tensor:
    outs = []
    for i in range(0, len(class_ids), a.gen_batch):
        c = class_ids[i:i + a.gen_batch]
        kw = dict(cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed + i, adsa=adsa, block_size=a.block_size, cfg_selection="shared")   # the vLLM path
        outs.append((generate(model, c, **kw).tokens if exact else fast_generate(model, c, **kw)).cpu())
    return torch.cat(outs)


def exact_check(model, class_ids, tokens, block_size, labels, budget) -> dict:
    """Fast path vs the reference trackers on a few images: max |delta logprob|, identical evicted sets."""
    out = {}
    c = [int(x) for x in class_ids]
    for label in labels:
        adsa = adsa_config(label, budget)
        ref = score_tokens(model, c, tokens, adsa=adsa, block_size=block_size, return_result=True)
        lp, dec = fast_score(model, c, tokens, adsa=adsa, block_size=block_size, return_state=True)
        same = [tr.evicted == ev for tr, ev in zip(ref.trackers or [], dec.evicted_sets())]
        out[label] = {"max_abs_logprob_diff": float((ref.logprobs - lp).abs().max()),
                      "evicted_sets_identical": f"{sum(same)}/{len(same)}"}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ---------------------------------------------------------------------------------------------------------------
COLORS = {"full": (0, 0, 0), "topk_v_diverse": (214, 39, 40), "topk_v_similar": (255, 127, 14),
          "streaming": (31, 119, 180), "random": (127, 127, 127), "attention_mass": (44, 160, 44)}


def plot_bits(results: dict, full_bits: float, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw
    W, H, ml, mr, mt, mb = 760, 480, 80, 200, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = {lab: [(b, v["bits_per_token"]) for b, v in sorted(per.items()) if "bits_per_token" in v]
           for lab, per in results.items()}
    ys = [y for p in pts.values() for _, y in p] + [full_bits]
    lo, hi = min(ys), max(ys)
    pad = max((hi - lo) * 0.08, 1e-3)
    lo, hi = lo - pad, hi + pad
    x0, x1, y0, y1 = ml, W - mr, H - mb, mt

    def X(b):
        return x0 + (b - 0.0) / 1.0 * (x1 - x0)

    def Y(v):
        return y0 - (v - lo) / (hi - lo) * (y0 - y1)

    d.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    for b in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([X(b), y0, X(b), y0 + 5], fill=(0, 0, 0))
        d.text((X(b) - 12, y0 + 8), f"{b:.2f}", fill=(0, 0, 0))
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        d.line([x0 - 5, Y(v), x0, Y(v)], fill=(0, 0, 0))
        d.line([x0, Y(v), x1, Y(v)], fill=(235, 235, 235))
        d.text((8, Y(v) - 6), f"{v:.4f}", fill=(0, 0, 0))
    d.text((x0 + 120, H - 22), "KV budget (fraction of the 784 image tokens)", fill=(0, 0, 0))
    d.text((x0, 12), title, fill=(0, 0, 0))
    yf = Y(full_bits)
    for xs in range(int(x0), int(x1), 12):  # dashed: full attention
        d.line([xs, yf, min(xs + 6, x1), yf], fill=COLORS["full"], width=2)
    for lab, p in pts.items():
        col = COLORS.get(lab, (148, 103, 189))
        xy = [(X(b), Y(v)) for b, v in p]
        if len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    ly = mt
    for lab in ["full"] + list(pts):
        d.line([x1 + 15, ly + 6, x1 + 40, ly + 6], fill=COLORS.get(lab, (148, 103, 189)), width=3)
        d.text((x1 + 46, ly), "full attention" if lab == "full" else lab, fill=(0, 0, 0))
        ly += 20
    d.text((x1 + 15, ly + 10), "y: test bits/token", fill=(0, 0, 0))
    img.save(path)


def sample_grid(rows: dict[str, np.ndarray], class_ids: np.ndarray, path: Path, per_class: int = 2,
                scale: int = 3) -> None:
    """rows: label -> uint8 [N, 28, 28] samples; columns: classes (per_class samples each, same seeds per row)."""
    from PIL import Image, ImageDraw
    g, pad, left, top = fm.GRID_SIZE * scale, 2, 120, 18
    cols = [(c, j) for c in range(fm.NUM_CLASSES) for j in range(per_class)]
    W = left + len(cols) * (g + pad)
    H = top + len(rows) * (g + pad)
    img = Image.new("L", (W, H), 255)
    d = ImageDraw.Draw(img)
    for ci, c in enumerate(range(fm.NUM_CLASSES)):
        d.text((left + ci * per_class * (g + pad) + 2, 3), fm.CLASS_NAMES[c][:12], fill=0)
    for ri, (lab, imgs) in enumerate(rows.items()):
        d.text((4, top + ri * (g + pad) + g // 2 - 6), lab, fill=0)
        for k, (c, j) in enumerate(cols):
            idx = np.nonzero(class_ids == c)[0]
            if j < len(idx):
                tile = Image.fromarray(imgs[idx[j]]).resize((g, g), Image.NEAREST)
                img.paste(tile, (left + k * (g + pad), top + ri * (g + pad)))
    img.save(path)


# ---------------------------------------------------------------------------------------------------------------
def markdown(rep: dict) -> str:
    a = rep["args"]
    bits = rep.get("bits")
    lines = [f"# ADSA quality on Fashion-MNIST LlamaGen ({rep['model']['folder']})", "",
             f"Device {rep['device']}, dtype {a['dtype']}, block size {a['block_size']}"
             + (f"; model test bits/token (full attention) {bits['full']['bits_per_token']:.4f} on "
                f"{bits['images']} test images (log2 K = {math.log2(rep['model']['codebook_size']):.0f})."
                if bits else "."), ""]
    if bits:
        budgets = sorted({float(b) for per in bits["policies"].values() for b in per})
        lines += ["## Teacher-forced bits/token (delta vs full attention, paired standard error)", "",
                  "| policy | " + " | ".join(f"budget {b:.2f}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for lab, per in bits["policies"].items():
            cells = []
            for b in budgets:
                v = per.get(str(b))
                cells.append("not run" if v is None else "skipped" if "skipped" in v else
                             f"{v['bits_per_token']:.4f} ({v['delta_vs_full']:+.4f} ± {v['delta_se']:.4f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        skipped = {b: v["skipped"] for per in bits["policies"].values() for b, v in per.items() if "skipped" in v}
        for b, why in skipped.items():
            lines += ["", f"Budget {b} skipped: {why}"]
    if rep.get("samples"):
        s = rep["samples"]
        lines += ["", f"## Samples ({s['per_policy']} per policy, CFG {a['cfg_scale']}, top-k {a['top_k']}, "
                      f"temperature {a['temperature']}, budget {a['sample_budget']}, {a['gen_dtype']})", "",
                  "| rows | FID (classifier features) | class accuracy |", "|---|---|---|"]
        for lab, v in s["results"].items():
            lines.append(f"| {lab} | skipped | |" if "skipped" in v else
                         f"| {lab} | {v['fid']:.3f} | {v['class_accuracy']:.3f} |")
        lines.append(f"| real train images (floor) | {s['real_floor']['fid']:.3f} | "
                     f"{s['real_floor']['class_accuracy']:.3f} |")
    if rep.get("exact_check"):
        lines += ["", "## Batched path vs reference trackers", "", "```",
                  json.dumps(rep["exact_check"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(rep: dict, samples: dict, class_ids, out_dir: Path, tag: str) -> None:
    """<tag>.json and .md always; the bits plot once a policy is measured; the sample grid and the samples
    themselves (<tag>_samples.npz, for --merge) once a row is sampled. Called after every measured unit, so a run
    stopped at its time limit leaves everything it finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out_dir / f"{tag}.md").write_text(markdown(rep))
    bits = rep.get("bits")
    if bits and any("bits_per_token" in v for per in bits["policies"].values() for v in per.values()):
        plot_bits({lab: {float(b): v for b, v in per.items()} for lab, per in bits["policies"].items()},
                  bits["full"]["bits_per_token"], out_dir / f"{tag}_bits.png",
                  f"Fashion-MNIST LlamaGen, {bits['images']} test images: bits/token vs ADSA budget")
    if samples:
        sample_grid(samples, class_ids, out_dir / f"{tag}_samples.png")
        np.savez_compressed(out_dir / f"{tag}_samples.npz", class_ids=class_ids, **samples)


def _shape(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "folder"}   # the same model may sit at another path


def merge(paths: list[str], out_dir: Path, tag: str) -> dict:
    """Combine the reports of runs that measured different parts / policies / sample rows of the same model and
    settings (e.g. two calls of a time-limited GPU machine) into one <tag>.{json,md,png}. Later files win on
    overlap; the per-run args, devices and timings are kept under `runs`."""
    reps = [json.loads(Path(p).read_text()) for p in paths]
    first = reps[0]
    out = {"model": first["model"], "device": "; ".join(dict.fromkeys(r["device"] for r in reps)),
           "args": dict(first["args"]), "timings_s": {}, "runs": []}
    samples, class_ids = {}, None
    for p, r in zip(paths, reps):
        if _shape(r["model"]) != _shape(first["model"]):
            raise SystemExit(f"{p}: another model than {paths[0]}")
        out["runs"].append({"file": Path(p).name, "device": r["device"], "args": r["args"],
                            "timings_s": r["timings_s"]})
        if r.get("bits"):
            b = out.setdefault("bits", {"images": r["bits"]["images"], "full": r["bits"]["full"], "policies": {}})
            if b["images"] != r["bits"]["images"]:
                raise SystemExit(f"{p}: bits/token on {r['bits']['images']} images, not {b['images']}")
            for lab, per in r["bits"]["policies"].items():
                b["policies"].setdefault(lab, {}).update(per)
        if r.get("samples"):
            s = out.setdefault("samples", {k: v for k, v in r["samples"].items() if k != "results"})
            s.setdefault("results", {}).update(r["samples"]["results"])
            npz = Path(p).with_name(Path(p).stem + "_samples.npz")
            if npz.is_file():
                with np.load(npz) as z:
                    class_ids = z["class_ids"]
                    samples.update({k: z[k] for k in z.files if k != "class_ids"})
        if r.get("exact_check"):
            out["exact_check"] = r["exact_check"]
    if "bits" in out:
        out["args"]["budgets"] = sorted({float(b) for per in out["bits"]["policies"].values() for b in per})
        out["args"]["policies"] = list(out["bits"]["policies"])
    write_outputs(out, samples, class_ids, out_dir, tag)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None,
                    help="model folder (config.json + model.safetensors; default: the shipped Fashion-MNIST model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype of bits/token; float32 so that bf16 rounding neither decides near-ties "
                    "between blocks nor blurs deltas of a few thousandths of a bit")
    ap.add_argument("--gen-dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype of sampling (default bfloat16 on CUDA, as vLLM serves it: half the cache "
                    "traffic; float32 on CPU)")
    ap.add_argument("--parts", nargs="+", choices=("bits", "samples"), default=["bits", "samples"],
                    help="what to measure (split a long run in two, then --merge the JSONs)")
    ap.add_argument("--limit", type=int, default=10000, help="test images for bits/token")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES),
                    help="none: full attention only (e.g. to choose --cfg-scale)")
    ap.add_argument("--sample-rows", nargs="+", default=None, choices=["full"] + list(POLICIES),
                    help="rows of samples (default: full attention, then every --policies)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="rows per scoring batch (default 2000 CUDA, 64 CPU)")
    ap.add_argument("--samples-per-policy", type=int, default=1000)
    ap.add_argument("--sample-budget", type=float, default=0.5)
    ap.add_argument("--gen-batch", type=int, default=None, help="samples per generation batch (default 1000 CUDA, "
                    "64 CPU; CFG doubles the rows)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=8, help="of the 16 grey levels")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-exact", type=int, default=4, help="test images compared against the reference "
                    "trackers (score_tokens) at the sample budget, after the other parts; 0 = skip")
    ap.add_argument("--exact", action="store_true", help="use the reference score_tokens/generate (slow)")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint (default adsa_vllm/assets/...)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--tag", default="fashion_quality")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge these reports into <out-dir>/<tag>.* and exit")
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    if a.merge:
        rep = merge(a.merge, out_dir, a.tag)
        print(markdown(rep))
        print(f"merged {len(a.merge)} reports into {out_dir}/{a.tag}.*")
        return
    if a.model is None:
        from adsa_vllm.default_model import default_model_dir
        a.model = str(default_model_dir())
    cuda = a.device.startswith("cuda")
    a.batch = a.batch or (2000 if cuda else 64)
    a.gen_batch = a.gen_batch or (1000 if cuda else 64)
    a.gen_dtype = a.gen_dtype or ("bfloat16" if cuda else "float32")
    a.sample_rows = a.sample_rows or ["full"] + list(a.policies)
    if cuda:  # full float32 matmuls: TF32 would add ~1e-3 relative noise to every score
        torch.backends.cuda.matmul.allow_tf32 = False
    import classifier as clf

    t_start = time.time()
    model = load_reference(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    cfg = model.cfg
    if (cfg.grid_size, cfg.codebook_size) != (fm.GRID_SIZE, fm.NUM_LEVELS):
        sys.exit(f"{a.model}: grid {cfg.grid_size} / codebook {cfg.codebook_size} is not a Fashion-MNIST model "
                 f"(grid {fm.GRID_SIZE}, K {fm.NUM_LEVELS})")
    xte, yte = fm.load("test")
    tokens = torch.as_tensor(fm.tokenize(xte[:a.limit]))
    labels = yte[:a.limit].astype(np.int64)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    rep = {"model": {"folder": str(a.model), **cfg.to_hf_dict()["llamagen"]}, "device": dev_name,
           "args": vars(a), "timings_s": {}}
    samples, class_ids = {}, np.arange(a.samples_per_policy) % fm.NUM_CLASSES

    def save():
        rep["timings_s"]["total"] = time.time() - t_start
        write_outputs(rep, samples, class_ids, out_dir, a.tag)

    # (a) bits/token
    if "bits" in a.parts:
        kw = dict(block_size=a.block_size, batch=a.batch, exact=a.exact)
        t0 = time.time()
        full = token_nll(model, labels, tokens, None, **kw)
        bits = rep["bits"] = {"images": len(tokens), "full": {"bits_per_token": float(full.mean()),
                                                              "seconds": time.time() - t0}, "policies": {}}
        print(f"full attention: {full.mean():.4f} bits/token ({time.time() - t0:.1f} s)", flush=True)
        for lab in a.policies:
            bits["policies"][lab] = {}
            for b in a.budgets:
                adsa = adsa_config(lab, b)
                why = check_layout(adsa, cfg, a.block_size)
                if why is not None:
                    bits["policies"][lab][str(b)] = {"skipped": why}
                    continue
                t1 = time.time()
                per = token_nll(model, labels, tokens, adsa, **kw)
                delta = per - full
                lay = adsa.layout(block_size=a.block_size, cls_token_num=cfg.cls_token_num, grid_size=cfg.grid_size)
                bits["policies"][lab][str(b)] = {
                    "bits_per_token": float(per.mean()), "delta_vs_full": float(delta.mean()),
                    "delta_se": float(delta.std() / math.sqrt(len(delta))) if len(delta) > 1 else 0.0,
                    "kept_blocks": lay.budget_blocks, "topk_blocks": lay.topk_blocks, "seconds": time.time() - t1}
                print(f"{lab} @ {b}: {per.mean():.4f} bits/token ({delta.mean():+.4f}) ({time.time() - t1:.1f} s)",
                      flush=True)
                rep["timings_s"]["bits"] = time.time() - t0
                save()
        rep["timings_s"]["bits"] = time.time() - t0
        save()

    # (b) samples
    if "samples" in a.parts and a.samples_per_policy > 0:
        t0 = time.time()
        net = clf.load(a.classifier or clf.DEFAULT_PATH, device=a.device)
        real_q = clf.quantize(xte)             # the generator's domain: K-level grey images
        ref_feat = clf.features(real_q, net)
        xtr, ytr = fm.load("train")
        pick = np.random.default_rng(a.seed).choice(len(xtr), a.samples_per_policy, replace=False)
        real_tr = clf.quantize(xtr[pick])
        floor = {"fid": clf.fid(clf.features(real_tr, net), ref_feat),
                 "class_accuracy": float((clf.predict(real_tr, net) == ytr[pick]).mean())}
        results = {}
        rep["samples"] = {"per_policy": a.samples_per_policy, "reference": f"{len(xte)} test images (K-level)",
                          "real_floor": floor, "results": results}
        gen_model = model if a.gen_dtype == a.dtype else load_reference(a.model, dtype=getattr(torch, a.gen_dtype),
                                                                         device=a.device)
        for lab in a.sample_rows:
            adsa = None if lab == "full" else adsa_config(lab, a.sample_budget)
            if adsa is not None and (why := check_layout(adsa, cfg, a.block_size)):
                results[lab] = {"skipped": why}
                continue
            t1 = time.time()
            toks = sample_tokens(gen_model, [int(c) for c in class_ids], adsa, a, a.exact)
            imgs = fm.detokenize(toks)
            samples[lab] = imgs
            results[lab] = {"fid": clf.fid(clf.features(imgs, net), ref_feat),
                            "class_accuracy": float((clf.predict(imgs, net) == class_ids).mean()),
                            "seconds": time.time() - t1}
            print(f"samples {lab}: FID {results[lab]['fid']:.3f}, class acc {results[lab]['class_accuracy']:.3f} "
                  f"({time.time() - t1:.1f} s)", flush=True)
            rep["timings_s"]["samples"] = time.time() - t0
            save()

    # cross-check of the batched path against the per-row reference trackers (last: the slowest per image)
    if a.check_exact and not a.exact:
        t0 = time.time()
        n = min(a.check_exact, len(tokens))
        rep["exact_check"] = {"images": n, "budget": a.sample_budget,
                              **exact_check(model, labels[:n], tokens[:n], a.block_size, a.policies,
                                            a.sample_budget)}
        rep["timings_s"]["exact_check"] = time.time() - t0
        print("exact check:", json.dumps(rep["exact_check"]), flush=True)

    save()
    print((out_dir / f"{a.tag}.md").read_text())
    print(f"wrote {out_dir}/{a.tag}.{{json,md}} (+ png/npz of what ran) in {rep['timings_s']['total']:.0f} s")


if __name__ == "__main__":
    main()
