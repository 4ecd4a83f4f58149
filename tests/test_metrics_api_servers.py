"""ADSA's totals on /metrics with several API-server processes (`vllm serve --data-parallel-size 2` starts two).

vLLM then runs prometheus_client in multiprocess mode: each API process writes its values under
PROMETHEUS_MULTIPROC_DIR and /metrics merges them with `MultiProcessCollector`. An engine's stats ride with any one
front-end's outputs, so both API processes see (part of) both engines' running totals. Here two real processes
(subprocesses, since prometheus_client picks its mode at import) each run an `ADSAStatLogger` over overlapping
slices of the same two engines' stats, and the merged scrape must read each engine's latest totals, once.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from metrics_util import Scrape

ROOT = Path(__file__).resolve().parents[1]

# One API process: record each (engine, ADSAStats fields) in order, as AsyncLLM calls the stat loggers.
API_PROCESS = """
import json, pickle, sys
from vllm.v1.metrics.stats import SchedulerStats
from adsa_vllm.engine.stats import ADSAStats, with_adsa
from adsa_vllm.metrics import ADSAStatLogger
with open(sys.argv[1], "rb") as f:
    logger = ADSAStatLogger(pickle.load(f), engine_indexes=[0, 1])
for engine, fields in json.loads(sys.argv[2]):
    logger.record(with_adsa(SchedulerStats(), ADSAStats(**fields)), None, engine_idx=engine)
"""

# Each engine's running totals at two steps; the second is the latest.
STEPS = {
    0: [dict(blocks_freed=8, admission_waits=3, requests_by_policy={"topk_v": 4}),
        dict(blocks_freed=16, admission_waits=5, requests_by_policy={"topk_v": 6, "streaming": 2})],
    1: [dict(blocks_freed=4, admission_waits=1, requests_by_policy={"random": 3}),
        dict(blocks_freed=64, admission_waits=9, preemptions=1, requests_by_policy={"random": 5, "attention_mass": 3})],
}
# Both processes saw step 0 of both engines; only process A saw engine 0's latest, only B engine 1's.
SEEN = {"A": [(0, STEPS[0][0]), (0, STEPS[0][1]), (1, STEPS[1][0])],
        "B": [(0, STEPS[0][0]), (1, STEPS[1][0]), (1, STEPS[1][1])]}


@pytest.fixture(scope="module")
def pickled_config(model16, tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs
    vc = EngineArgs(model=str(model16[0]), attention_backend="adsa", dtype="float32").create_engine_config()
    path = tmp_path_factory.mktemp("metrics_api") / "vllm_config.pkl"
    path.write_bytes(pickle.dumps(vc))
    return path


def _check_latest_totals(m: Scrape) -> None:
    for name in ("blocks_freed", "admission_waits", "preemptions"):
        want = {str(e): float(steps[-1].get(name, 0)) for e, steps in STEPS.items()}
        assert m.by_label(f"adsa:{name}_total", "engine") == want, m.lines(f"adsa:{name}")
    for engine, steps in STEPS.items():
        got = {labels["policy"]: v for n, labels, v in m.samples
               if n == "adsa:requests_total" and labels["engine"] == str(engine) and v}
        assert got == steps[-1]["requests_by_policy"], m.lines("adsa:requests_total")


def test_two_api_processes_export_each_engines_totals_once(pickled_config, tmp_path, monkeypatch):
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc_dir))   # as `vllm serve` sets it for >1 API server
    procs = [subprocess.Popen([sys.executable, "-c", API_PROCESS, str(pickled_config), json.dumps(seen)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for seen in SEEN.values()]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert len(list(multiproc_dir.glob("*.db"))) > 0, "the API processes did not write in multiprocess mode"
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc_dir))   # what vLLM's /metrics serves from
    text = generate_latest(registry).decode()
    _check_latest_totals(Scrape(text))
    for name in ("blocks_freed", "admission_waits", "preemptions", "requests"):
        assert f"# TYPE adsa:{name}_total gauge" in text   # a running total merged by max, declared as what it is


def test_one_process_exports_the_totals_it_is_given(pickled_config):
    """The single-API-server (and in-process) path: no multiprocess dir, the default registry. One process gets
    every step of every engine, in order; a repeated total (an idle engine's stats) adds nothing."""
    from vllm.v1.metrics.stats import SchedulerStats

    from adsa_vllm.engine.stats import ADSAStats, with_adsa
    from adsa_vllm.metrics import ADSAStatLogger
    logger = ADSAStatLogger(pickle.loads(pickled_config.read_bytes()), engine_indexes=[0, 1])
    for engine, steps in STEPS.items():
        for fields in steps + steps[-1:]:
            logger.record(with_adsa(SchedulerStats(), ADSAStats(**fields)), None, engine_idx=engine)
    _check_latest_totals(Scrape(generate_latest(REGISTRY).decode()))
