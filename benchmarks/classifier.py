"""Small CNN Fashion-MNIST classifier: the feature extractor for FID and the judge of class accuracy of samples.

Inception features mean nothing on 28x28 grey clothes, so sample quality is measured in the feature space of a
classifier trained on the same data (the usual practice for MNIST-like FIDs). The net sees images the way the
generator produces them: grey levels quantized to the tokenizer's K levels (adsa_vllm.data.fashion_mnist), so
quantization itself is not counted as a defect. ~33k parameters (0.14 MB), trained on the 60k train
split on CPU in a few minutes; the checkpoint is committed as adsa_vllm/assets/fashion_classifier.pt.

    python benchmarks/classifier.py --epochs 6          # train, report test accuracy, save the checkpoint

    from classifier import features, predict           # (benchmarks/ on sys.path)
    f = features(images_uint8)   # [N, 128] float64, penultimate layer (global-average-pooled conv features)
    y = predict(images_uint8)    # [N] int64 class ids
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adsa_vllm.data import fashion_mnist as fm  # noqa: E402

DEFAULT_PATH = ROOT / "adsa_vllm" / "assets" / "fashion_classifier.pt"
FEATURES = 128
# Fashion-MNIST train-set mean / std of [0, 1] pixels (fixed constants, so features never depend on a batch).
_MEAN, _STD = 0.2860, 0.3530


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()

        def block(cin, cout, k=3, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        # Small on purpose (~2.3M multiply-adds per image): a shared 2-core CPU trains an epoch in 10 s to a few
        # minutes depending on load. The strided 5x5 stem avoids full-resolution activations, which dominate CPU time.
        self.body = nn.Sequential(block(1, 16, k=5, stride=2), block(16, 32), nn.MaxPool2d(2),   # 14x14 -> 7x7
                                  block(32, 64), block(64, FEATURES, k=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURES, fm.NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.dropout(self.body(x), 0.2, self.training))


def to_input(images, device="cpu") -> torch.Tensor:
    """uint8 [N, 28, 28] (numpy or torch) -> normalised float [N, 1, 28, 28]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images, dtype=np.uint8))  # a copy
    return ((x.to(device, torch.float32) / 255.0 - _MEAN) / _STD).reshape(-1, 1, fm.GRID_SIZE, fm.GRID_SIZE)


def quantize(images: np.ndarray) -> np.ndarray:
    """The generator's image domain: grey levels rounded to the tokenizer's K levels."""
    return fm.detokenize(fm.tokenize(images))


_CACHE: dict = {}


def load(path: str | Path = DEFAULT_PATH, device="cpu") -> FashionCNN:
    key = (str(path), str(device))
    if key not in _CACHE:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no classifier checkpoint; train one with "
                                    "`python benchmarks/classifier.py`")
        net = FashionCNN()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        _CACHE[key] = net.to(device).eval()
    return _CACHE[key]


@torch.no_grad()
def _apply(fn, images, model, device, batch):
    model = model if model is not None else load(device=device)
    dev = next(model.parameters()).device
    return torch.cat([fn(model, to_input(images[i:i + batch], dev)).cpu()
                      for i in range(0, len(images), batch)]) if len(images) else torch.empty(0)


def features(images, model: FashionCNN | None = None, device="cpu", batch: int = 2048) -> np.ndarray:
    """[N, 128] float64 penultimate features of uint8 images [N, 28, 28] (for FID)."""
    return _apply(lambda m, x: m.features(x), images, model, device, batch).double().numpy()


def predict(images, model: FashionCNN | None = None, device="cpu", batch: int = 2048) -> np.ndarray:
    """[N] int64 predicted classes of uint8 images [N, 28, 28]."""
    return _apply(lambda m, x: m(x).argmax(-1), images, model, device, batch).numpy()


def fid(feat_a: np.ndarray, feat_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + Tr(Ca + Cb - 2 (Ca Cb)^1/2).
    Tr((Ca Cb)^1/2) = sum of sqrt(eigenvalues of Ca^1/2 Cb Ca^1/2), a symmetric PSD matrix (no complex sqrtm)."""
    mu_a, mu_b = feat_a.mean(0), feat_b.mean(0)
    ca, cb = np.cov(feat_a, rowvar=False), np.cov(feat_b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sa @ cb @ sa), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


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
