"""Convert an official LlamaGen c2i or t2i checkpoint (.pt) into a model folder: config.json + model.safetensors.

The tensors keep their official names (the reference model and the vLLM loader both read them as-is). Sizes are
inferred from the weights where possible; the head count is not recoverable from weights, so it comes from a preset
(auto-detected when dim and depth match an official one) or --n-head. A text-to-image checkpoint is recognised by its
caption projection (`cls_embedding.cap_proj.*`); its caption width and length come from the weights too.
Pure torch + safetensors, no vLLM.

    adsa-convert c2i_L_384.pt models/llamagen-L-384 --image-size 384
    python -m adsa_vllm.llamagen.convert c2i_B_256.pt models/llamagen-B --preset B --image-size 256 --dtype bfloat16
    adsa-convert t2i_XL_stage1_256.pt models/llamagen-t2i-XL-256 --image-size 256
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adsa_vllm.llamagen.config import PRESETS, LlamaGenConfig, grid_for_image_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Non-parameter tensors the official model may carry (plain attributes or KV-cache buffers).
_BUFFERS = re.compile(r"(^|\.)(freqs_cis|causal_mask|kv_cache\.[kv]_cache)$")
_PREFIXES = ("module.", "_orig_mod.")
_T2I_KEY = "cls_embedding.cap_proj.fc1.weight"        # present only in text-to-image checkpoints


class ConversionError(ValueError):
    """The checkpoint does not match the requested LlamaGen configuration; the message names the fix."""


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Official-format state dict from a .pt/.pth (optionally wrapped) or .safetensors file, buffers dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # training checkpoints may pickle argparse Namespaces etc.
            warnings.warn(f"{path}: weights_only load failed ({type(e).__name__}); retrying with full unpickling "
                          "- only convert checkpoints you trust")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    return clean_state_dict(obj)


def clean_state_dict(obj) -> dict[str, torch.Tensor]:
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError("checkpoint holds no state dict (looked for 'model', 'module', 'state_dict' or a "
                              "plain dict of tensors)")
    out = {}
    for k, v in obj.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        if _BUFFERS.search(k) or not isinstance(v, torch.Tensor):
            continue
        out[k] = v
    return out


def expected_shapes(config: LlamaGenConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a LlamaGen model (c2i or t2i) with this config."""
    d, hd, f = config.dim, config.head_dim, config.ffn_hidden
    shapes = {"tok_embeddings.weight": (config.codebook_size, d), "norm.weight": (d,),
              "output.weight": (config.codebook_size, d)}
    if config.is_t2i:
        shapes.update({_T2I_KEY: (d, config.caption_dim), "cls_embedding.cap_proj.fc2.weight": (d, d),
                       "cls_embedding.uncond_embedding": (config.cls_token_num, config.caption_dim)})
    else:
        shapes["cls_embedding.embedding_table.weight"] = (config.num_classes + 1, d)
    for i in range(config.n_layer):
        p = f"layers.{i}."
        shapes.update({p + "attention.wqkv.weight": ((config.n_head + 2 * config.kv_heads) * hd, d),
                       p + "attention.wo.weight": (d, d), p + "feed_forward.w1.weight": (f, d),
                       p + "feed_forward.w3.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
                       p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,)})
    return shapes


def validate(sd: dict[str, torch.Tensor], config: LlamaGenConfig) -> None:
    want = expected_shapes(config)
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} != expected {want[k]}" for k in want
           if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or extra or bad:
        lines = ([f"missing keys: {missing[:8]}"] if missing else []) \
            + ([f"unexpected keys: {extra[:8]} (only LlamaGen c2i and t2i checkpoints are supported)"]
               if extra else []) + bad[:8]
        cond = "--cls-token-num" if config.is_t2i else "--num-classes"
        raise ConversionError("checkpoint does not match " + _describe(config) + ":\n  " + "\n  ".join(lines) +
                              f"\nCheck --preset/--n-head/--n-kv-head (and {cond}/--codebook-size).")


