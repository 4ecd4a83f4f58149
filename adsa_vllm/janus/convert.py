"""Convert an original DeepSeek Janus / Janus-Pro checkpoint (github deepseek-ai/Janus `MultiModalityCausalLM`) into
the transformers `JanusForConditionalGeneration` layout: config.json + model.safetensors (+ the tokenizer files).

Offline, local files only: the source is the checkpoint folder as published (config.json with language_config /
vision_config / aligner_config / gen_vision_config / gen_aligner_config / gen_head_config, weights in
pytorch_model*.bin or *.safetensors, sharded or not) or one weights file with --config. Sizes come from the weights;
the SigLIP head count is not in the weights, so it comes from the vision tower's `model_name` preset or
--vision-heads. Every converted tensor is checked against the keys and shapes of the transformers model the
config describes (built on the meta device), so a missed or stray rename is an error, not a silent drop.

    python -m adsa_vllm.janus.convert Janus-Pro-7B/ models/janus-pro-7b --dtype bfloat16
    python -m adsa_vllm.janus.convert pytorch_model.bin OUT --config config.json --vision-heads 16
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The SigLIP towers the original code can build (janus/models/siglip_vit.py SigLIP_MODEL_CONFIG): their head counts.
SIGLIP_HEADS = {"siglip_large_patch16_384": (1024, 16), "siglip_so400m_patch14_384": (1152, 16),
                "siglip_so400m_patch14_224": (1152, 16)}
# Tokenizer and processor files copied next to the weights, so the output folder serves on its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "processor_config.json")
# Original tensors that no transformers module holds: the VQ usage counter (training statistics), the SigLIP
# attention-pool head (built but never run: the tower is used with ignore_head=True) and rotary caches.
DROPPED = re.compile(r"^(gen_vision_model\.quantize\.codebook_used|vision_model\.vision_tower\.attn_pool\..*"
                     r"|.*rotary_emb\.inv_freq)$")

# Original top-level module -> transformers prefix (MultiModalityCausalLM.__init__ -> JanusModel.__init__).
PARTS = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
         ("gen_vision_model.", "model.vqmodel."), ("gen_embed.", "model.generation_embeddings."),
         ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
         ("gen_head.vision_head.", "model.generation_head.vision_head."),
         ("gen_aligner.", "model.generation_aligner."), ("vision_model.vision_tower.", "model.vision_model."),
         ("aligner.", "model.aligner."))
# Within the VQ model: LlamaGen's VQ-16 names (vq_model.py) -> JanusVQVAE's (taming's encoder.down / decoder.up).
VQ_RENAMES = ((r"^(encoder)\.conv_blocks\.(\d+)\.res\.", r"\1.down.\2.block."),
              (r"^(encoder)\.conv_blocks\.", r"\1.down."),
              (r"^(decoder)\.conv_blocks\.(\d+)\.res\.", r"\1.up.\2.block."),
              (r"^(decoder)\.conv_blocks\.", r"\1.up."),
              (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid.block_1."),
              (r"^(encoder|decoder)\.mid\.1\.", r"\1.mid.attn_1."),
              (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid.block_2."))
# Within the SigLIP tower: timm's VisionTransformer names -> JanusVisionModel's (SigLIP-style).
VISION_RENAMES = ((r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
                  (r"^pos_embed$", "embeddings.position_embedding.weight"),
                  (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
                  (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
                  (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection_layer."),
                  (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),   # split below
                  (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
                  (r"^norm\.", "post_layernorm."))


class ConversionError(ValueError):
    """The source is not an original Janus checkpoint this converter understands; the message names the fix."""


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n:
            return key
    return key


def _projector_rename(rest: str) -> str:
    """MlpProjector (mlp_gelu) is Sequential(Linear, GELU, Linear, ...): layers.0 -> fc1, layers.2k ->
    hidden_layers.(k-1); odd indices are the GELUs and hold no tensors."""
    m = re.match(r"^layers\.(\d+)\.(.*)$", rest)
    if m is None or int(m.group(1)) % 2:
        raise ConversionError(f"unexpected projector tensor {rest!r} (only the mlp_gelu projector is supported)")
    i = int(m.group(1)) // 2
    return ("fc1." if i == 0 else f"hidden_layers.{i - 1}.") + m.group(2)


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MultiModalityCausalLM tensors -> JanusForConditionalGeneration tensors (same values; the SigLIP
    fused qkv is split in three, pos_embed loses its batch axis)."""
    out = {}
    for key, value in sd.items():
        if DROPPED.match(key):
            continue
        part = next(((old, new) for old, new in PARTS if key.startswith(old)), None)
        if part is None:
            raise ConversionError(f"unexpected tensor {key!r}: not part of an original Janus MultiModalityCausalLM")
        old, new = part
        rest = key[len(old):]
        if old == "gen_vision_model.":
            rest = _rename(rest, VQ_RENAMES)
        elif old == "vision_model.vision_tower.":
            rest = _rename(rest, VISION_RENAMES)
            if rest == "embeddings.position_embedding.weight":
                value = value.squeeze(0)
        elif old in ("aligner.", "gen_aligner."):
            rest = _projector_rename(rest)
        if ".self_attn.qkv." in rest:
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[new + rest.replace(".qkv.", f".{name}.")] = chunk
        else:
            out[new + rest] = value
    return out


