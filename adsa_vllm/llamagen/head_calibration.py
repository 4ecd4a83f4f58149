"""Where each attention head of a LlamaGen class-conditional model looks: the measurement behind head_split's head
classes (`adsa.heads`), the LlamaGen family's `head_calibration` tool (adsa_vllm/family.py).

One teacher-forced full-attention pass per batch of images. For every (layer, head) it averages, over the image
queries t whose window and prefix do not overlap (t >= prefix + local), the attention mass the head puts
  inside the local window (t - local, t]   (local = grid + 1 tokens: the row above and the row so far), and
  on the prefix [0, prefix)                (prefix = condition + the first image row: the sinks),
with the layout's default prefix and window. The images are the model's own samples under full attention (no data
needed: a user's checkpoint calibrates itself), or images the caller gives (benchmarks/head_calibration.py passes
Fashion-MNIST training images for the shipped model). The rule that turns masses into classes is the policy's
(`adsa_vllm.policy.head_split.classify_heads`).
"""

from __future__ import annotations

import torch

from adsa_vllm.llamagen.convert import load_config, load_reference


def head_masses(model, cond: torch.Tensor, tokens: torch.Tensor, prefix: int, local: int) -> torch.Tensor:
    """[layers, heads, 2] mean (window mass, prefix mass) over the queries t >= prefix + local of every image."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    h = torch.cat([model.embed_cond(cond), model.tok_embeddings(tokens[:, :-1])], dim=1)   # fed positions
    n, dev = h.shape[1], h.device
    pos = torch.arange(n, device=dev)
    caches = [tuple(torch.zeros(len(cond), cfg.kv_heads, n, cfg.head_dim, device=dev, dtype=dtype) for _ in "kv")
              for _ in range(cfg.n_layer)]
    t = torch.arange(prefix + local, n, device=dev)
    key = torch.arange(n, device=dev)
    window = ((key[None] > t[:, None] - local) & (key[None] <= t[:, None])).float()         # [T, n]
    sinks = (key[None] < prefix).float().expand_as(window)
    out = torch.zeros(cfg.n_layer, cfg.n_head, 2, device=dev)

    def hook(layer, q):   # q [B, H, n, D] post-RoPE; this layer's K is cached
        k = caches[layer][0].repeat_interleave(cfg.n_head // cfg.kv_heads, dim=1)
        logits = (q[:, :, t].float() @ k.float().transpose(-1, -2)) * cfg.head_dim ** -0.5   # [B, H, T, n]
        p = logits.masked_fill(key[None] > t[:, None], float("-inf")).softmax(-1)
        out[layer, :, 0] = (p * window).sum(-1).mean(dim=(0, 2))
        out[layer, :, 1] = (p * sinks).sum(-1).mean(dim=(0, 2))

    causal = (key[None] <= key[:, None])[None, None]
    model.forward_hidden(h, pos, caches, causal, hook=hook, rope_offset=cfg.position_offset(cfg.cls_token_num))
    return out.cpu()


def sample_classes(num_classes: int, images: int) -> list[int]:
    """`images` class ids spread evenly over the model's classes (all of them once images >= num_classes)."""
    return [i * num_classes // images for i in range(images)] if images <= num_classes else \
        [i % num_classes for i in range(images)]


def measure(model_dir: str, *, images: int = 16, device: str | None = None, seed: int = 0, batch: int = 4,
            top_k: int | None = None, cond: torch.Tensor | None = None, tokens: torch.Tensor | None = None) -> dict:
    """Per (layer, head) window and prefix attention mass of the model in `model_dir`, on `images` samples of its own
    (full attention, top-k sampling, classes spread over all) or on the given `cond` class ids + `tokens` images."""
    cfg = load_config(model_dir)                  # checked before the (large) weights load
    if cfg.is_t2i:
        raise ValueError(f"{model_dir} is a text-to-image model: calibrate-heads samples a class-conditional model "
                         "from class ids and has no captions to condition on; pass adsa.heads by hand (one L or S "
                         "per head, layers split by '/') or leave it unset (every head a sink head)")
    if images < 1 or batch < 1:
        raise ValueError(f"images={images}, batch={batch}: both must be at least 1")
    model = load_reference(model_dir, device="cpu").eval()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":
        model = model.float()                      # bf16 matmuls are slow on CPU and the masses are float32 anyway
    model = model.to(dev)
    prefix, local = cfg.cls_token_num + cfg.grid_size, cfg.grid_size + 1      # the layout's defaults
    if tokens is None:
        from adsa_vllm.cli_common import PIXEL_MODEL_TOP_K, VQ_MODEL_TOP_K
        from adsa_vllm.images import is_pixel_token_model
        from adsa_vllm.reference.generate import generate
        cond = torch.tensor(sample_classes(cfg.num_classes, images))
        k = top_k or (PIXEL_MODEL_TOP_K if is_pixel_token_model(cfg) else VQ_MODEL_TOP_K)
        with torch.no_grad():
            tokens = torch.cat([generate(model, cond[i:i + batch].tolist(), top_k=k, seed=seed + i).tokens.cpu()
                                for i in range(0, images, batch)])
        source = f"{images} samples of the model itself (full attention, top-k {k}, seed {seed})"
    else:
        source = f"{len(tokens)} given images"
    total = torch.zeros(cfg.n_layer, cfg.n_head, 2)
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            c, x = cond[i:i + batch].to(dev).long(), tokens[i:i + batch].to(dev).long()
            total += head_masses(model, c, x, prefix, local) * len(c)
    m = total / len(tokens)
    return {"model": str(model_dir), "images": source, "prefix_tokens": prefix, "local_tokens": local,
            "window_mass": [[round(v, 4) for v in layer[:, 0].tolist()] for layer in m],
            "prefix_mass": [[round(v, 4) for v in layer[:, 1].tolist()] for layer in m]}
