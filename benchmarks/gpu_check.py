"""End-to-end ADSA check on a GPU (FLASH_ATTN inner kernel, torch.compile + CUDA graphs on).

A small random LlamaGen in bf16: (1) ADSA with a budget covering the sequence must equal full attention token for
token; (2) ADSA at 50% must free blocks, keep every sequence within budget + slack, and follow the plain-PyTorch
reference ADSA (fp32 on the same GPU) — bf16 vs fp32 greedy decoding may part ways after a while, so the
agreement is reported, not asserted; (3) the pool's free-block count returns to its start value.
(4) classifier-free guidance (pairs as one sequence with 2H heads): CFG with ADSA budget None equals CFG with full
attention token for token, CFG + ADSA 50% frees blocks within the bound, and the logprobs vLLM returns match the
fp32 reference's guided distribution teacher-forced on vLLM's own tokens (bf16 tolerance, reported).
(5) FP8 KV cache: ADSA with a budget covering the sequence equals stock vLLM with the same fp8 cache token for token;
ADSA 50% on it frees blocks.
(6) token granularity (issue 12), float32 on TRITON_ATTN (the FLASH_ATTN cache layout, in a dtype where attending to
the same tokens in another order changes no greedy token; in bf16 it does): streaming keeps the same tokens at both
granularities, but at token granularity every selection moves slot entries on the device, so its images must equal
block granularity's token for token (a write in the wrong place changes them). TopK-V and random at token
granularity free blocks within the bound; their agreement with the fp32 reference is reported.
(7) query-dependent policies in CUDA graphs (adsa_vllm/worker/saved_queries.py), float32 on TRITON_ATTN: an engine
whose default is attention_mass must keep vLLM's FULL_AND_PIECEWISE mode, and every query policy at both
granularities (per request) must give, token for token, the images of the same engine in PIECEWISE mode, where
attention and the query copy run eagerly between the same compiled pieces (a copy missing from the full graphs
would score stale queries); both free blocks within the bound; agreement with the fp32 reference is reported.
Prints one JSON line; exits non-zero if (1), (3), (4), (5), (6), (7)'s equality or a bound fails. `--checks basic
cfg fp8 token query` runs a subset ((1)-(3), (4), (5), (6), (7)), e.g. one per GPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from adsa_vllm.config import ADSAConfig  # noqa: E402
from adsa_vllm.llamagen.convert import load_reference  # noqa: E402
from adsa_vllm.default_model import make_random_model_dir  # noqa: E402
from adsa_vllm.llamagen.config import LlamaGenConfig  # noqa: E402
from adsa_vllm.reference.generate import generate, score_tokens  # noqa: E402

CFG_SCALE = 3.0


def run(model_dir, config, classes, adsa: dict | None, guided: bool = False, kv_cache_dtype: str = "auto",
        overrides: list | None = None, dtype: str = "bfloat16", engine_kw: dict | None = None):
    """One engine in a fresh process (vLLM does not give all GPU memory back, and a later engine's memory
    profiling in the same process trips over the earlier one's memory being returned). `overrides`: each
    request's extra_args["adsa"] (one per class); `engine_kw`: more arguments of vllm.LLM."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        toks, stats, restored, lps = pool.submit(_run_engine, model_dir, config, classes, adsa, guided,
                                                 kv_cache_dtype, overrides, dtype, engine_kw).result()
    return torch.tensor(toks), stats, restored, torch.tensor(lps)