def _count(sd, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def _vq_config(sd: dict[str, torch.Tensor], gen_params: dict) -> dict:
    """JanusVQVAEConfig fields read from the VQ-16 weights (the original builds its VQ from the class name alone)."""
    p = "gen_vision_model.decoder.conv_blocks."
    levels = _count(sd, r"^gen_vision_model\.decoder\.conv_blocks\.(\d+)\.")
    base = sd["gen_vision_model.decoder.conv_out.weight"].shape[1]
    # decoder.conv_blocks[0] is the lowest resolution: channel multipliers run backwards.
    mult = [sd[f"{p}{i}.res.0.conv1.weight"].shape[0] // base for i in reversed(range(levels))]
    embedding = sd["gen_vision_model.quantize.embedding.weight"]
    if gen_params.get("image_token_size", embedding.shape[0]) != embedding.shape[0]:
        raise ConversionError(f"gen_vision_config says {gen_params['image_token_size']} codes, the weights hold "
                              f"{embedding.shape[0]}")
    head_in = sd["gen_head.output_mlp_projector.weight"]
    aligner_out = sd["gen_aligner.layers.0.weight"].shape[0]
    if head_in.shape[0] != aligner_out:   # transformers uses one projection_dim for both
        raise ConversionError(f"gen_head width {head_in.shape[0]} != gen_aligner width {aligner_out}: transformers' "
                              "JanusVQVAEConfig cannot express this model")
    return dict(embed_dim=embedding.shape[1], num_embeddings=embedding.shape[0], base_channels=base,
                channel_multiplier=mult, num_res_blocks=_count(sd, rf"^{re.escape(p)}0\.res\.(\d+)\.") - 1,
                latent_channels=sd["gen_vision_model.post_quant_conv.weight"].shape[0],
                projection_dim=aligner_out, num_hidden_layers=_count(sd, r"^gen_aligner\.layers\.(\d+)\.weight$"),
                image_token_embed_dim=head_in.shape[1])


def _vision_config(sd: dict[str, torch.Tensor], params: dict, vision_heads: int | None) -> dict:
    patch = sd["vision_model.vision_tower.patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    model_name = params.get("model_name", "")
    preset_width, preset_heads = SIGLIP_HEADS.get(model_name, (None, None))
    heads = vision_heads or (preset_heads if preset_width == width else None)
    if heads is None:
        raise ConversionError(f"the SigLIP head count is not in the weights (width {width}, model_name "
                              f"{model_name!r} is no known preset of that width); pass --vision-heads N")
    image_size = params.get("image_size", 384)
    positions = sd["vision_model.vision_tower.pos_embed"].shape[1]
    if positions != (image_size // patch_size) ** 2:
        raise ConversionError(f"vision_config image_size {image_size} / patch {patch_size} means "
                              f"{(image_size // patch_size) ** 2} positions, pos_embed holds {positions}")
    fc1 = sd["vision_model.vision_tower.blocks.0.mlp.fc1.weight"]
    return dict(hidden_size=width, num_hidden_layers=_count(sd, r"^vision_model\.vision_tower\.blocks\.(\d+)\."),
                num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                mlp_ratio=fc1.shape[0] / width, projection_dim=sd["aligner.layers.0.weight"].shape[0],
                depth=_count(sd, r"^aligner\.layers\.(\d+)\.weight$"))


def _special_token_ids(folder: Path | None) -> dict:
    """Token ids from the source's tokenizer.json: the image placeholder and the text model's bos/eos/pad."""
    if folder is None or not (folder / "tokenizer.json").exists():
        return {}
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tok.get("model", {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    ids = {"image_token_id": vocab["<image_placeholder>"]} if "<image_placeholder>" in vocab else {}
    special = folder / "special_tokens_map.json"
    names = json.loads(special.read_text()) if special.exists() else {}
    for role in ("bos", "eos", "pad"):
        token = names.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            ids[f"{role}_token_id"] = vocab[token]
    return ids


def janus_config(original: dict, sd: dict[str, torch.Tensor], *, vision_heads: int | None = None,
                 token_ids: dict | None = None):
    """The transformers JanusConfig of an original config.json (as a dict) and its state dict."""
    from transformers import JanusConfig
    text = dict(original["language_config"])
    text["model_type"] = "llama"
    # The original language model is a plain LlamaForCausalLM: its lm_head is tied only if its own config says so
    # (LlamaConfig's default: untied), whereas JanusConfig defaults to tied.
    tied = bool(text.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tied
    ids = dict(token_ids or {})
    image_token = {"image_token_id": ids.pop("image_token_id")} if "image_token_id" in ids else {}
    text.update(ids)
    vision = _vision_config(sd, original["vision_config"].get("params", {}), vision_heads)
    vq = _vq_config(sd, original["gen_vision_config"].get("params", {}))
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=tied, **image_token)


def validate(hf_sd: dict[str, torch.Tensor], config) -> None:
    """Keys and shapes must be exactly those of JanusForConditionalGeneration(config) (built without memory)."""
    from transformers import JanusForConditionalGeneration
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in JanusForConditionalGeneration(config).state_dict().items()}
    missing, extra = sorted(set(want) - set(hf_sd)), sorted(set(hf_sd) - set(want))
    bad = [f"{k}: {tuple(hf_sd[k].shape)} != {want[k]}" for k in sorted(set(want) & set(hf_sd))
           if tuple(hf_sd[k].shape) != want[k]]
    if missing or extra or bad:
        raise ConversionError("the converted tensors do not fit JanusForConditionalGeneration:\n  " + "\n  ".join(
            ([f"missing: {missing[:8]}"] if missing else []) + ([f"unexpected: {extra[:8]}"] if extra else [])
            + bad[:8]))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of every *.safetensors / pytorch_model*.bin (shards) in a folder."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    sd = {}
    for f in files:
        part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu",
                                                                                 weights_only=True, mmap=True)
        sd.update(part)
    return sd


def convert(source: str | Path, out_dir: str | Path, *, config_path: str | Path | None = None,
            vision_heads: int | None = None, dtype: str | None = None) -> Path:
    """Original checkpoint (folder or weights file) -> transformers Janus folder; dtype None keeps the stored one."""
    source = Path(source)
    folder = source if source.is_dir() else None
    config_path = Path(config_path) if config_path else (folder / "config.json" if folder else None)
    if config_path is None or not config_path.exists():
        raise ConversionError(f"no original config.json for {source}; pass --config PATH")
    original = json.loads(config_path.read_text())
    if "language_config" not in original or "gen_vision_config" not in original:
        raise ConversionError(f"{config_path} is not an original Janus config (no language_config / "
                              "gen_vision_config); a transformers-layout folder needs no conversion")
    sd = load_weights(source)
    config = janus_config(original, sd, vision_heads=vision_heads, token_ids=_special_token_ids(folder))
    hf_sd = convert_state_dict(sd)
    validate(hf_sd, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cast = DTYPES[dtype] if dtype else None
    save_file({k: v.detach().to(dtype=cast or v.dtype).contiguous() for k, v in sorted(hf_sd.items())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["JanusForConditionalGeneration"]   # what vLLM and the family registry route by
    config.dtype = dtype or str(sd["language_model.model.embed_tokens.weight"].dtype).removeprefix("torch.")
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if folder is not None and (folder / name).exists():
            shutil.copyfile(folder / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="adsa-janus-convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="original Janus checkpoint folder, or one weights file (.bin/.safetensors)")
    ap.add_argument("out_dir", help="folder to write (config.json + model.safetensors + tokenizer files)")
    ap.add_argument("--config", help="the original config.json (default: the checkpoint folder's)")
    ap.add_argument("--vision-heads", type=int, help="SigLIP attention heads (default: from the tower's preset)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: the stored dtype")
    a = ap.parse_args(argv)
    try:
        out = convert(a.checkpoint, a.out_dir, config_path=a.config, vision_heads=a.vision_heads, dtype=a.dtype)
    except ConversionError as e:
        ap.exit(2, f"adsa-janus-convert: error: {e}\n")
    config = json.loads((out / "config.json").read_text())
    text, vq = config["text_config"], config["vq_config"]
    print(f"wrote {out}: Janus (LLM {text['hidden_size']}x{text['num_hidden_layers']}, codebook "
          f"{vq['num_embeddings']}, image grid {vq['num_patches']}x{vq['num_patches']})")


if __name__ == "__main__":
    main()
