"""Train the Fashion-MNIST classifier (adsa_vllm.data.classifier) that FID and class accuracy of samples use.

The model, its features / predictions and the FID live in the library (adsa_vllm/data/classifier.py); this script
trains the net on the 60k train split on CPU in a few minutes and writes the checkpoint, committed as
adsa_vllm/assets/fashion_classifier.pt.

    python benchmarks/classifier.py --epochs 6          # train, report test accuracy, save the checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adsa_vllm.data import fashion_mnist as fm  # noqa: E402
from adsa_vllm.data.classifier import DEFAULT_PATH, FashionCNN, predict, quantize, to_input  # noqa: E402


def train(epochs: int, batch: int, lr: float, seed: int, threads: int | None) -> tuple[FashionCNN, dict]:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    xtr, ytr = fm.load("train")
    xte, yte = fm.load("test")
    xq = to_input(quantize(xtr))
    y = torch.as_tensor(ytr.astype(np.int64))
    net = FashionCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(xq) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    t0, step = time.time(), 0
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(xq), generator=gen)
        for i in range(0, len(xq) - batch + 1, batch):
            idx = perm[i:i + batch]
            xb = xq[idx]
            # Cheap augmentation: horizontal flips keep every class (clothes are left-right symmetric) and +-2 px
            # shifts make the features tolerant to the generator's small misplacements.
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            xb = torch.roll(xb, (dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        net.eval()
        acc_q = float((predict(quantize(xte), net) == yte).mean())
        print(f"epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, test acc (K-level images) {acc_q:.4f}, "
              f"{time.time() - t0:.0f} s", flush=True)
    net.eval()
    metrics = {"test_accuracy_quantized": float((predict(quantize(xte), net) == yte).mean()),
               "test_accuracy_raw": float((predict(xte, net) == yte).mean()),
               "epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "train_seconds": time.time() - t0,
               "params": sum(p.numel() for p in net.parameters())}
    return net, metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(DEFAULT_PATH))
    a = ap.parse_args(argv)
    net, metrics = train(a.epochs, a.batch, a.lr, a.seed, a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Plain tensors + JSON-able metadata only, so the checkpoint loads with weights_only=True.
    torch.save({"state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "metrics": metrics, "num_levels": fm.NUM_LEVELS}, out)
    metrics["bytes"] = out.stat().st_size
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
