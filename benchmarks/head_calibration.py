"""The shipped Fashion-MNIST model's head classes (adsa_vllm/assets/head_classes.json), measured on real images.

`adsa-vllm calibrate-heads MODEL_DIR` measures any LlamaGen c2i model on its own samples; for the shipped model this
script measures on the first N Fashion-MNIST *training* images instead (real images, not the test images the quality
benchmark scores), with the same measurement (adsa_vllm/llamagen/head_calibration.py) and rule
(`adsa_vllm.policy.head_split.classify_heads`). Writes JSON: the per-head masses, the rule, and `heads`, the string
`adsa.heads` takes.

  python benchmarks/head_calibration.py --images 16 --out adsa_vllm/assets/head_classes.json   # the shipped file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.default_model import SHIPPED_DIR  # noqa: E402
from adsa_vllm.llamagen.head_calibration import measure  # noqa: E402
from adsa_vllm.policy.head_split import classify_heads  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(SHIPPED_DIR))
    ap.add_argument("--images", type=int, default=16, help="training images (the first N)")
    ap.add_argument("--local-share", type=float, default=0.5, help="window mass at which a head counts as local")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    x, y = fm.load("train")
    m = measure(a.model, device="cpu", batch=a.images, cond=torch.tensor(y[:a.images], dtype=torch.long),
                tokens=torch.tensor(fm.tokenize(x[:a.images]), dtype=torch.long))
    result = {"model": str(a.model), "images": f"the first {a.images} Fashion-MNIST training images",
              "prefix_tokens": m["prefix_tokens"], "local_tokens": m["local_tokens"], "local_share": a.local_share,
              "window_mass": m["window_mass"], "prefix_mass": m["prefix_mass"],
              "heads": classify_heads(m["window_mass"], a.local_share)}
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
