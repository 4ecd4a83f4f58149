"""Every layer's paged KV cache seen by one Triton kernel: a table of the caches' base addresses.

vLLM allocates each layer's cache on its own, all with one shape and stride. A kernel that touches every layer at once
(token_copy.py, layer_gather.py) reads layer l's base address from an int64 table and offsets inside it, the pattern
of Triton's grouped GEMM. Offsets count words of the widest size (8, 4, 2 or 1 bytes) that every address, stride and
entry length is a multiple of, so the kernels move whole words, not bytes.

Applies to CUDA caches in a layout whose token-head entry (K then V, 2 x head_size values) is contiguous
(FLASH_ATTN / TRITON_ATTN / FLEX_ATTENTION), all layers alike, with Triton importable; CPU_ATTN (keys stored
transposed) and the CPU keep the per-layer torch paths of kv_views.py, which are also the kernels' test oracles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adsa_vllm.worker.device_copy import on_device

try:
    import triton
    import triton.language as tl
except ImportError:   # a CPU install without Triton: the per-layer torch paths
    triton = tl = None

WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
logger = logging.getLogger(__name__)
_failed: list[str] = []   # why the kernels were turned off in this process (a compile error), if they were


@dataclass(frozen=True)
class CacheTable:
    addresses: torch.Tensor     # [layers] int64 base addresses, on the caches' device
    word: int                   # bytes per word
    block: int                  # strides of (block, KV head, slot) in words
    head: int
    slot: int
    half: int                   # head_size values (where V starts in an entry) in words
    alike: bool                 # CUDA caches of one shape, stride and dtype, each entry contiguous: one kernel fits


_TABLES: dict = {}


def cache_table(caches: list[torch.Tensor], head_size: int) -> CacheTable:
    """The table of these caches, made once per set of caches (vLLM allocates them once; a new allocation gives
    new addresses and so a new table): on the hot path a call only reads the caches' addresses."""
    first = caches[0]
    key = (tuple(c.data_ptr() for c in caches), first.shape, first.stride(), first.dtype, head_size)
    table = _TABLES.get(key)
    if table is None:
        size = first.element_size()
        strides = [x * size for x in first.stride()[:3]]
        word = next(w for w in WORD_DTYPES if all(x % w == 0 for x in (*strides, *key[0], head_size * size)))
        alike = (first.device.type == "cuda" and first.stride(-1) == 1
                 and all(c.shape == first.shape and c.stride() == first.stride() and c.dtype == first.dtype
                         for c in caches))
        if len(_TABLES) > 8:
            _TABLES.clear()
        table = _TABLES[key] = CacheTable(on_device(key[0], first.device, torch.int64), word,
                                          *(x // word for x in strides), head_size * size // word, alike)
    return table


def applies(caches: list[torch.Tensor], backend: str, head_size: int) -> CacheTable | None:
    """The table of these caches where one kernel can address them, else None (per-layer torch)."""
    if triton is None or _failed or backend == "CPU_ATTN" or not caches:
        return None
    table = cache_table(caches, head_size)
    return table if table.alike else None


def run(kernel, fallback, fused: bool | None, caches: list[torch.Tensor], backend: str, head_size: int):
    """`kernel(table)` where it applies (or `fused` is True), else `fallback()`. Chosen by default (`fused` None), a
    kernel that fails (it compiles on first use: a Triton or driver this code was not tried on) is turned off for
    the process with a warning, and the per-layer torch path runs instead: slower, the same result."""
    if fused is not None:
        return kernel(cache_table(caches, head_size)) if fused else fallback()
    table = applies(caches, backend, head_size)
    if table is None:
        return fallback()
    try:
        return kernel(table)
    except Exception as e:  # noqa: BLE001 - the torch path gives the same result
        _failed.append(repr(e))
        logger.warning("ADSA: the Triton kernels over all layers' KV caches failed (%r); using per-layer torch "
                       "copies from now on (same results, slower)", e)
        return fallback()


if triton is not None:
    @triton.jit
    def layer_base(addresses, layer, live, WORD: tl.constexpr):
        """Layer `layer`'s cache as a pointer to words of WORD bytes (0 where not `live`)."""
        address = tl.load(addresses + layer, mask=live, other=0)
        if WORD == 8:
            base = address.to(tl.pointer_type(tl.int64), bitcast=True)
        elif WORD == 4:
            base = address.to(tl.pointer_type(tl.int32), bitcast=True)
        elif WORD == 2:
            base = address.to(tl.pointer_type(tl.int16), bitcast=True)
        else:
            base = address.to(tl.pointer_type(tl.uint8), bitcast=True)
        return base
