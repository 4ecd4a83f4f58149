"""`adsa-vllm`: class-conditional images to PNG files, offline or through a running server; `eval` scores them.

    adsa-vllm generate sneaker bag --cfg 2 --budget 0.5 --out pics/       # offline vllm.LLM with ADSA
    adsa-vllm client http://127.0.0.1:8000 sneaker bag --out pics/          # a running `api_server`
    adsa-vllm eval --settings full adsa:topk_v:0.5 --ref ref.npz           # FID / IS / P / R per setting
    adsa-vllm calibrate-heads models/llamagen-XL                          # head classes of head_split
    python -m adsa_vllm.cli generate --model models/llamagen-B 207 360 --vq vq_ds16_c2i.pt

CLASSES are class ids or, for the shipped Fashion-MNIST model, class names ("sneaker", "t-shirt/top", "ankle boot").
Each run writes one PNG per image, `{i:03d}_{label}.png`, plus `grid.png`, into --out. Pixels come from
`adsa_vllm.images.tokens_to_images`: grey levels for the shipped model, the VQ decoder for a model whose
config.json names `vq_ckpt` or when --vq is given.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from adsa_vllm.cli_common import (BLOCK_SIZE, PIXEL_MODEL_TOP_K, VQ_MODEL_TOP_K, class_names,  # noqa: F401
                                  file_label, parse_budget, parse_classes, set_cpu_defaults)


def write_images(images: np.ndarray, labels: list[str], out_dir: Path, nrow: int = 8) -> list[Path]:
    """One PNG per image ({i:03d}_{label}.png) plus grid.png; returns the paths written."""
    from adsa_vllm.images import save_grid, save_png
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, label) in enumerate(zip(images, labels)):
        paths.append(out_dir / f"{i:03d}_{label}.png")
        save_png(img, paths[-1])
    paths.append(out_dir / "grid.png")
    save_grid(images, paths[-1], nrow=nrow)
    return paths


def generate_offline(model_dir: str, prompts: list[list[int]], args, adsa: dict) -> np.ndarray:
    """Token ids [B, grid*grid] of one image per prompt from an offline vllm.LLM (progress bar on)."""
    import torch
    from vllm import LLM
    from adsa_vllm.family import load_config
    from adsa_vllm.guidance.api import image_params
    config = load_config(model_dir)
    guided = args.cfg != 1.0
    extra = {"adsa": adsa, **({"cfg": {"scale": args.cfg}} if guided else {})}
    llm = LLM(model=model_dir, attention_backend="adsa", additional_config=extra, dtype=args.dtype,
              block_size=BLOCK_SIZE, seed=0, max_num_seqs=len(prompts), enforce_eager=not torch.cuda.is_available())
    params = [image_params(config, cfg_scale=args.cfg if guided else None, seed=args.seed + i,
                           temperature=args.temperature, top_k=args.top_k) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    return np.array([list(o.outputs[0].token_ids) for o in outs], dtype=np.int64)


def generate_remote(url: str, model_dir: str, prompts: list[list[int]], args, adsa: dict | None) -> np.ndarray:
    """Token ids of one image per prompt from a running server (requests sent concurrently)."""
    from adsa_vllm.client import generate_via_server
    from adsa_vllm.family import load_config
    print(f"[adsa-vllm] sending {len(prompts)} request(s) to {url} ...", flush=True)
    tokens = generate_via_server(url, prompts=prompts, config=load_config(model_dir), adsa=adsa, seed=args.seed,
                                 temperature=args.temperature, top_k=args.top_k, cfg_scale=args.cfg)
    return np.array(tokens, dtype=np.int64)


def conditions(model_dir: str, config, items: list[str]) -> tuple[list[list[int]], list[str]]:
    """The command line's CLASS arguments -> (prompt ids, file labels): class ids or names, or for a family with
    text prompts (Janus-Pro) one text each."""
    from adsa_vllm.family import family_tool
    to_prompts = family_tool(model_dir, "text_prompts")
    if to_prompts is not None:
        labels = [re.sub(r"[^a-z0-9]+", "-", t.lower()).strip("-")[:40] or "prompt" for t in items]
        return to_prompts(model_dir, items), labels
    class_ids = parse_classes(items, config)
    return [config.prompt(c) for c in class_ids], [file_label(c, config) for c in class_ids]


def _add_common(p: argparse.ArgumentParser, *, server: bool) -> None:
    keep = " (default: the server's)" if server else ""
    p.add_argument("classes", nargs="+", metavar="CLASS",
                   help="class ids or names (shipped model: 'sneaker', ...); a text-prompted model (Janus-Pro) takes "
                        "one text per image")
    p.add_argument("--model", help="model folder (default: the shipped Fashion-MNIST model)"
                   + ("; the client decodes with its config, so name the folder the server serves" if server else ""))
    p.add_argument("--cfg", type=float, default=None if server else 2.0,
                   help="classifier-free guidance scale, 1 = off" + (keep or " (default 2)"))
    p.add_argument("--budget", default=None if server else "0.5",
                   help="ADSA KV budget: fraction of the image tokens, token count, or 'none'" + (keep or " (0.5)"))
    p.add_argument("--policy", default=None,
                   help="random, topk_v, streaming, attention_mass" + (keep or " (default: ADSA's, random)"))
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--top-k", type=int, help=f"sample among the k likeliest tokens (default: {PIXEL_MODEL_TOP_K} for "
                                               f"the shipped model, {VQ_MODEL_TOP_K} otherwise; 0 = all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", default="adsa-images", help="output folder (default ./adsa-images)")
    p.add_argument("--vq", help="LlamaGen VQ checkpoint (vq_ds16_c2i.pt) to decode with (default: config.json's "
                                "vq_ckpt, if any)")
    p.add_argument("--nrow", type=int, default=8, help="images per row of grid.png")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adsa-vllm", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="offline: build a vllm.LLM with ADSA and write PNGs")
    _add_common(gen, server=False)
    gen.add_argument("--dtype", default="float32", help="model dtype (default float32; GPUs: bfloat16 is faster)")
    cli = sub.add_parser("client", help="send the requests to a running server and write PNGs")
    cli.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8000")
    _add_common(cli, server=True)
    from adsa_vllm.eval.command import USAGE, add_arguments
    ev = sub.add_parser("eval", help="sample N images per class under several attention settings and score "
                                     "FID / IS / precision / recall (docs/eval.md)",
                        description="Sample N images per class (or caption) for each attention setting through an "
                                    "offline vllm.LLM, resumably, into ADM-layout npz files; score them against a "
                                    "reference batch; write eval.md / eval.json.",
                        epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ev)
    ev.set_defaults(command_parser=ev)
    from adsa_vllm import calibrate_heads
    cal = sub.add_parser("calibrate-heads", help="measure which heads attend locally / to sinks and write the "
                                                  "head_split classes into the model folder",
                         description=calibrate_heads.__doc__.split("\n\n")[0], epilog=calibrate_heads.USAGE,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrate_heads.add_arguments(cal)
    cal.set_defaults(command_parser=cal)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "eval":
        from adsa_vllm.eval.command import run_command
        return run_command(args, args.command_parser)
    if args.command == "calibrate-heads":
        from adsa_vllm.calibrate_heads import run_command
        run_command(args, args.command_parser)
        return
    from adsa_vllm.config import ADSAConfig
    from adsa_vllm.family import family_tool, load_config
    from adsa_vllm.default_model import default_model_dir
    from adsa_vllm.errors import SettingsError
    from adsa_vllm.guidance.settings import Guidance
    from adsa_vllm.images import is_pixel_token_model, load_vq_decoder, tokens_to_images
    from adsa_vllm.vq import VQCheckpointError

    model_dir = str(args.model or default_model_dir())
    # Everything a user can get wrong is checked here, before the (slow) engine or any request.
    try:
        config = load_config(model_dir)
        prompts, labels = conditions(model_dir, config, args.classes)
        adsa = {}  # client: only what was given, the server's defaults for the rest
        if args.budget is not None:
            adsa["budget"] = parse_budget(args.budget)
        if args.policy is not None:
            adsa["policy"] = args.policy
        settings = ADSAConfig.from_dict(adsa)
        if args.cfg is not None:
            Guidance().merged({"scale": args.cfg})
        if args.command == "generate":  # a server checks the layout against its own block size
            settings.layout(block_size=BLOCK_SIZE, cls_token_num=config.cls_token_num, grid_size=config.grid_size)
        decoder = family_tool(model_dir, "image_decoder")    # a family's own VQ decoder (Janus), else ours
        vq = None if decoder is not None else load_vq_decoder(model_dir, args.vq)
    except (ValueError, SettingsError, VQCheckpointError, OSError) as e:
        ap.exit(2, f"adsa-vllm {args.command}: error: {e}\n")
    if args.top_k is None:
        args.top_k = PIXEL_MODEL_TOP_K if is_pixel_token_model(config) else min(VQ_MODEL_TOP_K, config.codebook_size)
    if args.command == "generate":
        set_cpu_defaults()
        tokens = generate_offline(model_dir, prompts, args, adsa)
    else:
        from adsa_vllm.client import ServerError
        try:
            tokens = generate_remote(args.url, model_dir, prompts, args, adsa or None)
        except ServerError as e:
            ap.exit(1, f"adsa-vllm client: the server refused the request: {e}\n")
        except OSError as e:
            ap.exit(1, f"adsa-vllm client: cannot reach {args.url}: {e}\n")
    images = decoder(model_dir, tokens) if decoder is not None else tokens_to_images(config, tokens, vq=vq)
    if decoder is None and vq is None and not is_pixel_token_model(config):
        print("[adsa-vllm] no VQ decoder configured: wrote token maps (pass --vq vq_ds16_c2i.pt for pictures)")
    paths = write_images(images, labels, Path(args.out), args.nrow)
    h, w = images.shape[1:3]
    print(f"wrote {len(images)} image(s) of {w}x{h} and {paths[-1].name} to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
