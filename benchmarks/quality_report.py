"""The outputs of benchmarks/quality.py: <tag>.json, <tag>.md (tables), <tag>_bits.png (bits/token vs budget, one
line per policy), <tag>_samples.png (rows: full attention then each policy, columns: classes) and
<tag>_samples.npz (the samples, for --merge); `merge` combines the reports of runs that measured different parts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from adsa_vllm.data import fashion_mnist as fm

# Pictures: Pillow only.
COLORS = {"full": (0, 0, 0), "topk_v_diverse": (214, 39, 40), "topk_v_similar": (255, 127, 14),
          "streaming": (31, 119, 180), "random": (127, 127, 127), "attention_mass": (44, 160, 44),
          "row_anchored": (140, 86, 75), "head_split": (227, 119, 194)}


def _colour(label: str):
    """The policy's colour; a row with a window of n image rows ('<policy>@L<n>') lighter the wider it is."""
    policy, _, split = label.split("/")[0].partition("@")
    rows = split.partition("L")[2]
    col, light = COLORS.get(policy, (148, 103, 189)), min(0.75, 0.15 * (int(rows or 1) - 1))
    return tuple(int(c + (255 - c) * light) for c in col)


def _segment(d, a, b, col, dashed: bool, width: int = 2) -> None:
    if not dashed:
        d.line([a, b], fill=col, width=width)
        return
    n = max(1, int(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 // 6))
    for i in range(0, n, 2):
        t0, t1 = i / n, min(i + 1, n) / n
        d.line([(a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0),
                (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)], fill=col, width=width)


def plot_bits(results: dict, full_bits: float, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw
    W, H, ml, mr, mt, mb = 760, 480, 80, 200, 40, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = {lab: [(b, v["bits_per_token"]) for b, v in sorted(per.items()) if "bits_per_token" in v]
           for lab, per in results.items()}
    ys = [y for p in pts.values() for _, y in p] + [full_bits]
    lo, hi = min(ys), max(ys)
    pad = max((hi - lo) * 0.08, 1e-3)
    lo, hi = lo - pad, hi + pad
    x0, x1, y0, y1 = ml, W - mr, H - mb, mt

    def X(b):
        return x0 + (b - 0.0) / 1.0 * (x1 - x0)

    def Y(v):
        return y0 - (v - lo) / (hi - lo) * (y0 - y1)

    d.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    for b in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line([X(b), y0, X(b), y0 + 5], fill=(0, 0, 0))
        d.text((X(b) - 12, y0 + 8), f"{b:.2f}", fill=(0, 0, 0))
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        d.line([x0 - 5, Y(v), x0, Y(v)], fill=(0, 0, 0))
        d.line([x0, Y(v), x1, Y(v)], fill=(235, 235, 235))
        d.text((8, Y(v) - 6), f"{v:.4f}", fill=(0, 0, 0))
    d.text((x0 + 120, H - 22), "KV budget (fraction of the 784 image tokens)", fill=(0, 0, 0))
    d.text((x0, 12), title, fill=(0, 0, 0))
    yf = Y(full_bits)
    for xs in range(int(x0), int(x1), 12):  # dashed: full attention
        d.line([xs, yf, min(xs + 6, x1), yf], fill=COLORS["full"], width=2)
    for lab, p in pts.items():   # a '<policy>/token' row: its policy's colour, dashed, hollow markers
        col, token = _colour(lab), lab.endswith("/token")
        xy = [(X(b), Y(v)) for b, v in p]
        for a, b in zip(xy, xy[1:]):
            _segment(d, a, b, col, dashed=token)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill="white" if token else col, outline=col)
    ly = mt
    for lab in ["full"] + list(pts):
        _segment(d, (x1 + 15, ly + 6), (x1 + 40, ly + 6), _colour(lab), dashed=lab.endswith("/token"), width=3)
        d.text((x1 + 46, ly), "full attention" if lab == "full" else lab, fill=(0, 0, 0))
        ly += 20
    d.text((x1 + 15, ly + 10), "y: test bits/token", fill=(0, 0, 0))
    img.save(path)


def sample_grid(rows: dict[str, np.ndarray], class_ids: np.ndarray, path: Path, per_class: int = 2,
                scale: int = 3) -> None:
    """rows: label -> uint8 [N, 28, 28] samples; columns: classes (per_class samples each, same seeds per row)."""
    from PIL import Image, ImageDraw
    g, pad, left, top = fm.GRID_SIZE * scale, 2, 120, 18
    cols = [(c, j) for c in range(fm.NUM_CLASSES) for j in range(per_class)]
    W = left + len(cols) * (g + pad)
    H = top + len(rows) * (g + pad)
    img = Image.new("L", (W, H), 255)
    d = ImageDraw.Draw(img)
    for ci, c in enumerate(range(fm.NUM_CLASSES)):
        d.text((left + ci * per_class * (g + pad) + 2, 3), fm.CLASS_NAMES[c][:12], fill=0)
    for ri, (lab, imgs) in enumerate(rows.items()):
        d.text((4, top + ri * (g + pad) + g // 2 - 6), lab, fill=0)
        for k, (c, j) in enumerate(cols):
            idx = np.nonzero(class_ids == c)[0]
            if j < len(idx):
                tile = Image.fromarray(imgs[idx[j]]).resize((g, g), Image.NEAREST)
                img.paste(tile, (left + k * (g + pad), top + ri * (g + pad)))
    img.save(path)


def _budget(b: float) -> str:
    return f"{b:.2f}" if round(b, 2) == b else f"{b:g}"   # 0.10, 0.25; a finer budget in full (0.184)


def markdown(rep: dict) -> str:
    a = rep["args"]
    bits = rep.get("bits")
    lines = [f"# ADSA quality on Fashion-MNIST LlamaGen ({rep['model']['folder']})", "",
             f"Device {rep['device']}, dtype {a['dtype']}, block size {a['block_size']}"
             + (f"; model test bits/token (full attention) {bits['full']['bits_per_token']:.4f} on "
                f"{bits['images']} test images (log2 K = {math.log2(rep['model']['codebook_size']):.0f})."
                if bits else "."), ""]
    if bits:
        budgets = sorted({float(b) for per in bits["policies"].values() for b in per})
        lines += ["## Teacher-forced bits/token (delta vs full attention, paired standard error)", "",
                  "| policy | " + " | ".join(f"budget {_budget(b)}" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        for lab, per in bits["policies"].items():
            cells = []
            for b in budgets:
                v = per.get(str(b))
                cells.append("not run" if v is None else "skipped" if "skipped" in v else
                             f"{v['bits_per_token']:.4f} ({v['delta_vs_full']:+.4f} ± {v['delta_se']:.4f})")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        for ref, title in (("block", "Token vs block granularity (token minus block"),
                           ("default", "Budget split vs the default split (prefix = condition + 1 image row, "
                                       "window = 1 row + 1; row minus the same policy's default-split row")):
            rows = [(lab, per) for lab, per in bits["policies"].items()
                    if any(f"delta_vs_{ref}" in v for v in per.values())]
            if rows:
                lines += ["", f"### {title}, same images, paired standard error)",
                          "", "| policy | " + " | ".join(f"budget {_budget(b)}" for b in budgets) + " |",
                          "|---|" + "---|" * len(budgets)]
            for lab, per in rows:
                cells = [f"{v[f'delta_vs_{ref}']:+.4f} ± {v[f'delta_se_{ref}']:.4f}"
                         if (v := per.get(str(b))) and f"delta_vs_{ref}" in v else "" for b in budgets]
                lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        for lab, per in bits["policies"].items():
            lines += [f"\n{lab} at budget {b} skipped: {v['skipped']}" for b, v in per.items() if "skipped" in v]
    if rep.get("samples"):
        s = rep["samples"]
        res = s["results"]
        budgets = sorted({float(b) for lab, per in res.items() if lab != "full" for b in per})
        lines += ["", f"## Samples ({s['per_policy']} per row, CFG {a['cfg_scale']}, top-k {a['top_k']}, "
                      f"temperature {a['temperature']}, {a['gen_dtype']}): FID on classifier features / class "
                      "accuracy", "",
                  "| rows | " + " | ".join([f"budget {_budget(b)}" for b in budgets] or ["samples"]) + " |",
                  "|---|" + "---|" * max(len(budgets), 1)]
        for lab, per in res.items():
            if lab == "full":
                continue
            cells = ["not run" if (v := per.get(str(b))) is None else "skipped" if "skipped" in v else
                     f"{v['fid']:.3f} / {v['class_accuracy']:.3f}" for b in budgets]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        for lab, v in (("full attention", res.get("full")), ("real train images (floor)", s["real_floor"])):
            if v:
                pad = " |" * max(len(budgets) - 1, 0)
                lines.append(f"| {lab} | {v['fid']:.3f} / {v['class_accuracy']:.3f} |{pad}")
    if rep.get("exact_check"):
        lines += ["", "## Batched path vs reference trackers", "", "```",
                  json.dumps(rep["exact_check"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def write_outputs(rep: dict, samples: dict, class_ids, out_dir: Path, tag: str) -> None:
    """<tag>.json and .md always; the bits plot once a policy is measured; the sample grid and the samples
    themselves (<tag>_samples.npz, for --merge) once a row is sampled. Called after every measured unit, so a run
    stopped at its time limit leaves everything it finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    (out_dir / f"{tag}.md").write_text(markdown(rep))
    bits = rep.get("bits")
    if bits and any("bits_per_token" in v for per in bits["policies"].values() for v in per.values()):
        plot_bits({lab: {float(b): v for b, v in per.items()} for lab, per in bits["policies"].items()},
                  bits["full"]["bits_per_token"], out_dir / f"{tag}_bits.png",
                  f"Fashion-MNIST LlamaGen, {bits['images']} test images: bits/token vs ADSA budget")
    if samples:
        by_budget: dict[str, dict] = {}   # one grid per sample budget, full attention on top of each
        for key, imgs in samples.items():
            lab, _, b = key.partition(" ")
            by_budget.setdefault(b, {})[lab] = imgs
        full = by_budget.pop("", {})
        for b, rows in by_budget.items() or [("", {})]:
            name = f"{tag}_samples.png" if len(by_budget) <= 1 else f"{tag}_samples_{b}.png"
            sample_grid({**full, **rows}, class_ids, out_dir / name)
        np.savez_compressed(out_dir / f"{tag}_samples.npz", class_ids=class_ids, **samples)


def sample_key(row: str, budget: float | None) -> str:
    """The key of a row of samples in <tag>_samples.npz: the row label, + ' <budget>' for an ADSA row."""
    return row if budget is None else f"{row} {budget:g}"


def _nested_samples(s: dict, budget: float) -> dict:
    """A samples report of before several sample budgets (an ADSA row's metrics directly under its label, at the
    run's one budget) in today's layout (results[row][budget]); today's reports pass unchanged."""
    res = {lab: v if lab == "full" or not ("fid" in v or "skipped" in v) else {str(budget): v}
           for lab, v in s["results"].items()}
    return dict(s, results=res)


def _shape(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "folder"}   # the same model may sit at another path


def _merge_exact_checks(old: dict | list | None, new: dict | list) -> dict | list:
    """The batched-vs-reference checks of two reports: policies of a check on the same images and budget join one
    entry (the later wins on overlap), other checks are kept beside it; one check stays a dict, as a run writes it."""
    checks = [dict(c) for c in (old if isinstance(old, list) else [old] if old else [])]
    for c in new if isinstance(new, list) else [new]:
        same = next((k for k in checks if (k["images"], k["budget"]) == (c["images"], c["budget"])), None)
        if same is None:
            checks.append(dict(c))
        else:
            same.update(c)
    return checks[0] if len(checks) == 1 else checks


def merge(paths: list[str], out_dir: Path, tag: str) -> dict:
    """Combine the reports of runs that measured different parts / policies / sample rows of the same model and
    settings (e.g. two calls of a time-limited GPU machine) into one <tag>.{json,md,png}. Later files win on
    overlap; the per-run args, devices and timings are kept under `runs`."""
    reps = [json.loads(Path(p).read_text()) for p in paths]
    first = reps[0]
    devices = [d for r in reps for d in r["device"].split("; ")]   # a merged report's are "A; B": none twice
    out = {"model": first["model"], "device": "; ".join(dict.fromkeys(devices)),
           "args": dict(first["args"]), "timings_s": {}, "runs": []}
    samples, class_ids = {}, None
    for p, r in zip(paths, reps):
        if _shape(r["model"]) != _shape(first["model"]):
            raise SystemExit(f"{p}: another model than {paths[0]}")
        out["runs"] += r.get("runs") or [{"file": Path(p).name, "device": r["device"], "args": r["args"],
                                          "timings_s": r["timings_s"]}]   # a merged report brings its runs
        if r.get("bits"):
            b = out.setdefault("bits", {"images": r["bits"]["images"], "full": r["bits"]["full"], "policies": {}})
            if b["images"] != r["bits"]["images"]:
                raise SystemExit(f"{p}: bits/token on {r['bits']['images']} images, not {b['images']}")
            for lab, per in r["bits"]["policies"].items():
                b["policies"].setdefault(lab, {}).update(per)
        if r.get("samples"):
            old_budget = r["args"].get("sample_budget")   # reports of before --sample-budgets
            rs = _nested_samples(r["samples"], old_budget) if old_budget is not None else r["samples"]
            s = out.setdefault("samples", {k: v for k, v in rs.items() if k != "results"})
            for lab, v in rs["results"].items():
                if lab == "full":
                    s.setdefault("results", {})[lab] = v
                else:
                    s.setdefault("results", {}).setdefault(lab, {}).update(v)
            npz = Path(p).with_name(Path(p).stem + "_samples.npz")
            if npz.is_file():
                with np.load(npz) as z:
                    class_ids = z["class_ids"]
                    samples.update({k if k == "full" or old_budget is None else sample_key(k, old_budget): z[k]
                                    for k in z.files if k != "class_ids"})
        if r.get("exact_check"):
            out["exact_check"] = _merge_exact_checks(out.get("exact_check"), r["exact_check"])
    if "bits" in out:
        out["args"]["budgets"] = sorted({float(b) for per in out["bits"]["policies"].values() for b in per})
        out["args"]["policies"] = list(out["bits"]["policies"])
    if "samples" in out:
        out["args"].pop("sample_budget", None)
        out["args"]["sample_budgets"] = sorted({float(b) for lab, per in out["samples"]["results"].items()
                                                if lab != "full" for b in per})
    write_outputs(out, samples, class_ids, out_dir, tag)
    return out
