"""Reference batches: the real images samples are compared with, in ADM's npz layout.

ADM's reference batches (guided-diffusion evaluations/, e.g. VIRTUAL_imagenet256_labeled.npz) hold
  arr_0       uint8 [N, H, W, 3]: 10,000 real images (NHWC, RGB), used for precision / recall (and IS is not
              computed on them)
  mu, sigma   the Inception pool_3 statistics of the whole training set, which ADM's evaluator uses for FID
  mu_s, sigma_s   the same for sFID (spatial features; not computed here)
A batch without mu / sigma (e.g. one you write yourself) gets its FID statistics from arr_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADM_REF_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
               "VIRTUAL_imagenet256_labeled.npz")


class ReferenceBatchError(ValueError):
    """The reference batch cannot be used; the message names the fix."""


@dataclass
class ReferenceBatch:
    path: Path
    images: np.ndarray          # uint8 [N, H, W, 3]
    mu: np.ndarray | None       # the npz's FID statistics (ADM: the whole training set), if it has them
    sigma: np.ndarray | None


def check_image_batch(images, what: str) -> None:
    """ReferenceBatchError naming the conversion unless `images` is uint8 [N, H, W, 3] (NHWC, RGB)."""
    a = images
    fix = None
    if not isinstance(a, np.ndarray):
        fix = f"it is a {type(a).__name__}, not an array"
    elif a.ndim == 3:
        fix = ("it is grey [N, H, W]: replicate it to RGB, np.repeat(x[..., None], 3, axis=-1) "
               "(adsa_vllm.eval.pixels.to_rgb)")
    elif a.ndim != 4:
        fix = f"it has shape {list(a.shape)}"
    elif a.shape[-1] != 3 and a.shape[1] == 3:
        fix = f"it is NCHW {list(a.shape)}: transpose it to NHWC, x.transpose(0, 2, 3, 1)"
    elif a.shape[-1] != 3:
        fix = f"it has {a.shape[-1]} channels (shape {list(a.shape)}): evaluators take RGB"
    elif a.dtype != np.uint8:
        fix = (f"its dtype is {a.dtype}: store pixels as uint8 0..255, e.g. "
               "np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for floats in [0, 1]")
    elif len(a) == 0:
        fix = "it holds no image"
    if fix is not None:
        raise ReferenceBatchError(f"{what}: arr_0 must be uint8 [N, H, W, 3] (NHWC, RGB, as ADM's evaluator reads "
                                  f"it), but {fix}")


def load_reference_batch(path: str | Path) -> ReferenceBatch:
    """Read and check a reference npz; ReferenceBatchError naming the fix (missing file, not an npz, no arr_0,
    wrong layout)."""
    path = Path(path).expanduser()
    what = f"--ref {path}"
    if not path.is_file():
        raise ReferenceBatchError(f"{what}: no such file. Give a reference batch in ADM's layout, e.g. ImageNet "
                                  f"256's {ADM_REF_URL}, or write one with np.savez(PATH, arr_0=images)")
    try:
        z = np.load(path)
    except (OSError, ValueError) as e:
        raise ReferenceBatchError(f"{what}: not a numpy .npz file ({e}); write one with np.savez(PATH, "
                                  "arr_0=images)") from None
    if not hasattr(z, "files"):
        raise ReferenceBatchError(f"{what}: a single .npy array, not an .npz: write np.savez(PATH, arr_0=images)")
    with z:
        if "arr_0" not in z.files:
            raise ReferenceBatchError(f"{what}: no arr_0 in it (it holds {z.files}); the images must be arr_0, "
                                      "as np.savez(PATH, images) writes them")
        try:
            images = z["arr_0"]
            mu = z["mu"] if "mu" in z.files else None
            sigma = z["sigma"] if "sigma" in z.files else None
        except ValueError as e:   # object arrays need pickle, which an evaluator never loads
            raise ReferenceBatchError(f"{what}: {e}; store plain uint8 arrays") from None
    check_image_batch(images, what)
    if (mu is None) != (sigma is None) or (mu is not None and sigma.shape != (len(mu), len(mu))):
        raise ReferenceBatchError(f"{what}: mu and sigma must come together, mu [D] and sigma [D, D]; got "
                                  f"{None if mu is None else mu.shape} and {None if sigma is None else sigma.shape}")
    return ReferenceBatch(path, images, mu, sigma)


def write_fashion_mnist_reference(out_path: str | Path, split: str = "test") -> Path:
    """The reference batch of the shipped Fashion-MNIST model: the split's images as uint8 [N, 28, 28, 3]."""
    from adsa_vllm.data import fashion_mnist as fm
    from adsa_vllm.eval.pixels import to_rgb
    images, labels = fm.load(split)
    out_path = Path(out_path)
    np.savez(out_path, arr_0=to_rgb(images), arr_1=labels.astype(np.int64))
    return out_path


__all__ = ["ADM_REF_URL", "ReferenceBatch", "ReferenceBatchError", "check_image_batch", "load_reference_batch",
           "write_fashion_mnist_reference"]
