"""The embedded default model: the folder `adsa-vllm` serves when no model is named.

The default is the LlamaGen trained on Fashion-MNIST that ships inside the package (adsa_vllm/assets/: config.json
+ model.safetensors, 10.5 MB float16, listed in pyproject's package-data): dim 256, 8 layers, 8 heads, a 28x28
grid of pixel tokens with 16 grey levels (adsa_vllm.data.fashion_mnist), 10 classes + the null class for CFG;
0.8652 test bits/token (benchmarks/train_fashion.py, log in benchmarks/results/fashion_train_h100.log).
Its images decode with `adsa_vllm.data.fashion_mnist.detokenize`.

`random_model_dir()` is the tiny randomly initialised LlamaGen (DEFAULT_CONFIG: 16x16 grid, 512 codes; fixed
seed, so the same bytes everywhere) written on first use into $ADSA_CACHE_DIR/default-<hash> (default
~/.cache/adsa-vllm/default-<hash>), the hash covering config, seed and init. It is what the default used to be,
what `default_model_dir()` falls back to if the shipped files are missing (a source tree without them), and a
fast model for tests and smoke runs. No vLLM import.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from adsa_vllm.llamagen.config import LlamaGenConfig

DEFAULT_CONFIG = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
DEFAULT_SEED = 0
# Large enough that greedy decoding is well separated (the official std 0.02 gives near-uniform logits here).
DEFAULT_STD = 0.1
_FORMAT = 1  # bump when the init or the file layout changes, so stale cache folders are not reused
SHIPPED_DIR = Path(__file__).with_name("assets")


def make_random_model_dir(out_dir: str | Path, config: LlamaGenConfig, seed: int = 0, std: float = 0.02,
                          dtype: str = "float32") -> Path:
    """Write a deterministic random LlamaGen (config.json + model.safetensors) into out_dir; returns it."""
    from adsa_vllm.llamagen.convert import save_model_folder
    from adsa_vllm.reference.model import LlamaGenReference
    model = LlamaGenReference(config).init_random_(seed, std)
    return save_model_folder(model, config, out_dir, dtype)


def cache_root() -> Path:
    return Path(os.environ.get("ADSA_CACHE_DIR") or Path.home() / ".cache" / "adsa-vllm")


def _fingerprint() -> str:
    blob = json.dumps({"cfg": DEFAULT_CONFIG.to_hf_dict(), "seed": DEFAULT_SEED, "std": DEFAULT_STD,
                       "format": _FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def shipped_model_dir() -> Path | None:
    """adsa_vllm/assets/ if it holds the trained model (config.json + model.safetensors), else None."""
    return SHIPPED_DIR if _complete(SHIPPED_DIR) else None


def default_model_dir() -> Path:
    """Folder of the default model: the shipped trained Fashion-MNIST LlamaGen, else `random_model_dir()`."""
    return shipped_model_dir() or random_model_dir()


def random_model_dir() -> Path:
    """Folder of the tiny deterministic random LlamaGen (DEFAULT_CONFIG), created in the cache on first use."""
    target = cache_root() / f"default-{_fingerprint()}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a private temp folder, then rename: concurrent first uses never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=".default-", dir=target.parent))
    try:
        make_random_model_dir(tmp, DEFAULT_CONFIG, DEFAULT_SEED, DEFAULT_STD)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target):  # lost a race to another writer: fine if theirs is complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["DEFAULT_CONFIG", "DEFAULT_SEED", "DEFAULT_STD", "SHIPPED_DIR", "cache_root", "default_model_dir",
           "make_random_model_dir", "random_model_dir", "shipped_model_dir"]
