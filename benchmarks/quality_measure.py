"""The measurements of benchmarks/quality.py: teacher-forced bits/token, CFG samples, and the batched path checked
against the reference trackers. The batched selection lives in the library (adsa_vllm/reference/batched.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from adsa_vllm.config import ADSAConfig, ADSAConfigError
from adsa_vllm.reference import generate, score_tokens, score_tokens_batched

LN2 = math.log(2.0)
# head_split's head classes for the shipped model, measured by benchmarks/head_calibration.py
HEAD_CLASSES = Path(__file__).resolve().parent.parent / "adsa_vllm" / "assets" / "head_classes.json"
# (label, ADSAConfig fields) of every policy measured; labels are the JSON / table / plot keys.
POLICIES = {"topk_v_diverse": dict(policy="topk_v", keep="diverse"),
            "topk_v_similar": dict(policy="topk_v", keep="similar"),
            "streaming": dict(policy="streaming"),
            "random": dict(policy="random"),
            "attention_mass": dict(policy="attention_mass"),
            "row_anchored": dict(policy="row_anchored"),
            "head_split": dict(policy="head_split", heads=json.loads(HEAD_CLASSES.read_text())["heads"])}
BUDGETS = (0.10, 0.25, 0.50, 0.75)
# A policy label with a budget split other than the default (`split_label`): '<key>@P<p>L<l>', either part optional.
SPLIT_LABEL = re.compile(r"(?P<policy>[a-z_]+)(?:@(?:P(?P<prefix>\d+))?(?:L(?P<local>\d+))?)?")


def adsa_config(policy_label: str, budget, granularity: str = "block", model=None) -> ADSAConfig:
    """policy_label: a POLICIES key, or `split_label`'s '<key>@P<p>L<l>' (either part optional): a prefix of the
    condition + p image rows and a local window of l image rows + 1 token (the defaults are p = l = 1); model: the
    LlamaGen config whose rows those are."""
    m = SPLIT_LABEL.fullmatch(policy_label)
    split = {}
    if m["prefix"] is not None:
        split["prefix"] = model.cls_token_num + int(m["prefix"]) * model.grid_size
    if m["local"] is not None:
        split["local"] = int(m["local"]) * model.grid_size + 1
    return ADSAConfig(budget=budget, granularity=granularity, **POLICIES[m["policy"]], **split)


def split_label(policy_label: str, prefix_rows: int | None = None, local_rows: int | None = None) -> str:
    """The policy label with a prefix of the condition + `prefix_rows` image rows and a local window of
    `local_rows` rows + 1 token; None: that part's default."""
    split = "".join(f"{k}{v}" for k, v in (("P", prefix_rows), ("L", local_rows)) if v is not None)
    return f"{policy_label}@{split}" if split else policy_label


def default_split_row(label: str) -> tuple[str, bool]:
    """(the row label without its split, whether its split is the default one: each part absent or 1 row)."""
    policy, granularity = parse_row_label(label)
    m = SPLIT_LABEL.fullmatch(policy)
    return row_label(m["policy"], granularity), m["prefix"] in (None, "1") and m["local"] in (None, "1")


def row_label(policy_label: str, granularity: str) -> str:
    """The JSON / table key of a measured row: the policy label, + "/token" for token granularity."""
    return policy_label if granularity == "block" else f"{policy_label}/{granularity}"


def parse_row_label(label: str) -> tuple[str, str]:
    """`row_label`'s inverse: (policy label, granularity)."""
    policy, _, granularity = label.partition("/")
    return policy, granularity or "block"


def check_layout(adsa: ADSAConfig, config, block_size: int) -> str | None:
    """None if the budget is usable, else the reason it is not (the ADSAConfigError message)."""
    try:
        adsa.layout(block_size=block_size, cls_token_num=config.cls_token_num, grid_size=config.grid_size)
    except ADSAConfigError as e:
        return str(e)
    return None


def token_nll(model, class_ids, tokens, adsa, *, block_size=16, batch=1000, exact=False) -> torch.Tensor:
    """[N] mean NLL in bits per token of each image (teacher-forced, conditional on class_ids)."""
    per_image = []
    for i in range(0, len(tokens), batch):
        t = tokens[i:i + batch]
        c = [int(x) for x in class_ids[i:i + batch]]
        lp = (score_tokens(model, c, t, adsa=adsa, block_size=block_size) if exact
              else score_tokens_batched(model, c, t, adsa=adsa, block_size=block_size))
        nll = -lp.gather(-1, t.to(lp.device, torch.int64)[..., None])[..., 0]
        per_image.append(nll.mean(1).double().cpu() / LN2)
    return torch.cat(per_image)


def sample_tokens(model, class_ids, adsa, a, exact: bool) -> torch.Tensor:
    """[N, grid**2] CFG samples, a.gen_batch at a time (batch i seeded a.seed + i); a pair shares one selection,
    as in the vLLM path (in token mode: per head, by the pair's summed scores; benchmarks/cfg_selection.py
    measures the alternative)."""
    outs = []
    for i in range(0, len(class_ids), a.gen_batch):
        c = class_ids[i:i + a.gen_batch]
        kw = dict(cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  seed=a.seed + i, adsa=adsa, block_size=a.block_size, cfg_selection="shared")
        outs.append(generate(model, c, batched=not exact, **kw).tokens.cpu())
    return torch.cat(outs)


def exact_check(model, class_ids, tokens, block_size, labels, budget) -> dict:
    """Batched path vs the reference trackers on a few images: max |delta logprob|, identical evicted sets."""
    out = {}
    c = [int(x) for x in class_ids]
    for label in labels:
        adsa = adsa_config(label, budget, model=model.config)
        ref = score_tokens(model, c, tokens, adsa=adsa, block_size=block_size, return_result=True)
        lp, dec = score_tokens_batched(model, c, tokens, adsa=adsa, block_size=block_size, return_state=True)
        same = [tr.evicted == ev for tr, ev in zip(ref.trackers or [], dec.evicted_sets())]
        out[label] = {"max_abs_logprob_diff": float((ref.logprobs - lp).abs().max()),
                      "evicted_sets_identical": f"{sum(same)}/{len(same)}"}
    return out
