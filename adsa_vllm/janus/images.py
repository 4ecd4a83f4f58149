"""Janus image codes -> uint8 RGB pixels with transformers' `JanusVQVAE` decoder, read from a Janus model folder in
the transformers layout (adsa_vllm.janus.convert's output). Janus-Pro: 24x24 = 576 codes of a 16384 codebook ->
384x384 pixels.

    images = decode_images("models/janus-pro-7b", codes)     # int [N, 576] -> uint8 [N, 384, 384, 3]

Why JanusVQVAE and not the plugin's LlamaGen decoder (adsa_vllm.vq.VQDecoder): the two are the same network (LlamaGen's
VQ-16; the state dicts map one to one through the converter's VQ_RENAMES), but the plugin's attention block runs
SDPA where Janus runs bmm + softmax, so the floats differ by ~1e-5 and a few uint8 values by 1. Janus images here
are bit-identical to transformers' `decode_image_tokens` and to deepseek-ai/Janus's own sampler.

Only the `model.vqmodel.*` tensors are read (not the language model). Pixels as deepseek-ai/Janus
generation_inference.py makes them: clip((x + 1) / 2 * 255, 0, 255), truncated to uint8.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

VQ_PREFIX = "model.vqmodel."


def load_vq_decoder(model_dir: str | Path, *, device="cpu", dtype: torch.dtype = torch.float32):
    """The folder's JanusVQVAE (eval mode), built on the meta device and given only the VQ tensors of its
    *.safetensors files; `quantize.quant_state_dims` is the code grid (vision image_size // patch_size)."""
    from transformers import JanusConfig, JanusVQVAE
    folder = Path(model_dir)
    config = JanusConfig.from_pretrained(folder)
    sd = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            sd.update({k[len(VQ_PREFIX):]: f.get_tensor(k).to(dtype) for k in f.keys() if k.startswith(VQ_PREFIX)})
    if not sd:
        raise ValueError(f"{folder}: no {VQ_PREFIX}* tensors in its *.safetensors; is it a transformers-layout Janus "
                         "folder? (convert an original checkpoint with python -m adsa_vllm.janus.convert)")
    with torch.device("meta"):
        vq = JanusVQVAE(config.vq_config)
    vq.load_state_dict(sd, strict=True, assign=True)
    return vq.eval()


def codes_to_pixels(vq, codes) -> np.ndarray:
    """Codes [N, grid*grid] (raster order; numpy, list or tensor) -> uint8 RGB [N, H, W, 3] with a loaded
    JanusVQVAE."""
    grid = vq.quantize.quant_state_dims
    n_codes = vq.config.num_embeddings
    t = torch.as_tensor(np.asarray(codes), dtype=torch.int64, device=vq.post_quant_conv.weight.device)
    t = t.reshape(-1, grid[0] * grid[1])
    if t.numel() and not 0 <= int(t.min()) <= int(t.max()) < n_codes:
        raise ValueError(f"image codes must be in 0..{n_codes - 1}, got {int(t.min())}..{int(t.max())}")
    with torch.no_grad():
        x = vq.decode(t).to(torch.float32).permute(0, 2, 3, 1).cpu().numpy()
    return np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8)


def decode_images(model_dir: str | Path, codes, *, device="cpu") -> np.ndarray:
    """Image codes [N, grid*grid] -> uint8 RGB [N, H, W, 3] (Janus-Pro: [N, 576] -> [N, 384, 384, 3])."""
    return codes_to_pixels(load_vq_decoder(model_dir, device=device), codes)


__all__ = ["codes_to_pixels", "decode_images", "load_vq_decoder"]
