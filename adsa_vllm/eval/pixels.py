"""Image tokens -> the uint8 RGB images [B, H, W, 3] that evaluation suites read (ADM's evaluator, LlamaGen's).

* VQ models: the decoder's float output x (about [-1, 1]), optionally resized to `eval_size` with bicubic
  interpolation, then `clamp(127.5 x + 128, 0, 255)` truncated to uint8: LlamaGen's FID sampler
  (autoregressive/sample/sample_c2i_ddp.py, `--image-size 384 --image-size-eval 256`) step for step.
* The shipped Fashion-MNIST model: its grey levels (adsa_vllm.images), replicated to 3 channels.
* Any other model: adsa_vllm.images' grey token map, replicated (not a picture: only for smoke runs).
"""

from __future__ import annotations

import numpy as np


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] grey or [B, H, W, 3] RGB -> [B, H, W, 3] (grey replicated, as RGB readers of grey PNGs do)."""
    images = np.asarray(images)
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def vq_eval_images(vq, tokens, grid: int, eval_size: int | None = None, batch_size: int = 32) -> np.ndarray:
    """Codebook ids [B, grid*grid] -> uint8 [B, S, S, 3] as LlamaGen's FID sampler makes them (module docstring)."""
    import torch
    import torch.nn.functional as F
    device = vq.post_quant_conv.weight.device
    codes = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).reshape(-1, grid * grid)
    out = []
    with torch.no_grad():
        for chunk in codes.split(batch_size):
            x = vq.decode(chunk.to(device), grid).float()
            if eval_size is not None and eval_size != x.shape[-1]:
                x = F.interpolate(x, size=(eval_size, eval_size), mode="bicubic")
            x = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
            out.append(x.numpy())
    return np.concatenate(out)


def eval_images(config, tokens, *, vq=None, eval_size: int | None = None) -> np.ndarray:
    """Image tokens [B, grid*grid] -> uint8 [B, H, W, 3] (module docstring). eval_size (square side in pixels)
    needs a VQ decoder: pixel and token-map models have no continuous image to resize."""
    from adsa_vllm.images import tokens_to_images
    if vq is not None:
        return vq_eval_images(vq, tokens, config.grid_size, eval_size)
    images = to_rgb(tokens_to_images(config, tokens))
    if eval_size is not None and eval_size != images.shape[1]:
        raise ValueError(f"--image-size-eval {eval_size}: only VQ-decoded images are resized (this model's images "
                         f"are {images.shape[1]} px); leave it out")
    return images


__all__ = ["eval_images", "to_rgb", "vq_eval_images"]
