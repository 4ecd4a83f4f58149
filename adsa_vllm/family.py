"""The model-family contract: what ADSA, guidance and the request checks need from a family of image models, and the
registry from vLLM architecture name to family.

A family is one folder (its vLLM model, its config, its converter) plus one line in `FAMILIES`. The engine, worker,
settings and guidance read a model only through `ModelSpec` (found with `model_spec(model_config)`), never through
a family's own modules. Pure Python: no torch, no vLLM.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class ModelSpec(Protocol):
    """One model's shape as ADSA and guidance read it; a family's config object is one (duck-typed).

    The sequence is a condition (at most `cls_token_num` rows: token ids, or prompt_embeds rows when
    `uses_prompt_embeds`), then exactly `image_tokens` = grid_size**2 image-token ids in [0, codebook_size).
    Condition ids come after the codebook: the served vocabulary is [0, input_vocab_size)."""
    cls_token_num: int     # the condition's length (the longest, for a condition of variable length)
    grid_size: int         # image tokens per side
    codebook_size: int     # image-token ids are 0..codebook_size-1
    n_head: int            # attention heads (guidance declares twice as many: cond and uncond in one sequence)
    n_layer: int           # attention layers (ADSA keeps per-layer state)

    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def image_tokens(self) -> int: ...
    @property
    def uses_prompt_embeds(self) -> bool: ...      # the condition arrives as vLLM prompt_embeds (a caption)
    @property
    def input_vocab_size(self) -> int: ...         # codebook + condition ids: the width of every logits row, which
                                                   # the config hook declares as vLLM's vocabulary

    def check_prompt(self, ids: list[int]) -> None: ...       # ValueError naming the valid form, else None
    def check_prompt_embeds(self, shape: tuple, floating: bool = True) -> None: ...   # likewise, for prompt_embeds
    def prompt(self, class_id: int) -> list[int]: ...         # a class's condition ids (ValueError if none)
    def null_prompt(self, ids: list[int]) -> list[int] | None: ...   # the unconditional condition of prompt `ids`
                                                              # (it may depend on the prompt, e.g. Janus pads it);
                                                              # None: the model holds its own (a null caption)


class ModelFamily(Protocol):
    architectures: tuple[str, ...]   # config.json "architectures" names vLLM routes to this family
    model_cls: str                   # "module:Class" of its vLLM model (registered with vLLM's ModelRegistry)
    converter: str                   # "module:function" of its checkpoint converter (a main(argv))
    # User tools (adsa-vllm generate / client), "module:function" or None, found with `family_tool`:
    text_prompts: str | None         # (model_dir, texts) -> prompt ids per text; None: the prompt is a class id
    image_decoder: str | None        # (model_dir, codes [N, grid**2]) -> uint8 RGB [N, H, W, 3]; None:
                                     # adsa_vllm.images.tokens_to_images (grey levels, or the VQ-16 decoder)
    head_calibration: str | None     # (model_dir, images=, device=, seed=) -> {"window_mass": [layer][head],
                                     # ...}: where each head looks under full attention (adsa-vllm calibrate-heads);
                                     # None: the family has none (its users set adsa.heads by hand)

    def load_config(self, hf_config: dict) -> ModelSpec: ...  # config.json as a dict -> the spec; ValueError


# Architecture name -> its family, as "module:attribute" (imported on first use) or the family itself.
FAMILIES: dict[str, str | ModelFamily] = {
    "LlamaGenForCausalLM": "adsa_vllm.llamagen.family:LLAMAGEN",
    "JanusForConditionalGeneration": "adsa_vllm.janus.family:JANUS",
}


def family_of(architecture: str) -> ModelFamily | None:
    """The family serving this architecture name; None for any other model."""
    family = FAMILIES.get(architecture)
    if isinstance(family, str):
        module, _, attr = family.partition(":")
        family = getattr(importlib.import_module(module), attr)
    return family


def family_for(hf_config) -> ModelFamily | None:
    """The family of a model's HF config (its `architectures` list); None for a model no family serves."""
    for arch in getattr(hf_config, "architectures", None) or []:
        family = family_of(arch)
        if family is not None:
            return family
    return None


def model_spec(model_config) -> ModelSpec | None:
    """The spec of the model a vLLM ModelConfig (duck-typed) loads; None for a model no family serves."""
    family = family_for(model_config.hf_config)
    return None if family is None else family.load_config(model_config.hf_config.to_dict())


def family_tool(model_dir: str | Path, name: str):
    """A model folder's family tool (`text_prompts`, `image_decoder` or `head_calibration`, ModelFamily) as a
    function; None where its family has none."""
    family = _family_of_dir(model_dir)[0]
    entry = getattr(family, name, None)
    if entry is None:
        return None
    module, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module), attr)


def _family_of_dir(model_dir: str | Path) -> tuple[ModelFamily, dict]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no config.json: pass a model folder (config.json + safetensors)")
    hf_config = json.loads(path.read_text())
    architectures = hf_config.get("architectures") or []
    for arch in architectures:
        family = family_of(arch)
        if family is not None:
            return family, hf_config
    raise ValueError(f"{path}: architectures {architectures} are served by no adsa_vllm family; the families serve "
                     f"{', '.join(FAMILIES)} (adsa_vllm/family.py)")


def load_config(model_dir: str | Path) -> ModelSpec:
    """The spec of a model folder (its config.json, whichever family serves it): what the user tools (CLI, client,
    images, demo, eval) read before any engine exists. ValueError for a folder no family serves."""
    family, hf_config = _family_of_dir(model_dir)
    return family.load_config(hf_config)


__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "family_for", "family_of", "family_tool", "load_config",
           "model_spec"]
