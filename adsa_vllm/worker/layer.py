"""The model-facing side: `make_runtime` (one per model instance) and `make_attention` (one per layer).

With ADSA off these return None and a stock vLLM `Attention`. With ADSA on, layers wrap the platform's kernel in
the ADSA backend and declare an `ADSASpec`, which routes the scheduler to `ADSAManager`. The model picks the
backend itself because the CPU platform ignores --attention-backend.
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.selector import get_attn_backend

from adsa_vllm.engine.spec import ADSASpec
from adsa_vllm.settings import EngineSettings
from adsa_vllm.worker.backend import make_adsa_backend
from adsa_vllm.worker.runtime import ADSARuntime


def make_runtime(vllm_config: VllmConfig, model_cfg) -> ADSARuntime | None:
    engine = EngineSettings.from_vllm_config(vllm_config)   # resolved and validated by the config hook
    settings = engine.adsa
    if settings is None:
        return None
    tp_group = None
    if vllm_config.parallel_config.tensor_parallel_size > 1:
        from vllm.distributed import get_tp_group
        tp_group = get_tp_group()
    return ADSARuntime(settings=settings, num_layers=model_cfg.n_layer, tp_group=tp_group,
                       branches=2 if engine.guidance.enabled else 1,
                       max_rows=vllm_config.scheduler_config.max_num_seqs)


class ADSAAttention(Attention):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, *, runtime: ADSARuntime, cache_config, prefix):
        kv_cache_dtype = cache_config.cache_dtype if cache_config is not None else "auto"
        inner = get_attn_backend(head_size, torch.get_default_dtype(), kv_cache_dtype)
        super().__init__(num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         prefix=prefix, attn_backend=make_adsa_backend(inner))
        self.adsa_runtime = runtime
        self.adsa_index = len(runtime.layers)   # its buffer of saved queries (worker/saved_queries.py)
        runtime.layers.append(self)   # swap preemption copies every ADSA layer's blocks (worker/host_kv.py)

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return ADSASpec.from_full(super().get_kv_cache_spec(vllm_config), self.adsa_runtime.settings)


def make_attention(num_heads: int, head_size: int, scale: float, num_kv_heads: int, *, vllm_config: VllmConfig,
                   runtime: ADSARuntime | None, prefix: str) -> Attention:
    cache_config = vllm_config.cache_config
    if runtime is None:
        return Attention(num_heads, head_size, scale, num_kv_heads=num_kv_heads, cache_config=cache_config,
                         prefix=prefix)
    return ADSAAttention(num_heads, head_size, scale, num_kv_heads, runtime=runtime, cache_config=cache_config,
                         prefix=prefix)
