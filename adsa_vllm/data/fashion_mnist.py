"""Fashion-MNIST (Zalando, 70k real 28x28 grey images, 10 classes) as LlamaGen pixel tokens.

Data comes from Debian's `dataset-fashion-mnist` package (the official idx files and the official 60k/10k
train/test split; nothing is downloaded): `apt-get install dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist. $ADSA_FASHION_MNIST_DIR overrides the location (e.g. a copy carried to a GPU
machine that has no apt). Files may be gzipped (as Debian ships them) or raw.

Tokenization is per pixel, no VQ tokenizer: an image is its 28x28 = 784 pixels in raster order (grid_size=28,
the order LlamaGen's 2D RoPE assumes), each intensity rounded to one of K = 16 evenly spaced levels
(level k <-> round(17 k), since 255 / 15 = 17 exactly, so black 0 and white 255 stay exact). Why K = 16, measured
on the 10k test images with `quantization_report()`: Fashion-MNIST uses all 256 grey levels (50.0% of
pixels are exactly 0), and round-tripping through K levels gives
    K:        8      16     32     64
    PSNR:  30.9   37.5   43.6   49.3  dB      (max abs error 18 / 8 / 4 / 2 grey levels)
    H(level marginal): 2.23 / 2.78 / 3.31 / 3.84 bits
K = 16 is the smallest K whose round trip is visually lossless (37.5 dB, error <= 8/255 < 3.2%) while keeping
the softmax small (fast to train in a 10-minute budget) and the per-token uncertainty coarse enough that
attention sparsity, not pixel noise, dominates the bits/token differences between ADSA policies.
The class condition is the label 0..9; 10 is the null class for classifier-free guidance:
    LlamaGenConfig(num_classes=10, cls_token_num=1, grid_size=28, codebook_size=16)
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

ENV_VAR = "ADSA_FASHION_MNIST_DIR"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
GRID_SIZE = 28
IMAGE_TOKENS = GRID_SIZE * GRID_SIZE
NUM_LEVELS = 16          # K, the codebook size (see the module docstring for the measurement)
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class FashionMNISTNotFound(FileNotFoundError):
    """The idx files are not where we looked; the message says how to install them or point at them."""


def _has_files(d: Path) -> bool:
    return all((d / f).is_file() or (d / (f + ".gz")).is_file() for pair in _FILES.values() for f in pair)


def _dpkg_dirs() -> list[Path]:
    """Folders holding the package's idx files according to `dpkg -L` (the package may move them one day)."""
    if shutil.which("dpkg") is None:
        return []
    try:
        out = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({Path(line).parent for line in out.splitlines() if "idx3-ubyte" in line})


def locate(root: str | Path | None = None) -> Path:
    """Folder with the four idx files: `root`, else $ADSA_FASHION_MNIST_DIR, else the Debian package's folder."""
    explicit = root if root is not None else os.environ.get(ENV_VAR)
    if explicit:
        # An explicit location is never silently replaced by another one.
        candidates, where = [Path(explicit)], f"{Path(explicit)} (from {'the argument' if root else '$' + ENV_VAR})"
    else:
        candidates = [DEBIAN_DIR] + [d for d in _dpkg_dirs() if d != DEBIAN_DIR]
        where = ", ".join(str(c) for c in candidates)
    for d in candidates:
        if _has_files(d):
            return d
    need = ", ".join(f + "[.gz]" for pair in _FILES.values() for f in pair)
    raise FashionMNISTNotFound(
        f"Fashion-MNIST idx files not found in {where}; expected {need}. Install them with "
        f"`apt-get install {DEBIAN_PACKAGE}` (Debian/Ubuntu, files land in {DEBIAN_DIR}) or set ${ENV_VAR} to a "
        f"folder holding them.")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (gzip or raw): uint8 array of the shape its header declares."""
    path = Path(path)
    if not path.is_file() and Path(str(path) + ".gz").is_file():
        path = Path(str(path) + ".gz")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {arr.size} bytes")
    return arr.reshape(shape)


def load(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the official split: "train" (60k) or "test" (10k)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r}: choose 'train' or 'test'")
    d = locate(root)
    img_f, lab_f = _FILES[split]
    images, labels = read_idx(d / img_f), read_idx(d / lab_f)
    if images.shape[1:] != (GRID_SIZE, GRID_SIZE) or len(images) != len(labels):
        raise ValueError(f"{d}: unexpected shapes {images.shape} / {labels.shape}")
    return images, labels


def tokenize(images, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """uint8 [N, 28, 28] (or [28, 28]) -> int64 [N, 784] level ids in [0, K), raster order."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {x.shape}")
    k = np.rint(x.astype(np.float32) * ((num_levels - 1) / 255.0))  # round half to even; ties never occur for K=16
    return np.clip(k, 0, num_levels - 1).astype(np.int64).reshape(len(x), -1)


def detokenize(tokens, num_levels: int = NUM_LEVELS, grid_size: int = GRID_SIZE) -> np.ndarray:
    """int [N, 784] level ids (numpy or torch) -> uint8 [N, 28, 28] grey images."""
    t = tokens.detach().cpu().numpy() if hasattr(tokens, "detach") else np.asarray(tokens)
    t = np.clip(t.astype(np.int64), 0, num_levels - 1).reshape(-1, grid_size, grid_size)
    return np.rint(t * (255.0 / (num_levels - 1))).astype(np.uint8)


def quantization_report(images: np.ndarray, levels=(8, 16, 32, 64)) -> dict:
    """PSNR (dB), max abs error and level-marginal entropy (bits) of the K-level round trip: the numbers behind
    the choice of K in the module docstring."""
    x = np.asarray(images).astype(np.float64)
    out = {"distinct_grey_levels": int(len(np.unique(x))), "fraction_zero": float((x == 0).mean())}
    for k in levels:
        tok = tokenize(images, k)
        y = detokenize(tok, k).astype(np.float64).reshape(x.shape)
        mse = float(((x - y) ** 2).mean())
        p = np.bincount(tok.ravel(), minlength=k) / tok.size
        out[int(k)] = {"psnr_db": 10 * np.log10(255.0 ** 2 / mse), "max_abs_err": float(np.abs(x - y).max()),
                       "marginal_entropy_bits": float(-(p[p > 0] * np.log2(p[p > 0])).sum())}
    return out


def llamagen_config_kwargs() -> dict:
    """The data-dependent LlamaGenConfig fields (add the model size: dim, n_layer, n_head, ...)."""
    return dict(num_classes=NUM_CLASSES, cls_token_num=1, grid_size=GRID_SIZE, codebook_size=NUM_LEVELS)


__all__ = ["CLASS_NAMES", "ENV_VAR", "FashionMNISTNotFound", "GRID_SIZE", "IMAGE_TOKENS", "NUM_CLASSES", "NUM_LEVELS",
           "detokenize", "llamagen_config_kwargs", "load", "locate", "quantization_report", "read_idx", "tokenize"]
