"""Offline decode throughput: LlamaGen vs a plain Llama of the same shape, full attention vs ADSA, and
classifier-free guidance pairs vs the same work as independent requests.

Each mode runs in its own subprocess (a clean GPU / engine), all within one invocation, so the ratios compare runs
on the same machine minutes apart. Weights are vLLM dummy weights (throughput does not depend on their values).

  python benchmarks/throughput.py --preset XL --grid 32 --num-seqs 256 --kv-gib 8 \
      --modes llama llamagen adsa --out benchmarks/results/throughput_h100.json
  # CFG pairing overhead: N = num-seqs / 2 images as guided pairs ("cfg", one request each) vs the same 2N
  # sequences as independent requests (N conditional + N null-class, "pairs2n"), same KV budget; ratio cfg/pairs2n
  # of images per second.
  python benchmarks/throughput.py --preset L --grid 16 --num-seqs 512 --kv-gib 8 --modes pairs2n cfg
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_config(kind: str, preset: str, grid: int, out: Path) -> Path:
    from adsa_vllm.llamagen.config import preset as make_preset
    cfg = make_preset(preset, grid_size=grid)
    d = cfg.to_hf_dict()
    if kind == "llama":  # same shape, stock architecture, 1D RoPE, codebook-sized vocabulary
        d = {k: v for k, v in d.items() if k != "llamagen"}
        d.update(architectures=["LlamaForCausalLM"], vocab_size=cfg.codebook_size)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(d))
    return out


def run_mode(args) -> dict:
    """Child process: build one engine, generate, print one JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from adsa_vllm.llamagen.config import preset as make_preset
    cfg = make_preset(args.preset, grid_size=args.grid)
    model_dir = write_config("llama" if args.mode == "llama" else "llamagen", args.preset, args.grid,
                             Path(tempfile.mkdtemp()) / args.mode)
    kw = dict(model=str(model_dir), load_format="dummy", dtype=args.dtype, max_num_seqs=args.num_seqs,
              kv_cache_memory_bytes=int(args.kv_gib * (1 << 30)), block_size=16, seed=0,
              max_model_len=cfg.max_seq_len, enforce_eager=args.eager)
    if args.mode == "llama":
        kw["skip_tokenizer_init"] = True
    if args.mode.startswith("adsa"):
        budget = None if args.mode == "adsa-full" else args.budget   # adsa-full: ADSA scheduler, no eviction
        kw.update(attention_backend="adsa", additional_config={"adsa": {"budget": budget, "policy": args.policy}})
    if args.mode == "cfg":
        kw["additional_config"] = {"cfg": {"scale": args.cfg_scale}}
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    n = cfg.image_tokens
    prompts = [{"prompt_token_ids": cfg.prompt(i % cfg.num_classes) if args.mode != "llama" else [i % 1000]}
               for i in range(args.num_seqs)]
    images = args.num_seqs
    if args.mode in ("cfg", "pairs2n"):     # num_seqs sequences = num_seqs / 2 images
        images = args.num_seqs // 2
        prompts = prompts[:images]
        if args.mode == "pairs2n":          # the unconditional halves as requests of their own
            prompts += [{"prompt_token_ids": cfg.prompt(cfg.num_classes)}] * images
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    llm.generate(prompts[: min(8, len(prompts))], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                                  detokenize=False), use_tqdm=False)  # warm-up
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    batch_sizes, preemptions = _watch(sched)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    res = {"mode": args.mode, "tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed,
           "images": images, "images_per_s": images / elapsed,
           "startup_s": startup, "num_seqs": args.num_seqs, "image_tokens": n,
           "num_blocks": sched.kv_cache_manager.block_pool.num_gpu_blocks,
           "mean_running": sum(batch_sizes) / max(1, len(batch_sizes)), "max_running": max(batch_sizes),
           "steps": len(batch_sizes), "num_preemptions": preemptions[0]}
    if hasattr(sched, "adsa_stats"):
        res["total_freed_blocks"] = sched.adsa_stats().get("total_freed_blocks")
    if args.profile and args.mode == "adsa":
        res["profile"] = _profile(llm, prompts[: args.num_seqs], cfg.image_tokens, args.profile)
    return res


def _watch(sched):
    """Record the running batch size per step and count preemptions (works for the stock scheduler too)."""
    sizes, preempted = [], [0]
    schedule, preempt = sched.schedule, sched._preempt_request

    def schedule_and_record(*a, **k):
        out = schedule(*a, **k)
        sizes.append(len(sched.running))
        return out

    def count_preemption(*a, **k):
        preempted[0] += 1
        return preempt(*a, **k)
    sched.schedule, sched._preempt_request = schedule_and_record, count_preemption
    return sizes, preempted


def _profile(llm, prompts, n, path) -> str:
    """Top host-side ops of a short run (where the per-step time goes)."""
    import torch
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=min(n, 128), ignore_eos=True, detokenize=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, sp, use_tqdm=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(path).write_text(table)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="XL")
    ap.add_argument("--grid", type=int, default=32, help="image tokens per side (32 -> 1024 tokens)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--policy", default="topk_v")
    ap.add_argument("--eager", action="store_true", help="disable torch.compile and CUDA graphs")
    ap.add_argument("--modes", nargs="+", default=["llama", "llamagen", "adsa"],
                    help="llama | llamagen (stock vLLM) | adsa-full (ADSA scheduler, no eviction) | adsa | "
                         "cfg (guided pairs) | pairs2n (the same sequences as independent requests)")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--profile", help="write a torch.profiler table of a short ADSA-mode run to this path")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]
                                                            if a not in args.modes and a != "--modes"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(proc.stdout[-3000:], proc.stderr[-6000:], file=sys.stderr)
            raise SystemExit(f"mode {mode} failed (rc {proc.returncode})")
        results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1]), flush=True)
    by = {r["mode"]: r for r in results}
    ratios = {}
    if "llama" in by and "llamagen" in by:
        ratios["llamagen_over_llama"] = by["llamagen"]["tok_per_s"] / by["llama"]["tok_per_s"]
    if "llamagen" in by and "adsa" in by:
        ratios["adsa_over_full"] = by["adsa"]["tok_per_s"] / by["llamagen"]["tok_per_s"]
    if "cfg" in by and "pairs2n" in by:
        ratios["cfg_over_pairs2n_images"] = by["cfg"]["images_per_s"] / by["pairs2n"]["images_per_s"]
    report = {"args": {k: v for k, v in vars(args).items() if k != "mode"}, "results": results, "ratios": ratios}
    try:
        import torch
        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - informational only
        pass
    print(json.dumps(ratios))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
