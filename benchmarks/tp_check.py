"""Tensor parallelism on GPUs (issue 13): TP=N against TP=1, same weights, greedy, ADSA at 50%, with and without CFG.

One random LlamaGen of a preset shape is written once (real weights, seeded: `load_format="dummy"` would draw each
rank's shard independently, so TP=1 and TP=N would not be the same model). Each engine runs in a fresh process.
Reported per setting: the matching prefix length of every image between TP=1 and TP=N (bf16 kernels: the reduction
order differs across ranks, so greedy decoding may part ways after a while; the length is reported, not asserted),
and for TP=N whether every rank's eviction digest is equal (worker/rank_agreement.py; asserted), with the number of
in-engine rank checks, and the blocks freed.

  python benchmarks/tp_check.py --preset XL --tp 2 --out $OUT/tp_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _engine(model_dir: str, tp: int, classes: list, extra: dict, dtype: str, eager: bool) -> dict:
    from vllm import LLM, SamplingParams

    from adsa_vllm.llamagen.config import LlamaGenConfig
    config = LlamaGenConfig.from_hf_dict(json.load(open(os.path.join(model_dir, "config.json"))))
    llm = LLM(model=model_dir, dtype=dtype, tensor_parallel_size=tp, gpu_memory_utilization=0.5, seed=0,
              attention_backend="adsa", additional_config=extra, enforce_eager=eager)
    sp = SamplingParams(temperature=0.0, max_tokens=config.image_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c in classes], sp, use_tqdm=False)
    digests = llm.collective_rpc("adsa_rank_digest")
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "digests": digests}


def run(model_dir: str, tp: int, classes: list, extra: dict, dtype: str, eager: bool) -> dict:
    """One engine in a fresh process (GPU memory and vLLM's distributed state start clean)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_engine, model_dir, tp, classes, extra, dtype, eager).result()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="XL")
    ap.add_argument("--grid", type=int, default=16, help="image tokens per side (16 -> 256 tokens)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--std", type=float, default=0.1, help="weight init std (larger: peakier, fewer near-ties)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=0.5, help="ADSA budget; 0: none (full attention, the control)")
    ap.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs (faster engine starts)")
    ap.add_argument("--inner-backend", help="the kernel ADSA wraps, e.g. TRITON_ATTN for float32 on a GPU "
                    "(FlashAttention has no float32)")
    ap.add_argument("--out")
    args = ap.parse_args()

    import torch

    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import preset
    config = preset(args.preset, grid_size=args.grid)
    model_dir = str(make_random_model_dir(tempfile.mkdtemp(), config, seed=0, std=args.std, dtype=args.dtype))
    classes = [i % config.num_classes for i in range(args.images)]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out = {"args": vars(args), "device": device, "settings": {}}
    ok = True
    adsa = {"budget": args.budget or None, **({"inner_backend": args.inner_backend} if args.inner_backend else {})}
    for name, extra in (("adsa50", {"adsa": adsa}), ("adsa50_cfg4", {"adsa": adsa, "cfg": {"scale": 4.0}})):
        one, many = (run(model_dir, tp, classes, extra, args.dtype, args.eager) for tp in (1, args.tp))
        a, b = torch.tensor(one["tokens"]), torch.tensor(many["tokens"])
        agree = (a == b).int().cumprod(1).sum(1).tolist()
        d = many["digests"]
        equal = len({x["digest"] for x in d}) == 1 and d[0]["checks"] > 0 and sum(x["mismatches"] for x in d) == 0
        ok &= equal
        out["settings"][name] = {"matching_prefix_per_image": agree, "tokens_per_image": config.image_tokens,
                                 "all_equal": bool(torch.equal(a, b)), "rank_digests_equal": equal,
                                 "rank_checks": d[0]["checks"], "digests": d}
        print(name, json.dumps(out["settings"][name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
