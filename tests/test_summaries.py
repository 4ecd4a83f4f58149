"""TopK-V block summaries (adsa_vllm/worker/summaries.py) read the KV cache in its own element type.

vLLM stores an fp8 KV cache as uint8; summarising those bytes as integers would rank blocks by garbage. No engine:
a FLASH_ATTN-layout cache (num_blocks, H, block_size, 2 * head_dim) built by hand.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from adsa_vllm.policy.topk_v import TopKV
from adsa_vllm.worker.summaries import BlockSummaries


@pytest.mark.parametrize("dtype_name,fp8", [("fp8", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_cache_is_summarised_in_its_own_dtype(dtype_name, fp8):
    nb, h, bs, d = 6, 2, 16, 8
    kv = torch.randn(nb, h, bs, 2 * d, generator=torch.Generator().manual_seed(0)).to(fp8)
    layers = [SimpleNamespace(kv_cache=kv.view(torch.uint8), head_size=d, kv_cache_dtype=dtype_name)] * 2
    ids = torch.tensor([1, 4, 5])
    summaries = BlockSummaries()
    summaries.write(TopKV(), ids, layers, "FLASH_ATTN")
    want = TopKV.summarize(kv[ids][..., d:].float().transpose(1, 2)).to(torch.bfloat16)   # [n, H, D]
    for layer in range(2):
        assert torch.equal(summaries.table[ids, layer], want)
    assert not summaries.table[torch.tensor([0, 2, 3])].any()      # blocks not asked for stay untouched
