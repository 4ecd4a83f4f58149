"""`adsa-vllm generate / client` with a Janus-Pro folder (issue 25 D4): text prompts in, PNG files out, through the
family's tools (adsa_vllm/janus/prompts.py with the folder's tokenizer, adsa_vllm/janus/images.py's VQ decoder).

The tiny random Janus of test_vllm_janus.py gets a word-level tokenizer; offline with greedy sampling and no
eviction the pictures are exactly transformers' (generate(generation_mode="image") with guidance, then its VQ
decoder); the client sends the same prompt ids to a recording server (test_cli.py's) and decodes its answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adsa_vllm.cli import main
from adsa_vllm.family import load_config
from test_cli import fake_server  # noqa: F401 (fixture)
from test_vllm_janus import BOI, BOS, CODEBOOK, GRID, MAX_PROMPT, PAD, SCALE, hf_generate, janus  # noqa: F401

WORDS = ["<unk>", "<bos>", "<pad>", "<begin_of_image>", "<|User|>:", "<|Assistant|>:", "a", "red", "blue", "fox",
         "in", "snow"]
TEXTS = ["a red fox in snow", "a blue fox"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def janus_folder(janus):
    """The tiny Janus folder with a tokenizer whose special ids are the config's (BOS 1, pad 2, image start 3)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    assert [WORDS.index(w) for w in ("<bos>", "<pad>", "<begin_of_image>")] == [BOS, PAD, BOI]
    folder, model = janus
    tok = Tokenizer.from_str(json.dumps({   # word level, split at whitespace
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(WORDS)}, "unk_token": "<unk>"}}))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder, model


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_text_prompts_are_janus_chat_format_with_the_image_start(janus_folder):
    from adsa_vllm.janus.prompts import text_prompts
    folder, _ = janus_folder
    (prompt,) = text_prompts(folder, ["  a red fox in snow "])
    # <bos> <|User|>: a red fox in snow <|Assistant|>: <begin_of_image>
    assert [CODEBOOK + i for i in (BOS, 4, 6, 7, 9, 10, 11, 5, BOI)] == prompt


def test_generate_writes_the_pictures_transformers_makes(janus_folder, tmp_path):
    from adsa_vllm.janus.images import decode_images
    from adsa_vllm.janus.prompts import text_prompts
    folder, model = janus_folder
    # A subprocess, as test_cli's: its engine never overlaps the conftest engines.
    proc = subprocess.run([sys.executable, "-m", "adsa_vllm.cli", "generate", "--model", str(folder), *TEXTS,
                           "--cfg", str(SCALE), "--budget", "none", "--temperature", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 2 image(s) of 32x32" in proc.stdout
    for prompt, name in zip(text_prompts(folder, TEXTS), ("000_a-red-fox-in-snow.png", "001_a-blue-fox.png")):
        codes = hf_generate(model, [i - CODEBOOK for i in prompt], SCALE)
        want = decode_images(folder, [codes])[0]
        assert want.shape == (32, 32, 3) and np.array_equal(_png(tmp_path / name), want), name
    assert _png(tmp_path / "grid.png").shape == (36, 70, 3)


def test_client_sends_the_prompt_ids_and_decodes_with_the_janus_vq(janus_folder, fake_server, tmp_path):  # noqa: F811
    from adsa_vllm.janus.images import decode_images
    from adsa_vllm.janus.prompts import text_prompts
    folder, _ = janus_folder
    url, bodies = fake_server
    main(["client", url, "--model", str(folder), *TEXTS, "--cfg", "3", "--budget", "0.5", "--out", str(tmp_path)])
    assert sorted(b["prompt"] for b in bodies) == sorted(text_prompts(folder, TEXTS))
    assert all(b["max_tokens"] == GRID * GRID and b["top_k"] == CODEBOOK for b in bodies)
    reply = (CODEBOOK + BOS + 5) % 16      # test_cli's server answers every token with (prompt[0] + 5) % 16
    want = decode_images(folder, [[reply] * GRID * GRID])[0]
    assert np.array_equal(_png(tmp_path / "000_a-red-fox-in-snow.png"), want)


def test_a_prompt_beyond_the_context_exits_before_the_engine(janus_folder, capsys):
    folder, _ = janus_folder
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(folder), " ".join(["fox"] * MAX_PROMPT)])
    assert e.value.code == 2 and "shorten the text" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(folder), "a fox", "--budget", "0.1"])
    assert "budget" in capsys.readouterr().err


@pytest.fixture(scope="module")
def janus_server(janus_folder, tmp_path_factory):
    import json

    from server_util import launch_server
    extra = {"adsa": {"budget": 512}, "cfg": {"scale": SCALE}}     # a budget covering the sequence: exact
    yield from launch_server(janus_folder[0], tmp_path_factory.mktemp("janus_server") / "server.log",
                             "--attention-backend", "adsa", "--additional-config", json.dumps(extra))


def test_http_client_writes_transformers_pictures_and_bad_requests_get_400(janus_folder, janus_server, tmp_path):
    from adsa_vllm.client import ServerError, image_request, post_json, server_model
    from adsa_vllm.janus.images import decode_images
    from adsa_vllm.janus.prompts import text_prompts
    folder, model = janus_folder
    main(["client", janus_server, "--model", str(folder), TEXTS[0], "--temperature", "0", "--out", str(tmp_path)])
    (prompt,) = text_prompts(folder, TEXTS[:1])
    want = decode_images(folder, [hf_generate(model, [i - CODEBOOK for i in prompt], SCALE)])[0]
    assert np.array_equal(_png(tmp_path / "000_a-red-fox-in-snow.png"), want)
    config, url = load_config(folder), f"{janus_server}/v1/completions"
    served = server_model(janus_server)
    for body, match in (
            (image_request(config, model=served, prompt=[CODEBOOK + 7], max_tokens=4), "class ids are not a Janus"),
            (image_request(config, model=served, prompt=[CODEBOOK + BOS] * MAX_PROMPT + [CODEBOOK + BOI],
                           max_tokens=4), "shorten the text"),
            (image_request(config, model=served, prompt=prompt, max_tokens=4, adsa={"budget": 0.1}), "budget"),
            ({**image_request(config, model=served, prompt=prompt, max_tokens=4),
              "vllm_xargs": {"colour": "red"}}, r"unknown extra_args / vllm_xargs key")):
        with pytest.raises(ServerError, match=match) as err:
            post_json(url, body)
        assert err.value.status == 400
    again = post_json(url, image_request(config, model=served, prompt=prompt, temperature=0.0))
    assert again["choices"][0]["token_ids"] == hf_generate(model, [i - CODEBOOK for i in prompt], SCALE)


def test_eval_names_what_it_cannot_do_yet(janus_folder, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(janus_folder[0]), "--settings", "full"])
    assert e.value.code == 2 and "has no text-prompt conditions yet" in capsys.readouterr().err
