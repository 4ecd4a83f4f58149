"""A tiny random transformers Janus model and its original DeepSeek layout (the inverse of adsa_vllm.janus.convert,
written out here independently), for the converter and image-decoding tests. CPU, fp32, seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

VISION_HEADS = 2


def tiny_config(*, image_size: int = 64, vq_levels: int = 2, num_embeddings: int = 40):
    """The VQ grid is image_size // 16 (JanusConfig derives it from the vision tower); vq_levels sets its
    upsampling (2**(levels-1) pixels per code). GroupNorm needs channels divisible by 32."""
    from transformers import JanusConfig
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=VISION_HEADS, mlp_ratio=2.0,
                           image_size=image_size, patch_size=16, projection_dim=32, depth=2),
        vq_config=dict(embed_dim=8, num_embeddings=num_embeddings, base_channels=32,
                       channel_multiplier=[1] * (vq_levels - 1) + [2], num_res_blocks=1, latent_channels=32,
                       projection_dim=32, num_hidden_layers=2, image_token_embed_dim=32),
        image_token_id=5, tie_word_embeddings=False)


def tiny_model(seed: int = 0, **config):
    """Every parameter random (norm weights too), so a swapped pair of same-shaped tensors changes outputs."""
    from transformers import JanusForConditionalGeneration
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_config(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _vq_to_original(rest: str) -> str:
    rest = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.conv_blocks.\1.res.", rest)
    rest = re.sub(r"^encoder\.down\.", "encoder.conv_blocks.", rest)
    rest = re.sub(r"^decoder\.up\.(\d+)\.block\.", r"decoder.conv_blocks.\1.res.", rest)
    rest = re.sub(r"^decoder\.up\.", "decoder.conv_blocks.", rest)
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
        rest = re.sub(rf"^(encoder|decoder)\.mid\.{name}\.", rf"\1.mid.{i}.", rest)
    return rest


def _projector_to_original(rest: str) -> str:
    if rest.startswith("fc1."):
        return "layers.0." + rest[4:]
    m = re.match(r"^hidden_layers\.(\d+)\.(.*)$", rest)
    return f"layers.{2 * (int(m.group(1)) + 1)}.{m.group(2)}"


def _vision_to_original(rest: str) -> str:
    fixed = {"embeddings.position_embedding.weight": "pos_embed"}
    if rest in fixed:
        return fixed[rest]
    rest = rest.replace("embeddings.patch_embedding.", "patch_embed.proj.").replace("post_layernorm.", "norm.")
    rest = re.sub(r"^encoder\.layers\.(\d+)\.", r"blocks.\1.", rest)
    return (rest.replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
            .replace(".self_attn.projection_layer.", ".attn.proj."))


def to_original(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """JanusForConditionalGeneration tensors -> MultiModalityCausalLM tensors (deepseek-ai/Janus names)."""
    sd = {}
    for key, value in hf_sd.items():
        if key == "lm_head.weight":
            sd["language_model.lm_head.weight"] = value
        elif key.startswith("model.language_model."):
            sd["language_model.model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.vqmodel."):
            sd["gen_vision_model." + _vq_to_original(key[len("model.vqmodel."):])] = value
        elif key.startswith("model.generation_embeddings."):
            sd["gen_embed." + key[len("model.generation_embeddings."):]] = value
        elif key.startswith("model.generation_head.proj_out."):
            sd["gen_head.output_mlp_projector." + key[len("model.generation_head.proj_out."):]] = value
        elif key.startswith("model.generation_head.vision_head."):
            sd["gen_head.vision_head." + key[len("model.generation_head.vision_head."):]] = value
        elif key.startswith(("model.generation_aligner.", "model.aligner.")):
            part, rest = key[len("model."):].split(".", 1)
            sd[("gen_aligner." if part == "generation_aligner" else "aligner.") + _projector_to_original(rest)] = value
        elif key.startswith("model.vision_model."):
            rest = key[len("model.vision_model."):]
            if re.search(r"\.self_attn\.[qkv]_proj\.", rest):
                continue   # fused below
            sd["vision_model.vision_tower." + _vision_to_original(rest)] = value
        else:
            raise KeyError(key)
    for key in hf_sd:   # timm's fused qkv: rows q, then k, then v
        if key.startswith("model.vision_model.") and ".self_attn.q_proj." in key:
            parts = [hf_sd[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            layer, kind = re.search(r"layers\.(\d+)\.self_attn\.q_proj\.(\w+)$", key).groups()
            sd[f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"] = torch.cat(parts)
    sd["vision_model.vision_tower.pos_embed"] = sd["vision_model.vision_tower.pos_embed"].unsqueeze(0)
    return sd


def original_config(config) -> dict:
    """The original config.json of a transformers JanusConfig (MultiModalityConfig's sub-configs)."""
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    mlp = lambda dim_in, n, depth: {"cls": "MlpProjector", "model_type": "aligner", "params": {
        "depth": depth, "input_dim": dim_in, "n_embed": n, "projector_type": "mlp_gelu"}}
    return {
        "model_type": "multi_modality",
        "language_config": {k: getattr(text, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "max_position_embeddings")},
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "image_size": vision.image_size, "model_name": "siglip_large_patch16_384", "select_feature": "same",
            "select_layer": -1}},
        "aligner_config": mlp(vision.hidden_size, vision.projection_dim, vision.depth),
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
            "image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim}},
        "gen_aligner_config": mlp(vq.embed_dim, vq.projection_dim, vq.num_hidden_layers),
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
            "image_token_embed": vq.projection_dim, "image_token_size": vq.num_embeddings,
            "n_embed": vq.image_token_embed_dim}},
    }


# Special tokens of the tiny tokenizer (Janus-Pro's spellings; the ids fit the tiny vocabulary).
SPECIAL_TOKENS = {"<image_placeholder>": 5, "<｜begin▁of▁sentence｜>": 1, "<｜end▁of▁sentence｜>": 2, "<｜▁pad▁｜>": 3}


def write_original(model, folder: Path) -> Path:
    """An original-layout checkpoint folder (config.json + pytorch_model.bin + tokenizer files) holding the model's
    weights, plus the tensors the original has and transformers drops (VQ usage counter, SigLIP attention pool)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_original(model.state_dict())
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)
    sd["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, 32)
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(original_config(model.config), indent=2))
    added = [{"id": i, "content": t, "special": True} for t, i in SPECIAL_TOKENS.items()]
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 10, "b": 11}}, "added_tokens": added}))
    names = list(SPECIAL_TOKENS)
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": names[1]}, "eos_token": names[2], "pad_token": names[3]}))
    return folder
