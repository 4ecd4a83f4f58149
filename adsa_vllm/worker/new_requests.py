"""What the worker's runtimes read from vLLM's NewRequestData beyond its sampling params."""

from __future__ import annotations


def prompt_length(new_req) -> int | None:
    """The prompt length: its token ids (c2i), or its prompt_embeds rows (a t2i caption, 1..cls_token_num rows).
    The API process's request validation reads a vLLM EngineCoreRequest with it (the same two fields), so a
    request's condition length is counted one way there and in the worker."""
    embeds = getattr(new_req, "prompt_embeds", None)
    if embeds is not None:
        return len(embeds)
    ids = new_req.prompt_token_ids
    return None if ids is None else len(ids)
