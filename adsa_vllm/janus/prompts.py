"""Janus-Pro text prompts as the ids the served model takes (adsa_vllm/janus/config.py: text id t is served as
codebook_size + t).

The format is transformers' (its Janus chat template with a generation prompt, then the processor's image start
token in image mode) and deepseek-ai/Janus's (its sft template with an empty system prompt, then
`<begin_of_image>`): `<bos><|User|>: {text}\\n\\n<|Assistant|>:<begin_of_image>`. BOS and the image start are
placed by id, as the config names them, so a tokenizer that would add or split them differently cannot change the
prompt. The tokenizer is the model folder's (the converter copies DeepSeek's tokenizer files there).
"""

from __future__ import annotations

from pathlib import Path


def chat_text(text: str) -> str:
    return f"<|User|>: {text.strip()}\n\n<|Assistant|>:"


def prompt_ids(tokenizer, text: str, config) -> list[int]:
    """One text -> the served prompt ids (checked: ValueError naming the fix, e.g. a text too long)."""
    ids = tokenizer(chat_text(text), add_special_tokens=False)["input_ids"]
    served = config.text_ids([config.bos_token_id, *ids, config.boi_token_id])
    config.check_prompt(served)
    return served


def text_prompts(model_dir: str | Path, texts: list[str]) -> list[list[int]]:
    """The family's `text_prompts` tool (adsa_vllm/family.py): texts -> served prompts, with the folder's tokenizer."""
    from transformers import AutoTokenizer

    from adsa_vllm.family import load_config
    config = load_config(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir} has no usable tokenizer ({e}); convert DeepSeek's checkpoint with "
                         "`python -m adsa_vllm.janus.convert`, which copies its tokenizer files") from None
    return [prompt_ids(tokenizer, t, config) for t in texts]


__all__ = ["chat_text", "prompt_ids", "text_prompts"]
