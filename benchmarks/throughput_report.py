"""Markdown table + bar plot of throughput.py results (one JSON per invocation; ratios only within a JSON).

  python benchmarks/throughput_report.py benchmarks/results/throughput_h200_{a,b,c,d_batch1}.json \
      --out benchmarks/results/throughput_h200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("mode", "tok/s", "ratio", "images/s", "mean running", "preempt.", "step ms", "worker host ms/step",
           "ADSA host ms/step", "ADSA scoring ms/step")


def setting(args: dict) -> str:
    model = f"{args['preset']} t2i, 120-row captions +" if args.get("t2i") else f"{args['preset']},"
    s = f"{model} {args['grid'] ** 2} tok, KV {args['kv_gib']:g} GiB, {args['num_seqs']} requests"
    return s + (f", arrivals {args['arrival_rate']:g}/s" if args.get("arrival_rate") else "")


def rows(report: dict):
    stock = next((r for r in report["results"] if r["mode"] == "llamagen" and "failed" not in r), None)
    for r in report["results"]:
        if "failed" in r:
            yield [r["mode"], "failed: " + "; ".join(r.get("error", []))[:80]] + [""] * (len(COLUMNS) - 2)
            continue
        ratio = f"**{r['tok_per_s'] / stock['tok_per_s']:.2f}**" if stock and r is not stock else ""
        opt = lambda k: f"{r[k]:.2f}" if k in r else ""  # noqa: E731
        yield [r["mode"], f"{r['tok_per_s']:,.0f}", ratio, f"{r['images_per_s']:.2f}", f"{r['mean_running']:.0f}",
               str(r["num_preemptions"]), f"{r['step_ms']:.2f}", opt("worker_host_ms_per_step"),
               opt("adsa_host_ms_per_step"), opt("adsa_scoring_ms_per_step")]


def plot(reports: list[tuple[str, dict]], path: Path) -> None:
    """One group of bars per invocation: each mode's tok/s over stock's (1.0 line drawn)."""
    from PIL import Image, ImageDraw
    bars = [(label, r["mode"], r["tok_per_s"] / next(x for x in rep["results"] if x["mode"] == "llamagen")["tok_per_s"])
            for label, rep in reports for r in rep["results"] if "failed" not in r and r["mode"] != "llamagen"]
    W, H, left, bottom, bw = 120 + 90 * len(bars), 420, 60, 120, 60
    top = max(2.0, max(b[2] for b in bars) * 1.1)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    y = lambda v: H - bottom - v / top * (H - bottom - 30)  # noqa: E731
    for v in [0.5 * i for i in range(int(top / 0.5) + 1)]:
        d.line([(left, y(v)), (W - 10, y(v))], fill=(220, 220, 220))
        d.text((10, y(v) - 6), f"{v:.1f}x", fill="black")
    d.line([(left, y(1.0)), (W - 10, y(1.0))], fill=(200, 0, 0), width=2)
    for i, (label, mode, ratio) in enumerate(bars):
        x = left + 20 + 90 * i
        d.rectangle([x, y(ratio), x + bw, y(0)], fill=(40, 90, 170))
        d.text((x, y(ratio) - 14), f"{ratio:.2f}", fill="black")
        d.text((x, H - bottom + 6), mode.replace("adsa:", "").replace(":", " "), fill="black")
        d.text((x, H - bottom + 22), label, fill=(90, 90, 90))
    d.text((left, 8), "ADSA tok/s over stock vLLM, same invocation (red: 1.0)", fill="black")
    img.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsons", nargs="+")
    ap.add_argument("--out", required=True, help="path prefix: writes PREFIX.md and PREFIX.png")
    a = ap.parse_args()
    # label: the file name after "throughput_<gpu>_" ("throughput_h200_a_sw_fp8.json" -> "a_sw_fp8")
    reports = [("_".join(Path(p).stem.split("_")[2:]) or Path(p).stem, json.loads(Path(p).read_text()))
               for p in a.jsons]
    lines = []
    for label, rep in reports:
        lines += [f"### ({label}) {setting(rep['args'])} — {rep.get('device', '?')}", ""]
        lines += [f"_{rep['note']}_", ""] if rep.get("note") else []
        lines += [
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in rows(rep)] + [""]
    Path(a.out + ".md").write_text("\n".join(lines))
    plot(reports, Path(a.out + ".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
