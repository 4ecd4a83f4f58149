"""Janus-Pro text-to-image throughput: this plugin's CFG (full attention, then ADSA on top) vs transformers' own
image-generation loop, at the shapes of Janus-Pro-1B / 7B, bf16, dummy weights, classifier-free guidance scale 5.

Structure as benchmarks/throughput.py: every mode in its own child process (a clean GPU), all in one invocation, one
JSON line per mode, ratios only within the invocation. Modes:
  cfg                      vLLM + the plugin's CFG (cond/uncond as one sequence), full attention
  adsa:POLICY:BUDGET:cfg   the same with ADSA (e.g. adsa:random:0.5:cfg); ratio over cfg in images/s
  hf                       transformers' JanusForConditionalGeneration.generate(generation_mode="image") (its loop:
                           static cache, eager, cond + uncond rows), random init on the GPU, at the best of a sweep of
                           batch sizes (--hf-batches; the sweep stops at the first OOM, which is reported)

Shapes (--preset): the language model of Janus-Pro-1B (hidden 2048, 24 layers, 16 heads, MLP 5632) or 7B (4096, 30,
32, 11008), text vocabulary 102400, 384x384 images = 24x24 = 576 tokens, VQ codebook 16384 (embed 8), generation
aligner 8 -> hidden -> hidden and head hidden -> hidden -> 16384 (transformers' JanusVQVAEConfig defaults with
projection_dim = image_token_embed_dim = hidden, as DeepSeek's gen_aligner / gen_head configs), SigLIP-L vision tower
(built by the hf mode, unused in image generation). Weights: vLLM's dummy weights; the hf mode's transformers init
run on the GPU (seconds, also for 7B). Throughput does not depend on the values.

Prompt: no tokenizer here (dummy weights), so each image's prompt is BOS + random ordinary text ids + <begin_of_image>,
--prompt-tokens ids in all (default 48: the chat-formatted `<|User|>: {30-40 word caption}\\n\\n<|Assistant|>:`),
a different one per image (no shared prefix blocks); the uncond branch pads them as transformers does. The model
folder's max_prompt_tokens is set to that length: the ADSA prefix is the prompt plus one image row, so with Janus's
default 128 a 25% budget (144 tokens) could not hold prefix (152) + window (25).

  # one H100, about 6 and 7 minutes (engine starts of about a minute each dominate)
  python benchmarks/janus_throughput.py --preset 1B --num-images 512 --kv-gib 16 --hf-batches 64 128 256 512 \\
      --modes cfg adsa:random:0.5:cfg adsa:random:0.25:cfg hf --out benchmarks/results/janus_1b_h100.json
  python benchmarks/janus_throughput.py --preset 7B --num-images 192 --kv-gib 24 --hf-batches 32 64 96 128 \\
      --modes cfg adsa:random:0.5:cfg adsa:random:0.25:cfg hf --out benchmarks/results/janus_7b_h100.json
  python benchmarks/janus_throughput.py --tiny --num-images 4 --modes cfg adsa:random:0.5:cfg hf   # CPU smoke run

Per mode: images/s, seconds, peak GPU memory (torch.cuda.max_memory_allocated in the child: of the whole process and
of the measured run), vLLM's KV cache (blocks, GiB), mean running sequences (vLLM modes; hf: the batch), startup
seconds (engine start / model build).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import _watch, parse_mode  # noqa: E402

BOS, EOS, PAD, BOI = 100000, 100001, 100015, 100016   # Janus-Pro tokenizer ids (adsa_vllm/janus/config.py)
LM = {"1B": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5632),
      "7B": dict(hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, intermediate_size=11008)}
# Per preset: transformers batch sizes (ascending; the sweep stops at the first OOM), images per vLLM mode, KV GiB.
DEFAULTS = {"1B": ([16, 32, 64, 128, 256, 512], 512, 16.0), "7B": ([16, 32, 64, 128], 192, 24.0),
            "tiny": ([2, 4], 4, 1.0)}


def janus_config(preset: str, prompt_tokens: int):
    """A transformers JanusConfig of the preset (tiny: the shapes of tests/test_vllm_janus.py, CPU-sized)."""
    from transformers import JanusConfig
    if preset == "tiny":
        grid, hidden = 16, 64
        return JanusConfig(
            text_config=dict(model_type="llama", vocab_size=256, hidden_size=hidden, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=512, bos_token_id=1, eos_token_id=None, pad_token_id=2,
                             tie_word_embeddings=False),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0,
                               image_size=16 * grid, patch_size=16, projection_dim=hidden, depth=2,
                               num_image_tokens=grid * grid),
            vq_config=dict(embed_dim=8, num_embeddings=128, base_channels=32, channel_multiplier=[1, 2],
                           num_res_blocks=1, latent_channels=32, projection_dim=hidden, num_hidden_layers=2,
                           image_token_embed_dim=hidden),
            image_token_id=5, tie_word_embeddings=False, boi_token_id=3, max_prompt_tokens=prompt_tokens,
            architectures=["JanusForConditionalGeneration"])
    lm = LM[preset]
    hidden, heads = lm["hidden_size"], lm["num_attention_heads"]
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=102400, num_key_value_heads=heads, head_dim=hidden // heads,
                         max_position_embeddings=16384, rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False, **lm),
        vision_config=dict(image_size=384, patch_size=16, num_image_tokens=576, projection_dim=hidden),
        vq_config=dict(num_embeddings=16384, embed_dim=8, projection_dim=hidden, image_token_embed_dim=hidden,
                       num_hidden_layers=2),
        image_token_id=100581, tie_word_embeddings=False, boi_token_id=BOI, max_prompt_tokens=prompt_tokens,
        architectures=["JanusForConditionalGeneration"])


def prompts(config, n: int, length: int) -> list[list[int]]:
    """n prompts of tokenizer ids: BOS, random ordinary text ids (below the special tokens), <begin_of_image>."""
    text = config.text_config
    hi = min(BOS, text.vocab_size)
    lo = 6 if hi == text.vocab_size else 0           # tiny: ids 1..5 are special
    rng = random.Random(0)
    return [[text.bos_token_id] + [rng.randrange(lo, hi) for _ in range(length - 2)] + [config.boi_token_id]
            for _ in range(n)]


def _gib(b: float) -> float:
    return b / (1 << 30)


def _cuda_peak(reset: bool = False):
    import torch
    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return None
    torch.cuda.synchronize()
    return _gib(torch.cuda.max_memory_allocated())


def run_vllm(args, config) -> dict:
    from vllm import LLM, SamplingParams

    from adsa_vllm.engine.observe import engine_scheduler
    from adsa_vllm.janus.config import JanusConfig
    base, policy, budget = parse_mode(args.mode, "random", 0.5)
    flags = args.mode.split(":")[1:]
    guided = base == "cfg" or "cfg" in flags
    folder = Path(tempfile.mkdtemp()) / args.mode.replace(":", "_")
    config.save_pretrained(folder)                  # config.json only: dummy weights
    spec = JanusConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    n = spec.image_tokens
    kw = dict(model=str(folder), load_format="dummy", dtype=args.dtype, max_num_seqs=args.num_images, block_size=16,
              seed=0, max_model_len=spec.max_prompt_tokens + n, enforce_eager=args.eager,
              kv_cache_memory_bytes=int(args.kv_gib * (1 << 30)))
    extra = {}
    if base.startswith("adsa"):
        extra["adsa"] = {"budget": budget, "policy": policy}
        kw["attention_backend"] = "adsa"
    elif base != "cfg":
        raise ValueError(f"unknown mode {args.mode!r}: cfg | adsa:POLICY:BUDGET:cfg | hf")
    if guided:
        extra["cfg"] = {"scale": args.cfg_scale}
    kw["additional_config"] = extra
    t0 = time.perf_counter()
    llm = LLM(**kw)
    startup = time.perf_counter() - t0
    reqs = [{"prompt_token_ids": spec.text_ids(p)} for p in prompts(config, args.num_images, args.prompt_tokens)]
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    llm.generate(reqs[:8], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, detokenize=False),
                 use_tqdm=False)                    # warm-up
    sched = engine_scheduler(llm)
    batch_sizes, watch = _watch(sched)
    process_peak = _cuda_peak()
    _cuda_peak(reset=True)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    short = sum(o.outputs[0].finish_reason != "length" or len(o.outputs[0].token_ids) != n for o in outs)
    if short:
        raise RuntimeError(f"{short} of {len(outs)} requests did not emit {n} tokens; no throughput figure")
    kv = sched.kv_cache_config
    kv_bytes = kv.num_blocks * sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in kv.kv_cache_groups)
    steps = len(batch_sizes)
    res = {"mode": args.mode, "images": len(outs), "seconds": elapsed, "images_per_s": len(outs) / elapsed,
           "tok_per_s": len(outs) * n / elapsed, "startup_s": startup, "image_tokens": n,
           "prompt_tokens": args.prompt_tokens, "num_blocks": kv.num_blocks, "kv_cache_gib": _gib(kv_bytes),
           "peak_gib_run": _cuda_peak(), "peak_gib_process": process_peak,
           "mean_running": sum(batch_sizes) / max(1, steps), "max_running": max(batch_sizes, default=0),
           "steps": steps, "step_ms": 1e3 * elapsed / max(1, steps), "num_preemptions": watch.preemptions}
    if res["peak_gib_process"] is not None:
        res["peak_gib_process"] = max(res["peak_gib_process"], res["peak_gib_run"])
    if hasattr(sched, "adsa_stats"):
        res["total_freed_blocks"] = sched.adsa_stats().get("total_freed_blocks")
    return res


def _cache_keyword() -> str:
    """The keyword under which Janus's image generate() takes a ready cache. Why hand it one: in some transformers
    releases (the GPU image's, 2026-12) JanusForConditionalGeneration.generate calls GenerationMixin's
    _prepare_static_cache without the prefill_chunk_size argument that release's GenerationMixin requires (TypeError);
    generate() builds no cache of its own when one is given. The keyword is the one the installed generate() reads
    (`cache` in transformers 5.25, `past_key_values` before the rename)."""
    import inspect
    import re

    from transformers import JanusForConditionalGeneration
    source = inspect.getsource(JanusForConditionalGeneration.generate)
    read = re.findall(r'model_kwargs\.get\("(cache|past_key_values)"', source)
    if len(set(read)) != 1:
        raise RuntimeError(f"cannot tell which cache keyword this transformers' Janus generate() reads: {read}")
    return read[0]


def run_hf(args, config) -> dict:
    """transformers' own loop at each batch size of --hf-batches (one generate call of that many images each, after a
    4-token warm-up at the same batch); stops at the first out-of-memory."""
    import torch
    from transformers import GenerationConfig, JanusForConditionalGeneration, StaticCache
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_keyword = _cache_keyword()
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):                  # transformers' random init, run on the GPU: seconds for 7B
            model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    if device == "cuda":
        torch.cuda.synchronize()
    startup = time.perf_counter() - t0
    vision = model.model.vision_model.config
    n = vision.num_image_tokens
    text = config.text_config

    def generate(ids, tokens):
        vision.update({"num_image_tokens": tokens})   # generate() reads the image length from here
        gen = GenerationConfig(bos_token_id=text.bos_token_id, pad_token_id=text.pad_token_id, do_sample=False,
                               guidance_scale=args.cfg_scale, generation_kwargs={"boi_token_id": config.boi_token_id})
        with torch.no_grad():
            # the static cache generate() would make (it sizes itself to the cond + uncond rows on first use)
            cache = StaticCache(config=model.config.get_text_config(), max_cache_len=ids.shape[1] + tokens)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                 generation_config=gen, **{cache_keyword: cache})
        if device == "cuda":
            torch.cuda.synchronize()
        if tuple(out.shape) != (len(ids), tokens):
            raise RuntimeError(f"transformers returned {tuple(out.shape)} tokens, not {(len(ids), tokens)}")
        return out

    all_ids = prompts(config, max(args.hf_batches), args.prompt_tokens)
    sweep = []
    for b in args.hf_batches:
        ids = torch.tensor(all_ids[:b], device=device)
        try:
            generate(ids, 4)
            _cuda_peak(reset=True)
            t = time.perf_counter()
            out = generate(ids, n)
            elapsed = time.perf_counter() - t
        except torch.OutOfMemoryError as e:
            sweep.append({"batch": b, "oom": str(e).splitlines()[0][:200]})
            break
        finally:
            ids = out = None  # noqa: F841 - drop the cache and outputs before the next size
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        sweep.append({"batch": b, "seconds": elapsed, "images_per_s": b / elapsed, "peak_gib": _cuda_peak(),
                      "step_ms": 1e3 * elapsed / n})
        print(json.dumps(sweep[-1]), file=sys.stderr, flush=True)
    done = [s for s in sweep if "oom" not in s]
    if not done:
        raise RuntimeError(f"transformers ran out of memory at the smallest batch: {sweep}")
    best = max(done, key=lambda s: s["images_per_s"])
    return {"mode": "hf", "images": best["batch"], "seconds": best["seconds"], "images_per_s": best["images_per_s"],
            "tok_per_s": best["images_per_s"] * n, "startup_s": startup, "image_tokens": n,
            "prompt_tokens": args.prompt_tokens, "peak_gib_run": best["peak_gib"], "mean_running": best["batch"],
            "best_batch": best["batch"], "step_ms": best["step_ms"], "sweep": sweep,
            "oom_at": next((s["batch"] for s in sweep if "oom" in s), None)}


def run_mode(args) -> dict:
    """Child process: one mode, one JSON line."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.tiny:   # CPU: vLLM's KV space, no torch.compile warm-up (as tests/conftest.py)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    config = janus_config(args.preset, args.prompt_tokens)
    return run_hf(args, config) if args.mode == "hf" else run_vllm(args, config)


