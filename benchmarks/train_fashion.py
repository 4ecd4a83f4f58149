"""Train the reference LlamaGen on Fashion-MNIST pixel tokens, so ADSA's quality cost can be measured (issue #5).

Model: `adsa_vllm.reference.model.LlamaGenReference` (the official architecture), class-conditional with 10 classes
+ the null class, grid 28 (784 pixel tokens), codebook K = 16 grey levels (adsa_vllm/data/fashion_mnist.py).
Training: teacher-forced next-token cross-entropy on the 60k train images, the label replaced by the null class
with probability 0.1 (what classifier-free guidance needs), AdamW, linear warm-up then cosine decay over the *time*
budget (--minutes; --max-steps fixes the schedule by steps instead), bf16 autocast on CUDA, float32 on CPU.
Output: a model folder (config.json + float16 model.safetensors, must stay <= 12 MB so it can ship in the package)
plus train_metrics.json in it: train loss and test bits/token (teacher-forced NLL / ln 2 over all 784 tokens of the
10k test images, computed with the saved float16 weights in float32).

  # GPU (H100, <= 10 min): the default size, 5.3M parameters, 10.5 MB in float16. Measured: 1.14M tokens/s
  # (batch 128, bf16, no compile), so 7.5 min = 10.9 epochs -> test 0.8652 bits/token (log2 K = 4).
  python benchmarks/train_fashion.py --device cuda --minutes 9 --out /tmp/fashion-llamagen
  # The shipped default model is that run's config.json + model.safetensors, copied into adsa_vllm/assets/
  # (its metrics: benchmarks/results/fashion_train_h100_metrics.json).
  # A GPU machine without apt: copy /usr/share/datasets/fashion-mnist into the machine and set
  # ADSA_FASHION_MNIST_DIR to it.
  # CPU smoke run (a tiny model)
  python benchmarks/train_fashion.py --device cpu --minutes 3 --dim 64 --n-layer 2 --n-head 2 --out /tmp/fm-smoke
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adsa_vllm.llamagen.convert import load_reference, save_model_folder  # noqa: E402
from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.llamagen.config import LlamaGenConfig  # noqa: E402
from adsa_vllm.reference.model import LlamaGenReference  # noqa: E402

MAX_FOLDER_BYTES = 12 * 10**6   # the folder ships in the package (adsa_vllm/assets/): keep the wheel small
LN2 = math.log(2.0)


def make_config(a) -> LlamaGenConfig:
    # Default ffn: LlamaGen's 8/3*dim rounded up to a multiple of 256 gives 768 for dim 256, i.e. 6.8M parameters
    # = 13.6 MB in float16 at 8 layers, over the 12 MB cap; ffn_dim_multiplier 0.75 gives 512 (5.3M, 10.6 MB) and
    # keeps 8 layers (depth matters for ADSA: scores are summed over layers). head_dim = dim / n_head must be one
    # the vLLM CPU attention kernel accepts (32, 64, 80, 96, 112, 128, ...).
    return LlamaGenConfig(dim=a.dim, n_layer=a.n_layer, n_head=a.n_head, ffn_dim_multiplier=a.ffn_mult,
                          **fm.llamagen_config_kwargs())


def param_bytes(config: LlamaGenConfig, bytes_per_param: int = 2) -> int:
    return sum(p.numel() for p in LlamaGenReference(config).parameters()) * bytes_per_param


@torch.no_grad()
def bits_per_token(model: LlamaGenReference, tokens: torch.Tensor, labels: torch.Tensor, batch: int = 500,
                   autocast: bool = False) -> float:
    """Teacher-forced NLL / ln 2 averaged over every token of every image (conditional on the true label).
    forward_full(idx, cond) returns [B, n + 1, V] where entry i predicts image token i; feeding tokens[:, :-1]
    gives exactly the 784 predictions of the 784 tokens."""
    dev = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        t = tokens[i:i + batch].to(dev, torch.int64)
        c = labels[i:i + batch].to(dev, torch.int64)
        with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            logits = model.forward_full(t[:, :-1], c)
        total += F.cross_entropy(logits.float().flatten(0, 1), t.flatten(), reduction="sum").item()
        count += t.numel()
    return total / count / LN2


def lr_at(frac: float, step: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps times a cosine over the budget fraction `frac` (time or steps). A product,
    not a hand-over, so the LR stays continuous when the warm-up ends late in a short (CPU) run."""
    frac = min(max(frac, 0.0), 1.0)
    cosine = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return lr * min(1.0, (step + 1) / warmup) * cosine


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write (config.json + model.safetensors)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=9.0, help="training time budget (evaluation and saving come "
                    "on top: about 10-20 s on a GPU)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop (and schedule the LR) by steps instead")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--ffn-mult", type=float, default=0.75, help="LlamaGen ffn_dim_multiplier (see make_config)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    ap.add_argument("--lr", type=float, default=None, help="peak LR (default 1e-3 on CUDA, 2e-3 on CPU)")
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--label-dropout", type=float, default=0.1, help="probability of training on the null class")
    ap.add_argument("--eval-limit", type=int, default=None, help="test images for the final bits/token (all 10k)")
    ap.add_argument("--log-every", type=float, default=20.0, help="seconds between progress lines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA)")
    a = ap.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batch = a.batch_size or (128 if cuda else 32)
    lr = a.lr or (1e-3 if cuda else 2e-3)
    config = make_config(a)
    size = param_bytes(config)
    if size > MAX_FOLDER_BYTES:  # fail before training, not after ten minutes
        sys.exit(f"model would take {size / 1e6:.1f} MB in float16 > {MAX_FOLDER_BYTES / 1e6:.0f} MB; shrink "
                 "--dim/--n-layer/--ffn-mult")

    torch.manual_seed(a.seed)
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("test")
    # uint8 on the device (47 MB for the train split), widened to int64 per batch.
    train_tok = torch.as_tensor(fm.tokenize(xtr).astype(np.uint8)).to(dev)
    train_lab = torch.as_tensor(ytr.astype(np.int64)).to(dev)
    test_tok = torch.as_tensor(fm.tokenize(xte))
    test_lab = torch.as_tensor(yte.astype(np.int64))

    model = LlamaGenReference(config).init_random_(a.seed, 0.02).to(dev).train()
    nparams = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95),
                            fused=cuda)
    fwd = torch.compile(model.forward_full) if a.compile else model.forward_full
    print(f"LlamaGen dim={config.dim} layers={config.n_layer} heads={config.n_head} head_dim={config.head_dim} "
          f"ffn={config.ffn_hidden} codebook={config.codebook_size}: {nparams / 1e6:.2f}M params "
          f"({size / 1e6:.1f} MB float16); device {dev}, batch {batch}, lr {lr}", flush=True)

    gen = torch.Generator(device=dev).manual_seed(a.seed)
    budget = a.minutes * 60.0
    t0 = last_log = time.time()
    step, epoch, seen, ema_loss, history = 0, 0, 0, None, []
    perm = torch.randperm(len(train_tok), device=dev, generator=gen)
    cursor = 0
    while True:
        elapsed = time.time() - t0
        if (a.max_steps is not None and step >= a.max_steps) or (a.max_steps is None and elapsed >= budget):
            break
        frac = step / a.max_steps if a.max_steps else elapsed / budget
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, step, a.warmup, lr, a.min_lr_ratio)
        if cursor + batch > len(perm):
            perm, cursor, epoch = torch.randperm(len(train_tok), device=dev, generator=gen), 0, epoch + 1
        idx = perm[cursor:cursor + batch]
        cursor += batch
        tok = train_tok[idx].long()
        # Classifier-free guidance needs an unconditional model: the null class (id num_classes) replaces the
        # label with probability label_dropout.
        drop = torch.rand(batch, device=dev, generator=gen) < a.label_dropout
        cond = torch.where(drop, torch.full_like(train_lab[idx], config.num_classes), train_lab[idx])
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            logits = fwd(tok[:, :-1], cond)           # [B, 784, K]: entry i predicts token i
        loss = F.cross_entropy(logits.float().flatten(0, 1), tok.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        seen += batch
        if step % 10 == 0 or step <= 2:
            lv = loss.item()
            ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
        now = time.time()
        if now - last_log >= a.log_every:
            last_log = now
            history.append({"step": step, "seconds": round(now - t0, 1), "train_bits": ema_loss / LN2})
            print(f"step {step} epoch {epoch} ({seen / len(train_tok):.2f} epochs seen) {now - t0:.0f}s "
                  f"lr {opt.param_groups[0]['lr']:.2e} train loss {ema_loss:.4f} nats = "
                  f"{ema_loss / LN2:.4f} bits/token, {seen * 784 / (now - t0):.0f} tok/s", flush=True)
    train_seconds = time.time() - t0
    final_loss = loss.item()

    out = save_model_folder(model.eval(), config, a.out, dtype="float16")
    if cuda:  # evaluate in full float32 (TF32 matmuls would blur the bits/token in the 3rd decimal)
        torch.backends.cuda.matmul.allow_tf32 = False
    folder_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    # Evaluate what was saved: the float16 weights, computed in float32 (what quality.py loads).
    saved = load_reference(out, dtype=torch.float32, device=dev)
    n_eval = a.eval_limit or len(test_tok)
    t1 = time.time()
    test_bits = bits_per_token(saved, test_tok[:n_eval], test_lab[:n_eval], batch=500 if cuda else 50)
    null_bits = bits_per_token(saved, test_tok[:n_eval], torch.full_like(test_lab[:n_eval], config.num_classes),
                               batch=500 if cuda else 50)
    metrics = {"test_bits_per_token": test_bits, "test_bits_per_token_null_class": null_bits,
               "log2_codebook": math.log2(config.codebook_size), "test_images": n_eval,
               "final_train_loss_nats": final_loss, "final_train_bits_per_token": final_loss / LN2,
               "steps": step, "epochs_seen": seen / len(train_tok), "batch_size": batch, "peak_lr": lr,
               "train_seconds": train_seconds, "eval_seconds": time.time() - t1, "device": str(dev),
               "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu", "params": nparams,
               "folder_bytes": folder_bytes, "config": config.to_hf_dict()["llamagen"],
               "label_dropout": a.label_dropout, "seed": a.seed, "history": history}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "config")}, indent=2))
    if folder_bytes > MAX_FOLDER_BYTES:
        sys.exit(f"{out} holds {folder_bytes / 1e6:.1f} MB > {MAX_FOLDER_BYTES / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
