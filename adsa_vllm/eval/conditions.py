"""What an eval run conditions on: class ids (c2i) or captions (t2i), as the vLLM prompts of its images.

Image i of a run has condition i % len(conditions): the conditions cycle, so every stretch of len(conditions)
images holds each condition once. That keeps ADM's evaluator honest on our npz files: it scores the Inception
Score over consecutive splits of 5,000 images, and class-major order would give each split a tenth of ImageNet.

Captions (t2i) are text-encoder rows, [v, caption_dim] each (adsa_vllm/llamagen/t5_captions.py), from either
  * `--caption-embeds FILE`: a .pt holding a list of [v, C] tensors or {"features": [B, L, C], "mask": [B, L]},
    or a .npz with arrays "features" [B, L, C] and "mask" [B, L] (mask: 1 = a real token);
  * `--captions FILE.txt --t5 DIR`: one caption per line, encoded by a local flan-t5-xl folder exactly as LlamaGen
    does (adsa_vllm.llamagen.t5_captions.encode_captions).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Conditions:
    prompts: list[dict]   # one vLLM prompt per condition: {"prompt_token_ids": ...} or {"prompt_embeds": ...}
    labels: list[int]     # the npz's arr_1 per condition: the class id (c2i) or the caption's line (t2i)
    kind: str             # "c2i" | "t2i"

    def __len__(self) -> int:
        return len(self.prompts)

    def of_image(self, i: int) -> int:
        """Index of the condition of image i."""
        return i % len(self.prompts)


def class_conditions(config, class_ids: list[int]) -> Conditions:
    if not class_ids:
        raise ValueError("no class to sample: give --classes or leave it out for all classes")
    return Conditions([{"prompt_token_ids": config.prompt(c)} for c in class_ids], list(class_ids), "c2i")


def caption_conditions(config, rows: list) -> Conditions:
    """Caption rows ([v, caption_dim] each) -> Conditions; ValueError naming the form the model takes."""
    import torch
    if not rows:
        raise ValueError("no caption to sample: the caption file is empty")
    prompts = []
    for i, r in enumerate(rows):
        r = torch.as_tensor(r)
        try:
            config.check_prompt_embeds(tuple(r.shape), floating=r.is_floating_point())
        except ValueError as e:
            raise ValueError(f"caption {i}: {e}") from None
        prompts.append({"prompt_embeds": r.detach().to("cpu", torch.float32)})
    return Conditions(prompts, list(range(len(rows))), "t2i")


def load_caption_embeds(path: str | Path) -> list:
    """Caption rows from a .pt (list of [v, C] tensors, or {"features", "mask"}) or .npz ("features", "mask")."""
    import torch

    from adsa_vllm.llamagen.t5_captions import caption_prompts
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--caption-embeds {path}: no such file")
    if path.suffix == ".npz":
        with np.load(path) as z:
            if not {"features", "mask"} <= set(z.files):
                raise ValueError(f"--caption-embeds {path}: a .npz needs arrays 'features' [B, L, C] and 'mask' "
                                 f"[B, L]; it holds {z.files}")
            obj = {"features": torch.from_numpy(z["features"]), "mask": torch.from_numpy(z["mask"])}
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and {"features", "mask"} <= set(obj):
        return caption_prompts(torch.as_tensor(obj["features"]).float(), torch.as_tensor(obj["mask"]))
    if isinstance(obj, (list, tuple)) and all(torch.is_tensor(r) for r in obj):
        return list(obj)
    raise ValueError(f"--caption-embeds {path}: expected a list of [v, C] tensors or {{'features': [B, L, C], "
                     "'mask': [B, L]}} (torch.save), or a .npz with 'features' and 'mask'")


def encode_caption_file(path: str | Path, t5_dir: str, batch_size: int = 32) -> list:
    """One caption per non-empty line of a text file -> caption rows, through a local T5 (LlamaGen's encoding)."""
    import torch

    from adsa_vllm.llamagen.t5_captions import caption_prompts, encode_captions, load_t5
    texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"--captions {path}: no caption in the file (one per line)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, tokenizer = load_t5(t5_dir, device=device)
    rows = []
    for start in range(0, len(texts), batch_size):
        features, mask = encode_captions(texts[start:start + batch_size], encoder, tokenizer)
        rows += [r.float().cpu() for r in caption_prompts(features, mask)]
    del encoder
    if device == "cuda":
        torch.cuda.empty_cache()   # the engine starts next and sizes its KV cache by the free memory
    return rows


__all__ = ["Conditions", "caption_conditions", "class_conditions", "encode_caption_file", "load_caption_embeds"]
