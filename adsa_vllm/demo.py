"""Generate labelled class-conditional images with vLLM + ADSA, then the same requests with full attention.

    python -m adsa_vllm.demo [--model DIR] [--classes 0 1 2 ...] [--budget 0.5] [--policy random] [--cfg-scale 2]
                             [--num-images N] [--top-k 8] [--temperature 1.0] [--greedy] [--seed 0] [--out demo.png]

On the embedded default model (the LlamaGen trained on Fashion-MNIST, adsa_vllm/default_model.py) this draws one
garment per class, labelled with its class name. Both runs go through `vllm.LLM` in this process (ADSA first, then
full attention; the first engine is deleted before the second is built) with the same per-request seeds, so the
two rows differ only where eviction changed the model's probabilities. Sampling is top-k 8 of the 16 grey levels
at temperature 1 with classifier-free guidance at scale 2 (what benchmarks/quality.py uses; greedy decoding
collapses to flat grey garments; --cfg-scale 1 turns guidance off, each request then runs one branch). The table
shows throughput and the KV blocks one sequence (under CFG: one cond/uncond pair) holds: with ADSA its peak stays at
budget + slack blocks instead of the full sequence, and the evicted blocks go back to vLLM's pool. `sample_images`
is the one generation call; pixels come from `adsa_vllm.images.tokens_to_images`, like `adsa-vllm`'s.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time

import numpy as np


def _cpu_only() -> bool:
    import torch
    return not torch.cuda.is_available()


def is_fashion_model(config) -> bool:
    from adsa_vllm.images import is_pixel_token_model
    return is_pixel_token_model(config)


def tokens_to_image(tokens, config) -> np.ndarray:
    """Image token ids (grid*grid, raster order) -> uint8 [H, W]: grey levels for a Fashion-MNIST pixel-token
    model, else a token map (adsa_vllm.images.tokens_to_images, which `adsa-vllm` uses too)."""
    from adsa_vllm.images import tokens_to_images
    return tokens_to_images(config, [tokens])[0]


def class_label(c: int, config) -> str:
    if is_fashion_model(config) and config.num_classes == 10:
        from adsa_vllm.data import fashion_mnist as fm
        return fm.CLASS_NAMES[c]
    return f"class {c}"


def _check_out(ap: argparse.ArgumentParser, out: str) -> None:
    from PIL import Image
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in Image.registered_extensions():
        ap.error(f"--out {out!r}: the grid is one image file; give a name ending in an image extension, "
                 "e.g. --out demo.png")


def save_grid(rows: list[tuple[str, list[np.ndarray], list[str]]], path: str, tile: int = 128) -> None:
    """rows: (row label, images [H, W] uint8, per-image labels) -> one labelled PNG (Pillow only)."""
    from PIL import Image, ImageDraw
    pad, head, left = 6, 16, 92
    ncol = max(len(r[1]) for r in rows)
    sheet = Image.new("L", (left + ncol * (tile + pad) + pad, len(rows) * (tile + head + pad) + pad), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (row_label, images, labels) in enumerate(rows):
        y = pad + r * (tile + head + pad)
        draw.multiline_text((pad, y + head + tile // 2 - 6), row_label, fill=0)
        for c, (img, label) in enumerate(zip(images, labels)):
            x = left + c * (tile + pad)
            draw.text((x, y + 2), label, fill=0)
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y + head))
    sheet.save(path)


def _peak_held(seen: dict):
    """A SchedulerWatch callback: the most KV blocks one running request holds after a schedule() (null = evicted
    blocks excluded), into seen["peak"]; works on vLLM's stock scheduler as well as ADSAScheduler."""
    def on_step(scheduler):
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        for r in scheduler.running:
            held = max(sum(not b.is_null for b in m.req_to_blocks.get(r.request_id, ())) for m in managers)
            seen["peak"] = max(seen["peak"], held)
    return on_step


