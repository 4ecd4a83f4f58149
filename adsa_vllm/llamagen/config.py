"""LlamaGen model hyper-parameters, shared by the vLLM model, the plain-PyTorch reference and the converter.

Pure Python (no torch, no vLLM): a model folder's ``config.json`` is a transformers ``LlamaConfig`` (``model_type:
"llama"``, so vLLM's config loader needs no custom class) plus the LlamaGen fields below, and
``architectures: ["LlamaGenForCausalLM"]`` routes it to this plugin.

Token layout (c2i): the prompt is ``cls_token_num`` condition ids, each ``codebook_size + class_id`` with ``class_id``
in ``[0, num_classes]`` (``num_classes`` itself is the null class used for classifier-free guidance); the model then
emits exactly ``grid_size**2`` image-token ids in ``[0, codebook_size)``.

Token layout (t2i, ``model_type="t2i"``): the condition is a caption, ``cls_token_num`` (120) rows of
``caption_dim`` (2048) text-encoder features, projected by the caption MLP. LlamaGen left-pads short captions and
masks the padding out of every attention; here a prompt is the *valid* caption rows only (1..cls_token_num of them,
sent as ``prompt_embeds``), which is the same computation: condition positions have all-zero rotary rows (their q
and k are zero), so where a caption row sits does not matter, and the image tokens keep their official positions
``cls_token_num + i`` whatever the caption length (the vLLM model asks for those positions,
adsa_vllm/llamagen/caption.py).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

ARCHITECTURE = "LlamaGenForCausalLM"


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class LlamaGenConfig:
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    codebook_size: int = 16384
    num_classes: int = 1000
    cls_token_num: int = 1
    grid_size: int = 16
    model_type: str = "c2i"       # "c2i" (class-conditional) | "t2i" (text-conditional, caption features)
    caption_dim: int = 2048       # t2i: width of one caption row (flan-t5-xl features)

    def __post_init__(self):
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be a multiple of n_head={self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.kv_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim={self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type={self.model_type!r}: choose 'c2i' (class-conditional) or 't2i' "
                             "(text-conditional)")
        if self.is_t2i and self.dim > self.caption_dim:
            # One inputs_embeds buffer carries caption rows and (zero-padded) image-token rows.
            raise ValueError(f"t2i: dim={self.dim} > caption_dim={self.caption_dim} is not supported (the official "
                             "t2i models have dim <= caption_dim)")
        if self.grid_size < 1 or self.cls_token_num < 1:
            raise ValueError("grid_size and cls_token_num must be >= 1")

    @property
    def is_t2i(self) -> bool:
        return self.model_type == "t2i"

    @property
    def uses_prompt_embeds(self) -> bool:
        """A t2i condition is caption features, sent as vLLM prompt_embeds (the ModelSpec contract)."""
        return self.is_t2i

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    def position_offset(self, prompt_len: int) -> int:
        """Position (RoPE row) of sequence index 0 for a condition of `prompt_len` rows, so that image token i sits
        at cls_token_num + i whatever the condition's length: 0 for a class token, 120 - v for a compact caption of
        v rows (condition rows all have zero angle). The vLLM path (llamagen/caption.py) and the reference use it."""
        return self.cls_token_num - prompt_len

    @property
    def max_seq_len(self) -> int:
        """Prompt + every image token (the last image token is emitted but never fed back)."""
        return self.cls_token_num + self.image_tokens

    @property
    def input_vocab_size(self) -> int:
        """Codebook ids, then (c2i) one id per class and the null class; a t2i prompt is embeddings, not ids."""
        return self.codebook_size if self.is_t2i else self.codebook_size + self.num_classes + 1

    def check_prompt_embeds(self, shape: tuple, floating: bool = True) -> None:
        """Raise ValueError naming the valid form unless `shape` is a t2i prompt: [rows, caption_dim] with
        1 <= rows <= cls_token_num (the valid caption rows, padding left out)."""
        if not self.is_t2i:
            raise ValueError("this is a class-to-image LlamaGen: send prompt_token_ids = config.prompt(class_id), "
                             "not prompt_embeds")
        ok = len(shape) == 2 and 1 <= shape[0] <= self.cls_token_num and shape[1] == self.caption_dim
        if not ok or not floating:
            raise ValueError(
                f"a text-to-image prompt is prompt_embeds of shape [rows, {self.caption_dim}] in a floating dtype, "
                f"1 <= rows <= {self.cls_token_num}: the caption's valid text-encoder rows, padding left out "
                f"(adsa_vllm.llamagen.t5_captions.caption_prompt makes it from features and mask); got shape "
                f"{list(shape)}" + ("" if floating else " with a non-floating dtype"))

    def class_token(self, class_id: int) -> int:
        if self.is_t2i:
            raise ValueError("this is a text-to-image LlamaGen: its prompt is caption features (prompt_embeds), "
                             "not a class id")
        if not 0 <= class_id <= self.num_classes:
            raise ValueError(
                f"class id {class_id} is out of range: valid ids are 0..{self.num_classes - 1} "
                f"(and {self.num_classes} for the null/unconditional class)")
        return self.codebook_size + class_id

    def check_prompt(self, ids: list[int]) -> None:
        """Raise ValueError naming the valid form unless `ids` is a condition prompt of this model."""
        if self.is_t2i:
            raise ValueError(
                f"this is a text-to-image LlamaGen: send the caption as prompt_embeds [rows, {self.caption_dim}] "
                f"(1 <= rows <= {self.cls_token_num}), not prompt_token_ids; see "
                "adsa_vllm.llamagen.t5_captions.caption_prompt")
        lo, hi = self.codebook_size, self.codebook_size + self.num_classes
        if len(ids) != self.cls_token_num or any(not lo <= i <= hi for i in ids):
            bad = [i - lo for i in ids if not lo <= i <= hi]
            raise ValueError(
                f"a LlamaGen prompt is {self.cls_token_num} condition token id(s) codebook_size + class_id = "
                f"{lo} + class_id, with class_id in 0..{self.num_classes - 1} ({self.num_classes} = null class "
                f"for CFG), i.e. ids {lo}..{hi}; got {len(ids)} id(s)"
                + (f" with class ids {bad[:4]} out of range" if bad else ""))

    def prompt(self, class_id: int) -> list[int]:
        return [self.class_token(class_id)] * self.cls_token_num

    def null_prompt(self, ids: list[int] | None = None) -> list[int] | None:
        """The unconditional condition of any prompt: the null class's ids (c2i); None for t2i, whose model holds a
        learned null caption (llamagen/caption.py)."""
        return None if self.is_t2i else self.prompt(self.num_classes)

    # ---- config.json (a transformers LlamaConfig with extra fields) ----
    def to_hf_dict(self) -> dict:
        d = {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.kv_heads,
            "intermediate_size": self.ffn_hidden,
            "vocab_size": self.input_vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_base,
            "tie_word_embeddings": False,
            # Image tokens have no end-of-sequence: without these, LlamaConfig's defaults (eos 2) stop generation.
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            "torch_dtype": "float32",
            "llamagen": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
        }
        if self.is_t2i:
            # vLLM sizes its inputs_embeds buffer by `projection_dim` (ModelConfig.get_inputs_embeds_size): caption
            # rows are that wide. An "mrope_section" makes vLLM ask the model for each request's positions
            # (SupportsMRoPE), which keeps the image tokens at their official positions for any caption length.
            d["projection_dim"] = self.caption_dim
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_base,
                                    "mrope_section": [self.head_dim // 4, self.head_dim // 4]}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> "LlamaGenConfig":
        if "llamagen" not in d:
            raise ValueError("config.json has no 'llamagen' section: is this a LlamaGen model folder? "
                             "Convert official checkpoints with `python -m adsa_vllm.llamagen.convert`.")
        return cls(**d["llamagen"])


# Official LlamaGen sizes (FoundationVision/LlamaGen autoregressive/models/gpt.py GPT_models).
PRESETS: dict[str, dict] = {
    "B": dict(dim=768, n_layer=12, n_head=12),
    "L": dict(dim=1024, n_layer=24, n_head=16),
    "XL": dict(dim=1280, n_layer=36, n_head=20),
    "XXL": dict(dim=1536, n_layer=48, n_head=24),
    "XXXL": dict(dim=2560, n_layer=48, n_head=40),
    "1B": dict(dim=2048, n_layer=22, n_head=32),
    "3B": dict(dim=3200, n_layer=24, n_head=32),
}


# Official text-to-image settings (t2i_XL_stage1_256.pt: a 120-row flan-t5-xl caption).
T2I = dict(model_type="t2i", cls_token_num=120, caption_dim=2048)


def preset(name: str, **overrides) -> LlamaGenConfig:
    """An official size; `preset("XL", **T2I)` is the text-to-image XL."""
    if name not in PRESETS:
        raise ValueError(f"unknown LlamaGen preset {name!r}; choose one of {sorted(PRESETS)}")
    return LlamaGenConfig(**{**PRESETS[name], **overrides})


def grid_for_image_size(image_size: int, downsample: int = 16) -> int:
    grid = image_size // downsample
    if grid * downsample != image_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the tokenizer downsample {downsample}")
    return grid


__all__ = ["ARCHITECTURE", "LlamaGenConfig", "PRESETS", "T2I", "preset", "find_multiple", "grid_for_image_size"]
