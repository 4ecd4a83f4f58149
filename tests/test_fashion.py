"""Fashion-MNIST data, the reference's batched decoder that benchmarks/quality.py measures with, its report merge,
and the demo's image decoding.

Pure torch/numpy, no vLLM. The dataset-dependent test is skipped where `dataset-fashion-mnist` is not installed.
ADSA's ordering on the shipped trained model is tests/test_quality_shipped.py; the batched selection engine alone
against per-row trackers is tests/test_lockstep.py.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from adsa_vllm.config import ADSAConfig
from adsa_vllm.data import fashion_mnist as fm
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.reference import LlamaGenReference, generate, score_tokens, score_tokens_batched

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "adsa_vllm" / "assets"


# The policies benchmarks/quality.py measures.
POLICIES = [dict(policy="topk_v", keep="diverse"), dict(policy="topk_v", keep="similar"), dict(policy="streaming"),
            dict(policy="random"), dict(policy="attention_mass")]


def tiny(grid=16, cls=1, seed=0) -> LlamaGenReference:
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=fm.NUM_LEVELS, num_classes=10,
                         cls_token_num=cls, grid_size=grid)
    return LlamaGenReference(config).init_random_(seed, 0.2).eval()


# ---- data ----
def test_tokenize_round_trip_error_bound():
    K = fm.NUM_LEVELS
    # every grey level (both directions), then random pixels, as three 28x28 images
    x = np.concatenate([np.arange(256), np.arange(256)[::-1],
                        np.random.default_rng(0).integers(0, 256, 784 * 3 - 512)])
    x = x.astype(np.uint8).reshape(3, 28, 28)
    t = fm.tokenize(x)
    assert t.dtype == np.int64 and t.shape == (3, 784) and t.min() >= 0 and t.max() == K - 1
    y = fm.detokenize(t)
    assert y.dtype == np.uint8 and y.shape == (3, 28, 28)
    # Rounding to the nearest of K evenly spaced levels: error <= half a step, black and white exact.
    assert np.abs(y.astype(int) - x.astype(int)).max() <= 255 / (K - 1) / 2
    assert fm.detokenize(fm.tokenize(np.zeros((28, 28), np.uint8))).max() == 0
    assert fm.detokenize(fm.tokenize(np.full((28, 28), 255, np.uint8))).min() == 255
    # tokens are a fixed point, and torch input works too
    assert np.array_equal(fm.tokenize(fm.detokenize(torch.as_tensor(t))), t)


def _write_idx(path: Path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (path.with_name(path.name + ".gz").write_bytes(gzip.compress(data)) if gz else path.write_bytes(data))


def test_locate_and_load_from_env(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    for split, (img, lab) in fm._FILES.items():
        n = 5 if split == "train" else 3
        _write_idx(tmp_path / img, rng.integers(0, 256, (n, 28, 28)), gz=split == "train")   # gzip and raw
        _write_idx(tmp_path / lab, rng.integers(0, 10, (n,)), gz=False)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    x, y = fm.load("test")
    assert x.shape == (3, 28, 28) and y.shape == (3,) and x.dtype == np.uint8
    assert fm.load("train")[0].shape == (5, 28, 28)


def test_missing_data_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(fm.FashionMNISTNotFound, match=r"apt-get install dataset-fashion-mnist") as e:
        fm.load("train")
    assert "nowhere" in str(e.value) and fm.ENV_VAR in str(e.value)


def test_real_data_quantization_if_installed():
    try:
        x, y = fm.load("test")
    except fm.FashionMNISTNotFound:
        pytest.skip("dataset-fashion-mnist not installed")
    assert x.shape == (10000, 28, 28) and np.bincount(y).tolist() == [1000] * 10
    rep = fm.quantization_report(x[:2000], levels=(fm.NUM_LEVELS,))
    assert rep[fm.NUM_LEVELS]["psnr_db"] > 37.0     # the number the docstring's choice of K rests on


# ---- the batched decoder ----
def test_batched_scoring_full_attention_equals_direct_forward():
    m = tiny(grid=28)
    tokens = torch.randint(0, fm.NUM_LEVELS, (3, 784), generator=torch.Generator().manual_seed(0))
    labels = [0, 4, 10]
    with torch.no_grad():
        logits = m.forward_full(tokens[:, :-1], torch.as_tensor(labels))     # [B, 784, K], entry i -> token i
    for adsa in (None, ADSAConfig(budget=None)):
        torch.testing.assert_close(score_tokens_batched(m, labels, tokens, adsa=adsa), logits.log_softmax(-1),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid,cls,policies", [(16, 1, POLICIES), (12, 2, POLICIES[:1])])
def test_batched_scoring_matches_reference_trackers(grid, cls, policies):
    m = tiny(grid=grid, cls=cls)
    tokens = torch.randint(0, fm.NUM_LEVELS, (3, grid * grid), generator=torch.Generator().manual_seed(1))
    c = [1, 5, 10]
    for fields in policies:
        adsa = ADSAConfig(budget=0.5, **fields)
        ref = score_tokens(m, c, tokens, adsa=adsa, return_result=True)
        lp, dec = score_tokens_batched(m, c, tokens, adsa=adsa, max_chunk=37, return_state=True)
        assert dec.selection.selections > 0
        torch.testing.assert_close(lp, ref.logprobs, atol=1e-4, rtol=0)
        assert [t.evicted for t in ref.trackers] == dec.evicted_sets(), fields


def test_batched_sampling_matches_reference_generate():
    m = tiny(grid=16)
    # attention_mass: the only policy that reads the query, so the scoring forward's position must be right too
    for adsa in (ADSAConfig(budget=0.5, policy="topk_v"), ADSAConfig(budget=0.5, policy="attention_mass")):
        for selection in ("shared", "separate"):   # CFG pairs: one decision per pair (the vLLM path) or per row
            kw = dict(cfg_scale=2.0, top_k=8, seed=3, adsa=adsa, cfg_selection=selection)
            assert torch.equal(generate(m, [1, 9], batched=True, **kw).tokens, generate(m, [1, 9], **kw).tokens), \
                selection


def test_fid_is_zero_on_identical_features_and_grows_with_a_shift():
    from adsa_vllm.data import classifier as clf
    f = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(clf.fid(f, f)) < 1e-6
    assert clf.fid(f, f + 1.0) == pytest.approx(8.0, rel=1e-6)   # |mu shift|^2, same covariance


def test_shipped_classifier_loads_from_the_package_assets():
    from adsa_vllm.data import classifier as clf
    assert clf.DEFAULT_PATH == ASSETS / "fashion_classifier.pt"
    imgs = clf.quantize(np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8))
    assert clf.features(imgs).shape == (3, clf.FEATURES)
    assert clf.predict(imgs).shape == (3,) and set(clf.predict(imgs)) <= set(range(fm.NUM_CLASSES))


def test_demo_draws_fashion_tokens_as_labelled_garments():
    from adsa_vllm import demo
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=fm.NUM_LEVELS, num_classes=10, grid_size=28)
    tokens = fm.tokenize(np.arange(784).reshape(1, 28, 28) % 256)[0]
    assert np.array_equal(demo.tokens_to_image(tokens, config), fm.detokenize(tokens)[0])
    assert [demo.class_label(c, config) for c in (0, 9)] == ["T-shirt/top", "Ankle boot"]
    other = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
    assert demo.tokens_to_image(np.full(256, 511), other).shape == (16, 16) and demo.class_label(3, other) == "class 3"


def test_merge_combines_parts_of_a_split_run(tmp_path):
    """quality.py --merge: bits of one call + samples of another -> one report, tables and pictures of the union."""
    base = {"model": {"folder": "m", "codebook_size": fm.NUM_LEVELS}, "device": "gpu",
            "args": {"dtype": "float32", "block_size": 16, "budgets": [0.5], "cfg_scale": 2.0, "top_k": 8,
                     "temperature": 1.0, "sample_budget": 0.5, "gen_dtype": "bfloat16"}, "timings_s": {"total": 1}}
    v = {"bits_per_token": 0.9, "delta_vs_full": 0.01, "delta_se": 0.001}
    bits = dict(base, bits={"images": 10, "full": {"bits_per_token": 0.89},
                            "policies": {"random": {"0.5": v, "0.1": {"skipped": "too small"}}}})
    more = dict(base, bits={"images": 10, "full": {"bits_per_token": 0.89},
                            "policies": {"random": {"0.75": dict(v, bits_per_token=0.895)}}})
    samples = dict(base, samples={"per_policy": 4, "real_floor": {"fid": 0.1, "class_accuracy": 0.9},
                                  "results": {"full": {"fid": 0.2, "class_accuracy": 1.0},
                                              "random/token": {"fid": 0.3, "class_accuracy": 0.5}}})
    # a report of today's layout (several sample budgets: results[row][budget]) beside the one above, written
    # before there were several (one budget, args["sample_budget"], metrics directly under the row)
    new_args = {k: v for k, v in base["args"].items() if k != "sample_budget"} | {"sample_budgets": [0.25]}
    at_025 = {"random/token": {"0.25": {"fid": 0.7, "class_accuracy": 0.25}}}
    low = dict(base, args=new_args, samples={"per_policy": 4, "real_floor": {"fid": 0.1, "class_accuracy": 0.9},
                                             "results": at_025})
    # devices and batched-vs-reference checks of several calls: each device once; checks on the same images and
    # budget join, others stay beside them
    exact = {"max_abs_logprob_diff": 1e-5, "evicted_sets_identical": "4/4"}
    bits["exact_check"] = {"images": 4, "budget": 0.5, "random": exact}
    more.update(device="gpu; cpu", exact_check={"images": 4, "budget": 0.5, "streaming": exact})
    low["exact_check"] = {"images": 4, "budget": 0.1, "random": exact}
    paths = []
    for name, rep in (("a", bits), ("b", more), ("c", samples), ("d", low)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
        paths.append(str(tmp_path / f"{name}.json"))
    imgs = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "c_samples.npz", class_ids=np.arange(4), full=imgs, **{"random/token": imgs + 1})
    np.savez(tmp_path / "d_samples.npz", class_ids=np.arange(4), **{"random/token 0.25": imgs + 2})
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--merge", *paths,
                    "--out-dir", str(tmp_path / "out"), "--tag", "m"], check=True, capture_output=True)
    out = json.loads((tmp_path / "out" / "m.json").read_text())
    assert set(out["bits"]["policies"]["random"]) == {"0.5", "0.1", "0.75"}
    assert out["args"]["budgets"] == [0.1, 0.5, 0.75] and out["samples"]["results"]["full"]["fid"] == 0.2
    assert out["args"]["sample_budgets"] == [0.25, 0.5] and len(out["runs"]) == 4
    assert out["samples"]["results"]["random/token"]["0.5"]["fid"] == 0.3
    assert out["device"] == "gpu; cpu"
    again = [str(tmp_path / "out" / "m.json"), paths[0], "--out-dir", str(tmp_path / "again"), "--tag", "m"]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--merge", *again], check=True,
                   capture_output=True)
    assert len(json.loads((tmp_path / "again" / "m.json").read_text())["runs"]) == 5   # a merge of a merge
    assert out["exact_check"] == [{"images": 4, "budget": 0.5, "random": exact, "streaming": exact},
                                  {"images": 4, "budget": 0.1, "random": exact}]
    md = (tmp_path / "out" / "m.md").read_text()
    assert "0.8950 (+0.0100" in md and "| full attention | 0.200 / 1.000 |" in md and "skipped" in md
    assert "| random/token | 0.700 / 0.250 | 0.300 / 0.500 |" in md
    with np.load(tmp_path / "out" / "m_samples.npz") as z:   # a '/' in a row label survives the npz round trip
        assert (z["random/token 0.5"] == 1).all() and (z["random/token 0.25"] == 2).all() and (z["full"] == 0).all()
    # one grid per sample budget, full attention on top of each
    assert {f.name for f in (tmp_path / "out").glob("m_samples*.png")} == {"m_samples_0.25.png", "m_samples_0.5.png"}
    for f in ("m.json", "m_bits.png", "m_samples.npz"):
        assert (tmp_path / "out" / f).is_file(), f



def test_quality_workers_split_a_run_into_jobs_that_measure_each_unit_once():
    """quality.py --workers: every bits row x budget, sample row x budget and the exact check is measured by exactly
    one job, and no job spreads again."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality
    import quality_workers
    from quality_measure import row_label

    def units(a):
        out = []
        if "bits" in a.parts:
            out += [("bits", row_label(p, g), b) for p in a.splits for g in a.granularities for b in a.budgets]
        if "samples" in a.parts and a.samples_per_policy > 0:
            out += [("samples", r, b) for r in a.sample_rows for b in ([None] if r == "full" else a.sample_budgets)]
        if a.check_exact and not a.exact:
            out.append(("exact", min(a.check_exact, a.limit), a.sample_budgets[0]))
        return out

    argv = ["--device", "cpu", "--policies", "random", "head_split", "--granularities", "block", "token",
            "--budgets", "0.1", "0.25", "--sample-budgets", "0.1", "0.5", "--local-rows", "1", "2",
            "--check-exact", "2", "--workers", "3"]
    a = quality.parse_args(argv)
    base = quality_workers.without_workers(argv)
    assert base == argv[:-2]
    jobs = quality_workers.jobs(a)
    assert [n for n, _ in jobs] == ["samples_0.1_block", "samples_0.1_token", "samples_0.5_block",
                                    "samples_0.5_token", "samples_full", "bits_random_0.1", "bits_random_0.25",
                                    "bits_head_split_0.1", "bits_head_split_0.25", "exact"]
    measured = []
    for name, extra in jobs:
        sub = quality.parse_args(base + extra + ["--out-dir", "/tmp/x", "--tag", name])
        assert sub.workers == 1
        measured += units(sub)
    assert sorted(measured, key=str) == sorted(units(a), key=str)
    assert len(measured) == 2 * 2 * 2 * 2 + 1 + 2 * 2 * 2 + 1   # bits + full + sample rows x budgets + exact


