"""Soak benchmark (issue 22, not in CI): one real CFG + ADSA server under a steady mixed load for a fixed time.
Does anything grow without bound (server memory, KV in use, blocks held), and is the pool empty at the end?

Starts the OpenAI server (tests/server_util.launch_server) on --model (default: the tiny random 16x16 LlamaGen, 256
tokens an image) with ADSA and guidance on and the KV pool cut to --pool-blocks, so the admission gate keeps
requests waiting and every block is reused many times. Sends tests/load_mix.py's mix (per-request policy, budget,
guidance, sampling; a fifth hung up mid-generation, sent by load_mix.send as tests/test_load.py does) at --rate requests/s for
--duration-s, at most --max-in-flight open at once. Every --sample-s it records /metrics (KV usage, running,
waiting, adsa:blocks_held, the adsa: totals) and the RSS of each server process (API server, EngineCore, worker).
Then it waits for idle and records the final state. Writes benchmarks/results/soak_<tag>.json (settings, every
sample, outcomes, final state), .md (table, verdict) and .png (PIL, like the other reports; no matplotlib).
Exits 1 if a request failed, a block is still in use at the end, or the server died.

  # CPU (2 cores; launch_server sets VLLM_CPU_KVCACHE_SPACE):
  python benchmarks/soak.py --duration-s 600 --rate 4 --tag cpu
  # GPU: a real model folder, longer, faster, more in flight and a bigger pool:
  python benchmarks/soak.py --model models/llamagen-L-256 --duration-s 3600 --rate 30 --max-in-flight 256 \\
      --pool-blocks 4096 --tag h100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import linear_regression, mean

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # the tests' server launcher, request mix and sender, not copies

from load_mix import plan, send  # noqa: E402
from metrics_util import scrape  # noqa: E402
from server_util import healthy, launch_server  # noqa: E402

GAUGES = {"kv_usage": "vllm:kv_cache_usage_perc", "running": "vllm:num_requests_running",
          "waiting": "vllm:num_requests_waiting", "blocks_held": "adsa:blocks_held",
          "blocks_freed_total": "adsa:blocks_freed_total", "admission_waits_total": "adsa:admission_waits_total",
          "preemptions_total": "adsa:preemptions_total"}
EMPTY = ("kv_usage", "blocks_held", "running", "waiting")   # what must read 0 once the load is over
RSS_GROWTH_LIMIT = 0.10   # last-quarter mean RSS over first-quarter mean above this counts as growth


def server_rss_mb() -> dict[str, float]:
    """RSS by process name of every process this benchmark started: the API server and its children."""
    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            out[p.name()] = out.get(p.name(), 0.0) + p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def sample(base: str, t0: float, phase: str) -> dict:
    rss = server_rss_mb()
    s = {"t": round(time.monotonic() - t0, 2), "phase": phase, "rss_mb": round(sum(rss.values()), 1),
         "rss_by_process": {k: round(v, 1) for k, v in rss.items()}}
    try:
        m = scrape(base)
        s.update({k: m.total(name) for k, name in GAUGES.items()})
    except (OSError, KeyError) as e:   # a slow or dead server: recorded, judged at the end by /health
        s["error"] = repr(e)
    return s


def run_load(base: str, config, model: str, a, t0: float) -> dict:
    """Send the mix for a.duration_s seconds and wait for the last answer; outcome counts and latencies."""
    rng = random.Random(a.seed)
    planned = plan(config, model, math.ceil(a.rate * a.duration_s * 2) + 20, seed=a.seed)
    slots = threading.BoundedSemaphore(a.max_in_flight)
    outcomes, errors, latencies, lock = Counter(), [], [], threading.Lock()

    def one(req):
        start = time.monotonic()
        try:
            kind, value = send(base, req)
            if kind == "done" and len(value) != config.image_tokens:
                kind, value = "error", f"{len(value)} tokens, expected {config.image_tokens}"
        except Exception as e:   # a refused connection or a timeout is a failure of the server under test
            kind, value = "error", repr(e)
        finally:
            slots.release()
        with lock:
            outcomes[kind] += 1
            if kind == "error":
                errors.append(f"{req.way} {req.policy}: {value}"[:300])
            elif kind == "done":
                latencies.append(time.monotonic() - start)

    sent = late = 0
    next_at = 0.0
    with ThreadPoolExecutor(a.max_in_flight) as pool:
        for req in planned:
            next_at += rng.expovariate(a.rate) if a.arrivals == "poisson" else 1 / a.rate
            if next_at >= a.duration_s:
                break
            time.sleep(max(0.0, t0 + next_at - time.monotonic()))
            if not slots.acquire(blocking=False):   # the in-flight bound holds this arrival back: count it
                late += 1
                slots.acquire()
            pool.submit(one, req)
            sent += 1
    lat = sorted(latencies)
    pct = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None  # noqa: E731
    return {"sent": sent, "outcomes": dict(outcomes), "held_back_by_in_flight_bound": late,
            "done_latency_s": {"p50": pct(0.5), "p95": pct(0.95), "max": pct(1.0)}, "errors": errors[:20]}


def settle(base: str, t0: float, timeout_s: float = 120.0) -> dict:
    """The first sample with nothing in use (vLLM's gauges update after an engine step, so poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = sample(base, t0, "final")
        if all(s.get(k) == 0 for k in EMPTY) or time.monotonic() > deadline:
            return s
        time.sleep(1.0)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu or None, "python": platform.python_version(), "commit": commit}


