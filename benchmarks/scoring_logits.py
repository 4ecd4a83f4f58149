"""Device time of the query-dependent block scoring (AttentionMass.score) on bf16 keys: logits by bmm with float32
output (policy/dense_attention.py `query_key_logits`, today) vs upcasting every key to float32 first (before).

Shapes are one scorer call of worker/query_scoring.py: rows = layers x requests scored that step, C candidate blocks
of 16 tokens, LlamaGen-XL heads (20 x 64). Pure torch (no vLLM): runs on the GPU machine without staging.
  python benchmarks/scoring_logits.py --out benchmarks/results/scoring_logits_h100.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernel_report import save_and_print  # noqa: E402
from adsa_vllm.policy import ScoreInputs  # noqa: E402
from adsa_vllm.policy.attention_mass import AttentionMass  # noqa: E402


def upcast_score(scorer: AttentionMass, x: ScoreInputs) -> torch.Tensor:
    """The same scorer as it ran before: query and keys upcast to float32 first (float32 inputs take
    `query_key_logits`'s einsum branch); the copies are part of what is timed."""
    return scorer.score(dataclasses.replace(x, keys=x.keys.float(), query=x.query.float()))


def median_ms(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[36 * 4, 36 * 16], help="layers x requests per call")
    ap.add_argument("--candidates", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False   # as vLLM leaves it: the upcast einsum runs in full float32
    scorer, results = AttentionMass(), []
    for r in a.rows:
        for c in a.candidates:
            g = torch.Generator(device=dev).manual_seed(0)
            keys = torch.randn(r, c, 16, 20, 64, device=dev, generator=g).to(torch.bfloat16)
            x = ScoreInputs(keys=keys, values=None, valid=torch.rand(r, c, device=dev, generator=g) > 0.1,
                            block_index=torch.arange(c, device=dev).expand(r, c), positions=torch.full((r,), 999,
                            device=dev), query=torch.randn(r, 20, 64, device=dev, generator=g).to(torch.bfloat16),
                            scale=0.125, layer=torch.zeros(r, dtype=torch.long, device=dev))
            new, old = scorer.score(x), upcast_score(scorer, x)
            row = {"rows": r, "candidate_blocks": c, "key_MB": keys.numel() * 2 / 2**20,
                   "max_abs_diff": float((new - old).abs().max()),
                   "same_top_half": float((new.topk(c // 2).indices.sort().values
                                           == old.topk(c // 2).indices.sort().values).all(-1).float().mean()),
                   "upcast_ms": median_ms(lambda: upcast_score(scorer, x)),
                   "bmm_ms": median_ms(lambda: scorer.score(x))}
            row["speedup"] = row["upcast_ms"] / row["bmm_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
    rep = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    save_and_print(rep, a.out, ["rows", "candidate blocks", "keys MB", "upcast ms", "bmm ms", "speedup",
                                "max abs diff"],
                   [[str(x["rows"]), str(x["candidate_blocks"]), f"{x['key_MB']:.0f}", f"{x['upcast_ms']:.3f}",
                     f"{x['bmm_ms']:.3f}", f"{x['speedup']:.2f}x", f"{x['max_abs_diff']:.1e}"] for x in results])


if __name__ == "__main__":
    main()
