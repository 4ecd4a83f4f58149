"""The table of malformed / hostile /v1/completions requests of tests/test_fuzz_server.py (issue 10).

Each case is (name, body, expected status, text the error message must contain or None). `body` is a dict (sent
as JSON, NaN / Infinity written as the JSON extensions Python's parser and the server accept) or raw bytes.
Per-request settings ride in `vllm_xargs` as JSON strings, the HTTP form (adsa_vllm/client.py). Requests that
could be accepted use few tokens; those expected to fail would be cheap even if they were accepted.
"""

from __future__ import annotations

import json

SMALL = 4   # max_tokens of cases that are not about length


def cases(config) -> list[tuple[str, object, int, str | None]]:
    """The table for a LlamaGen config `config` (grid, codebook, classes) on a server with CFG + ADSA on."""
    cond = config.codebook_size            # class 0's prompt id; cond + num_classes is the null class
    image = config.image_tokens

    def body(**over):
        b = {"prompt": config.prompt(1), "max_tokens": SMALL, "temperature": 0.0, "return_token_ids": True}
        b.update(over)
        return b

    def adsa(text):   # the raw JSON string of extra_args["adsa"] (so NaN / bad JSON can be written)
        return body(vllm_xargs={"adsa": text})

    def guidance(text):
        return body(vllm_xargs={"cfg": text})

    t = [
        # ---- per-request ADSA settings: wrong types, out of range, unknown keys, not an object
        ("adsa seed string (engine killer)", adsa('{"policy": "random", "seed": "3"}'), 400, "adsa.seed"),
        ("adsa seed float", adsa('{"policy": "random", "seed": 3.5}'), 400, "adsa.seed"),
        ("adsa seed negative", adsa('{"policy": "random", "seed": -1}'), 400, "adsa.seed"),
        ("adsa seed huge", adsa('{"policy": "random", "seed": 1' + "0" * 30 + '}'), 400, "adsa.seed"),
        ("adsa seed bool", adsa('{"policy": "random", "seed": true}'), 400, "adsa.seed"),
        ("adsa seed null", adsa('{"policy": "random", "seed": null}'), 400, "adsa.seed"),
        ("adsa budget string", adsa('{"budget": "0.5"}'), 400, "adsa.budget"),
        ("adsa budget bool", adsa('{"budget": true}'), 400, "adsa.budget"),
        ("adsa budget NaN", adsa('{"budget": NaN}'), 400, "adsa.budget"),
        ("adsa budget Infinity", adsa('{"budget": Infinity}'), 400, "adsa.budget"),
        ("adsa budget negative", adsa('{"budget": -1}'), 400, "adsa.budget"),
        ("adsa budget zero", adsa('{"budget": 0}'), 400, "adsa.budget"),
        ("adsa budget fraction above 1", adsa('{"budget": 1.5}'), 400, "adsa.budget"),
        ("adsa budget too small for prefix+local", adsa('{"budget": 1}'), 400, "raise the budget"),
        ("adsa budget list", adsa('{"budget": [0.5]}'), 400, "adsa.budget"),
        ("adsa budget huge int keeps everything", adsa('{"budget": 1' + "0" * 40 + '}'), 200, None),
        ("adsa budget 400-digit int", adsa('{"budget": 1' + "0" * 400 + '}'), 200, None),
        ("adsa budget 5000-digit int", adsa('{"budget": 1' + "0" * 5000 + '}'), 400, "not valid JSON"),
        ("adsa policy number", adsa('{"policy": 3}'), 400, "adsa.policy"),
        ("adsa policy unknown", adsa('{"policy": "nope"}'), 400, "topk_v"),
        ("adsa policy list", adsa('{"policy": ["topk_v"]}'), 400, "adsa.policy"),
        ("adsa keep unknown", adsa('{"keep": "up"}'), 400, "adsa.keep"),
        ("adsa granularity unknown", adsa('{"granularity": "head"}'), 400, "adsa.granularity"),
        ("adsa prefix string", adsa('{"prefix": "1"}'), 400, "adsa.prefix"),
        ("adsa prefix huge", adsa('{"prefix": 100000000000000000000}'), 400, "adsa.budget"),
        ("adsa local zero", adsa('{"local": 0}'), 400, "adsa.local"),
        ("adsa local float", adsa('{"local": 17.0}'), 400, "adsa.local"),
        ("adsa refresh string", adsa('{"refresh": "16"}'), 400, "adsa.refresh"),
        ("adsa unknown key", adsa('{"bugdet": 0.5}'), 400, "unknown adsa setting"),
        ("adsa engine-only key", adsa('{"enabled": false}'), 400, "unknown adsa setting"),
        ("adsa JSON list", adsa("[1, 2]"), 400, "must be a dict"),
        ("adsa JSON number", adsa("3"), 400, "must be a dict"),
        ("adsa not JSON", adsa("budget=0.5"), 400, "not valid JSON"),
        ("adsa truncated JSON", adsa('{"budget": 0.5'), 400, "not valid JSON"),
        ("adsa as a bare number", body(vllm_xargs={"adsa": 0.5}), 400, "must be a dict"),
        ("adsa as a nested object", body(vllm_xargs={"adsa": {"budget": 0.5}}), 400, None),
        # ---- per-request guidance
        ("cfg scale string", guidance('{"scale": "4"}'), 400, "cfg scale"),
        ("cfg scale bool", guidance('{"scale": true}'), 400, "cfg scale"),
        ("cfg scale NaN", guidance('{"scale": NaN}'), 400, "cfg scale"),
        ("cfg scale -Infinity", guidance('{"scale": -Infinity}'), 400, "cfg scale"),
        ("cfg scale negative", guidance('{"scale": -2}'), 400, "cfg scale"),
        ("cfg scale huge", guidance('{"scale": 1e300}'), 400, "cfg scale"),
        ("cfg interval float", guidance('{"interval": 2.5}'), 400, "cfg interval"),
        ("cfg interval below -1", guidance('{"interval": -2}'), 400, "cfg interval"),
        ("cfg unknown key", guidance('{"sclae": 2}'), 400, "unknown cfg setting"),
        ("cfg JSON list", guidance("[]"), 400, "must be a dict"),
        ("unknown vllm_xargs key", body(vllm_xargs={"asda": "{}"}), 400, "unknown extra_args"),
        ("vllm_xargs not an object", body(vllm_xargs=[1, 2]), 400, None),
        # ---- stock fields checked against the codebook instead of a tokenizer
        ("allowed_token_ids past the vocabulary (engine killer)", body(allowed_token_ids=[10**5]), 400,
         "allowed_token_ids"),
        ("allowed_token_ids condition ids only", body(allowed_token_ids=[cond]), 400, "allowed_token_ids"),
        ("allowed_token_ids negative", body(allowed_token_ids=[-1]), 400, "allowed_token_ids"),
        ("allowed_token_ids empty", body(allowed_token_ids=[]), 400, "allowed_token_ids"),
        ("allowed_token_ids codebook ids work", body(allowed_token_ids=[3, 5]), 200, None),
        ("logit_bias past the codebook", body(logit_bias={str(cond + 1): 5}), 400, "logit_bias"),
        ("logit_bias non-integer key", body(logit_bias={"abc": 1}), 400, "logit_bias"),
        ("logit_bias NaN value", body(logit_bias={"3": float("nan")}), 200, None),
        ("stop_token_ids past the vocabulary with min_tokens", body(stop_token_ids=[10**6], min_tokens=2), 400,
         "stop_token_ids"),
        ("stop_token_ids negative", body(stop_token_ids=[-5]), 400, "stop_token_ids"),
        ("stop string", body(stop=["x"]), 400, "stop strings"),
        ("stop single string", body(stop="x"), 400, "stop strings"),
        ("bad_words", body(bad_words=["x"]), 400, "bad_words"),
        ("logprob_token_ids past the vocabulary", body(logprobs=1, logprob_token_ids=[10**5]), 400,
         "logprob_token_ids"),
        ("logprobs above the limit", body(logprobs=10**4), 400, "logprobs"),
        ("logprobs negative", body(logprobs=-5), 400, "logprobs"),
        ("logprobs with return_tokens_as_token_ids false", body(logprobs=2, return_tokens_as_token_ids=False), 400,
         "return_tokens_as_token_ids"),
        ("prompt_logprobs under guidance", body(prompt_logprobs=1), 400, "prompt_logprobs"),
        ("echo", body(echo=True), 400, "echo"),
        ("beam search", body(use_beam_search=True, n=2), 400, "use_beam_search"),
        ("structured outputs", body(structured_outputs={"choice": ["a", "b"]}), 400, None),
        ("response_format json", body(response_format={"type": "json_object"}), 400, None),
        ("suffix", body(suffix="x"), 400, "suffix"),
        ("n zero", body(n=0), 400, "n"),
        ("n huge", body(n=10**6, temperature=1.0), 400, "n"),
        ("n 2 greedy", body(n=2), 400, "n"),
        ("min_tokens above max_tokens", body(min_tokens=SMALL + 1), 400, "min_tokens"),
        ("priority (ignored by the FCFS policy)", body(priority=5), 200, None),
        # ---- lengths, numbers
        ("max_tokens zero", body(max_tokens=0), 400, "max_tokens"),
        ("max_tokens negative", body(max_tokens=-1), 400, "max_tokens"),
        ("max_tokens past the image", body(max_tokens=image + 1), 400, "output tokens"),
        ("max_tokens huge", body(max_tokens=10**12), 400, "max_tokens"),
        ("max_tokens float", body(max_tokens=4.5), 400, None),
        ("max_tokens numeric string (pydantic coerces it)", body(max_tokens="4"), 200, None),
        ("temperature NaN", body(temperature=float("nan")), 400, "temperature"),
        ("temperature negative", body(temperature=-1), 400, "temperature"),
        ("top_p zero", body(top_p=0), 400, "top_p"),
        ("top_k negative", body(top_k=-5), 400, "top_k"),
        ("seed past int64", body(seed=2**70), 400, None),
        ("repetition_penalty zero", body(repetition_penalty=0), 400, "repetition_penalty"),
        ("presence_penalty huge", body(presence_penalty=1e9), 400, "presence_penalty"),
        # ---- prompts of the wrong shape
        ("prompt empty", body(prompt=[]), 400, None),
        ("prompt image token", body(prompt=[0]), 400, None),
        ("prompt class past the table", body(prompt=[cond + config.num_classes + 1]), 400, None),
        ("prompt two tokens", body(prompt=[cond, cond]), 400, None),
        ("prompt negative id", body(prompt=[-1]), 400, None),
        ("prompt huge id", body(prompt=[10**30]), 400, None),
        ("prompt text", body(prompt="a shirt"), 400, None),
        ("prompt missing", {k: v for k, v in body().items() if k != "prompt"}, 400, None),
        ("prompt nested empty", body(prompt=[[]]), 400, None),
        ("prompt embeds", body(prompt_embeds="AAAA"), 400, None),
        # ---- not a completion object at all
        # vLLM 0.26's own CompletionRequest validators call data.get() on a body that is not an object:
        # AttributeError, HTTP 500, before any engine work (nothing of the plugin's runs yet).
        ("JSON array", b"[]", 500, None),
        ("JSON string", b'"hello"', 500, None),
        ("JSON null", b"null", 400, None),
        ("JSON number", b"3", 500, None),
        ("truncated JSON", b'{"prompt": [', 400, None),
        ("empty body", b"", 400, None),
        ("binary garbage", bytes(range(256)), 400, None),
        ("unknown model", body(model="not-this-model"), 404, None),
    ]
    return t


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()
