"""Under CFG with ADSA, should a pair share one eviction decision or should each half decide alone? (issue #4)

The vLLM path shares (a pair is one sequence: one block table, scores summed over both halves' heads). The
alternative, "separate", is what two independent requests would do. Both are run by the exact reference
(`adsa_vllm.reference.generate.score_tokens`, cfg_selection="shared" | "separate"), teacher-forced on real
Fashion-MNIST test images with the trained model, and compared with full-attention CFG on the guided
distribution u + s (c - u) at every image token:

  * bits/token of the real test image under the guided distribution (lower = closer to the data), and
  * KL(full-attention guided || ADSA guided) in bits per token (lower = closer to what full attention would do).

  python benchmarks/cfg_selection.py [MODEL_DIR] --images 256 --budgets 0.25 0.5 --out /tmp/cfg_selection.json

With --granularity token (issue 12) the selection is per layer and KV head: "shared" keeps, in both halves, each
head's best tokens by the sum of the two halves' scores of that head; "separate" lets each half's heads choose.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adsa_vllm.config import ADSAConfig  # noqa: E402
from adsa_vllm.llamagen.convert import load_reference  # noqa: E402
from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.reference.generate import score_tokens  # noqa: E402


def measure(model, classes, tokens, *, scale, budgets, policy, granularity="block") -> dict:
    rows = {}
    t0 = time.perf_counter()
    full = score_tokens(model, classes, tokens, cfg_scale=scale, force_cfg=True)
    full_bits = _bits(full, tokens)
    rows["full"] = {"bits_per_token": full_bits, "seconds": time.perf_counter() - t0}
    print(f"full: {full_bits:.4f} bits/token", flush=True)
    for budget in budgets:
        for sel in ("shared", "separate"):
            t0 = time.perf_counter()
            lp = score_tokens(model, classes, tokens, cfg_scale=scale, force_cfg=True, cfg_selection=sel,
                              adsa=ADSAConfig(budget=budget, policy=policy, granularity=granularity))
            kl = (full.exp() * (full - lp)).sum(-1).mean().item() / math.log(2)
            rows[f"{sel}@{budget}"] = {"selection": sel, "budget": budget, "bits_per_token": _bits(lp, tokens),
                                       "kl_bits_per_token": kl, "seconds": time.perf_counter() - t0}
            r = rows[f"{sel}@{budget}"]
            print(f"{sel} @ {budget}: {r['bits_per_token']:.4f} bits/token (+{r['bits_per_token'] - full_bits:.4f}),"
                  f" KL to full {kl:.5f} bits/token", flush=True)
    return rows


def _bits(logprobs: torch.Tensor, tokens: torch.Tensor) -> float:
    return -logprobs.gather(-1, tokens[..., None]).mean().item() / math.log(2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a Fashion-MNIST LlamaGen folder (default: the embedded default model)", nargs="?")
    ap.add_argument("--images", type=int, default=32, help="test images (the first N of the official test split)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--policy", default="topk_v")
    ap.add_argument("--granularity", choices=("block", "token"), default="block")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.model is None:
        from adsa_vllm.default_model import default_model_dir
        a.model = default_model_dir()
    torch.set_grad_enabled(False)
    model = load_reference(a.model, dtype=torch.float32, device=a.device)
    images, labels = fm.load("test")
    tokens = torch.from_numpy(fm.tokenize(images[: a.images])).to(a.device)
    classes = [int(c) for c in labels[: a.images]]
    rows = measure(model, classes, tokens, scale=a.cfg_scale, budgets=a.budgets, policy=a.policy,
                   granularity=a.granularity)
    report = {"model": str(a.model), "images": a.images, "cfg_scale": a.cfg_scale, "policy": a.policy,
              "granularity": a.granularity,
              "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "results": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
        Path(a.out).with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(rep: dict) -> str:
    full = rep["results"]["full"]["bits_per_token"]
    lines = [f"CFG scale {rep['cfg_scale']}, ADSA {rep['policy']} ({rep.get('granularity', 'block')} granularity), "
             f"{rep['images']} Fashion-MNIST test images, "
             f"teacher-forced, exact reference ({rep['device']}).", "",
             "| pair selection | budget | guided bits/token | vs full | KL(full ‖ ADSA) bits/token |",
             "|---|---|---|---|---|", f"| full attention | - | {full:.4f} | - | - |"]
    for r in rep["results"].values():
        if "selection" in r:
            lines.append(f"| {r['selection']} | {r['budget']:.0%} | {r['bits_per_token']:.4f} | "
                         f"{r['bits_per_token'] - full:+.4f} | {r['kl_bits_per_token']:.5f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
