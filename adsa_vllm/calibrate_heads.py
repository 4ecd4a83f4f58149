"""`adsa-vllm calibrate-heads MODEL_DIR`: measure which attention heads attend locally and which to sinks, and write
the classes into the model folder, where an engine with `"policy": "head_split"` reads them (engine/config_hook.py).

The measurement is the model family's (`head_calibration` in adsa_vllm/family.py; LlamaGen: full attention on the
model's own samples, adsa_vllm/llamagen/head_calibration.py); the rule is the policy's (`classify_heads`: a head is
local when at least --local-share of its attention falls inside the local window). No data is needed, so an
official checkpoint calibrates itself once after conversion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

USAGE = """examples:
  adsa-vllm calibrate-heads models/llamagen-XL                     # writes models/llamagen-XL/head_classes.json
  adsa-vllm calibrate-heads models/llamagen-XL --out heads.json    # elsewhere: pass its "heads" as adsa.heads
"""


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="model folder (the shipped model's classes are in the package, measured on "
                                  "Fashion-MNIST training images: benchmarks/head_calibration.py)")
    ap.add_argument("--images", type=int, default=16, help="samples to measure on (default 16)")
    ap.add_argument("--local-share", type=float, default=0.5,
                    help="window share of a head's attention from which it counts as local (default 0.5)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON to write (default: MODEL/head_classes.json, which the "
                                                "engine reads)")


def run_command(args, parser: argparse.ArgumentParser) -> dict:
    from adsa_vllm.family import family_tool
    from adsa_vllm.policy.head_split import HEAD_CLASSES_FILE, classify_heads
    model_dir = str(args.model)
    try:
        classify_heads([], args.local_share)           # a bad share fails before the (slow) measurement
        measure = family_tool(model_dir, "head_calibration")
        if measure is None:
            raise ValueError(f"{model_dir}: this model family has no head calibration; set adsa.heads by hand (one "
                             "L or S per head, layers split by '/') or leave it unset (every head a sink head)")
        result = measure(model_dir, images=args.images, device=args.device, seed=args.seed)
        heads = classify_heads(result["window_mass"], args.local_share)
    except (ValueError, OSError) as e:               # OSError: a folder without its weights
        parser.error(str(e))
    result.update(local_share=args.local_share, heads=heads)
    out = Path(args.out) if args.out else Path(model_dir) / HEAD_CLASSES_FILE
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[adsa-vllm] {heads.count('L')} of {len(heads.replace('/', ''))} heads local (window share >= "
          f"{args.local_share}), per layer: {heads}\n[adsa-vllm] wrote {out}"
          + ("" if args.out else " (engines on this folder default head_split to these classes)"), flush=True)
    return result
