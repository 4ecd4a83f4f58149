"""Janus-Pro image generation as a `ModelSpec` (adsa_vllm/family.py), read from a transformers
`JanusForConditionalGeneration` config.json (pure Python: no torch, no vLLM).

Token ids. Janus reads two id spaces that overlap: text ids (the LLaMA vocabulary, 102400) and image codes (the VQ
codebook, 16384). vLLM sees one: image code c is id c, and text id t is id codebook_size + t, so the served vocabulary
is codebook + text (`input_vocab_size`, declared to vLLM by the config hook). Why this way round: every part of the
plugin that reads image ids (request checks, guidance, client, images, eval) already takes them as [0, codebook_size),
with the condition's ids above (LlamaGen's class ids sit there too), and the forward tells a token's kind from its id
alone, without knowing where each request's prompt ends. vLLM never tokenizes here (the plugin's engines run without
a tokenizer): a text prompt arrives as ids, shifted by `text_ids` (adsa_vllm/janus/prompts.py makes them).

Prompt: Janus's chat format and the image start token, `<bos><|User|>: {text}\\n\\n<|Assistant|>:<begin_of_image>`,
at most `max_prompt_tokens` ids (the longest prompt the engine's ADSA defaults are checked against, as a t2i
LlamaGen's 120-row caption is). The unconditional prompt of classifier-free guidance is the same prompt with every
token but BOS and the image start replaced by the pad id (transformers' `JanusForConditionalGeneration.generate`,
image mode; DeepSeek's original pads tokens 1..-2, the same for a prompt that begins with BOS).

Heads: under guidance the config hook declares 2H heads on the text config (cond and uncond in one sequence), so the
spec derives the model's own head count from hidden_size / head_dim, which the hook leaves as they are (Janus's
LLaMA has hidden_size = heads x head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ARCHITECTURE = "JanusForConditionalGeneration"
# deepseek-ai/Janus-Pro tokenizer ids, for config.json files that do not name them: transformers keeps <begin_of_image>
# (and the pad id generate() uses) in generation_config.json, which a model's spec does not read.
JANUS_BOI_TOKEN_ID = 100016     # <begin_of_image>
JANUS_PAD_TOKEN_ID = 100015     # <｜▁pad▁｜>
DEFAULT_MAX_PROMPT_TOKENS = 128


@dataclass(frozen=True)
class JanusConfig:
    text_vocab_size: int
    hidden_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    context: int                 # max_position_embeddings: prompt + image tokens must fit
    codebook_size: int           # vq_config.num_embeddings
    grid_size: int               # sqrt(vision_config.num_image_tokens): 24 for 384 px
    gen_embed_dim: int           # vq_config.embed_dim: generation_embeddings width
    gen_aligner_dim: int         # vq_config.projection_dim: the aligner's width (= hidden_size)
    gen_aligner_layers: int      # vq_config.num_hidden_layers: Linear layers of the aligner
    gen_head_dim: int            # vq_config.image_token_embed_dim: the generation head's input (= hidden_size)
    gen_act: str                 # vq_config.hidden_act (aligner and head)
    bos_token_id: int
    pad_token_id: int
    boi_token_id: int
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    eos_token_id: int | None = None    # the text EOS: vLLM stops a request that samples this id, as served

    def __post_init__(self):
        if self.eos_token_id is not None and 0 <= self.eos_token_id < self.codebook_size:
            # vLLM takes the model's EOS (config / generation_config.json) as a stop id without our shift, and every
            # id below codebook_size is an image code: the image would end where that code is drawn.
            raise ValueError(f"Janus config: text_config.eos_token_id={self.eos_token_id} is an image code as "
                             f"vLLM serves this model (codes are 0..{self.codebook_size - 1}), so images would stop "
                             "early; set it (and generation_config.json's) to null or the tokenizer's real EOS "
                             "(Janus-Pro: 100001)")
        for name in ("bos_token_id", "pad_token_id", "boi_token_id"):
            tid = getattr(self, name)
            if not 0 <= tid < self.text_vocab_size:
                raise ValueError(f"Janus config: {name}={tid} is outside the text vocabulary "
                                 f"0..{self.text_vocab_size - 1}; set it in config.json (top level for boi_token_id, "
                                 "text_config for the others)")
        if not 1 <= self.max_prompt_tokens <= self.context - self.image_tokens:
            raise ValueError(f"Janus config: max_prompt_tokens={self.max_prompt_tokens} must be 1.."
                             f"{self.context - self.image_tokens} (context {self.context} minus {self.image_tokens} "
                             "image tokens)")
        if self.gen_aligner_dim != self.hidden_size or self.gen_head_dim != self.hidden_size:
            raise ValueError(f"Janus config: the generation aligner ({self.gen_aligner_dim}) and head "
                             f"({self.gen_head_dim}) must be as wide as the language model ({self.hidden_size})")

    # ---- the ModelSpec contract ----
    @property
    def cls_token_num(self) -> int:
        return self.max_prompt_tokens

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head

    @property
    def image_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def uses_prompt_embeds(self) -> bool:
        return False

    @property
    def input_vocab_size(self) -> int:
        return self.codebook_size + self.text_vocab_size

    def text_ids(self, token_ids: list[int]) -> list[int]:
        """Tokenizer ids -> served ids (codebook_size + id)."""
        return [self.codebook_size + t for t in token_ids]

    def check_prompt(self, ids: list[int]) -> None:
        lo, hi = self.codebook_size, self.input_vocab_size
        form = (f"a Janus prompt is 1..{self.max_prompt_tokens} text token ids shifted past the codebook "
                f"(codebook_size + id = {lo}..{hi - 1}) ending with the image start token ({lo + self.boi_token_id});"
                " adsa_vllm.janus.prompts.text_prompts(model_dir, texts) makes them")
        if not ids:
            raise ValueError(f"{form}; got an empty prompt")
        if len(ids) > self.max_prompt_tokens:
            raise ValueError(f"{form}; got {len(ids)} ids: shorten the text, or raise max_prompt_tokens in "
                             f"config.json (at most {self.context - self.image_tokens}; the engine's ADSA budget must "
                             "then hold the longer prefix)")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not lo <= i < hi]
        if bad:
            below = any(isinstance(i, int) and 0 <= i < lo for i in bad)
            raise ValueError(f"{form}; got id(s) {bad[:4]} outside it"
                             + (" (image codes or class ids are not a Janus prompt)" if below else ""))
        if ids[-1] != lo + self.boi_token_id:
            raise ValueError(f"{form}; got a prompt ending with {ids[-1]} (class ids are not a Janus prompt)")

    def check_prompt_embeds(self, shape: tuple, floating: bool = True) -> None:
        raise ValueError("Janus takes a text prompt as token ids (adsa_vllm.janus.prompts.text_prompts(model_dir, "
                         "texts)), not prompt_embeds")

    def prompt(self, class_id: int) -> list[int]:
        raise ValueError("Janus is a text-to-image model: send a text prompt (adsa_vllm.janus.prompts.text_prompts("
                         "model_dir, texts)), not a class id")

    @property
    def null_kept_ids(self) -> tuple[int, int]:
        """The served ids the unconditional prompt keeps (BOS, image start); every other text id becomes
        `null_pad_id` (the model applies the same rule per token: janus/model.py embed_pair)."""
        return self.codebook_size + self.bos_token_id, self.codebook_size + self.boi_token_id

    @property
    def null_pad_id(self) -> int:
        return self.codebook_size + self.pad_token_id

    def null_prompt(self, ids: list[int]) -> list[int]:
        return [i if i in self.null_kept_ids else self.null_pad_id for i in ids]

    @classmethod
    def from_hf_dict(cls, d: dict) -> "JanusConfig":
        if "text_config" not in d or "vq_config" not in d:
            raise ValueError("config.json has no text_config / vq_config: is this a transformers Janus folder? "
                             "Convert DeepSeek's checkpoints with `python -m adsa_vllm.janus.convert`.")
        text, vq, vision = d["text_config"], d["vq_config"], d.get("vision_config") or {}
        hidden = text["hidden_size"]
        head_dim = text.get("head_dim") or hidden // text["num_attention_heads"]
        n_head = hidden // head_dim                           # see the module docstring (guidance doubles the heads)
        declared = text["num_attention_heads"]
        n_kv = text.get("num_key_value_heads") or declared
        num_image_tokens = vision.get("num_image_tokens", 576)
        grid = math.isqrt(num_image_tokens)
        if grid * grid != num_image_tokens:
            raise ValueError(f"vision_config.num_image_tokens={num_image_tokens} is not a square grid")
        pad = text.get("pad_token_id")
        return cls(
            text_vocab_size=text["vocab_size"], hidden_size=hidden, n_layer=text["num_hidden_layers"],
            n_head=n_head, n_kv_head=n_kv * n_head // declared, head_dim=head_dim,
            context=text.get("max_position_embeddings", 4096), codebook_size=vq["num_embeddings"], grid_size=grid,
            gen_embed_dim=vq["embed_dim"], gen_aligner_dim=vq["projection_dim"],
            gen_aligner_layers=vq.get("num_hidden_layers", 2), gen_head_dim=vq["image_token_embed_dim"],
            gen_act=vq.get("hidden_act", "gelu"), bos_token_id=text.get("bos_token_id", 100000),
            pad_token_id=JANUS_PAD_TOKEN_ID if pad is None else pad,
            boi_token_id=d.get("boi_token_id", JANUS_BOI_TOKEN_ID),
            max_prompt_tokens=d.get("max_prompt_tokens", DEFAULT_MAX_PROMPT_TOKENS), eos_token_id=_first(
                text.get("eos_token_id")))


def _first(ids):
    """An id, a list of ids (a generation config may name several) or None -> the smallest id or None."""
    return min(ids) if isinstance(ids, list) and ids else ids if isinstance(ids, int) else None


__all__ = ["ARCHITECTURE", "DEFAULT_MAX_PROMPT_TOKENS", "JanusConfig"]