def ratios_of(by: dict) -> dict:
    ratios = {}
    if "cfg" in by:
        for m, r in by.items():
            if m.startswith("adsa") and "cfg" in m.split(":")[1:]:
                ratios[f"{m}_over_cfg_images"] = r["images_per_s"] / by["cfg"]["images_per_s"]
        if "hf" in by:
            ratios["cfg_over_hf_images"] = by["cfg"]["images_per_s"] / by["hf"]["images_per_s"]
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["1B", "7B"], default="1B")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Janus, float32, eager: a CPU smoke run")
    ap.add_argument("--num-images", type=int, default=None, help="images per vLLM mode, all submitted at once "
                    "(also max_num_seqs); default 1B 512, 7B 192")
    ap.add_argument("--kv-gib", type=float, default=None, help="vLLM's KV cache per mode, default 1B 16, 7B 24 "
                    "(CPU: VLLM_CPU_KVCACHE_SPACE instead)")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=None,
                    help="transformers batch sizes, ascending; stops at the first OOM (default 1B: 16..512, "
                         "7B: 16..128)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="ids per prompt (default 48; tiny 12)")
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--dtype", default=None, help="default bfloat16 (tiny: float32)")
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile and CUDA graphs (tiny: on)")
    ap.add_argument("--modes", nargs="+", default=["cfg", "adsa:random:0.5:cfg", "adsa:random:0.25:cfg", "hf"])
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.tiny:
        args.preset, args.eager = "tiny", True
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.prompt_tokens = args.prompt_tokens or (12 if args.tiny else 48)
    batches, images, kv_gib = DEFAULTS[args.preset]
    args.hf_batches, args.num_images = args.hf_batches or batches, args.num_images or images
    args.kv_gib = args.kv_gib or kv_gib
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        return
    results = []
    report = {"args": {k: v for k, v in vars(args).items() if k != "mode"}, "results": results}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode] + [a for a in sys.argv[1:]
                                                            if a not in args.modes and a != "--modes"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:   # reported, and the other modes still run
            print(proc.stderr[-4000:], file=sys.stderr)
            err = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-3:]
            results.append({"mode": mode, "failed": f"rc {proc.returncode}", "error": err})
        else:
            results.append(json.loads(line[0][7:]))
        results[-1]["child_s"] = time.perf_counter() - t0
        print(json.dumps(results[-1]), flush=True)
        report["ratios"] = ratios_of({r["mode"]: r for r in results if "failed" not in r})
        if args.out:   # after every mode: a call that hits its time limit keeps what it measured
            Path(args.out).write_text(json.dumps(report, indent=1))
    try:
        import torch
        report["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - informational only
        pass
    print(json.dumps(report["ratios"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
