"""`adsa-vllm eval` (and benchmarks/eval.py): flags -> a checked EvalRun -> samples, metrics, table.

Everything a user can get wrong (model, classes or captions, settings, CFG, VQ, reference batch, metric library,
feature weights, a resumed folder holding other samples) is checked before the engine starts: a mistake found
after hours of sampling would cost the hours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

USAGE = """examples:
  # the shipped Fashion-MNIST model, all 10 classes x 50, full attention vs ADSA at 50% (three policies)
  adsa-vllm eval --settings full adsa:topk_v:0.5 adsa:random:0.5 adsa:streaming:0.5 --ref fashion_test.npz
  # LlamaGen-XL (384 px, evaluated at 256 px like LlamaGen) against ADM's ImageNet reference batch
  adsa-vllm eval --model models/llamagen-XL-384 --vq vq_ds16_c2i.pt --cfg 1.75 --image-size-eval 256 \\
      --settings full adsa:topk_v:0.5 --ref VIRTUAL_imagenet256_labeled.npz --out eval-xl
settings: 'full' or 'adsa[:POLICY[:BUDGET[:GRANULARITY]]]'; omitted fields from --policy/--budget/--granularity.
A rerun with the same flags and --out keeps every shard already written (docs/eval.md)."""

# LlamaGen's sampling defaults: sample_c2i_ddp.py (its FID script: top-k 0 = whole codebook, CFG 1.5) and
# sample_t2i.py (top-k 1000, CFG 7.5); the shipped pixel model samples as benchmarks/quality.py does.
C2I_TOP_K, T2I_TOP_K, C2I_CFG, T2I_CFG, PIXEL_CFG = 0, 1000, 1.5, 7.5, 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and conditions")
    g.add_argument("--model", help="model folder (default: the shipped Fashion-MNIST model)")
    g.add_argument("--vq", help="LlamaGen VQ checkpoint to decode with (default: config.json's vq_ckpt, if any)")
    g.add_argument("--classes", nargs="+", metavar="CLASS", help="c2i: class ids or names (default: all classes)")
    g.add_argument("--per-class", type=int, default=50, help="c2i: images per class (default 50, ADM's 50k)")
    g.add_argument("--captions", help="t2i: text file, one caption per line (needs --t5)")
    g.add_argument("--t5", help="t2i: local flan-t5-xl folder encoding --captions")
    g.add_argument("--caption-embeds", help="t2i: caption features, .pt (list of [v, C] tensors, or {features, "
                                            "mask}) or .npz (features, mask)")
    g.add_argument("--per-caption", type=int, default=1, help="t2i: images per caption (default 1)")
    g = p.add_argument_group("attention settings (one engine runs them all)")
    g.add_argument("--settings", nargs="+", metavar="SPEC",
                   help="e.g. full adsa:topk_v:0.5 adsa:random:0.5 adsa:streaming:0.5 (default: one setting from "
                        "the flags below)")
    g.add_argument("--budget", help="ADSA budget for settings that leave it out: fraction, tokens or 'none' (=full)")
    g.add_argument("--policy", help="ADSA policy for settings that leave it out (default random)")
    g.add_argument("--granularity", help="block or token, for settings that leave it out (default block)")
    g = p.add_argument_group("sampling (LlamaGen's defaults)")
    g.add_argument("--cfg", type=float, help=f"guidance scale, 1 = off (default {C2I_CFG} c2i, {T2I_CFG} t2i, "
                                             f"{PIXEL_CFG} shipped model)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, help=f"default {C2I_TOP_K} (all) c2i, {T2I_TOP_K} t2i, 8 shipped model")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--image-size-eval", type=int, help="resize VQ images to this side before saving (LlamaGen: "
                                                       "384 px models are evaluated at 256)")
    g = p.add_argument_group("output and metrics")
    g.add_argument("--out", default="adsa-eval", help="output folder (default ./adsa-eval)")
    g.add_argument("--shard-size", type=int, default=1000, help="images per resumable shard (default 1000)")
    g.add_argument("--ref", help="reference batch .npz (arr_0 uint8 NHWC), e.g. VIRTUAL_imagenet256_labeled.npz; "
                                 "without it: samples and timings only")
    g.add_argument("--feature-extractor", default=None,
                   help="torch-fidelity extractor name (default inception-v3-compat, the TF-FID Inception)")
    g.add_argument("--feature-weights", help="local weights file of the extractor (default: torch-fidelity "
                                             "downloads its own on first use)")
    g.add_argument("--metrics-device", help="cuda or cpu (default: cuda if available)")
    g.add_argument("--metrics-batch-size", type=int, default=64)
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", help="model dtype (default bfloat16 on a GPU, as LlamaGen samples; float32 on CPU)")
    g.add_argument("--max-num-seqs", type=int, help="vLLM max_num_seqs (default: vLLM's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                   help="vLLM's share of the GPU (default 0.8: the VQ decoder needs room beside it)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_run(args):
    """Flags -> EvalRun; ValueError / OSError / ADSAConfigError ... naming the fix, before any engine starts."""
    import torch

    from adsa_vllm.cli_common import BLOCK_SIZE, PIXEL_MODEL_TOP_K, parse_classes
    from adsa_vllm.family import family_tool, load_config
    from adsa_vllm.default_model import default_model_dir
    from adsa_vllm.eval import conditions as cond
    from adsa_vllm.eval.metrics import DEFAULT_FEATURE_EXTRACTOR
    from adsa_vllm.eval.run import EvalRun
    from adsa_vllm.eval.samples import SamplePlan
    from adsa_vllm.eval.setting import parse_settings
    from adsa_vllm.guidance.settings import Guidance
    from adsa_vllm.images import is_pixel_token_model, load_vq_decoder

    model_dir = str(args.model or default_model_dir())
    config = load_config(model_dir)
    if family_tool(model_dir, "text_prompts") is not None:
        raise ValueError(f"{model_dir} takes text prompts (Janus-Pro): adsa-vllm eval samples class ids or "
                         "LlamaGen captions and has no text-prompt conditions yet; adsa-vllm generate draws its images")
    pixel = is_pixel_token_model(config)
    if config.is_t2i:
        if args.classes:
            raise ValueError(f"{model_dir} is a text-to-image model: give --captions FILE --t5 DIR or "
                             "--caption-embeds FILE, not --classes")
        if bool(args.captions) == bool(args.caption_embeds) or (args.captions and not args.t5):
            raise ValueError("a text-to-image model needs exactly one of --captions FILE (with --t5 DIR, a local "
                             "flan-t5-xl) or --caption-embeds FILE")
        rows = (cond.encode_caption_file(args.captions, args.t5) if args.captions
                else cond.load_caption_embeds(args.caption_embeds))
        conditions, per = cond.caption_conditions(config, rows), args.per_caption
        longest = max(p["prompt_embeds"].shape[0] for p in conditions.prompts)
    else:
        if args.captions or args.caption_embeds:
            raise ValueError(f"{model_dir} is a class-to-image model: give --classes (or nothing: all classes), "
                             "not captions")
        ids = parse_classes(args.classes, config) if args.classes else list(range(config.num_classes))
        conditions, per, longest = cond.class_conditions(config, ids), args.per_class, config.cls_token_num
    settings = parse_settings(args.settings, budget=args.budget, policy=args.policy, granularity=args.granularity)
    for s in settings:   # the layout the engine will check, for the longest condition of this run
        s.check(block_size=BLOCK_SIZE, cls_token_num=longest, grid_size=config.grid_size)
    cfg = args.cfg if args.cfg is not None else PIXEL_CFG if pixel else T2I_CFG if config.is_t2i else C2I_CFG
    Guidance().merged({"scale": cfg})
    top_k = args.top_k if args.top_k is not None else (PIXEL_MODEL_TOP_K if pixel else
                                                       T2I_TOP_K if config.is_t2i else C2I_TOP_K)
    plan = SamplePlan(num_conditions=len(conditions), per_condition=per, seed=args.seed,
                      temperature=args.temperature, top_k=top_k, top_p=args.top_p, cfg_scale=cfg,
                      shard_size=args.shard_size)
    vq = load_vq_decoder(model_dir, args.vq)
    if args.image_size_eval is not None and vq is None:
        raise ValueError("--image-size-eval resizes VQ-decoded images: this model has no VQ decoder (--vq)")
    reference, extractor = None, args.feature_extractor or DEFAULT_FEATURE_EXTRACTOR
    if args.ref:
        reference = _check_metrics(args, extractor)
    cuda = torch.cuda.is_available()
    engine_args = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                     ("gpu_memory_utilization", args.gpu_memory_utilization if cuda else None))
                   if v is not None}
    return EvalRun(model_dir=model_dir, config=config, conditions=conditions, settings=settings, plan=plan,
                   out_dir=Path(args.out), dtype=args.dtype or ("bfloat16" if cuda else "float32"), vq=vq,
                   vq_path=str(args.vq) if args.vq else _configured_vq_path(model_dir), eval_size=args.image_size_eval,
                   engine_args=engine_args, reference=reference, feature_extractor=extractor,
                   feature_weights=args.feature_weights, metrics_device=args.metrics_device,
                   metrics_batch_size=args.metrics_batch_size, progress=not args.no_progress)


def _configured_vq_path(model_dir: str) -> str | None:
    from adsa_vllm.images import configured_vq
    path, _ = configured_vq(model_dir)
    return None if path is None else str(path)


def _check_metrics(args, extractor: str):
    """The reference batch's path, once it is read and checked and the metric library, extractor and weights are
    known to exist."""
    from adsa_vllm.eval.metrics import MetricsUnavailable, require_library
    from adsa_vllm.eval.reference import load_reference_batch
    require_library()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise MetricsUnavailable(f"--feature-extractor {extractor!r} is not registered with torch-fidelity; "
                                 f"registered: {', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    if args.feature_weights and not Path(args.feature_weights).is_file():
        raise ValueError(f"--feature-weights {args.feature_weights}: no such file (leave it out and torch-fidelity "
                         "downloads its own weights on first use)")
    return load_reference_batch(args.ref).path   # read in full once to check it; measured from the path later


def run_command(args, parser: argparse.ArgumentParser) -> None:
    from adsa_vllm.cli_common import set_cpu_defaults
    from adsa_vllm.errors import SettingsError
    from adsa_vllm.eval.metrics import MetricsUnavailable
    from adsa_vllm.eval.report import table
    from adsa_vllm.eval.run import execute, identity
    from adsa_vllm.eval.samples import finished_samples
    from adsa_vllm.vq import VQCheckpointError
    set_cpu_defaults()   # first: torch-fidelity imports torchvision, which imports torch._dynamo (reads its env once)
    try:
        run = build_run(args)
        for s in run.settings:   # a resumed folder holding other samples: stop now, not after the engine starts
            finished_samples(run.out_dir, s, identity(run, s))
    except (ValueError, SettingsError, VQCheckpointError, MetricsUnavailable, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    rows, (json_path, md_path) = execute(run)
    print(table(rows), end="")
    print(f"wrote {json_path} and {md_path}")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    ap = argparse.ArgumentParser(prog=prog or "adsa-vllm eval", description=__doc__.split("\n\n")[0],
                                 epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    run_command(ap.parse_args(argv), ap)


__all__ = ["USAGE", "add_arguments", "build_run", "main", "run_command"]