def _describe(config: LlamaGenConfig) -> str:
    cond = (f"t2i, caption {config.cls_token_num}x{config.caption_dim}" if config.is_t2i
            else f"classes={config.num_classes}")
    return (f"LlamaGen(dim={config.dim}, n_layer={config.n_layer}, n_head={config.n_head}, "
            f"n_kv_head={config.kv_heads}, codebook={config.codebook_size}, {cond})")


def _condition_fields(sd: dict[str, torch.Tensor], num_classes: int | None, cls_token_num: int | None) -> dict:
    """The LlamaGenConfig fields of the condition: a class table (c2i) or a caption projection (t2i)."""
    if _T2I_KEY not in sd:
        rows = sd["cls_embedding.embedding_table.weight"].shape[0]
        # The last row is the null class used for classifier-free guidance.
        return dict(num_classes=rows - 1 if num_classes is None else num_classes,
                    cls_token_num=1 if cls_token_num is None else cls_token_num)
    if num_classes is not None:
        raise ConversionError("this is a text-to-image checkpoint (it has cls_embedding.cap_proj): it has no "
                              "classes; drop --num-classes")
    if "cls_embedding.uncond_embedding" not in sd:
        raise ConversionError("text-to-image checkpoint without 'cls_embedding.uncond_embedding' (the null caption "
                              "for CFG, shape [cls_token_num, caption_dim]): is the file complete?")
    rows, caption_dim = sd["cls_embedding.uncond_embedding"].shape
    if cls_token_num is not None and cls_token_num != rows:
        raise ConversionError(f"--cls-token-num {cls_token_num}, but the checkpoint's uncond_embedding holds "
                              f"{rows} caption rows; drop --cls-token-num (it is read from the weights)")
    return dict(model_type="t2i", cls_token_num=rows, caption_dim=caption_dim)


