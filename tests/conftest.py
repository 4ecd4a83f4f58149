"""Shared fixtures. vLLM runs in-process on CPU: the environment below must be set before vLLM is imported.

  * VLLM_ENABLE_V1_MULTIPROCESSING=0: EngineCore lives in this process, so tests can reach the scheduler
    (`llm.llm_engine.engine_core.engine_core.scheduler`) and the worker's KV tensors.
  * VLLM_CPU_KVCACHE_SPACE=1: 1 GiB of KV cache (tests that need an exact pool use num_gpu_blocks_override).
  * TORCHDYNAMO_DISABLE=1: skips the ~20 s torch.compile warm-up of vLLM's CPU sampler (the model runs eagerly).

vLLM is only imported by the tests that need it (test_policy.py stays pure torch). `engines` keeps at most one
vllm.LLM alive at a time: asking for a different key deletes the previous engine first, and every module
ends with none alive.
"""

from __future__ import annotations

import gc
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402

# Small LlamaGen shapes the CPU attention kernel accepts (head_dim 32).
GRID16 = dict(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
GRID24 = dict(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=24)


def _make_dir(tmp_path_factory, name: str, shape: dict, seed: int = 0):
    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import LlamaGenConfig
    config = LlamaGenConfig(**shape)
    # std 0.1 keeps greedy argmax well separated (no near-ties between vLLM and the reference).
    return make_random_model_dir(tmp_path_factory.mktemp(name), config, seed=seed, std=0.1), config


@pytest.fixture(scope="session")
def model16(tmp_path_factory):
    """(model folder, LlamaGenConfig) of a random 16x16-grid LlamaGen."""
    return _make_dir(tmp_path_factory, "llamagen16", GRID16)


@pytest.fixture(scope="session")
def model24(tmp_path_factory):
    """(model folder, LlamaGenConfig) of a random 24x24-grid LlamaGen."""
    return _make_dir(tmp_path_factory, "llamagen24", GRID24)


class _Engines:
    """At most one live vllm.LLM; `get(key, model_dir, **kwargs)` builds it on first use for that key."""

    def __init__(self):
        self.key = None
        self.llm = None

    def get(self, key, model_dir, **kwargs):
        if self.key != key:
            self.close()
            from vllm import LLM
            args = dict(dtype="float32", enforce_eager=True, block_size=16)
            args.update(kwargs)
            self.llm = LLM(model=str(model_dir), **args)
            self.key = key
        return self.llm

    def close(self):
        if self.llm is not None:
            llm, self.llm, self.key = self.llm, None, None
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass
            del llm
            gc.collect()


_ENGINES = _Engines()


@pytest.fixture(scope="session")
def engines():
    yield _ENGINES
    _ENGINES.close()


@pytest.fixture(scope="module", autouse=True)
def _close_engines_after_module():
    yield
    _ENGINES.close()


class _RefCache:
    """Reference greedy generations (tokens and log_softmax), memoised per (model, ADSA settings, class id).

    The plain-PyTorch reference is the slow part of these tests (a 24x24 image is 576 sequential steps), so each
    class is computed once per session and shared between modules; missing classes are generated as one batch.
    """

    def __init__(self):
        self.models = {}
        self.rows = {}

    def greedy(self, model_dir, class_ids, adsa=None, *, logprobs=True, max_new_tokens=None):
        import torch

        from adsa_vllm.llamagen.convert import load_reference
        from adsa_vllm.reference.generate import GenerationResult, generate
        base = (str(model_dir), adsa, max_new_tokens)
        missing = [c for c in dict.fromkeys(class_ids) if base + (c,) not in self.rows]
        if missing:
            if str(model_dir) not in self.models:
                self.models[str(model_dir)] = load_reference(model_dir)
            res = generate(self.models[str(model_dir)], missing, greedy=True, adsa=adsa, return_logprobs=True,
                           max_new_tokens=max_new_tokens)
            for i, c in enumerate(missing):
                self.rows[base + (c,)] = (res.tokens[i], res.logprobs[i])
        toks, lps = zip(*(self.rows[base + (c,)] for c in class_ids))
        return GenerationResult(torch.stack(toks), torch.stack(lps) if logprobs else None)


@pytest.fixture(scope="session")
def reference():
    """`reference.greedy(model_dir, class_ids, adsa=ADSAConfig|None)` -> GenerationResult (tokens, logprobs)."""
    return _RefCache()
