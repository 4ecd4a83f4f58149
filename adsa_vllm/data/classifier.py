"""Small CNN Fashion-MNIST classifier: the feature extractor for FID and the judge of class accuracy of samples.

Inception features mean nothing on 28x28 grey clothes, so sample quality is measured in the feature space of a
classifier trained on the same data (the usual practice for MNIST-like FIDs). The net sees images the way the
generator produces them: grey levels quantized to the tokenizer's K levels (adsa_vllm.data.fashion_mnist), so
quantization itself is not counted as a defect. ~33k parameters (0.14 MB); the checkpoint ships as
adsa_vllm/assets/fashion_classifier.pt (trained by `python benchmarks/classifier.py`). Torch and numpy, no vLLM.

    from adsa_vllm.data import classifier as clf
    f = clf.features(images_uint8)   # [N, 128] float64, penultimate layer (global-average-pooled conv features)
    y = clf.predict(images_uint8)    # [N] int64 class ids
    clf.fid(f_a, f_b)                # Frechet distance between two feature sets
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adsa_vllm.data import fashion_mnist as fm

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "assets" / "fashion_classifier.pt"
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


__all__ = ["DEFAULT_PATH", "FEATURES", "FashionCNN", "features", "fid", "load", "predict", "quantize", "to_input"]
