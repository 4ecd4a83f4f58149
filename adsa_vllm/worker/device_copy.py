"""Small host arrays (block ids, row indices, masks) to the device without a stream synchronisation.

A copy from pageable host memory makes `.to(cuda)` wait for the stream first, which under async scheduling makes the
host wait for the step in flight. From pinned memory the copy is queued on the current stream and the host goes on;
the caching host allocator keeps the pinned buffer alive until the copy is done. Elsewhere (CPU) it is a plain
tensor.
"""

from __future__ import annotations

import torch


def on_device(values, dev: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list or numpy array) as a tensor on `dev`, copied from pinned memory on a GPU."""
    host = torch.as_tensor(values, dtype=dtype)
    if dev.type != "cuda":
        return host.to(dev)
    return host.pin_memory().to(dev, non_blocking=True)


__all__ = ["on_device"]
