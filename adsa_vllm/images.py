"""Image tokens -> pixels -> PNG files; the one place that picks how a model's tokens become pixels.

* The shipped Fashion-MNIST model (28x28 pixel tokens, 16 grey levels): `fashion_mnist.detokenize`, grey [B, 28, 28].
* A model with a VQ decoder (official LlamaGen: codebook ids of `vq_ds16_c2i.pt`): `adsa_vllm.vq.VQDecoder`,
  RGB [B, grid*16, grid*16, 3]. The decoder comes from the caller (`vq=`, e.g. the CLI's `--vq PATH`) or from the
  model folder's config.json:
      "vq_ckpt": "vq_ds16_c2i.pt",           # relative to the model folder, or absolute
      "vq_config": {"codebook_size": 16384}  # optional VQConfig overrides (default: the official VQ-16)
* Any other model: a grey token map (one pixel per token, id scaled to 0..255), so there is always a picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VQ_CKPT_KEY, VQ_CONFIG_KEY = "vq_ckpt", "vq_config"


def is_pixel_token_model(config) -> bool:
    """The Fashion-MNIST layout: tokens are grey levels of a 28x28 image."""
    from adsa_vllm.data import fashion_mnist as fm
    return (config.grid_size, config.codebook_size) == (fm.GRID_SIZE, fm.NUM_LEVELS)


def configured_vq(model_dir: str | Path) -> tuple[Path | None, dict]:
    """(checkpoint path or None, VQConfig overrides) from the folder's config.json `vq_ckpt` / `vq_config`."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    overrides = dict(raw.get(VQ_CONFIG_KEY) or {})
    if not raw.get(VQ_CKPT_KEY):
        return None, overrides
    path = Path(raw[VQ_CKPT_KEY]).expanduser()
    return (path if path.is_absolute() else Path(model_dir) / path), overrides


def load_vq_decoder(model_dir: str | Path | None, vq_ckpt: str | Path | None = None):
    """The VQDecoder for a model: `vq_ckpt` if given, else the one its config.json names; None if neither.
    VQConfig overrides come from config.json's vq_config either way (default: the official VQ-16)."""
    from adsa_vllm.vq import VQDecoder
    configured, overrides = configured_vq(model_dir) if model_dir is not None else (None, {})
    path = vq_ckpt if vq_ckpt is not None else configured
    return None if path is None else VQDecoder.from_checkpoint(path, **overrides)


def tokens_to_images(model_dir_or_config, tokens, *, vq=None) -> np.ndarray:
    """Image token ids [B, grid*grid] (raster order) -> uint8 images: [B, H, W] grey or [B, H, W, 3] RGB.

    model_dir_or_config: a model folder (its config.json may name a VQ checkpoint) or a LlamaGenConfig.
    vq: a VQDecoder or a checkpoint path, overriding the folder's; required for VQ decoding from a bare config.
    """
    from adsa_vllm.family import load_config
    from adsa_vllm.vq import VQDecoder
    is_dir = isinstance(model_dir_or_config, (str, Path))
    config = load_config(model_dir_or_config) if is_dir else model_dir_or_config
    if not isinstance(vq, VQDecoder) and (vq is not None or is_dir):
        vq = load_vq_decoder(model_dir_or_config if is_dir else None, vq)
    t = np.asarray(tokens, dtype=np.int64).reshape(-1, config.image_tokens)
    if vq is not None:
        if vq.config.codebook_size != config.codebook_size:
            raise ValueError(f"the VQ decoder has {vq.config.codebook_size} codes but the model emits "
                             f"{config.codebook_size}: use the VQ checkpoint the model was trained with")
        return vq.decode_codes(t, config.grid_size)
    if is_pixel_token_model(config):
        from adsa_vllm.data import fashion_mnist as fm
        return fm.detokenize(t)
    grey = (t * 255 // max(config.codebook_size - 1, 1)).astype(np.uint8)
    return grey.reshape(-1, config.grid_size, config.grid_size)


def save_png(image: np.ndarray, path: str | Path) -> None:
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) -> PNG."""
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(image)).save(str(path), format="PNG")


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """[B, H, W(, 3)] -> one image, `nrow` images per row (torchvision.utils.make_grid's layout); white padding
    because Fashion-MNIST backgrounds are black."""
    images = np.asarray(images)
    b, h, w = images.shape[:3]
    ncol = max(1, min(nrow, b))
    rows = -(-b // ncol)
    sheet = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding) + images.shape[3:], pad_value,
                    dtype=np.uint8)
    for i, img in enumerate(images):
        y, x = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        sheet[y:y + h, x:x + w] = img
    return sheet


def save_grid(images: np.ndarray, path: str | Path, nrow: int = 8) -> None:
    save_png(make_grid(images, nrow), path)


__all__ = ["VQ_CKPT_KEY", "VQ_CONFIG_KEY", "configured_vq", "is_pixel_token_model", "load_vq_decoder", "make_grid",
           "save_grid", "save_png", "tokens_to_images"]
