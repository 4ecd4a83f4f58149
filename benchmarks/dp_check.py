"""Data parallelism (issue 13): vLLM's OpenAI server with --data-parallel-size N against DP=1, ADSA at 50%, greedy.

One random LlamaGen of a preset shape is written once (real weights, seeded, as in tp_check.py), then served twice,
one server after the other: DP=N, then DP=1. Each gets the same image requests at once (class i % num_classes).
Checked: every request returns exactly grid**2 image tokens, and the DP=N server's /metrics shows every engine
(`engine="0"`, `engine="1"`, ...) finished requests. Reported: requests and ADSA's freed blocks per engine, and the
matching prefix length of every image between DP=N and DP=1. The engines batch different requests together, so
bf16 kernels on GPUs may part ways after a while: reported, not asserted. On CPU (float32) the images must be equal:
they were in every smoke run (docs/parallelism.md, "Data parallelism").

  python benchmarks/dp_check.py --preset XL --dp 2 --out $OUT/dp_check.json                  # 2 GPUs
  python benchmarks/dp_check.py --preset B --grid 16 --images 8 --out dp_check_cpu.json       # CPU smoke test

On CPU the servers run with --dtype float32 --enforce-eager, VLLM_CPU_KVCACHE_SPACE=1 and one core per engine
(VLLM_CPU_OMP_THREADS_BIND, unless set): on a one-NUMA-node machine vLLM's automatic binding puts every engine's
threads on the same core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

STARTUP_TIMEOUT_S = 600   # two engines loading on a 2-core machine, or an XL model compiling on a GPU


class ServerDidNotStart(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def server_command(model_dir: str, port: int, dp: int, additional: dict, dtype: str, on_cpu: bool) -> list[str]:
    # `vllm serve` starts one API process per DP engine by default; the module entry point starts one API process
    # for all engines (and is the only one that works with vllm-cpu, whose console script is broken).
    use_cli = not on_cpu and shutil.which("vllm")
    head = ["vllm", "serve", model_dir] if use_cli else \
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir]
    cpu = ["--dtype", "float32", "--enforce-eager"] if on_cpu else ["--dtype", dtype]
    return [*head, "--data-parallel-size", str(dp), "--attention-backend", "adsa",
            "--additional-config", json.dumps(additional), "--block-size", "16", "--seed", "0", *cpu,
            "--host", "127.0.0.1", "--port", str(port)]


def server_env(dp: int, on_cpu: bool) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # the server runs its EngineCores its normal way
    if on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("TORCHDYNAMO_DISABLE", "1")     # skips the ~20 s compile warm-up of the CPU sampler
        if dp > 1:
            cpus = sorted(os.sched_getaffinity(0))
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(dp)))
    return env


@contextlib.contextmanager
def serve(model_dir: str, dp: int, additional: dict, dtype: str, on_cpu: bool, log_path: Path):
    """A healthy server's base URL; the server (its whole process group) is killed on the way out."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = server_command(model_dir, port, dp, additional, dtype, on_cpu)
    print(f"dp={dp}: {' '.join(cmd)} > {log_path}", flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=server_env(dp, on_cpu), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while _get(f"{base}/health") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.poll() is not None else \
                    f"not healthy after {STARTUP_TIMEOUT_S} s"
                lines = log_path.read_text(errors="replace").strip().splitlines() or [""]
                raise ServerDidNotStart(f"DP={dp} server {why} (log {log_path}): {lines[-1]}")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def per_engine(metrics: str, name: str) -> dict[str, int]:
    """The samples of `name` summed by their `engine` label (over the other labels, e.g. finished_reason)."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == name and "engine" in s.labels:
                out[s.labels["engine"]] = out.get(s.labels["engine"], 0) + int(s.value)
    return out


def counted_metrics(base: str, requests: int, timeout: float = 30.0) -> str:
    """/metrics once it counts all `requests` as finished (the API process records a step's stats after the
    responses of that step may already have gone out)."""
    deadline = time.monotonic() + timeout
    while True:
        text = _get(f"{base}/metrics") or ""
        if sum(per_engine(text, "vllm:request_success_total").values()) >= requests or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def run(base: str, config, classes: list[int]) -> dict:
    from adsa_vllm.client import ServerError, generate_via_server
    t0 = time.monotonic()
    try:
        tokens = generate_via_server(base, classes, config=config, temperature=0.0, timeout=1800)
    except (ServerError, OSError) as e:
        return {"error": str(e), "tokens": []}
    wall = time.monotonic() - t0
    metrics = counted_metrics(base, len(classes))
    return {"wall_s": round(wall, 2), "tokens": tokens,
            "requests_per_engine": per_engine(metrics, "vllm:request_success_total"),
            "adsa_blocks_freed_per_engine": per_engine(metrics, "adsa:blocks_freed_total"),
            "adsa_requests_per_engine": per_engine(metrics, "adsa:requests_total")}


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="XL")
    ap.add_argument("--grid", type=int, default=16, help="image tokens per side (16 -> 256 tokens)")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--std", type=float, default=0.1, help="weight init std (larger: peakier, fewer near-ties)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype on GPU (CPU always runs float32)")
    ap.add_argument("--cfg-scale", type=float, help="serve with classifier-free guidance at this scale")
    ap.add_argument("--out-dir", help="server logs and the model folder (default: a temporary folder)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()

    import torch

    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import preset
    on_cpu = not torch.cuda.is_available()
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="dp_check_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    config = preset(args.preset, grid_size=args.grid)
    dtype = "float32" if on_cpu else args.dtype
    model_dir = str(make_random_model_dir(out_dir / "model", config, seed=0, std=args.std, dtype=dtype))
    additional = {"adsa": {"budget": 0.5}, **({"cfg": {"scale": args.cfg_scale}} if args.cfg_scale else {})}
    classes = [i % config.num_classes for i in range(args.images)]
    out = {"args": vars(args), "device": "cpu" if on_cpu else torch.cuda.get_device_name(0), "runs": {}}

    problems = []
    for dp in (args.dp, 1):
        try:
            with serve(model_dir, dp, additional, dtype, on_cpu, out_dir / f"server_dp{dp}.log") as base:
                result = run(base, config, classes)
        except ServerDidNotStart as e:
            result = {"error": str(e), "tokens": []}
        out["runs"][f"dp{dp}"] = result
        if "error" in result:
            problems.append(f"dp{dp}: {result['error']}")
            continue
        short = [i for i, t in enumerate(result["tokens"]) if len(t) != config.image_tokens]
        if short:
            problems.append(f"dp{dp}: images {short} do not have {config.image_tokens} tokens")
        idle = [str(e) for e in range(dp) if not result["requests_per_engine"].get(str(e))]
        if idle:
            problems.append(f"dp{dp}: engines {idle} finished no request: {result['requests_per_engine']}")
        print(f"dp{dp}", json.dumps({k: v for k, v in result.items() if k != "tokens"}), flush=True)

    many, one = out["runs"][f"dp{args.dp}"], out["runs"]["dp1"]
    summary = ""
    if many["tokens"] and one["tokens"]:
        prefix = [matching_prefix(a, b) for a, b in zip(many["tokens"], one["tokens"])]
        out["matching_prefix_per_image"], out["all_equal"] = prefix, many["tokens"] == one["tokens"]
        equal = sum(p == config.image_tokens for p in prefix)
        if on_cpu and not out["all_equal"]:
            problems.append(f"float32 on CPU: dp{args.dp} and dp1 images differ, matching prefixes {prefix}")
        summary = (f" | dp{args.dp}: requests per engine {many['requests_per_engine']}, ADSA blocks freed "
                   f"{many['adsa_blocks_freed_per_engine']}, {many['wall_s']} s (dp1 {one['wall_s']} s) | "
                   f"{equal}/{len(prefix)} images equal to dp1, shortest matching prefix {min(prefix)}/"
                   f"{config.image_tokens}")
    out["problems"] = problems
    print("dp_check:", ("ok" if not problems else "FAILED: " + "; ".join(problems)) + summary, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