def sample_images(llm, config, classes: list[int], *, top_k: int, temperature: float, seed: int,
                  greedy: bool = False, cfg_scale: float = 1.0) -> list[list[int]]:
    """One image per class id (request i uses seed + i); token ids per image. With cfg_scale != 1 each request is
    a guided cond/uncond pair (adsa_vllm.guidance), and the engine must have been built with guidance on."""
    from adsa_vllm.guidance.api import generate_images, image_params
    if cfg_scale != 1.0:
        out = generate_images(llm, classes, cfg_scale=cfg_scale, seed=seed, temperature=temperature, top_k=top_k,
                              greedy=greedy)
        return out.tokens.tolist()
    params = [image_params(config, seed=seed + i, temperature=temperature, top_k=top_k, greedy=greedy)
              for i in range(len(classes))]
    outs = llm.generate([{"prompt_token_ids": config.prompt(c)} for c in classes], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def run(model_dir: str, config, classes: list[int], adsa: dict | None, dtype: str, sampling: dict) -> dict:
    from vllm import LLM, SamplingParams

    from adsa_vllm.engine.observe import SchedulerWatch, engine_scheduler
    guidance = {"cfg": {"scale": sampling["cfg_scale"]}} if sampling["cfg_scale"] != 1.0 else {}
    kw = dict(attention_backend="adsa", additional_config={"adsa": adsa, **guidance}) if adsa is not None else \
        dict(additional_config=guidance)
    t_start = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, block_size=16, seed=0,
              max_num_seqs=max(len(classes), 1), **kw)
    scheduler = engine_scheduler(llm)
    llm.generate([{"prompt_token_ids": config.prompt(classes[0])}],  # warm-up: kernels, allocator
                 SamplingParams(temperature=0.0, max_tokens=16, detokenize=False), use_tqdm=False)
    startup = time.perf_counter() - t_start
    stats0 = scheduler.adsa_stats() if hasattr(scheduler, "adsa_stats") else {}
    seen = {"peak": 0}
    with SchedulerWatch(scheduler, on_step=_peak_held(seen)) as watch:
        t0 = time.perf_counter()
        tokens = sample_images(llm, config, classes, **sampling)
        seconds = time.perf_counter() - t0
    res = {"tokens": tokens, "n_tokens": sum(map(len, tokens)), "seconds": seconds, "startup": startup,
           "peak": seen["peak"],
           "preemptions": watch.preemptions, "bound": "-", "freed": "-"}
    stats = scheduler.adsa_stats() if hasattr(scheduler, "adsa_stats") else {}
    if stats.get("enabled"):
        new = [v for k, v in stats["requests"].items() if k not in stats0.get("requests", {})]
        res["peak"] = max([res["peak"]] + [v["peak_held_blocks"] for v in new])
        res["bound"] = "/".join(sorted({f"{v['budget_blocks']}+{v['slack_blocks']}" for v in new}))
        res["freed"] = stats["total_freed_blocks"] - stats0.get("total_freed_blocks", 0)
    del scheduler, llm
    gc.collect()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="LlamaGen model folder (default: the embedded default model)")
    ap.add_argument("--classes", type=int, nargs="+", help="class ids (default: 0, 1, 2, ... cycling)")
    ap.add_argument("--budget", type=float, default=0.5, help="ADSA KV budget: fraction of the image tokens")
    ap.add_argument("--policy", default=None, help="ADSA policy (default: ADSA's, random)")
    ap.add_argument("--num-images", type=int, help="default: len(--classes), else one per class")
    ap.add_argument("--top-k", type=int, default=8, help="sample among the k most likely tokens (0: all)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ap.add_argument("--cfg-scale", type=float, default=2.0, help="classifier-free guidance scale (1: off)")
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i (the same in both runs)")
    ap.add_argument("--no-full", action="store_true", help="skip the full-attention comparison run")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="demo.png")
    args = ap.parse_args(argv)
    _check_out(ap, args.out)   # before minutes of generation, not after

    t_all = time.perf_counter()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # EngineCore in-process: scheduler stats
    if _cpu_only():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU backend needs it set
        # The model runs eagerly (enforce_eager); this skips the ~20 s per engine torch.compile warm-up of vLLM's
        # CPU random sampler, which then runs eagerly too (over 16 grey levels that costs nothing).
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from adsa_vllm.config import ADSAConfig
    from adsa_vllm.family import load_config
    from adsa_vllm.default_model import default_model_dir

    model_dir = str(args.model or default_model_dir())
    config = load_config(model_dir)
    n = args.num_images or (len(args.classes) if args.classes else config.num_classes)
    base = args.classes or list(range(config.num_classes))
    classes = [base[i % len(base)] for i in range(n)]
    for c in classes:
        config.class_token(c)  # clear error for an out-of-range class id
    budget = int(args.budget) if args.budget > 1 else args.budget
    policy = args.policy or ADSAConfig.policy
    adsa = {"budget": budget, "policy": policy}
    ADSAConfig.from_dict(adsa)  # validate before building an engine
    sampling = dict(top_k=args.top_k, temperature=args.temperature, seed=args.seed, greedy=args.greedy,
                    cfg_scale=args.cfg_scale)
    how = "greedy" if args.greedy else f"top-k {args.top_k}, temperature {args.temperature:g}, seed {args.seed}+i"
    how += f", CFG {args.cfg_scale:g}" if args.cfg_scale != 1.0 else ", no CFG"

    results = {}
    runs = [(f"adsa {policy} b={budget}", adsa)] + ([] if args.no_full else [("full attention", None)])
    for name, a in runs:
        print(f"[demo] {name}: {n} images of {config.grid_size}x{config.grid_size} tokens ({how}) ...", flush=True)
        results[name] = run(model_dir, config, classes, a, args.dtype, sampling)

    bs = 16
    full_blocks = math.ceil((config.max_seq_len - 1) / bs)  # the last image token is emitted, never cached
    head = f"{'mode':<26}{'images':>7}{'tokens':>8}{'start s':>8}{'gen s':>7}{'tok/s':>8}{'peak blk/seq':>13}" \
           f"{'budget+slack':>13}{'full blk':>9}{'freed':>7}{'preempt':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results.items():
        print(f"{name:<26}{len(r['tokens']):>7}{r['n_tokens']:>8}{r['startup']:>8.1f}{r['seconds']:>7.1f}"
              f"{r['n_tokens'] / r['seconds']:>8.1f}{r['peak']:>13}{r['bound']:>13}{full_blocks:>9}"
              f"{r['freed']:>7}{r['preemptions']:>8}")
    if len(results) == 2:
        a, f = results.values()
        same = np.mean([np.mean(np.equal(x, y)) for x, y in zip(a["tokens"], f["tokens"])])
        print(f"\nADSA vs full attention, same seeds: {same:.0%} of image tokens equal "
              f"(eviction starts once a sequence passes its budget)")

    labels = [class_label(c, config) for c in classes]
    save_grid([(name.replace(" b=", "\nbudget "), [tokens_to_image(t, config) for t in r["tokens"]], labels)
               for name, r in results.items()], args.out, tile=112 if is_fashion_model(config) else 128)
    print(f"wrote {args.out} ({len(results)} rows x {n} images) in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
