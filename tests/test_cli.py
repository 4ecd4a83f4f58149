"""`adsa-vllm generate` end to end on the shipped model; `adsa-vllm client` against a small in-process HTTP server
that records the requests and answers with known token ids (no vLLM: the real server path is covered by
test_server.py; here the point is request building, decoding and the PNG files); class-name errors; the choice
between pixel levels and the VQ decoder in tokens_to_images."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adsa_vllm.cli import main
from adsa_vllm.data import fashion_mnist as fm
from adsa_vllm.images import make_grid, tokens_to_images
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.vq import VQConfig, VQDecoder
from test_vq_decoder import SMALL, _random_official_state_dict

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = 16  # the shipped model's grey levels


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def test_generate_shipped_model_writes_pngs(tmp_path):
    # A subprocess, so its engine never overlaps the conftest engines; ~45 s on 2 idle cores, minutes when shared.
    out = tmp_path / "pics"
    proc = subprocess.run([sys.executable, "-m", "adsa_vllm.cli", "generate", "sneaker", "T-shirt/top",
                           "--budget", "0.25", "--cfg", "2", "--seed", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {out.resolve()}" in proc.stdout
    assert "Processed prompts" in proc.stderr  # vLLM's progress bar
    assert sorted(p.name for p in out.iterdir()) == ["000_sneaker.png", "001_t-shirt-top.png", "grid.png"]
    images = np.stack([_png(out / "000_sneaker.png"), _png(out / "001_t-shirt-top.png")])
    assert images.shape == (2, 28, 28) and images.dtype == np.uint8
    assert np.all(images % 17 == 0)  # the 16 grey levels of the pixel tokens, 255 / 15 = 17
    assert images.std(axis=(1, 2)).min() > 10  # a garment, not a flat image
    grid = _png(out / "grid.png")
    assert grid.shape == (2 + 28 + 2, 2 + 2 * (28 + 2))
    np.testing.assert_array_equal(grid, make_grid(images))


def test_bad_class_lists_valid_names(capsys):
    for bad in ("shoe", "10"):
        with pytest.raises(SystemExit) as e:
            main(["generate", "bag", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"unknown class {bad!r}" in err and "'sneaker' (7)" in err and "'ankle boot' (9)" in err


@pytest.mark.parametrize("flags, message", [(["--cfg", "nan"], "cfg scale=nan"), (["--budget", "x"], "--budget 'x'"),
                                           (["--budget", "0.01"], "raise the budget to at least 80 tokens"),
                                           (["--policy", "nope"], "adsa.policy='nope' is unknown")])
def test_bad_settings_exit_before_the_engine(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "bag", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


class _FakeCompletions(BaseHTTPRequestHandler):
    """Answers /v1/models and /v1/completions with every image token = reply_token(prompt)."""
    bodies: list = []

    @staticmethod
    def reply_token(prompt: list[int]) -> int:
        return (prompt[0] + 5) % CODEBOOK  # shipped model: class c (prompt 16 + c) -> grey level c + 5

    def _send(self, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "served-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self._send({"choices": [{"token_ids": [self.reply_token(body["prompt"])] * body["max_tokens"]}]})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _FakeCompletions.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeCompletions.bodies
    server.shutdown()
    server.server_close()


def test_client_builds_requests_and_writes_pngs(tmp_path, fake_server, capsys):
    url, bodies = fake_server
    main(["client", url, "bag", "3", "--cfg", "3", "--budget", "0.25", "--seed", "5", "--out", str(tmp_path)])
    assert str(tmp_path) in capsys.readouterr().out
    by_class = {b["prompt"][0] - CODEBOOK: b for b in bodies}
    assert sorted(by_class) == [3, 8]
    for class_id, seed in ((8, 5), (3, 6)):  # image i uses seed + i
        b = by_class[class_id]
        assert (b["model"], b["max_tokens"], b["seed"], b["top_k"], b["return_token_ids"]) == \
            ("served-model", 784, seed, 8, True)
        assert json.loads(b["vllm_xargs"]["adsa"]) == {"budget": 0.25}  # --policy not given: server's default
        assert json.loads(b["vllm_xargs"]["cfg"]) == {"scale": 3.0}
    for name, class_id in (("000_bag.png", 8), ("001_dress.png", 3)):
        np.testing.assert_array_equal(_png(tmp_path / name), np.full((28, 28), (class_id + 5) * 17, np.uint8))
    assert _png(tmp_path / "grid.png").shape == (32, 62)


def test_client_without_settings_leaves_server_defaults(tmp_path, fake_server):
    url, bodies = fake_server
    main(["client", url, "0", "--out", str(tmp_path)])
    assert "vllm_xargs" not in bodies[0]


def _vq_model_dir(tmp_path: Path, with_ckpt: bool) -> Path:
    """A model folder (config.json only: decoding needs no GPT weights) for a 4x4 grid of 64 VQ codes."""
    config = LlamaGenConfig(dim=64, n_layer=1, n_head=2, codebook_size=SMALL["codebook_size"], num_classes=10,
                         grid_size=4)
    torch.save({"model": _random_official_state_dict(seed=7)}, tmp_path / "vq_small.pt")
    hf = {**config.to_hf_dict(), "vq_config": SMALL, **({"vq_ckpt": "vq_small.pt"} if with_ckpt else {})}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_tokens_to_images_picks_vq_from_config_json(tmp_path):
    model_dir = _vq_model_dir(tmp_path, with_ckpt=True)
    codes = np.random.default_rng(0).integers(0, SMALL["codebook_size"], (3, 16))
    want = VQDecoder.from_checkpoint(tmp_path / "vq_small.pt", **SMALL).decode_codes(codes, 4)
    got = tokens_to_images(model_dir, codes)
    assert got.shape == (3, 8, 8, 3) and want.std() > 0
    np.testing.assert_array_equal(got, want)
    shipped = tokens_to_images(ROOT / "adsa_vllm" / "assets", np.full((1, 784), 15))
    np.testing.assert_array_equal(shipped, fm.detokenize(np.full((1, 784), 15)))


def test_client_with_vq_flag_writes_rgb_pictures(tmp_path, fake_server):
    url, _ = fake_server
    (tmp_path / "model").mkdir()
    model_dir = _vq_model_dir(tmp_path / "model", with_ckpt=False)
    out = tmp_path / "out"
    main(["client", url, "2", "--model", str(model_dir), "--vq", str(model_dir / "vq_small.pt"), "--out", str(out)])
    vq = VQDecoder.from_checkpoint(model_dir / "vq_small.pt", **SMALL)
    want = vq.decode_codes(np.full((1, 16), _FakeCompletions.reply_token([64 + 2])), 4)[0]
    got = _png(out / "000_class2.png")
    assert got.shape == (8, 8, 3)
    np.testing.assert_array_equal(got, want)


def test_vq_codebook_must_match_the_model():
    model_cfg = LlamaGenConfig(dim=64, n_layer=1, n_head=2, codebook_size=64, num_classes=10, grid_size=4)
    vq = VQDecoder(VQConfig(**{**SMALL, "codebook_size": 32})).eval()
    with pytest.raises(ValueError, match="32 codes but the model emits 64"):
        tokens_to_images(model_cfg, np.zeros((1, 16)), vq=vq)


@pytest.mark.parametrize("out", ["pics/", "demo", "grid.txt"])
def test_demo_rejects_an_output_without_image_extension_before_generating(out, capsys):
    from adsa_vllm import demo
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", out])
    assert e.value.code == 2 and "image extension" in capsys.readouterr().err
