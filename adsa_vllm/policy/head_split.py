"""Head split (after SSD, arXiv 2510.18716): spatial-locality heads keep only their recent window; semantic-sink
heads keep the tokens they attend to most.

Which head is which is measured, not chosen: `adsa-vllm calibrate-heads MODEL_DIR` runs full attention on a few of
the model's own samples and classes a head "L" (local) when most of its attention falls inside the local window,
else "S" (sink: `classify_heads`); the classes reach the policy as the setting `adsa.heads` ("LSLS/SSLL": one
character per head, layers split by "/"; an engine whose model folder holds head_classes.json, as the shipped
model's does, defaults to its classes: engine/config_hook.py). None: every head is a sink head.
  token: per (layer, KV head), the granularity this policy is made for. A sink head rates its candidates by its
         own softmax probability under the current query (token attention_mass); a local head by position, so
         its top-k slots hold the newest aged tokens, i.e. its window continues (slots are shared blocks: a local
         head cannot hold fewer tokens than the others, so it spends them on recency).
  block: one decision for every head, so the local heads, which need only the window (always kept), get no vote:
         a block's score is its attention mass averaged over the sink heads of the layer (0 in a layer without
         one; where no head votes, ties keep the newest blocks: streaming). Under CFG a pair's heads are
         [conditional, null]: head h has class h mod heads-per-layer. Under tensor parallelism the block form
         would see only its rank's heads with no offset (the token form gets one), so engine start and request
         validation refuse it there (request_validation.check_tensor_parallel), naming the token form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adsa_vllm.policy.attention_mass import candidate_probs
from adsa_vllm.policy.base import BlockScorer, ScoreInputs
from adsa_vllm.policy.token_scores import TokenInputs, TokenScorer, query_probs

HEAD_CLASSES_FILE = "head_classes.json"   # in a model folder: its measured classes, the engine's default `heads`
CALIBRATE = "run `adsa-vllm calibrate-heads MODEL_DIR` on this model (it writes the classes the engine reads)"


def classify_heads(window_mass: list[list[float]], local_share: float = 0.5) -> str:
    """The `adsa.heads` string of measured window masses ([layer][head]: the share of a head's attention inside the
    local window): "L" (local) where it is at least `local_share`, else "S" (sink); layers split by "/"."""
    if not 0 < local_share <= 1:
        raise ValueError(f"local_share={local_share}: a share of attention in (0, 1]")
    return "/".join("".join("L" if w >= local_share else "S" for w in layer) for layer in window_mass)


def sink_heads(heads: str | None, layer, head_index: torch.Tensor) -> torch.Tensor:
    """heads (the setting), layer an int or [R] int64, head_index [H] int64 model head indices -> bool [H] or
    [R, H]: whether each head is a sink head. Raises ValueError when the classes do not fit the model."""
    if heads is None:
        return torch.ones(head_index.shape, dtype=torch.bool, device=head_index.device).expand(
            *torch.as_tensor(layer).shape, -1)
    table = torch.tensor([[ch == "S" for ch in row] for row in heads.split("/")], device=head_index.device)
    layer = torch.as_tensor(layer, dtype=torch.int64, device=head_index.device)
    if int(layer.max()) >= table.shape[0] or int(head_index.max()) >= table.shape[1]:
        raise ValueError(f"adsa.heads classes {table.shape[0]} layers x {table.shape[1]} heads; the model has "
                         f"layer {int(layer.max())}, head {int(head_index.max())}: {CALIBRATE}")
    return table[layer][..., head_index]


@dataclass(frozen=True)
class HeadSplit(BlockScorer):
    name = "head_split"
    needs_query = True
    heads: str | None = None

    def score(self, x: ScoreInputs) -> torch.Tensor:
        r, c, bs = x.keys.shape[:3]
        h = x.query.shape[1]
        per_layer = len(self.heads.split("/")[0]) if self.heads else h
        if h % per_layer:
            raise ValueError(f"adsa.heads has {per_layer} heads per layer; this layer scores {h}: {CALIBRATE}")
        sink = sink_heads(self.heads, x.layer, torch.arange(h, device=x.query.device) % per_layer).float()
        sink = sink.expand(r, h)                                                # [H] or [R, H] (a layer per row)
        mass = candidate_probs(x).reshape(r, h, c, bs).sum(-1)                  # [R, H, C]
        return torch.einsum("rhc,rh->rc", mass, sink) / sink.sum(-1, keepdim=True).clamp(min=1)


@dataclass(frozen=True)
class TokenHeadSplit(TokenScorer):
    name = "head_split"
    needs_query = True
    reads = ("keys",)
    heads: str | None = None

    def score(self, x: TokenInputs) -> torch.Tensor:
        r, n, hkv, _ = x.keys.shape
        mass = query_probs(x).reshape(r, hkv, -1, n).mean(2)                     # token attention_mass
        recency = x.positions.to(torch.float32).expand(r, hkv, n)                # token streaming
        head = torch.arange(hkv, device=mass.device, dtype=torch.int64) + x.head_offset
        sink = sink_heads(self.heads, x.layer, head)                             # [Hkv] or [R, Hkv]
        sink = sink.expand(r, hkv) if sink.dim() == 1 else sink
        return torch.where(sink[..., None], mass, recency)
