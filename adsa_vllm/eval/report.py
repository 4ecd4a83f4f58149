"""The run's table: one row per setting (setting, N, FID, IS, precision, recall, seconds, images/s), written as
<out>/eval.json (rows + what the run was) and <out>/eval.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

COLUMNS = ("setting", "N", "FID", "IS", "precision", "recall", "seconds", "images/s")


@dataclass
class Row:
    setting: str
    images: int
    seconds: float                  # vLLM generate time of the samples (resumed shards: their recorded time)
    fid: float | None = None        # None: no --ref given (sampling only)
    inception_score: float | None = None
    inception_score_std: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid_reference: str | None = None
    samples: str | None = None      # the npz path

    @property
    def images_per_second(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


def _cell(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    """The markdown table alone."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join([r.setting, str(r.images), _cell(r.fid, 3), _cell(r.inception_score, 2),
                                        _cell(r.precision, 3), _cell(r.recall, 3), _cell(r.seconds, 1),
                                        _cell(r.images_per_second, 2)]) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[Row], run: dict) -> str:
    """Header lines (what the run was) and the table."""
    return "\n".join(["# adsa-vllm eval", "", *[f"* {k}: {v}" for k, v in run.items()], "", table(rows)])


def write_report(rows: list[Row], run: dict, out_dir: str | Path, name: str = "eval") -> tuple[Path, Path]:
    """<out_dir>/<name>.json and <name>.md; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    payload = {"run": run, "columns": list(COLUMNS),
               "rows": [{**asdict(r), "images_per_second": r.images_per_second} for r in rows]}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path.write_text(markdown(rows, run))
    return json_path, md_path


__all__ = ["COLUMNS", "Row", "markdown", "table", "write_report"]
