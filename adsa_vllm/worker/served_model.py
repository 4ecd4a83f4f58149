"""What every family's vLLM model class (the outer module vLLM builds) shares: the worker finds the model's runtimes
as `adsa_runtime` and `guidance_runtime` (worker/worker.py), and embedding and forward belong to the inner module
`self.model`, which also owns both runtimes. A family's class adds its head and `compute_logits`
(guidance/runtime.image_logits) and its `load_weights`."""

from __future__ import annotations

import torch
from torch import nn


class ServedImageModel(nn.Module):
    model: nn.Module   # set by the subclass: .runtime, .guidance, embed_input_ids(ids), forward(...)

    @property
    def adsa_runtime(self):
        return self.model.runtime

    @property
    def guidance_runtime(self):
        return self.model.guidance

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)


__all__ = ["ServedImageModel"]
