"""ADSA's quality cost on a LlamaGen trained on real images (Fashion-MNIST pixel tokens, issue #5).

(a) Teacher-forced bits/token on test images for full attention and every policy (topk_v keep=diverse,
    topk_v keep=similar, streaming, random, attention_mass) at budgets 0.10/0.25/0.50/0.75 of the image tokens.
    Every policy keeps the same number of blocks at a budget; budgets below prefix + local window are invalid
    (ADSAConfigError) and reported as skipped with the reason.
(b) CFG samples for full attention and each policy at each --sample-budgets (0.5): FID between classifier features
    (adsa_vllm.data.classifier) of the samples and of the test images, and classifier accuracy on the intended class.
(c) <out-dir>/<tag>.json, <tag>.md (tables), <tag>_bits.png (bits/token vs budget, one line per policy) and
    <tag>_samples.png (rows: full attention then each policy, columns: classes; one <tag>_samples_<budget>.png per
    sample budget when there are several).

Selection code. The reference `score_tokens` / `generate` drive one `SequenceTracker` per row in Python at every
step: exact, but ~10k rows x 784 steps x 16 configurations is hours even on an H100. This benchmark runs the same
decisions batched, through the library's `score_tokens_batched` and `generate(batched=True)`
(adsa_vllm/reference/batched.py, on `adsa_vllm.policy.LockstepTrackers`; tests/test_lockstep.py and
tests/test_fashion.py check them against the trackers). `--check-exact N` repeats that check on N test images of
the model being measured (reported in the JSON), and `--exact` uses the per-row trackers for everything (slow).
Files: quality_measure.py (the measurements), quality_report.py (tables, plots, --merge), this one (the CLI).

  # GPU: the committed run (benchmarks/results/fashion_quality_h200.*), on one H200 in 387 s: full attention 6 s,
  # 10-17 s per ADSA configuration for the 10k test images (float32), 12-13 s per row of 1000 CFG samples (bf16;
  # the first row 63 s, warm-up included), exact check 46 s. Default model: the shipped one (adsa_vllm/assets/).
  ADSA_FASHION_MNIST_DIR=... python benchmarks/quality.py --device cuda --tag fashion_quality_h200
  # Every policy at 10-50%, both granularities, samples at each budget, as jobs in 12 processes on one GPU (the
  # measurements are launch-bound: one process leaves the device mostly idle); rerun the same command to finish
  # the jobs a time limit stopped (benchmarks/quality_workers.py)
  python benchmarks/quality.py --device cuda --budgets 0.1 0.17 0.25 0.5 --sample-budgets 0.1 0.17 0.25 0.5 \
      --policies random streaming topk_v_diverse attention_mass row_anchored head_split --granularities block token \
      --batch 400 --gen-batch 500 --workers 12 --tag fashion_frontier_gpu
  # A run that may not fit one time-limited call: measure in parts, then merge (tables and plots of the union)
  python benchmarks/quality.py --parts bits --tag q_bits && python benchmarks/quality.py --parts samples --tag q_s
  python benchmarks/quality.py --merge benchmarks/results/q_bits.json benchmarks/results/q_s.json --tag q
  # Token- vs block-level selection (issue 12): rows '<policy>/token' with their paired delta vs the block row,
  # and a sample row per policy and granularity (a CFG pair shares its selection in both modes)
  python benchmarks/quality.py --device cpu --limit 32 --budgets 0.25 0.5 --granularities block token --parts bits
  python benchmarks/quality.py --device cuda --budgets 0.25 0.5 0.75 --granularities block token --tag q_gran
  # Budget split (issue 24): local window of 1..6 image rows + 1 token (rows '<policy>@L<n>'), prefix of the
  # condition + 0..1 rows ('@P<n>'), each with its paired delta vs the default split; the rest goes to top-k
  python benchmarks/quality.py --device cpu --limit 64 --parts bits --budgets 0.17 0.25 --local-rows 1 2 3 4 6
  python benchmarks/quality.py --device cpu --limit 64 --parts bits --budgets 0.17 0.25 --prefix-rows 0 1 --local-rows 1
  # CPU smoke run (~2 min on 2 cores)
  python benchmarks/quality.py --device cpu --limit 64 --policies random --samples-per-policy 10 --out-dir /tmp/q
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from adsa_vllm.llamagen.convert import load_reference  # noqa: E402
from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from quality_measure import (BUDGETS, POLICIES, adsa_config, check_layout, exact_check,  # noqa: E402
                             parse_row_label, row_label, sample_tokens, token_nll,
                             default_split_row, split_label)
from quality_report import markdown, merge, sample_key, write_outputs  # noqa: E402


def paired(x: torch.Tensor, y: torch.Tensor, name: str) -> dict:
    """Mean per-image difference x - y and its paired standard error, as delta_vs_<name> / delta_se[_<name>]."""
    d = x - y
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return {f"delta_vs_{name}": float(d.mean()), "delta_se" if name == "full" else f"delta_se_{name}": se}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, defaults resolved (model, batches, sample rows) and `splits`: the policy labels measured
    (with their budget splits)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None,
                    help="model folder (config.json + model.safetensors; default: the shipped Fashion-MNIST model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="compute dtype of bits/token; float32 so that bf16 rounding neither decides near-ties "
                    "between blocks nor blurs deltas of a few thousandths of a bit")
    ap.add_argument("--gen-dtype", choices=("float32", "bfloat16"), default=None,
                    help="compute dtype of sampling (default bfloat16 on CUDA, as vLLM serves it: half the cache "
                    "traffic; float32 on CPU)")
    ap.add_argument("--parts", nargs="+", choices=("bits", "samples"), default=["bits", "samples"],
                    help="what to measure (split a long run in two, then --merge the JSONs)")
    ap.add_argument("--limit", type=int, default=10000, help="test images for bits/token")
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    ap.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES),
                    help="none: full attention only (e.g. to choose --cfg-scale)")
    ap.add_argument("--sample-rows", nargs="+", default=None,
                    choices=["full"] + [row_label(p, g) for p in POLICIES for g in ("block", "token")],
                    help="rows of samples (default: full attention, then every --policies at every --granularities; "
                         "'<policy>/token' is token granularity)")
    ap.add_argument("--granularities", nargs="+", choices=("block", "token"), default=["block"],
                    help="bits/token only: selection unit(s); token = per (layer, KV head) tokens, rows "
                    "'<policy>/token', each with its paired delta vs the same policy's block row")
    ap.add_argument("--local-rows", type=int, nargs="+", default=None,
                    help="bits/token and the exact check: local window of N image rows + 1 token (default 1), rows "
                    "'<policy>@L<N>', each with its paired delta vs the same policy's default split if measured")
    ap.add_argument("--prefix-rows", type=int, nargs="+", default=None,
                    help="as --local-rows, for the prefix: the condition + N image rows (default 1), rows "
                    "'<policy>@P<N>' ('@P<N>L<M>' with both)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="rows per scoring batch (default 2000 CUDA, 64 CPU)")
    ap.add_argument("--samples-per-policy", type=int, default=1000)
    ap.add_argument("--sample-budgets", "--sample-budget", dest="sample_budgets", type=float, nargs="+",
                    default=[0.5], help="budgets of the sample rows (every sample row at each); the exact check "
                    "runs at the first")
    ap.add_argument("--gen-batch", type=int, default=None, help="samples per generation batch (default 1000 CUDA, "
                    "64 CPU; CFG doubles the rows)")
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=8, help="of the 16 grey levels")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-exact", type=int, default=4, help="test images compared against the reference "
                    "trackers (score_tokens) at the first sample budget, after the other parts; 0 = skip")
    ap.add_argument("--exact", action="store_true", help="use the reference score_tokens/generate (slow)")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint (default adsa_vllm/assets/...)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--tag", default="fashion_quality")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge these reports into <out-dir>/<tag>.* and exit")
    ap.add_argument("--workers", type=int, default=1, help="run the measurements as jobs in this many processes "
                    "at once (one device), then merge (benchmarks/quality_workers.py)")
    a = ap.parse_args(argv)
    if a.merge:
        return a
    if a.model is None:
        from adsa_vllm.default_model import default_model_dir
        a.model = str(default_model_dir())
    cuda = a.device.startswith("cuda")
    a.batch = a.batch or (2000 if cuda else 64)
    a.gen_batch = a.gen_batch or (1000 if cuda else 64)
    a.gen_dtype = a.gen_dtype or ("bfloat16" if cuda else "float32")
    a.sample_rows = a.sample_rows or ["full"] + [row_label(p, g) for p in a.policies for g in a.granularities]
    a.splits = [split_label(p, pr, lr) for p in a.policies for pr in a.prefix_rows or [None]
                for lr in a.local_rows or [None]]
    return a


def main(argv=None):
    a = parse_args(argv)
    out_dir = Path(a.out_dir)
    if a.merge:
        rep = merge(a.merge, out_dir, a.tag)
        print(markdown(rep))
        print(f"merged {len(a.merge)} reports into {out_dir}/{a.tag}.*")
        return
    if a.workers > 1:
        import quality_workers
        quality_workers.run(a, sys.argv[1:] if argv is None else list(argv))
        return
    splits, cuda = a.splits, a.device.startswith("cuda")
    if cuda:  # full float32 matmuls: TF32 would add ~1e-3 relative noise to every score
        torch.backends.cuda.matmul.allow_tf32 = False
    from adsa_vllm.data import classifier as clf

    t_start = time.time()
    model = load_reference(a.model, dtype=getattr(torch, a.dtype), device=a.device)
    config = model.config
    if (config.grid_size, config.codebook_size) != (fm.GRID_SIZE, fm.NUM_LEVELS):
        sys.exit(f"{a.model}: grid {config.grid_size} / codebook {config.codebook_size} is not a Fashion-MNIST model "
                 f"(grid {fm.GRID_SIZE}, K {fm.NUM_LEVELS})")
    xte, yte = fm.load("test")
    tokens = torch.as_tensor(fm.tokenize(xte[:a.limit]))
    labels = yte[:a.limit].astype(np.int64)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu"
    rep = {"model": {"folder": str(a.model), **config.to_hf_dict()["llamagen"]}, "device": dev_name,
           "args": vars(a), "timings_s": {}}
    samples, class_ids = {}, np.arange(a.samples_per_policy) % fm.NUM_CLASSES

    def save():
        rep["timings_s"]["total"] = time.time() - t_start
        write_outputs(rep, samples, class_ids, out_dir, a.tag)

    # (a) bits/token
    if "bits" in a.parts:
        kw = dict(block_size=a.block_size, batch=a.batch, exact=a.exact)
        t0 = time.time()
        full = token_nll(model, labels, tokens, None, **kw)
        bits = rep["bits"] = {"images": len(tokens), "full": {"bits_per_token": float(full.mean()),
                                                              "seconds": time.time() - t0}, "policies": {}}
        print(f"full attention: {full.mean():.4f} bits/token ({time.time() - t0:.1f} s)", flush=True)
        per_image = {}   # (row, budget) -> per-image bits, for the token-vs-block and split-vs-default pairings
        for pol, g in [(p, g) for p in splits for g in a.granularities]:
            lab = row_label(pol, g)
            bits["policies"][lab] = {}
            for b in a.budgets:
                adsa = adsa_config(pol, b, g, config)
                why = check_layout(adsa, config, a.block_size)
                if why is not None:
                    bits["policies"][lab][str(b)] = {"skipped": why}
                    continue
                t1 = time.time()
                per = per_image[lab, b] = token_nll(model, labels, tokens, adsa, **kw)
                lay = adsa.layout(block_size=a.block_size, cls_token_num=config.cls_token_num,
                                  grid_size=config.grid_size)
                row = bits["policies"][lab][str(b)] = {
                    "bits_per_token": float(per.mean()), **paired(per, full, "full"),
                    "kept_blocks": lay.budget_blocks, "topk_blocks": lay.topk_blocks,
                    "token_edges": lay.token_edges, "seconds": time.time() - t1}
                if g != "block" and (pol, b) in per_image:
                    row.update(paired(per, per_image[pol, b], "block"))
                print(f"{lab} @ {b}: {per.mean():.4f} bits/token ({row['delta_vs_full']:+.4f}) "
                      f"({time.time() - t1:.1f} s)", flush=True)
                rep["timings_s"]["bits"] = time.time() - t0
                save()
        defaults = {}   # (row without its split, budget) -> per-image bits with the default split
        for (lab, b), per in per_image.items():
            if (d := default_split_row(lab))[1]:
                defaults.setdefault((d[0], b), per)
        for (lab, b), per in per_image.items():   # every other split vs its policy's default, same images
            if not (d := default_split_row(lab))[1] and (d[0], b) in defaults:
                bits["policies"][lab][str(b)].update(paired(per, defaults[d[0], b], "default"))
        rep["timings_s"]["bits"] = time.time() - t0
        save()

    # (b) samples
    if "samples" in a.parts and a.samples_per_policy > 0:
        t0 = time.time()
        net = clf.load(a.classifier or clf.DEFAULT_PATH, device=a.device)
        real_q = clf.quantize(xte)             # the generator's domain: K-level grey images
        ref_feat = clf.features(real_q, net)
        xtr, ytr = fm.load("train")
        pick = np.random.default_rng(a.seed).choice(len(xtr), a.samples_per_policy, replace=False)
        real_tr = clf.quantize(xtr[pick])
        floor = {"fid": clf.fid(clf.features(real_tr, net), ref_feat),
                 "class_accuracy": float((clf.predict(real_tr, net) == ytr[pick]).mean())}
        results = {}
        rep["samples"] = {"per_policy": a.samples_per_policy, "reference": f"{len(xte)} test images (K-level)",
                          "real_floor": floor, "results": results}
        gen_model = model if a.gen_dtype == a.dtype else load_reference(a.model, dtype=getattr(torch, a.gen_dtype),
                                                                         device=a.device)
        # results["full"] = metrics; results[<row>][<budget>] = metrics, as bits["policies"] (quality_report)
        for lab, b in [(lab, b) for lab in a.sample_rows
                       for b in ([None] if lab == "full" else a.sample_budgets)]:
            pol, g = parse_row_label(lab)
            adsa = None if b is None else adsa_config(pol, b, g, config)
            if adsa is not None and (why := check_layout(adsa, config, a.block_size)):
                results.setdefault(lab, {})[str(b)] = {"skipped": why}
                continue
            t1 = time.time()
            toks = sample_tokens(gen_model, [int(c) for c in class_ids], adsa, a, a.exact)
            imgs = fm.detokenize(toks)
            samples[sample_key(lab, b)] = imgs
            v = {"fid": clf.fid(clf.features(imgs, net), ref_feat),
                 "class_accuracy": float((clf.predict(imgs, net) == class_ids).mean()), "seconds": time.time() - t1}
            if b is None:
                results[lab] = v
            else:
                results.setdefault(lab, {})[str(b)] = v
            print(f"samples {sample_key(lab, b)}: FID {v['fid']:.3f}, class acc {v['class_accuracy']:.3f} "
                  f"({time.time() - t1:.1f} s)", flush=True)
            rep["timings_s"]["samples"] = time.time() - t0
            save()

    # cross-check of the batched path against the per-row reference trackers (last: the slowest per image)
    if a.check_exact and not a.exact:
        t0 = time.time()
        n = min(a.check_exact, len(tokens))
        rep["exact_check"] = {"images": n, "budget": a.sample_budgets[0],
                              **exact_check(model, labels[:n], tokens[:n], a.block_size, splits,
                                            a.sample_budgets[0])}
        rep["timings_s"]["exact_check"] = time.time() - t0
        print("exact check:", json.dumps(rep["exact_check"]), flush=True)

    save()
    print((out_dir / f"{a.tag}.md").read_text())
    print(f"wrote {out_dir}/{a.tag}.{{json,md}} (+ png/npz of what ran) in {rep['timings_s']['total']:.0f} s")


if __name__ == "__main__":
    main()
