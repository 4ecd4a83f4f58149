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


def model_config(preset: str, grid: int, t2i: bool):
    from adsa_vllm.llamagen.config import T2I
    from adsa_vllm.llamagen.config import preset as make_preset
    return make_preset(preset, grid_size=grid, **(T2I if t2i else {}))


def write_config(kind: str, preset: str, grid: int, out: Path, window: int = 0, t2i: bool = False) -> Path:
    config = model_config(preset, grid, t2i)
    d = config.to_hf_dict()
    if kind in ("llama", "llama-sw"):  # same shape, stock architecture, 1D RoPE, codebook-sized vocabulary
        d = {k: v for k, v in d.items() if k != "llamagen"}
        d.update(architectures=["LlamaForCausalLM"], vocab_size=config.codebook_size)
    if kind == "llama-sw":        # vLLM's own sliding window at the same KV token budget as ADSA
        d.update(sliding_window=window, layer_types=["sliding_attention"] * config.n_layer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(d))
    return out


# Mode parts that are switches, not a policy name: vLLM's V1 model runner, token granularity, guided pairs,
# admission rules.
FLAGS = ("v1", "token", "cfg", "peak", "average", "overcommit")


def parse_mode(mode: str, policy: str, budget: float):
    """"adsa:streaming:0.25" -> ("adsa", "streaming", 0.25); "llama-sw:0.25" -> ("llama-sw", policy, 0.25);
    missing parts come from --policy / --budget; a part "fp8" (any mode) sets that mode's KV cache dtype, a part
    "token" an ADSA mode's granularity (e.g. "adsa:topk_v:0.5:token"), "cfg" guided pairs with ADSA on top
    ("adsa:random:0.5:cfg", against mode "cfg": the plugin's CFG with full attention), "peak" / "average" /
    "overcommit" the ADSA admission rule (default: the plugin's, "peak")."""
    parts = mode.split(":")
    base = parts[0]
    for p in parts[1:]:
        if p.startswith("fp8") or p in FLAGS:
            continue          # a KV cache dtype (see run_mode) / one of FLAGS
        try:
            budget = float(p)
        except ValueError:
            policy = p
    return base, policy, budget


