"""`adsa-vllm eval`: what an ADSA KV budget costs in image quality, measured the way LlamaGen and ADM measure it.

setting.py     'full' / 'adsa:POLICY:BUDGET[:GRANULARITY]' -> Setting (one engine runs every setting)
conditions.py  class ids or captions -> vLLM prompts; image i has condition i % len(conditions)
pixels.py      tokens -> uint8 RGB [N, H, W, 3], as LlamaGen's FID sampler makes them
samples.py     sampling through vllm.LLM into ADM-layout npz files (arr_0 uint8 NHWC), resumable by shard
reference.py   the reference batch (ADM's VIRTUAL_imagenet256_labeled.npz, or yours), checked
metrics.py     FID / IS / precision-recall through torch-fidelity, set up as ADM's evaluator
report.py      eval.md + eval.json: one row per setting
run.py         one run: engine, samples, metrics, report; command.py: its flags (docs/eval.md)
Nothing here downloads anything; torch-fidelity fetches its Inception weights itself unless --feature-weights.
"""