def _run_engine(model_dir, config, classes, adsa, guided, kv_cache_dtype, overrides=None, dtype="bfloat16",
                engine_kw=None):
    extra = {"cfg": {"scale": CFG_SCALE}} if guided else {}
    kw = dict(attention_backend="adsa", additional_config={"adsa": adsa, **extra}) if adsa is not None else \
        dict(additional_config=extra)
    llm = LLM(model=str(model_dir), dtype=dtype, block_size=16, gpu_memory_utilization=0.3, seed=0,
              kv_cache_dtype=kv_cache_dtype, **kw, **(engine_kw or {}))
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    free0 = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    params = [SamplingParams(temperature=0.0, max_tokens=config.image_tokens, detokenize=False, logprobs=0,
                             extra_args=None if overrides is None else {"adsa": ov}) for ov in overrides or [None]]
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c in classes],
                        params if overrides is not None else params[0], use_tqdm=False)
    toks = [list(o.outputs[0].token_ids) for o in outs]
    lps = [[s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    stats = sched.adsa_stats() if hasattr(sched, "adsa_stats") else {}
    stats["cudagraph_mode"] = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode.name
    free1 = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    return toks, stats, free0 == free1, lps


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS),
                    help="a subset, e.g. to spread the checks over two GPUs (one engine start is about a minute)")
    args = ap.parse_args()
    config = LlamaGenConfig(dim=256, n_layer=4, n_head=4, codebook_size=1024, num_classes=10, grid_size=16)
    d = make_random_model_dir(tempfile.mkdtemp(), config, seed=0, std=0.1)
    classes = list(range(8))
    out = {"device": torch.cuda.get_device_name(0), "checks": args.checks}
    ref_model = load_reference(d, device="cuda") if {"basic", "cfg", "token", "query"} & set(args.checks) else None
    for name in args.checks:
        out.update(CHECKS[name](d, config, classes, ref_model))
    print("GPUCHECK " + json.dumps(out), flush=True)
    failed = [k for k, ok in _verdicts(out).items() if not ok]
    if failed:
        print("GPUCHECK failed: " + ", ".join(failed), flush=True)
    sys.exit(1 if failed else 0)


def _verdicts(out: dict) -> dict:
    """Each asserted property of the checks that ran (the fp32-agreement figures are reported, not asserted)."""
    v = {}
    if "budget_none_equals_full" in out:
        v.update(budget_none_equals_full=out["budget_none_equals_full"], pool_restored=out["pool_restored"],
                 adsa50_within_bound=out["adsa50_peak_held"] <= out["adsa50_bound"],
                 adsa50_freed=out["adsa50_freed_blocks"] > 0)
    if "cfg_budget_none_equals_cfg_full" in out:
        v.update(cfg_budget_none_equals_cfg_full=out["cfg_budget_none_equals_cfg_full"],
                 cfg_pool_restored=out["cfg_pool_restored"],
                 cfg_adsa50_within_bound=out["cfg_adsa50_peak_held"] <= out["cfg_adsa50_bound"],
                 cfg_adsa50_freed=out["cfg_adsa50_freed_blocks"] > 0)
    if "token_streaming_equals_block_streaming" in out:
        v.update(token_streaming_equals_block_streaming=out["token_streaming_equals_block_streaming"],
                 token_pool_restored=out["token_pool_restored"],
                 token_within_bound=out["token_peak_held"] <= out["token_bound"],
                 token_freed=out["token_freed_blocks"] > 0)
    if "fp8_budget_none_equals_fp8_full" in out:
        v.update(fp8_budget_none_equals_fp8_full=out["fp8_budget_none_equals_fp8_full"],
                 fp8_pool_restored=out["fp8_pool_restored"], fp8_adsa50_freed=out["fp8_adsa50_freed_blocks"] > 0)
    if "query_graphs_equal_piecewise" in out:
        v.update(query_graphs_equal_piecewise=out["query_graphs_equal_piecewise"],
                 query_full_graphs_kept=out["query_cudagraph_mode"] == "FULL_AND_PIECEWISE",
                 query_pool_restored=out["query_pool_restored"],
                 query_within_bound=out["query_peak_held"] <= out["query_bound"],
                 query_freed=out["query_freed_blocks"] > 0)
    return v


