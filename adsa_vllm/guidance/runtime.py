"""Worker-side guidance state: each live request's `Guidance` and the image-token index its next sample has.

The model's `compute_logits` receives one row per request in the runner's batch order (V1 or V2 runner, bound by
the worker, see adsa_vllm/worker/worker.py) and asks `row_scales(n)` for the scale of every row. The worker feeds
`on_schedule` with each SchedulerOutput before the step runs, so the index of the token a row samples this step
(num_computed + num_scheduled - prompt length; a t2i caption's length varies per request) is known on the host.
A preempted request keeps its guidance (it resumes); a finished one is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from adsa_vllm.guidance.settings import Guidance, GuidanceSettings
from adsa_vllm.settings import EngineSettings
from adsa_vllm.worker.failures import RequestFailures
from adsa_vllm.worker.new_requests import prompt_length


@dataclass
class GuidanceRuntime:
    settings: GuidanceSettings
    cls_token_num: int
    batch_req_ids: Callable[[int], list] | None = None   # n -> the first n request ids in batch order (worker)
    _guidance: dict = field(default_factory=dict)
    _index: dict = field(default_factory=dict)
    _prompt_len: dict = field(default_factory=dict)
    _buf: torch.Tensor | None = None
    failures: RequestFailures = field(default_factory=RequestFailures)

    def on_schedule(self, so) -> None:
        for rid in so.finished_req_ids:
            self._guidance.pop(rid, None)
            self._index.pop(rid, None)
            self._prompt_len.pop(rid, None)
        scheduled = so.num_scheduled_tokens
        for nr in so.scheduled_new_reqs:
            params = nr.sampling_params
            try:
                self._guidance[nr.req_id] = self.settings.for_request(getattr(params, "extra_args", None))
            except Exception as e:  # noqa: BLE001 - validated in the API process; fail this request alone
                self.failures.fail(nr.req_id, e)
            prompt_len = prompt_length(nr) or self.cls_token_num
            self._prompt_len[nr.req_id] = prompt_len
            self._index[nr.req_id] = nr.num_computed_tokens + scheduled[nr.req_id] - prompt_len
        cached = so.scheduled_cached_reqs
        for rid, computed in zip(cached.req_ids, cached.num_computed_tokens):
            self._index[rid] = computed + scheduled[rid] - self._prompt_len.get(rid, self.cls_token_num)

    def guidance_of(self, req_id: str) -> Guidance:
        return self._guidance.get(req_id, self.settings.defaults)

    def row_scales(self, n: int, device: torch.device) -> torch.Tensor:
        """[n, 1] float32 scale per batch row. Rows beyond the live batch (dummy / profiling runs) get 1.0."""
        if self.batch_req_ids is None:
            raise RuntimeError("classifier-free guidance needs the batch order on the host, which the plugin's worker "
                               "binds when it loads the model: run with the worker the config hook installs "
                               "(adsa_vllm.worker.worker), not a custom --worker-cls")
        ids = list(self.batch_req_ids(n))
        scales = [self.guidance_of(r).scale_at(self._index.get(r, 0)) for r in ids] + [1.0] * (n - len(ids))
        host = torch.tensor(scales, dtype=torch.float32)
        if device.type != "cuda":
            return host[:, None]
        if self._buf is None or self._buf.numel() < n:
            self._buf = torch.empty(max(n, 256), dtype=torch.float32, device=device)
        out = self._buf[:n]
        out.copy_(host.pin_memory(), non_blocking=True)
        return out[:, None]


def image_logits(logits: torch.Tensor, n: int, guidance: GuidanceRuntime | None, codebook_size: int,
                 vocab_size: int) -> torch.Tensor:
    """A family model's compute_logits: head logits [n * branches, >= codebook_size] -> [n, vocab_size]. Under
    guidance a request's rows are its (cond, uncond) pair, merged as u + s (c - u) in float32 with each request's
    scale; the columns beyond the codebook (condition ids: classes, text) are -inf, so sampling never emits them."""
    logits = logits[:, :codebook_size]
    if guidance is not None:
        pair = logits.float().reshape(n, 2, -1)
        c, u = pair[:, 0], pair[:, 1]
        logits = u + guidance.row_scales(n, logits.device) * (c - u)
    return torch.cat([logits, logits.new_full((n, vocab_size - codebook_size), float("-inf"))], dim=-1)


def make_guidance_runtime(vllm_config, model_cfg) -> GuidanceRuntime | None:
    """One per model instance; None when the engine runs without guidance (the model then runs one branch)."""
    settings = EngineSettings.from_vllm_config(vllm_config).guidance
    if not settings.enabled:
        return None
    return GuidanceRuntime(settings=settings, cls_token_num=model_cfg.cls_token_num)
