"""The ADSA attention backend: the platform's paged kernel, fed only the blocks a sequence keeps.

`make_adsa_backend(inner)` subclasses the inner backend (CPU_ATTN, FLASH_ATTN, TRITON_ATTN; pattern of vLLM's
ChunkedLocalAttention), so `get_name()` and the KV layout stay the inner ones:
  * Builder.build: `plan_step` decides evictions and which logical blocks each decode row keeps; the inner builder
    then gets a compacted block table [kept blocks...] and compacted seq_lens (every kept block is full except the
    tail, which is all a paged kernel needs; K/V writes still go to the positional slot). Both live in persistent
    buffers, so the addresses a CUDA graph captured stay valid on every replay.
  * Impl.forward: the inner kernel; it also saves the decode query rows that query-dependent policies score with
    after the step (worker/saved_queries.py: one copy, which CUDA graphs capture), and only for layouts with token
    edges it recomputes the attention of the rows concerned (worker/token_edges.py).
"""

from __future__ import annotations

import functools
import time

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionCGSupport, CommonAttentionMetadata

from adsa_vllm.worker.kept_tables import KeptTables
from adsa_vllm.worker.planner import plan_step


@functools.lru_cache
def make_adsa_backend(inner: type[AttentionBackend]) -> type[AttentionBackend]:
    inner_builder, inner_impl = inner.get_builder_cls(), inner.get_impl_cls()
    backend_name = inner.get_name()

    class ADSAMetadataBuilder(inner_builder):  # type: ignore[misc, valid-type]
        @classmethod
        def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
            if kv_cache_spec.adsa.layout().token_edges:
                # Token edges (worker/token_edges.py) run Python inside each layer's forward: keep attention out of
                # CUDA graphs. (Other engines refuse such per-request settings: request_validation.py.)
                return AttentionCGSupport.NEVER
            return super().get_cudagraph_support(vllm_config, kv_cache_spec)

        def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
                  fast_build: bool = False):
            cm = common_attn_metadata
            ctx = self.vllm_config.compilation_config.static_forward_context
            layers = [ctx[name] for name in self.layer_names]
            runtime = layers[0].adsa_runtime
            t0 = time.perf_counter()
            plan = plan_step(runtime, cm, layers, backend_name)
            cm = self._persistent(cm, plan)
            runtime.stats.host_s += time.perf_counter() - t0
            runtime.stats.steps += 1
            metadata = super().build(common_prefix_len, cm, fast_build)
            metadata.adsa_edges = plan.edges
            return metadata

        def _persistent(self, cm: CommonAttentionMetadata, plan) -> CommonAttentionMetadata:
            if getattr(self, "_adsa_tables", None) is None:
                self._adsa_tables = KeptTables()
            table, seq_lens = self._adsa_tables.update(cm.block_table_tensor, cm.seq_lens, plan,
                                                       self.vllm_config.scheduler_config.max_num_seqs)
            if len(plan.rows) == 0:
                return cm.replace(block_table_tensor=table, seq_lens=seq_lens)
            n = len(plan.seq_lens)
            upper = cm.seq_lens_cpu_upper_bound
            if upper is not None:
                upper = upper.clone()
                upper[:n] = torch.from_numpy(plan.seq_lens).to(upper.dtype)
            return cm.replace(block_table_tensor=table, seq_lens=seq_lens, max_seq_len=int(plan.seq_lens.max()),
                              seq_lens_cpu_upper_bound=upper, _seq_lens_cpu=None, _num_computed_tokens_cpu=None,
                              _num_computed_tokens_cache=None)

    class ADSAImpl(inner_impl):  # type: ignore[misc, valid-type]
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            layer.adsa_runtime.queries.save(layer.adsa_index, query, planned=attn_metadata is not None)
            edges = getattr(attn_metadata, "adsa_edges", None)
            if edges is not None:   # prefix and window at token granularity (worker/token_edges.py)
                edges.attend(query, kv_cache, output, backend_name, self.head_size, self.scale)
            return out

    class ADSABackend(inner):  # type: ignore[misc, valid-type]
        @staticmethod
        def get_builder_cls():
            return ADSAMetadataBuilder

        @staticmethod
        def get_impl_cls():
            return ADSAImpl

    ADSABackend.__name__ = ADSABackend.__qualname__ = f"ADSA_{inner.__name__}"
    return ADSABackend

