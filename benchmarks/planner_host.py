"""Host time of ADSA's per-step planner (`plan_step` + the kept tables) at N running sequences.

No model and no GPU: N live sequences of the XL/1024-token layout are driven through every decode step of an
image, staggered as in a full server, scored by position (streaming, no KV read), so only the planning is timed.
What is timed is the host work the metadata builder adds per step, i.e. what must stay below the GPU's step time
to be hidden by async scheduling.

  python benchmarks/planner_host.py --rows 512 1024 --budget 0.5 0.25
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.settings import ADSASettings
from adsa_vllm.worker.kept_tables import KeptTables
from adsa_vllm.worker.planner import plan_step
from adsa_vllm.worker.runtime import ADSARuntime


def run(rows: int, budget: float, grid: int, steps: int, policy: str) -> dict:
    bs, cls = 16, 1
    rt = ADSARuntime(ADSASettings(ADSAConfig(budget=budget, policy=policy), block_size=bs, cls_token_num=cls,
                                  grid_size=grid), num_layers=1)
    seq_len = cls + grid * grid
    width = -(-seq_len // bs)
    ids = [f"r{i}" for i in range(rows)]
    for i, rid in enumerate(ids):
        rt._start(rid, None, first_block=i + 1)
    rt.batch_req_ids = lambda n: ids[:n]
    block_table = torch.arange(rows * width, dtype=torch.int32).reshape(rows, width) + rows + 1
    tables = KeptTables()
    layer = SimpleNamespace(kv_cache=torch.zeros(1, 1, bs, 2 * 8), head_size=8, impl=SimpleNamespace(scale=1.0))
    # Staggered positions, as requests admitted at different times: row i is at token (i * 7919) % image.
    pos = (np.arange(rows) * 7919) % (grid * grid - 2) + cls
    times = []
    for _ in range(steps):
        cm = SimpleNamespace(num_reqs=rows, query_start_loc_cpu=torch.arange(rows + 1, dtype=torch.int32),
                             seq_lens_cpu_upper_bound=torch.from_numpy(pos + 1).to(torch.int32),
                             block_table_tensor=block_table)
        t0 = time.perf_counter()
        plan = plan_step(rt, cm, [layer], "none")    # streaming scores need no KV layout
        tables.update(block_table, cm.seq_lens_cpu_upper_bound, plan, rows)
        times.append(time.perf_counter() - t0)
        pos = np.where(pos + 1 >= seq_len - 1, cls, pos + 1)   # a finished row restarts as a new request
        for i in np.nonzero(pos == cls)[0]:
            rt._start(ids[i], None, first_block=int(i) + 1)
    t = np.array(times[steps // 10:]) * 1e3
    return {"rows": rows, "budget": budget, "policy": policy, "grid": grid, "steps": steps,
            "host_ms_per_step_mean": float(t.mean()), "host_ms_per_step_p90": float(np.percentile(t, 90)),
            "us_per_row": float(t.mean() * 1e3 / rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--budget", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--grid", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = [run(r, b, a.grid, a.steps, "streaming") for r in a.rows for b in a.budget]
    for r in res:
        print(json.dumps(r))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