def verdict(samples: list[dict], final: dict, alive: bool) -> dict:
    """RSS of the first vs the last quarter of the load phase, its trend over the second half (the first holds
    the warm-up), and the final state."""
    load = [s for s in samples if s["phase"] == "load" and s["rss_mb"]]
    q, half = max(1, len(load) // 4), load[len(load) // 2:]
    first, last = mean(s["rss_mb"] for s in load[:q]), mean(s["rss_mb"] for s in load[-q:])
    trend = linear_regression([s["t"] for s in half], [s["rss_mb"] for s in half]).slope * 60 if len(half) > 1 else 0
    return {"rss_first_quarter_mb": round(first, 1), "rss_last_quarter_mb": round(last, 1),
            "rss_growth": round(last / first - 1, 4), "rss_grows": last / first - 1 > RSS_GROWTH_LIMIT,
            "rss_second_half_mb_per_min": round(trend, 2),
            "not_empty_at_end": {k: final.get(k) for k in EMPTY if final.get(k) != 0}, "server_alive": alive}


def plot(samples: list[dict], load_end: float, path: Path) -> None:
    """Four panels over time: KV usage, blocks held, running/waiting, each process's RSS change since the start
    (a leak shows as a rising line; absolute values in the legend). Grey line: the load ends."""
    from PIL import Image, ImageDraw, ImageFont
    ok = [s for s in samples if "error" not in s]
    first = ok[0]
    names = ["total", *sorted({n for s in ok for n in s["rss_by_process"]})]
    rss = lambda s, n: s["rss_mb"] if n == "total" else s["rss_by_process"].get(n, 0.0)  # noqa: E731
    colors = [(200, 30, 30), (30, 90, 200), (20, 150, 60), (160, 90, 0), (120, 40, 160)]
    panels = [("vllm:kv_cache_usage_perc (fraction of the pool)", [("", lambda s: s["kv_usage"])]),
              ("adsa:blocks_held", [("", lambda s: s["blocks_held"])]),
              ("requests", [("running", lambda s: s["running"]), ("waiting", lambda s: s["waiting"])]),
              ("RSS change since the start, MiB (start value)", [(f"{n} ({rss(first, n):,.0f})",
                                                                   lambda s, n=n: rss(s, n) - rss(first, n))
                                                                  for n in names])]
    W, PH, L, R = 1100, 220, 70, 20
    img = Image.new("RGB", (W, PH * len(panels) + 40), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:   # Pillow < 10.1 has only the bitmap font
        font = ImageFont.load_default()
    tmax = max(s["t"] for s in ok) or 1.0
    x = lambda t: L + t / tmax * (W - L - R)  # noqa: E731
    step = next(m * 10**k for k in range(6) for m in (1, 2, 5) if tmax / (m * 10**k) <= 8)
    ticks = [step * k for k in range(int(tmax // step) + 1)]
    for i, (title, series) in enumerate(panels):
        top, bottom = i * PH + 30, (i + 1) * PH - 10
        values = [f(s) for _, f in series for s in ok]
        lo, hi = min(0.0, *values), max(1e-9, *values)
        if i == 3:   # RSS noise of a few MiB should look flat, not fill the panel
            lo, hi = min(lo, -10.0), max(hi, 10.0)
        y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)  # noqa: E731
        d.rectangle([L, top, W - R, bottom], outline=(160, 160, 160))
        for v in {lo, 0.0, hi} | ({hi / 2} if lo == 0 else set()):
            d.line([(L, y(v)), (W - R, y(v))], fill=(225, 225, 225))
            d.text((4, y(v) - 8), f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}", fill="black", font=font)
        for t in ticks:
            d.line([(x(t), top), (x(t), bottom)], fill=(235, 235, 235))
        d.line([(x(load_end), top), (x(load_end), bottom)], fill=(150, 150, 150), width=2)
        d.text((L + 5, top - 20), title + ":", fill="black", font=font)
        label_x = L + 15 + d.textlength(title + ":", font=font)
        for (label, f), color in zip(series, colors):
            d.line([(x(s["t"]), y(f(s))) for s in ok], fill=color, width=2)
            d.text((label_x, top - 20), label, fill=color, font=font)
            label_x += d.textlength(label, font=font) + 20
    for t in ticks:
        d.text((x(t) - 10, PH * len(panels) - 6), f"{t:.0f}", fill="black", font=font)
    d.text((L, PH * len(panels) + 14), f"time (s); grey line: load ends at {load_end:.0f} s", fill="black",
           font=font)
    img.save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the tiny random 16x16 LlamaGen)")
    ap.add_argument("--additional-config", default='{"adsa": {"budget": 0.5}, "cfg": {"scale": 2.0}}')
    ap.add_argument("--pool-blocks", type=int, default=64, help="--num-gpu-blocks-override: a small pool")
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second offered")
    ap.add_argument("--arrivals", choices=("poisson", "fixed"), default="poisson")
    ap.add_argument("--max-in-flight", type=int, default=16)
    ap.add_argument("--duration-s", type=float, default=60.0, help="how long requests are sent")
    ap.add_argument("--sample-s", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="smoke", help="writes benchmarks/results/soak_<tag>.{json,md,png}")
    a = ap.parse_args()

    from adsa_vllm.client import server_model
    from adsa_vllm.llamagen.convert import load_config
    from adsa_vllm.default_model import random_model_dir
    model_dir = Path(a.model) if a.model else random_model_dir()
    config = load_config(model_dir)
    log_path = Path(tempfile.gettempdir()) / f"soak_{a.tag}_server.log"
    server_args = ["--attention-backend", "adsa", "--additional-config", a.additional_config,
                   "--num-gpu-blocks-override", str(a.pool_blocks)]
    server = launch_server(model_dir, log_path, *server_args)
    base = next(server)
    try:
        samples: list[dict] = []
        phase = ["load"]
        stop = threading.Event()
        t0 = time.monotonic()
        samples.append(sample(base, t0, "start"))   # idle baseline before the first request

        def sampler():
            while not stop.wait(a.sample_s):
                samples.append(sample(base, t0, phase[0]))

        threading.Thread(target=sampler, daemon=True).start()
        load = run_load(base, config, server_model(base), a, t0)
        phase[0], load_end = "drain", time.monotonic() - t0   # the last answers are in; the engine winds down
        final = settle(base, t0)
        stop.set()
        alive = healthy(base)
    finally:
        server.close()   # kills the server's process group
    samples.append(final)
    v = verdict(samples, final, alive)
    ok = not load["outcomes"].get("error") and not v["not_empty_at_end"] and alive

    out = HERE / "results" / f"soak_{a.tag}"
    out.parent.mkdir(exist_ok=True)
    report = {"settings": {**vars(a), "model_dir": str(model_dir), "grid": config.grid_size,
                           "image_tokens": config.image_tokens, "server_args": server_args},
              "machine": machine(), "load_end_s": round(load_end, 1), "load": load, "final": final,
              "verdict": v, "ok": ok, "samples": samples}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(samples, load_end, out.with_suffix(".png"))
    m, grows, nan = report["machine"], v["rss_grows"], float("nan")
    busy = [s for s in samples if s["phase"] == "load" and "error" not in s]
    md = [f"# Soak `{a.tag}`: {a.duration_s:g} s of mixed CFG + ADSA requests", "",
          f"`{' '.join(['python benchmarks/soak.py', *sys.argv[1:]])}` at {m['commit']} on {m['cpu']} "
          f"({m['cores']} cores, {m['memory_gib']} GiB{', ' + m['gpu'] if m['gpu'] else ''}).",
          f"Model: {model_dir.name} ({config.grid_size}x{config.grid_size}, {config.image_tokens} tokens an image); "
          f"server `{' '.join(server_args)}`; tests/load_mix.py's mix at {a.rate:g}/s ({a.arrivals}), at most "
          f"{a.max_in_flight} in flight; a sample every {a.sample_s:g} s.", "",
          f"Requests: {load['sent']} sent, {load['outcomes']}; {load['held_back_by_in_flight_bound']} arrivals held "
          f"back by the in-flight bound; done latency {load['done_latency_s']} s. Load ended at {load_end:.0f} s.", "",
          "| series | start (idle) | end (idle) | max during load |", "|---|---|---|---|",
          *[f"| {k} | {samples[0].get(k, nan):g} | {final.get(k, nan):g} | {max(s.get(k, nan) for s in busy):g} |"
            for k in ("rss_mb", *GAUGES)], "",
          f"**Verdict: {'OK' if ok else 'FAILED'}.** RSS of the server's processes: first-quarter mean "
          f"{v['rss_first_quarter_mb']} MiB, last-quarter mean {v['rss_last_quarter_mb']} MiB "
          f"({v['rss_growth']:+.1%}; {'grows' if grows else 'no growth'} beyond the {RSS_GROWTH_LIMIT:.0%} "
          f"allowance); trend over the second half of the load {v['rss_second_half_mb_per_min']:+} MiB/min. "
          "At the end: "
          + (f"still in use {v['not_empty_at_end']}" if v["not_empty_at_end"] else
             "no KV in use, no block held, nothing running or waiting")
          + f"; server {'alive' if alive else 'DEAD'}.", "", f"![soak](soak_{a.tag}.png)", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md) + f"\nserver log: {log_path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
