"""Quality of attention settings by FID / IS / precision / recall: `adsa-vllm eval` as a benchmark script.

    python benchmarks/eval.py --settings full adsa:topk_v:0.5 adsa:random:0.5 adsa:streaming:0.5 --ref REF.npz

The code is the package's (adsa_vllm/eval/); docs/eval.md has the commands of the LlamaGen-XL table.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adsa_vllm.eval.command import main  # noqa: E402

if __name__ == "__main__":
    main(prog="benchmarks/eval.py")