def infer_config(sd: dict[str, torch.Tensor], *, preset: str | None = None, n_head: int | None = None,
                 n_kv_head: int | None = None, grid_size: int | None = None, image_size: int | None = None,
                 codebook_size: int | None = None, num_classes: int | None = None, cls_token_num: int | None = None,
                 **extra) -> LlamaGenConfig:
    """Build the LlamaGenConfig of a cleaned official state dict. Explicit arguments override inferred values;
    cls_token_num defaults to 1 (c2i) or to the caption length the weights hold (t2i)."""
    cond_key = _T2I_KEY if _T2I_KEY in sd else "cls_embedding.embedding_table.weight"
    for k in ("tok_embeddings.weight", cond_key):
        if k not in sd:
            raise ConversionError(f"checkpoint has no {k!r}: not a LlamaGen c2i or t2i checkpoint "
                                  f"(keys: {sorted(sd)[:6]})")
    cb, dim = sd["tok_embeddings.weight"].shape
    n_layer = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))), default=-1)
    base = dict(PRESETS[preset]) if preset else {}
    if preset is None:  # official sizes are unique by (dim, depth): safe to recognise
        base = next((dict(p) for p in PRESETS.values() if (p["dim"], p["n_layer"]) == (dim, n_layer)), {})
    if preset and (base["dim"], base["n_layer"]) != (dim, n_layer):
        raise ConversionError(f"--preset {preset} means dim={base['dim']}, n_layer={base['n_layer']}, but the "
                              f"checkpoint has dim={dim}, n_layer={n_layer}; pick the matching preset "
                              f"({', '.join(sorted(PRESETS))}) or pass --n-head without --preset")
    heads = n_head if n_head is not None else base.get("n_head")
    if heads is None:
        raise ConversionError(f"cannot infer the number of attention heads from the weights (dim={dim}, "
                              f"n_layer={n_layer} matches no official preset); pass --n-head N (convert(..., "
                              f"n_head=N)) or --preset {{{','.join(PRESETS)}}}")
    if n_kv_head is None and "layers.0.attention.wqkv.weight" in sd and dim % heads == 0:
        rows, hd = sd["layers.0.attention.wqkv.weight"].shape[0], dim // heads
        n_kv_head = (rows // hd - heads) // 2 if rows % hd == 0 and rows // hd > heads else None
        n_kv_head = None if n_kv_head == heads else n_kv_head
    if image_size is not None:
        try:
            g = grid_for_image_size(image_size)
        except ValueError as e:
            raise ConversionError(f"{e}; pass --image-size 256|384|512 or --grid-size N") from None
        if grid_size is not None and grid_size != g:
            raise ConversionError(f"image_size={image_size} means grid {g}, but grid_size={grid_size} was given")
        grid_size = g
    if grid_size is None:
        raise ConversionError("the image grid is not stored in the weights; pass --image-size 256|384|512 "
                              "(grid = image_size // 16) or --grid-size N")
    cond = _condition_fields(sd, num_classes, cls_token_num)
    try:
        config = LlamaGenConfig(dim=dim, n_layer=n_layer, n_head=heads, n_kv_head=n_kv_head,
                                codebook_size=codebook_size or cb, grid_size=grid_size, **cond, **extra)
    except ValueError as e:
        raise ConversionError(f"{e} (check --n-head/--n-kv-head)") from None
    validate(sd, config)
    return config


def save_model_folder(model_or_state_dict, config: LlamaGenConfig, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write config.json + model.safetensors (official key names) into out_dir; returns the folder."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    validate(sd, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous().clone() for k, v in sorted(sd.items())}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return out


def load_config(model_dir: str | Path) -> LlamaGenConfig:
    return LlamaGenConfig.from_hf_dict(json.loads((Path(model_dir) / "config.json").read_text()))


def load_reference(model_dir: str | Path, *, dtype: torch.dtype | None = None, device="cpu"):
    """LlamaGenReference (eval mode) from a model folder; dtype defaults to the stored one."""
    from adsa_vllm.reference.model import LlamaGenReference
    config = load_config(model_dir)
    sd = load_file(str(Path(model_dir) / "model.safetensors"), device=str(device))
    validate(sd, config)
    model = LlamaGenReference(config).to(device=device, dtype=dtype or next(iter(sd.values())).dtype)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def convert(ckpt_path: str | Path, out_dir: str | Path, *, preset: str | None = None, image_size: int | None = None,
            grid_size: int | None = None, n_head: int | None = None, n_kv_head: int | None = None,
            codebook_size: int | None = None, num_classes: int | None = None, cls_token_num: int | None = None,
            dtype: str = "float32") -> Path:
    """Official checkpoint -> model folder. codebook_size / num_classes default to what the weights hold
    (16384 / 1000 for the official c2i models); a t2i checkpoint's caption size (120 x 2048) is read from it."""
    if preset is not None and preset not in PRESETS:
        raise ConversionError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    sd = load_checkpoint(ckpt_path)
    config = infer_config(sd, preset=preset, n_head=n_head, n_kv_head=n_kv_head, grid_size=grid_size,
                       image_size=image_size, codebook_size=codebook_size, num_classes=num_classes,
                       cls_token_num=cls_token_num)
    return save_model_folder(sd, config, out_dir, dtype)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsa-convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="official LlamaGen c2i or t2i checkpoint (.pt, or .safetensors)")
    ap.add_argument("out_dir", help="model folder to write (config.json + model.safetensors)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="official size (auto-detected from dim and depth)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--image-size", type=int, help="256, 384 or 512 (grid = image_size // 16)")
    size.add_argument("--grid-size", type=int)
    ap.add_argument("--n-head", type=int, help="attention heads (needed when no preset matches)")
    ap.add_argument("--n-kv-head", type=int, help="KV heads (inferred from wqkv by default)")
    ap.add_argument("--codebook-size", type=int)
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--cls-token-num", type=int, help="condition tokens (c2i: default 1; t2i: read from the weights)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    a = ap.parse_args(argv)
    try:
        out = convert(a.checkpoint, a.out_dir, preset=a.preset, image_size=a.image_size, grid_size=a.grid_size,
                      n_head=a.n_head, n_kv_head=a.n_kv_head, codebook_size=a.codebook_size,
                      num_classes=a.num_classes, cls_token_num=a.cls_token_num, dtype=a.dtype)
    except ConversionError as e:
        ap.exit(2, f"adsa-convert: error: {e}\n")
    config = load_config(out)
    print(f"wrote {out}: {_describe(config)}, grid {config.grid_size}x{config.grid_size}, dtype {a.dtype}")


if __name__ == "__main__":
    main()
