"""The output of the kernel micro-benchmarks (scoring_logits.py, layer_kernels.py): a JSON file and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path


def save_and_print(rep: dict, out: str | None, columns: list[str], rows: list[list[str]]) -> None:
    """Write `rep` to `out` (if given) and print `rows` as a markdown table under `columns`."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rep, indent=2) + "\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(r) + " |")