def test_quality_workers_rerun_runs_only_the_jobs_not_done_and_merges_all(tmp_path, monkeypatch):
    """A job that finished leaves <job>.done with its arguments: the same command again starts no process for it
    (here: none at all) and still merges every job's report."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality
    import quality_workers
    argv = ["--device", "cpu", "--policies", "random", "--budgets", "0.5", "--parts", "bits", "--check-exact", "0",
            "--out-dir", str(tmp_path), "--tag", "q", "--workers", "2"]
    a = quality.parse_args(argv)
    (name, extra), = quality_workers.jobs(a)
    parts = tmp_path / "q_parts"
    parts.mkdir()
    args = [*quality_workers.without_workers(argv), *extra, "--out-dir", str(parts), "--tag", name]
    (parts / f"{name}.done").write_text(json.dumps(args))
    v = {"bits_per_token": 0.9, "delta_vs_full": 0.01, "delta_se": 0.001}
    (parts / f"{name}.json").write_text(json.dumps({
        "model": {"folder": "m", "codebook_size": fm.NUM_LEVELS}, "device": "cpu", "timings_s": {"total": 1},
        "args": {"dtype": "float32", "block_size": 16, "budgets": [0.5]},
        "bits": {"images": 10, "full": {"bits_per_token": 0.89}, "policies": {"random": {"0.5": v}}}}))
    monkeypatch.setattr(quality_workers.subprocess, "Popen", lambda *x, **k: pytest.fail("a job ran again"))
    quality.main(argv)
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["bits"]["policies"]["random"]["0.5"]["bits_per_token"] == 0.9


def test_quality_workers_retry_a_job_that_ran_out_of_device_memory_and_show_why_others_failed(tmp_path, monkeypatch,
                                                                                                 capsys):
    """A job whose log says the device ran out of memory runs again (fewer at a time); a job that failed otherwise
    is not retried and the end of its log is printed; the merge takes every report."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import quality
    import quality_workers
    argv = ["--device", "cpu", "--policies", "random", "--budgets", "0.25", "0.5", "0.75", "--parts", "bits",
            "--check-exact", "0", "--out-dir", str(tmp_path), "--tag", "q", "--workers", "3"]
    starts: list[str] = []

    class FakeJob:
        def __init__(self, cmd, stdout, stderr):
            args = cmd[2:]   # the job's own --tag and --out-dir come last (argparse: the last one wins)
            name = args[len(args) - args[::-1].index("--tag")]
            parts = Path(args[len(args) - args[::-1].index("--out-dir")])
            budget = name.rsplit("_", 1)[1]
            starts.append(name)
            if budget == "0.25" and starts.count(name) == 1:
                stdout.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
                self.returncode = 1
            elif budget == "0.75":
                stdout.write("Traceback (most recent call last):\nValueError: the bad job's own error\n")
                self.returncode = 1
            else:
                v = {"bits_per_token": 0.9 + float(budget), "delta_vs_full": 0.01, "delta_se": 0.001}
                (parts / f"{name}.json").write_text(json.dumps({
                    "model": {"folder": "m", "codebook_size": fm.NUM_LEVELS}, "device": "cpu",
                    "timings_s": {"total": 1}, "args": {"dtype": "float32", "block_size": 16, "budgets": [budget]},
                    "bits": {"images": 10, "full": {"bits_per_token": 0.89},
                             "policies": {"random": {budget: v}}}}))
                self.returncode = 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(quality_workers.subprocess, "Popen", FakeJob)
    monkeypatch.setattr(quality_workers.time, "sleep", lambda s: None)
    quality.main(argv)
    out = capsys.readouterr().out
    assert starts.count("bits_random_0.25") == 2 and starts.count("bits_random_0.75") == 1
    assert "bits_random_0.25: FAILED (exit 1)" in out and "out of device memory: again later" in out
    assert "ValueError: the bad job's own error" in out and "failed: bits_random_0.75" in out
    merged = json.loads((tmp_path / "q.json").read_text())["bits"]["policies"]["random"]
    assert sorted(merged) == ["0.25", "0.5"]
    assert (tmp_path / "q_parts" / "bits_random_0.25.done").is_file()
    assert not (tmp_path / "q_parts" / "bits_random_0.75.done").is_file()