def run_mode(args) -> dict:
    """Child process: build one engine, generate, print one JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if "v1" in args.mode.split(":")[1:]:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"   # e.g. "llamagen:v1": stock on the V1 runner
    from vllm import LLM, SamplingParams
    config = model_config(args.preset, args.grid, args.t2i)
    base, policy, budget = parse_mode(args.mode, args.policy, args.budget)
    kind = base if base in ("llama", "llama-sw") else "llamagen"
    window = int(budget * config.image_tokens) if budget <= 1 else int(budget)
    model_dir = write_config(kind, args.preset, args.grid, Path(tempfile.mkdtemp()) / args.mode, window, args.t2i)
    kw = dict(model=str(model_dir), load_format="dummy", dtype=args.dtype, max_num_seqs=args.num_seqs,
              kv_cache_memory_bytes=int(args.kv_gib * (1 << 30)), block_size=16, seed=0,
              max_model_len=config.max_seq_len, enforce_eager=args.eager, tensor_parallel_size=args.tp)
    if args.num_gpu_blocks:   # a pool of exactly this many blocks (vLLM's CPU backend ignores --kv-gib)
        kw["num_gpu_blocks_override"] = args.num_gpu_blocks
    if args.max_graph_size:
        kw["compilation_config"] = {"max_cudagraph_capture_size": args.max_graph_size}
    stock_llama = kind in ("llama", "llama-sw")
    if stock_llama:
        kw["skip_tokenizer_init"] = True
    kv_dtype = next((p for p in args.mode.split(":")[1:] if p.startswith("fp8")), args.kv_cache_dtype)
    if kv_dtype:
        kw["kv_cache_dtype"] = kv_dtype
    flags = args.mode.split(":")[1:]
    guided = base == "cfg" or "cfg" in flags
    extra = {}
    if base.startswith("adsa"):
        budget = None if base == "adsa-full" else budget   # adsa-full: ADSA scheduler, no eviction
        extra["adsa"] = {"budget": budget, "policy": policy, "granularity": "token" if "token" in flags else "block"}
        admission = next((f for f in flags if f in ("peak", "average", "overcommit")), None)
        if admission:
            extra["adsa"]["admission"] = admission
        if args.swap_space_gib is not None:
            extra["adsa"]["swap_space_gib"] = args.swap_space_gib
        kw["attention_backend"] = "adsa"
    if guided:
        extra["cfg"] = {"scale": args.cfg_scale}
    if extra:
        kw["additional_config"] = extra
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    n = config.image_tokens
    # A plain Llama has no class tokens: its prompt is one ordinary token id inside its (codebook-sized) vocabulary.
    if args.t2i:   # full-length captions (120 rows of random caption features): the longest t2i prompt
        import torch
        gen = torch.Generator().manual_seed(0)
        prompts = [{"prompt_embeds": torch.randn(config.cls_token_num, config.caption_dim, generator=gen)}
                   for _ in range(args.num_seqs)]
    else:
        prompts = [{"prompt_token_ids": [i % min(1000, config.codebook_size)] if stock_llama
                    else config.prompt(i % config.num_classes)} for i in range(args.num_seqs)]
    images = args.num_seqs
    if guided or base == "pairs2n":         # num_seqs sequences = num_seqs / 2 images
        images = args.num_seqs // 2
        prompts = prompts[:images]
        if base == "pairs2n":               # the unconditional halves as requests of their own
            prompts += [{"prompt_token_ids": config.prompt(config.num_classes)}] * images
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    llm.generate(prompts[: min(8, len(prompts))], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True,
                                                                  detokenize=False), use_tqdm=False)  # warm-up
    core = llm.llm_engine.engine_core.engine_core
    sched = core.scheduler
    if args.profile:
        first, count = (int(x) for x in args.profile_steps.split(":"))
        out = Path(args.profile) / f"profile_{args.mode.replace(':', '_')}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        _profile_window(sched, first, count, out)
    batch_sizes, watch = _watch(sched)
    # Under tensor parallelism the workers run in processes of their own: no per-step worker timings then.
    worker = getattr(getattr(core.model_executor, "driver_worker", None), "worker", None)
    host = _time_worker(worker) if worker is not None else None
    planner = _planner_stats(worker) if worker is not None else None
    p0 = dict(vars(planner)) if planner is not None else None
    t0 = time.perf_counter()
    if args.arrival_rate:
        done, elapsed, window = _arrivals(llm, prompts, sp, args.arrival_rate, args.warmup_frac)
        tokens = done * n
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        window = elapsed
        short = sum(o.outputs[0].finish_reason != "length" for o in outs)
        if short:   # e.g. requests that failed inside the worker: their tokens would flatter the rate
            raise RuntimeError(f"{short} of {len(outs)} requests did not run to max_tokens "
                               f"({sorted({str(o.outputs[0].finish_reason) for o in outs})}); no throughput figure")
    steps = len(batch_sizes)
    res = {"mode": args.mode, "tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / window,
           "images": images, "images_per_s": (tokens / n) / window * (images / len(prompts)),
           "startup_s": startup, "num_seqs": args.num_seqs, "image_tokens": n,
           "num_blocks": sched.kv_cache_manager.block_pool.num_gpu_blocks,
           "mean_running": sum(batch_sizes) / max(1, steps), "max_running": max(batch_sizes),
           "steps": steps, "num_preemptions": watch.preemptions, "step_ms": 1e3 * elapsed / max(1, steps),
           "tensor_parallel_size": args.tp}
    if host is not None:
        res["worker_host_ms_per_step"] = 1e3 * host["s"] / max(1, host["calls"])
    if args.tp > 1 and base.startswith("adsa"):
        digests = llm.collective_rpc("adsa_rank_digest")   # every rank evicted the same blocks (worker/rank_agreement)
        res.update(adsa_rank_digests_equal=len({d["digest"] for d in digests}) == 1,
                   adsa_tp_checks=digests[0]["checks"], adsa_tp_mismatches=sum(d["mismatches"] for d in digests))
    if args.arrival_rate:
        res.update(arrival_rate=args.arrival_rate, measured_window_s=window)
    if planner is not None:
        d = {k: v - p0[k] for k, v in vars(planner).items()}
        res.update(adsa_host_ms_per_step=1e3 * d["host_s"] / max(1, steps),
                   adsa_scoring_ms_per_step=1e3 * d["scoring_s"] / max(1, steps),
                   adsa_scored_rows=d["scored_rows"], adsa_summarized_blocks=d["summarized_blocks"],
                   adsa_tp_checks=d.get("tp_checks", 0), adsa_tp_mismatches=d.get("tp_mismatches", 0))
    if hasattr(sched, "adsa_stats"):
        stats = sched.adsa_stats()
        res["total_freed_blocks"] = stats.get("total_freed_blocks")
        if stats.get("enabled"):   # preemptions by kind (swap: exact; recomputed: vLLM's own) and admission waits
            res.update(swaps=stats["swaps"], admission_waits=stats["admission_waits"],
                       swap_gib=stats["swaps"]["bytes_out"] / (1 << 30))
    return res


def _watch(sched):
    """Record the running batch size per step and count preemptions (works for the stock scheduler too)."""
    from adsa_vllm.engine.observe import SchedulerWatch
    sizes = []
    return sizes, SchedulerWatch(sched, on_step=lambda s: sizes.append(len(s.running)))


def _time_worker(worker) -> dict:
    """Host seconds inside the worker's execute_model + sample_tokens (the per-step host work of the runner)."""
    acc = {"s": 0.0, "calls": 0}
    for name in ("execute_model", "sample_tokens"):
        fn = getattr(worker, name)

        def timed(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc["s"] += time.perf_counter() - t
                acc["calls"] += _name == "execute_model"
        setattr(worker, name, timed)
    return acc


def _planner_stats(worker):
    try:
        model = worker.model_runner.get_model()
    except Exception:  # noqa: BLE001 - a runner without get_model runs no ADSA
        return None
    rt = getattr(getattr(model, "unwrap", lambda: model)(), "adsa_runtime", None)
    return None if rt is None else rt.stats


def _arrivals(llm, prompts, sp, rate: float, warmup_frac: float):
    """Open loop: request i arrives at i / rate seconds; counts images finished after the warm-up fraction of
    the arrivals until the last arrival (steady state above saturation). Returns (images, elapsed, window)."""
    engine = llm.llm_engine
    t0 = time.perf_counter()
    nxt, finished = 0, []
    while nxt < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < len(prompts) and nxt / rate <= now:
            engine.add_request(str(nxt), prompts[nxt], sp)
            nxt += 1
        for out in engine.step():
            if out.finished:
                if out.outputs[0].finish_reason != "length":
                    raise RuntimeError(f"request {out.request_id} ended with {out.outputs[0].finish_reason!r}, "
                                       "not max_tokens; no throughput figure")
                finished.append(time.perf_counter() - t0)
        if nxt == len(prompts) and len(finished) >= len(prompts):
            break
    t_start, t_end = warmup_frac * len(prompts) / rate, len(prompts) / rate
    done = sum(t_start <= t < t_end for t in finished)
    return done, time.perf_counter() - t0, t_end - t_start


def _profile_window(sched, first: int, count: int, path: Path):
    """torch.profiler over `count` scheduler steps starting at step `first` of the measured run (choose a window
    after the first ADSA selections, e.g. at 60% of the image), written as two tables: device and host time."""
    import torch

    from adsa_vllm.engine.observe import SchedulerWatch
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                              torch.profiler.ProfilerActivity.CUDA])

    def profile_window(step):
        if step == first:
            prof.start()
        if step == first + count:
            prof.stop()
            avg = prof.key_averages()
            path.write_text(f"steps {first}..{first + count}\n\n== by device time ==\n"
                            + avg.table(sort_by="self_device_time_total", row_limit=30)
                            + "\n\n== by host time ==\n" + avg.table(sort_by="self_cpu_time_total", row_limit=30))
    SchedulerWatch(sched, before_step=profile_window)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="XL")
    ap.add_argument("--grid", type=int, default=32, help="image tokens per side (32 -> 1024 tokens)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--num-gpu-blocks", type=int, default=None,
                    help="KV pool of exactly this many blocks, every mode (instead of --kv-gib; works on CPU too)")
    ap.add_argument("--swap-space-gib", type=float, default=None,
                    help="ADSA modes: host memory for swap preemption (default: the plugin's, 4 GiB)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--policy", default="topk_v")
    ap.add_argument("--eager", action="store_true", help="disable torch.compile and CUDA graphs")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of every mode (KV GiB is per GPU)")
    ap.add_argument("--max-graph-size", type=int, default=None,
                    help="CUDA graphs up to this many tokens per step, every mode (vLLM's default stops at 512, "
                         "so larger decode batches run without graphs)")
    ap.add_argument("--modes", nargs="+", default=["llama", "llamagen", "adsa"],
                    help="llama | llama-sw (vLLM sliding window, window = budget tokens) | llamagen (stock vLLM) | "
                         "adsa-full (ADSA scheduler, no eviction) | adsa | adsa:POLICY:BUDGET[:fp8] | "
                         "cfg (guided pairs) | pairs2n (the same sequences as independent requests); parts: fp8, "
                         "token, cfg (ADSA on guided pairs), peak | average (ADSA admission), v1")
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--t2i", action="store_true", help="the text-to-image model of the preset (120-row captions as "
                    "prompt_embeds; modes llamagen and adsa*)")
    ap.add_argument("--kv-cache-dtype", default=None, help="e.g. fp8 (every mode of the invocation)")
    ap.add_argument("--arrival-rate", type=float, default=0.0,
                    help="open loop: requests per second (0: all at once); images/s counted after the warm-up")
    ap.add_argument("--warmup-frac", type=float, default=0.3)
    ap.add_argument("--tag", default="", help="label of this invocation in the output")
    ap.add_argument("--profile", help="folder: torch.profiler tables of --profile-steps of every mode's run")
    ap.add_argument("--profile-steps", default="600:20", help="FIRST:COUNT scheduler steps of the measured run")
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
        if proc.returncode or not line:   # reported, and the other modes still run
            err = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-3:]
            print(proc.stderr[-4000:], file=sys.stderr)
            results.append({"mode": mode, "failed": f"rc {proc.returncode}", "error": err})
            continue
        results.append(json.loads(line[0][7:]))
        print(json.dumps(results[-1]), flush=True)
        if args.out:   # after every mode: a call that hits its time limit keeps what it measured
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    by = {r["mode"]: r for r in results if "failed" not in r}
    ratios = {}
    if "llama" in by and "llamagen" in by:
        ratios["llamagen_over_llama"] = by["llamagen"]["tok_per_s"] / by["llama"]["tok_per_s"]
    if "llamagen" in by:
        for m, r in by.items():
            if m != "llamagen" and not m.startswith(("cfg", "pairs")) and "cfg" not in m.split(":")[1:]:
                ratios[f"{m}_over_stock"] = r["tok_per_s"] / by["llamagen"]["tok_per_s"]
    if "cfg" in by:   # guided pairs with ADSA against the plugin's CFG with full attention, in images/s
        for m, r in by.items():
            if m != "cfg" and "cfg" in m.split(":")[1:]:
                ratios[f"{m}_over_cfg_images"] = r["images_per_s"] / by["cfg"]["images_per_s"]
    for m, r in by.items():   # token granularity against the same mode at block granularity (issue 12)
        block = ":".join(p for p in m.split(":") if p != "token")
        if block != m and block in by:
            ratios[f"{m}_over_block"] = r["tok_per_s"] / by[block]["tok_per_s"]
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
