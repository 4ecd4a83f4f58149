"""quality.py --workers N: one run's measurements as independent jobs, N processes at a time, then one --merge.

The measurements are per-step loops over small batched kernels: one process leaves most of a GPU (and the host's
other cores) idle, so N processes on one device finish a 10k-image sweep several times sooner. Each job is quality.py
itself with the run's own arguments and a subset of the work, so every number is what a single process would give:
- bits/token: one job per policy label and budget (both granularities and every budget split: the token-vs-block
  and split-vs-default pairings stay inside one process); each also scores full attention, which its deltas pair
  with (a few seconds a job);
- samples: full attention alone, then one job per sample budget and granularity;
- the exact check against the reference trackers: a job of its own.
Jobs write <out-dir>/<tag>_parts/<job>.{json,log,...}; a job that fails leaves its log and is reported with the end of
it; the merge takes every job that wrote a report (a partial one included: quality.py saves after every measured
unit). A job that ran out of device memory (N jobs at a time did not fit) runs again later (OOM_RETRIES times at
most): the limit drops to the jobs still running when it failed (they fit) and grows back by one with each job that
finishes (seen on an H100: 12 jobs of the 10k sweep at once did not fit in 80 GB, 8 did).
Resumable: a job that finished leaves <job>.done with its command; rerunning the same command (e.g. after a time
limit stopped it) runs only the jobs without one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from quality_measure import parse_row_label
from quality_report import markdown, merge


def jobs(a) -> list[tuple[str, list[str]]]:
    """(name, extra arguments) of every job of the run `a`, the longest first so that the tail of the run is short
    (a budget split's prefix / local rows travel as the run's own options)."""
    out = []
    if "samples" in a.parts and a.samples_per_policy > 0:
        by_granularity: dict[str, list[str]] = {}
        for r in a.sample_rows:
            if r != "full":
                by_granularity.setdefault(parse_row_label(r)[1], []).append(r)
        for b in a.sample_budgets:
            for g, rows in by_granularity.items():
                out.append((f"samples_{b:g}_{g}", ["--parts", "samples", "--sample-budgets", str(b),
                                                   "--sample-rows", *rows, "--check-exact", "0"]))
        if "full" in a.sample_rows:
            out.append(("samples_full", ["--parts", "samples", "--sample-rows", "full", "--check-exact", "0"]))
    if "bits" in a.parts:
        split = [*(["--local-rows", *map(str, a.local_rows)] if a.local_rows else []),
                 *(["--prefix-rows", *map(str, a.prefix_rows)] if a.prefix_rows else [])]
        for p in a.policies:
            for b in a.budgets:
                out.append((f"bits_{p}_{b:g}", ["--parts", "bits", "--policies", p, "--budgets", str(b),
                                                "--check-exact", "0", *split]))
    if a.check_exact and not a.exact:
        out.append(("exact", ["--parts", "samples", "--samples-per-policy", "0", "--limit", str(a.check_exact)]))
    return out


def without_workers(argv: list[str]) -> list[str]:
    """The run's own arguments less --workers: what every job starts from (argparse lets later options win, so a
    job's own options go after them)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--workers":
            skip = True
        elif not x.startswith("--workers="):
            out.append(x)
    return out


def run(a, argv: list[str]) -> dict:
    """Run the jobs of `a` (parsed from `argv`), a.workers at a time, and merge their reports into <tag>.*."""
    parts = Path(a.out_dir) / f"{a.tag}_parts"
    parts.mkdir(parents=True, exist_ok=True)
    base = without_workers(argv)
    todo = jobs(a)
    # merge in job order (bits rows in the order of --policies, full attention first among the samples)
    order = sorted((name for name, _ in todo), key=lambda n: (not n.startswith("bits_"), n != "samples_full"))
    running: dict[str, tuple[subprocess.Popen, float, list[str]]] = {}
    failed, t0 = [], time.time()
    signal.signal(signal.SIGTERM, _interrupt)   # a time limit's SIGTERM: stop the jobs, merge what they saved
    try:
        _drain(todo, running, failed, base, parts, a.workers, t0)
    except KeyboardInterrupt:
        # `timeout` signals its whole process group: this process may get a second SIGTERM while it stops the jobs
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, (proc, *_) in running.items():
            proc.terminate()
            proc.wait()
            failed.append(f"{name} (stopped)")
        print(f"[workers] stopped after {time.time() - t0:.0f} s; merging what the jobs saved", flush=True)
    reports = [str(parts / f"{n}.json") for n in order if (parts / f"{n}.json").is_file()]
    if not reports:
        raise SystemExit(f"[workers] no job wrote a report; logs under {parts}")
    rep = merge(reports, Path(a.out_dir), a.tag)
    print(markdown(rep))
    print(f"[workers] merged {len(reports)} reports into {a.out_dir}/{a.tag}.* in {time.time() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)} (logs under {parts})" if failed else ""))
    return rep


def _interrupt(signum, frame):
    raise KeyboardInterrupt


OOM_RETRIES = 3
_OOM_MARKERS = ("out of memory", "outofmemoryerror")


def log_tail(log: str, lines: int = 4) -> str:
    """The last non-empty lines of a job's log (where its error is)."""
    return "\n".join([x[:300] for x in log.splitlines() if x.strip()][-lines:])


def ran_out_of_memory(log: str) -> bool:
    return any(m in log.lower() for m in _OOM_MARKERS)


def _drain(todo, running, failed, base, parts: Path, workers: int, t0: float) -> None:
    """Start jobs from `todo`, `workers` at a time, until all have ended; failed: names of those that failed. A job
    that ran out of device memory goes to the back of `todo` (OOM_RETRIES per job) and the limit drops to the jobs
    still running then (they fit); each job that finishes raises it by one, up to `workers`."""
    retries: dict[str, int] = {}
    limit = workers
    while todo or running:
        while todo and len(running) < limit:
            name, extra = todo.pop(0)
            args = [*base, *extra, "--out-dir", str(parts), "--tag", name]
            done = parts / f"{name}.done"
            if done.is_file() and json.loads(done.read_text()) == args:
                print(f"[workers] {name}: done by an earlier run of this command", flush=True)
                continue
            log = open(parts / f"{name}.log", "w")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("quality.py")), *args],
                                    stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), args, extra)
            log.close()
        time.sleep(1.0)
        finished = [name for name, (proc, *_) in running.items() if proc.poll() is not None]
        fit = len(running) - len(finished)
        for name in finished:
            proc, t1, args, extra = running.pop(name)
            ok = proc.returncode == 0
            log = "" if ok else (parts / f"{name}.log").read_text(errors="replace")
            retry = not ok and ran_out_of_memory(log) and retries.get(name, 0) < OOM_RETRIES
            if ok:
                (parts / f"{name}.done").write_text(json.dumps(args))
                limit = min(workers, limit + 1)
            elif retry:
                retries[name] = retries.get(name, 0) + 1
                todo.append((name, extra))
                limit = max(1, min(limit, fit))
            else:
                failed.append(name)
            state = "done" if ok else f"FAILED (exit {proc.returncode})"
            print(f"[workers] {name}: {state} in {time.time() - t1:.0f} s ({time.time() - t0:.0f} s since the start)"
                  + (f"; out of device memory: again later, {limit} at a time" if retry else ""), flush=True)
            if not ok and not retry:
                print("    " + log_tail(log).replace("\n", "\n    "), flush=True)
