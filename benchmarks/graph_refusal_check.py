"""GPU check of issue 22's CUDA-graph rule: a per-request query-dependent policy (attention_mass, block and token
granularity) on three engines built with the shipped model: default policy random with vLLM's default graphs
(attention inside FULL graphs: the request must be refused naming the fix, and the engine keep serving), the same
with --enforce-eager, and attention_mass as the default (its graphs capture the query copy,
adsa_vllm/worker/saved_queries.py: vLLM keeps FULL_AND_PIECEWISE; before that copy it dropped to PIECEWISE).
Both of the latter must accept it and free blocks. Prints a line per engine and `RESULT {json}`; a CPU engine has
no graphs, so this runs on a GPU only:  python benchmarks/graph_refusal_check.py
"""
import gc
import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # the scheduler in this process (engine_scheduler)
import torch  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

from adsa_vllm.llamagen.convert import load_config  # noqa: E402
from adsa_vllm.default_model import SHIPPED_DIR  # noqa: E402
from adsa_vllm.engine.observe import engine_scheduler  # noqa: E402

cfg = load_config(str(SHIPPED_DIR))
out = {}
ENGINES = (("graphs_random", "random", False), ("eager_random", "random", True),
           ("graphs_attention_mass", "attention_mass", False))
for name, default, eager in ENGINES:
    llm = LLM(model=str(SHIPPED_DIR), attention_backend="adsa", enforce_eager=eager, gpu_memory_utilization=0.25,
              additional_config={"adsa": {"budget": 0.5, "policy": default}}, dtype="float32")
    sched = engine_scheduler(llm)
    row = {"cudagraph_mode": str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)}
    for gran in ("block", "token"):
        adsa = {"policy": "attention_mass", "granularity": gran}
        p = SamplingParams(max_tokens=cfg.image_tokens, seed=0, extra_args={"adsa": adsa})
        freed0 = sched.adsa_stats()["total_freed_blocks"]
        try:
            o = llm.generate([{"prompt_token_ids": cfg.prompt(3)}], p, use_tqdm=False)
            row[gran] = {"accepted_tokens": len(o[0].outputs[0].token_ids),
                         "blocks_freed": sched.adsa_stats()["total_freed_blocks"] - freed0}
        except ValueError as e:
            row[gran] = {"refused": str(e)[:300]}
    plain = SamplingParams(max_tokens=cfg.image_tokens, seed=0)
    o = llm.generate([{"prompt_token_ids": cfg.prompt(3)}], plain, use_tqdm=False)
    row["serves_after"] = len(o[0].outputs[0].token_ids)
    out[name] = row
    print(name, json.dumps(row), flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
print("RESULT", json.dumps(out))