def check_basic(d, config, classes, ref_model) -> dict:
    full, _, ok_full, _ = run(d, config, classes, None)
    same, st_same, ok_same, _ = run(d, config, classes, {"budget": None})
    half, st_half, ok_half, _ = run(d, config, classes, {"budget": 0.5, "policy": "topk_v"})
    ref = generate(ref_model, classes, greedy=True, adsa=ADSAConfig(budget=0.5)).tokens.cpu()
    agree = (half == ref).float().cumprod(1).sum(1)  # matching prefix length per image
    peaks = [r["peak_held_blocks"] for r in st_half["requests"].values()]
    bound = max(r["budget_blocks"] + r["slack_blocks"] for r in st_half["requests"].values())
    return {"budget_none_equals_full": bool(torch.equal(full, same)),
            "adsa50_differs_from_full": bool(not torch.equal(full, half)),
            "adsa50_freed_blocks": st_half["total_freed_blocks"], "adsa50_peak_held": max(peaks),
            "adsa50_bound": bound, "pool_restored": ok_full and ok_same and ok_half,
            "adsa50_vs_reference_fp32_matching_prefix": agree.tolist()}


def check_fp8(d, config, classes, ref_model=None) -> dict:
    """FP8 KV cache: ADSA with a budget covering the sequence equals stock vLLM with the same fp8 cache, token for
    token; at 50% it runs, frees blocks, and TopK-V scores read the cache in its own dtype (worker/summaries.py)."""
    full, _, ok_full, _ = run(d, config, classes, None, kv_cache_dtype="fp8")
    same, _, ok_same, _ = run(d, config, classes, {"budget": None}, kv_cache_dtype="fp8")
    half, st, ok_half, _ = run(d, config, classes, {"budget": 0.5, "policy": "topk_v"}, kv_cache_dtype="fp8")
    return {"fp8_budget_none_equals_fp8_full": bool(torch.equal(full, same)),
            "fp8_pool_restored": ok_full and ok_same and ok_half, "fp8_adsa50_freed_blocks": st["total_freed_blocks"],
            "fp8_adsa50_peak_held": max(r["peak_held_blocks"] for r in st["requests"].values())}


def check_guidance(d, config, classes, ref_model) -> dict:
    full, _, ok_full, lp_full = run(d, config, classes, None, guided=True)
    same, _, ok_same, _ = run(d, config, classes, {"budget": None}, guided=True)
    half, st, ok_half, lp_half = run(d, config, classes, {"budget": 0.5, "policy": "topk_v"}, guided=True)
    out = {"cfg_budget_none_equals_cfg_full": bool(torch.equal(full, same)),
           "cfg_pool_restored": ok_full and ok_same and ok_half,
           "cfg_adsa50_freed_blocks": st["total_freed_blocks"],
           "cfg_adsa50_peak_held": max(r["peak_held_blocks"] for r in st["requests"].values()),
           "cfg_adsa50_bound": max(r["budget_blocks"] + r["slack_blocks"] for r in st["requests"].values())}
    # Teacher-forced on vLLM's own tokens, the fp32 reference's guided log-probabilities of those tokens.
    for name, toks, lps, adsa in (("full", full, lp_full, None), ("adsa50", half, lp_half, ADSAConfig(budget=0.5))):
        ref = score_tokens(ref_model, classes, toks.cuda(), cfg_scale=CFG_SCALE, adsa=adsa, cfg_selection="shared")
        want = ref.gather(-1, toks.cuda()[..., None])[..., 0].cpu()
        out[f"cfg_{name}_max_abs_logprob_diff_vs_fp32_reference"] = float((lps - want).abs().max())
        out[f"cfg_{name}_mean_abs_logprob_diff_vs_fp32_reference"] = float((lps - want).abs().mean())
    return out


