"""What the `adsa-vllm` subcommands share (generate, client, eval): class ids or names, budget text, sampling
defaults and the offline engine's CPU settings. Its own module so that `adsa_vllm.eval` uses them without
importing cli.py (which imports eval's command)."""

from __future__ import annotations

import os
import re

# The shipped model's pixel tokens have 16 grey levels: top-k 8 is what the demo and benchmarks/quality.py sample
# with. Official LlamaGen models: sample_c2i.py's default top-k.
PIXEL_MODEL_TOP_K, VQ_MODEL_TOP_K = 8, 2000
BLOCK_SIZE = 16  # KV block size of the offline engine (ADSA supports 16 and 32)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def class_names(config) -> list[str] | None:
    """Class names of the model (the shipped Fashion-MNIST model), or None when only ids exist."""
    from adsa_vllm.data import fashion_mnist as fm
    from adsa_vllm.images import is_pixel_token_model
    return [n.lower() for n in fm.CLASS_NAMES] if is_pixel_token_model(config) and config.num_classes == 10 else None


def parse_classes(specs: list[str], config) -> list[int]:
    """Class ids or names -> ids; ValueError listing the valid ones. A name matches a whole class name or one of
    its '/'-separated parts, ignoring case and punctuation ("T-shirt", "tshirt/top", "ankle-boot")."""
    names = class_names(config) or []
    lookup = {}
    for i, n in enumerate(names):
        for alias in [n, *n.split("/")]:
            lookup[_norm(alias)] = i
    ids = []
    for s in specs:
        if re.fullmatch(r"\d+", s.strip()) and int(s) < config.num_classes:
            ids.append(int(s))
        elif _norm(s) in lookup:
            ids.append(lookup[_norm(s)])
        else:
            valid = f"class ids 0..{config.num_classes - 1}"
            if names:
                valid += " or names " + ", ".join(f"{n!r} ({i})" for i, n in enumerate(names))
            raise ValueError(f"unknown class {s!r}: valid are {valid}")
    return ids


def file_label(class_id: int, config) -> str:
    names = class_names(config)
    return re.sub(r"[^a-z0-9]+", "-", names[class_id]).strip("-") if names else f"class{class_id}"


def parse_budget(text: str) -> int | float | None:
    """'none' (never evict), a fraction of the image tokens ('0.5', '1') or a token count ('300')."""
    if text.lower() in ("none", "null", "full"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--budget {text!r}: use a fraction of the image tokens (0.5), a token count (300) or "
                         "'none'") from None
    return int(value) if value > 1 and value.is_integer() else value


def set_cpu_defaults() -> None:
    """vLLM's CPU backend refuses to start without a KV-cache size; the rest keeps start-up short."""
    import torch
    if torch.cuda.is_available():
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    # Skips the ~20 s torch.compile warm-up of vLLM's CPU sampler (the model runs eagerly anyway).
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # EngineCore in this process: no second start-up


__all__ = ["BLOCK_SIZE", "PIXEL_MODEL_TOP_K", "VQ_MODEL_TOP_K", "class_names", "file_label", "parse_budget",
           "parse_classes", "set_cpu_defaults"]