def check_token(d, config, classes, ref_model) -> dict:
    """Token granularity on the GPU path (one engine, every case a per-request override): streaming at token vs
    block granularity (equal by construction), TopK-V and random at token granularity."""
    cases = {"block_streaming": {"policy": "streaming"},
             "token_streaming": {"policy": "streaming", "granularity": "token"},
             "token_topk_v": {"policy": "topk_v", "granularity": "token"},
             "token_random": {"policy": "random", "seed": 3, "granularity": "token"}}
    reqs = [(name, c) for name in cases for c in classes]
    toks, st, ok, _ = run(d, config, [c for _, c in reqs], {"budget": 0.5, "inner_backend": "TRITON_ATTN"},
                          overrides=[cases[n] for n, _ in reqs], dtype="float32")
    got = {name: toks[i * len(classes):(i + 1) * len(classes)] for i, name in enumerate(cases)}
    reqs_st = list(st["requests"].values())
    out = {"token_streaming_equals_block_streaming": bool(torch.equal(got["token_streaming"],
                                                                       got["block_streaming"])),
           "token_pool_restored": ok, "token_freed_blocks": st["total_freed_blocks"],
           "token_peak_held": max(r["peak_held_blocks"] for r in reqs_st),
           "token_bound": max(r["budget_blocks"] + r["slack_blocks"] for r in reqs_st),
           "token_topk_v_differs_from_block_streaming": bool(not torch.equal(got["token_topk_v"],
                                                                             got["block_streaming"]))}
    for name in ("token_topk_v", "token_random"):
        adsa = ADSAConfig(budget=0.5, granularity="token", **{k: v for k, v in cases[name].items()
                                                              if k != "granularity"})
        ref = generate(ref_model, classes, greedy=True, adsa=adsa).tokens.cpu()
        out[f"{name}_vs_reference_fp32_matching_prefix"] = (got[name] == ref).float().cumprod(1).sum(1).tolist()
    return out


def check_query(d, config, classes, ref_model) -> dict:
    """Query-dependent policies with attention in CUDA graphs: FULL_AND_PIECEWISE vs PIECEWISE, same engine
    settings, every query policy at both granularities as per-request overrides on an attention_mass default."""
    cases = {f"{policy}_{g}": {"policy": policy, "granularity": g}
             for policy in ("attention_mass", "head_split", "row_anchored") for g in ("block", "token")}
    reqs = [(name, c) for name in cases for c in classes]
    adsa = {"budget": 0.5, "policy": "attention_mass", "inner_backend": "TRITON_ATTN"}
    runs = {}
    for mode in ("FULL_AND_PIECEWISE", "PIECEWISE"):
        runs[mode] = run(d, config, [c for _, c in reqs], adsa, overrides=[cases[n] for n, _ in reqs],
                         dtype="float32", engine_kw={"compilation_config": {"cudagraph_mode": mode}})
    (full, st, ok_full, _), (piece, st_p, ok_piece, _) = runs["FULL_AND_PIECEWISE"], runs["PIECEWISE"]
    reqs_st = list(st["requests"].values())
    out = {"query_graphs_equal_piecewise": bool(torch.equal(full, piece)),
           "query_cudagraph_mode": st["cudagraph_mode"], "query_piecewise_mode": st_p["cudagraph_mode"],
           "query_pool_restored": ok_full and ok_piece, "query_freed_blocks": st["total_freed_blocks"],
           "query_peak_held": max(r["peak_held_blocks"] for r in reqs_st),
           "query_bound": max(r["budget_blocks"] + r["slack_blocks"] for r in reqs_st),
           "query_cases_equal": {name: bool(torch.equal(full[i * len(classes):(i + 1) * len(classes)],
                                                        piece[i * len(classes):(i + 1) * len(classes)]))
                                 for i, name in enumerate(cases)}}
    for i, (name, case) in enumerate(cases.items()):
        ref = generate(ref_model, classes, greedy=True, adsa=ADSAConfig(budget=0.5, **case)).tokens.cpu()
        got = full[i * len(classes):(i + 1) * len(classes)]
        out[f"query_{name}_vs_reference_fp32_matching_prefix"] = (got == ref).float().cumprod(1).sum(1).tolist()
    return out


CHECKS = {"basic": check_basic, "cfg": check_guidance, "fp8": check_fp8, "token": check_token, "query": check_query}

if __name__ == "__main__":
    main()
