"""`adsa-vllm eval` end to end on tiny random c2i and t2i models (CPU): the npz layout ADM's evaluator reads, a rerun
that samples nothing, a run cut short that resumes to the identical npz, the metrics through torch-fidelity (a tiny
random feature extractor registered with the library: its code path runs, the values mean nothing), and the
errors a user can make, each before an engine starts.

One vllm.LLM per model for the whole module (conftest's `engines`): `build_engine` is replaced by one that hands
out that engine behind a counter of `generate` calls, so reruns are checked by the calls they make."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adsa_vllm.cli import main
from adsa_vllm.eval import run as eval_run
from adsa_vllm.eval.metrics import FeatureSpace, fid_statistics, score
from adsa_vllm.eval.pixels import eval_images, to_rgb
from adsa_vllm.eval.setting import Setting, parse_setting, parse_settings

pytest.importorskip("torch_fidelity")
import tiny_features  # noqa: E402  (needs torch_fidelity)

# Grid 8 (64 image tokens) keeps sampling short; ADSA needs 48 of them at least (prefix + local window blocks).
C2I = dict(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=8)
T2I = dict(dim=64, n_layer=2, n_head=2, codebook_size=512, grid_size=8, model_type="t2i", cls_token_num=8,
           caption_dim=64)
SETTINGS = ["full", "adsa:random:0.75"]


def _model(tmp_path_factory, name, shape):
    from adsa_vllm.default_model import make_random_model_dir
    from adsa_vllm.llamagen.config import LlamaGenConfig
    return make_random_model_dir(tmp_path_factory.mktemp(name), LlamaGenConfig(**shape), seed=0, std=0.1)


@pytest.fixture(scope="module")
def c2i_dir(tmp_path_factory):
    return _model(tmp_path_factory, "eval_c2i", C2I)


class Interrupted(Exception):
    pass


class CountingLLM:
    """The module's engine, counting generate calls; `fail_at` = n raises on the n-th call (a run cut short)."""

    def __init__(self, llm, fail_at: int | None = None):
        self.llm, self.calls, self.fail_at = llm, 0, fail_at

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupted
        return self.llm.generate(*args, **kwargs)


@pytest.fixture
def engine(monkeypatch, engines):
    """Patches eval's build_engine; returns a function giving the CountingLLM the next run will get."""
    state = {"fail_at": None, "proxies": []}

    def build(run):
        kwargs = eval_run.engine_kwargs(run)
        llm = engines.get(("eval", run.config.model_type, json.dumps(kwargs["additional_config"])),
                          kwargs.pop("model"), **kwargs)
        state["proxies"].append(CountingLLM(llm, state["fail_at"]))
        return state["proxies"][-1]

    monkeypatch.setattr(eval_run, "build_engine", build)
    return state


@pytest.fixture(scope="module")
def feature_weights(tmp_path_factory):
    """The tiny extractor's weights as a file, so --feature-weights is exercised."""
    path = tmp_path_factory.mktemp("features") / "tiny.pt"
    torch.save(tiny_features.TinyFeatures(tiny_features.NAME, ["32"]).state_dict(), path)
    return path


def _eval_args(model_dir, out, *extra):
    return ["eval", "--model", str(model_dir), "--classes", "0", "1", "2", "--per-class", "2", "--shard-size", "4",
            "--cfg", "2", "--top-k", "50", "--out", str(out), "--no-progress", *extra]


def test_samples_metrics_and_a_rerun_that_samples_nothing(c2i_dir, engine, feature_weights, tmp_path, capfd):
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    args = _eval_args(c2i_dir, tmp_path / "out", "--settings", *SETTINGS, "--ref", str(ref),
                      "--feature-extractor", tiny_features.register(), "--feature-weights", str(feature_weights))
    main(args)
    assert engine["proxies"][0].calls == 6               # 2 settings x (a warm-up image + 2 shards of 4, 2)
    out = tmp_path / "out"
    for stem in ("full", "adsa_random_0.75"):
        with np.load(out / f"{stem}.npz") as z:        # ADM's layout: arr_0 uint8 NHWC RGB, arr_1 labels
            images, labels, tokens = z["arr_0"], z["arr_1"], z["tokens"]
        assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8 and tokens.shape == (6, 64)
        np.testing.assert_array_equal(images[..., 0], images[..., 2])   # token maps are grey, replicated
        assert labels.tolist() == [0, 1, 2, 0, 1, 2]     # classes cycle: every IS split sees every class
        assert not (out / f"{stem}.parts").exists()
    report = json.loads((out / "eval.json").read_text())
    assert [r["setting"] for r in report["rows"]] == SETTINGS
    for r in report["rows"]:
        assert r["images"] == 6 and r["seconds"] > 0 and r["images_per_second"] > 0
        for key in ("fid", "inception_score", "precision", "recall"):
            assert np.isfinite(r[key]), (key, r)
        assert r["fid_reference"] == "arr_0 (8 images)"
    assert "| adsa:random:0.75 | 6 |" in (out / "eval.md").read_text()
    assert "| full | 6 |" in capfd.readouterr().out

    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.npz")}
    main(args)                                           # everything on disk: no engine, no generate call
    assert len(engine["proxies"]) == 1
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*.npz")} == before
    assert json.loads((out / "eval.json").read_text())["rows"][0]["fid"] == report["rows"][0]["fid"]


def test_a_run_cut_short_resumes_to_the_same_npz(c2i_dir, engine, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    main(_eval_args(c2i_dir, whole, "--settings", "adsa:random:0.75"))
    engine["fail_at"] = 3                                # warm-up, shard 0 written, then the run dies
    with pytest.raises(Interrupted):
        main(_eval_args(c2i_dir, cut, "--settings", "adsa:random:0.75"))
    assert [p.name for p in (cut / "adsa_random_0.75.parts").glob("*.npz")] == ["00000.npz"]
    engine["fail_at"] = None
    main(_eval_args(c2i_dir, cut, "--settings", "adsa:random:0.75"))
    assert [p.calls for p in engine["proxies"]] == [3, 3, 2]   # the resumed run: warm-up and shard 1 only
    with np.load(whole / "adsa_random_0.75.npz") as a, np.load(cut / "adsa_random_0.75.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert json.loads((cut / "adsa_random_0.75.json").read_text())["shards"] == 2


def test_a_folder_of_other_samples_is_refused_before_the_engine(c2i_dir, engine, tmp_path, capsys):
    main(_eval_args(c2i_dir, tmp_path, "--settings", "full", "--per-class", "1"))
    with pytest.raises(SystemExit) as e:
        main(_eval_args(c2i_dir, tmp_path, "--settings", "full", "--per-class", "1", "--seed", "1"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "describes other samples (seed: 0 -> 1)" in err and "give another --out" in err
    assert len(engine["proxies"]) == 1


def test_t2i_samples_from_caption_embeddings(tmp_path_factory, engine, tmp_path):
    model_dir = _model(tmp_path_factory, "eval_t2i", T2I)
    gen = torch.Generator().manual_seed(1)
    captions = tmp_path / "captions.pt"
    torch.save([torch.randn(v, T2I["caption_dim"], generator=gen) for v in (8, 3)], captions)
    main(["eval", "--model", str(model_dir), "--caption-embeds", str(captions), "--per-caption", "2",
          "--settings", "adsa:random:0.75", "--cfg", "4", "--out", str(tmp_path / "out"), "--no-progress"])
    assert engine["proxies"][0].calls == 2               # warm-up and one shard
    with np.load(tmp_path / "out" / "adsa_random_0.75.npz") as z:
        assert z["arr_0"].shape == (4, 8, 8, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].tolist() == [0, 1, 0, 1]


def test_metrics_of_identical_batches():
    space = FeatureSpace.create(tiny_features.register(), device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    feats = space.features(images)
    assert feats["32"].shape == (24, 32) and feats["logits"].shape == (24, 10)
    same = score(feats, feats, space.layers)
    assert abs(same.fid) < 1e-6 and same.precision == same.recall == 1.0 and same.inception_score >= 1.0
    assert same.fid_reference == "arr_0 (24 images)"
    stored = score(feats, feats, space.layers, reference_stats=fid_statistics(feats["32"]))   # ADM's mu / sigma path
    assert abs(stored.fid) < 1e-6 and stored.fid_reference == "npz mu/sigma"
    other = score(space.features(255 - images), feats, space.layers)
    assert other.fid > 1e-3 and np.isfinite([other.inception_score, other.precision, other.recall]).all()


@pytest.mark.parametrize("write, message", [
    (None, "no such file"),
    (lambda p: p.write_text("not numpy"), "not a numpy .npz file"),
    (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)), "no arr_0 in it (it holds ['images'])"),
    (lambda p: np.savez(p, np.zeros((2, 3, 8, 8), np.uint8)), "transpose it to NHWC, x.transpose(0, 2, 3, 1)"),
    (lambda p: np.savez(p, np.zeros((2, 8, 8), np.uint8)), "replicate it to RGB"),
    (lambda p: np.savez(p, np.zeros((2, 8, 8, 3), np.float32)), "store pixels as uint8 0..255"),
])
def test_a_bad_reference_batch_is_named_before_sampling(write, message, tmp_path, engine, capsys):
    ref = tmp_path / "ref.npz"
    if write is not None:
        write(ref)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ref", str(ref), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--ref {ref}" in err and message in err, err
    assert engine["proxies"] == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--settings", "adsa:nope:0.5"], "adsa.policy='nope' is unknown"),
    (["--settings", "sparse"], "write 'full' or 'adsa[:POLICY[:BUDGET[:GRANULARITY]]]'"),
    (["--settings", "full", "adsa:random:0.5", "adsa::0.5"], "names adsa:random:0.5 more than once"),
    (["--settings", "adsa:random:0.01"], "raise the budget to at least 80 tokens"),
    (["--classes", "shoe"], "unknown class 'shoe'"),
    (["--caption-embeds", "x.pt"], "is a class-to-image model"),
    (["--image-size-eval", "256"], "this model has no VQ decoder"),
    (["--ref", "x.npz", "--feature-extractor", "nope"], "'nope' is not registered with torch-fidelity"),
])
def test_bad_flags_exit_before_the_engine(flags, message, tmp_path, engine, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--out", str(tmp_path), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert engine["proxies"] == []


def test_settings_syntax():
    assert [s.label for s in parse_settings(["full", "adsa:topk_v:0.5", "adsa::300:token", "adsa"],
                                            policy="streaming")] == \
        ["full", "adsa:topk_v:0.5", "adsa:streaming:300:token", "adsa:streaming:0.5"]
    assert parse_settings(None, budget="none") == [Setting(budget=None)]
    assert parse_settings(None, budget="0.25", policy="topk_v") == [Setting(0.25, "topk_v")]
    s = parse_setting("adsa:random:0.25:token")
    assert s.file_stem == "adsa_random_0.25_token" and parse_setting(s.label) == s
    assert s.request_adsa() == {"budget": 0.25, "policy": "random", "granularity": "token"}
    assert Setting(budget=None).request_adsa() == {"budget": None}


def test_eval_images_layout(tmp_path):
    from adsa_vllm.data import fashion_mnist as fm
    from adsa_vllm.llamagen.config import LlamaGenConfig
    from adsa_vllm.vq import VQDecoder
    from test_vq_decoder import SMALL, _random_official_state_dict
    pixel = LlamaGenConfig(dim=64, n_layer=1, n_head=2, codebook_size=16, num_classes=10, grid_size=28)
    tokens = np.random.default_rng(0).integers(0, 16, (2, 784))
    np.testing.assert_array_equal(eval_images(pixel, tokens), to_rgb(fm.detokenize(tokens)))
    torch.save({"model": _random_official_state_dict(seed=7)}, tmp_path / "vq.pt")
    vq = VQDecoder.from_checkpoint(tmp_path / "vq.pt", **SMALL)
    model = LlamaGenConfig(dim=64, n_layer=1, n_head=2, codebook_size=SMALL["codebook_size"], grid_size=4)
    codes = np.random.default_rng(1).integers(0, SMALL["codebook_size"], (3, 16))
    native = eval_images(model, codes, vq=vq)
    assert native.shape == (3, 8, 8, 3) and native.dtype == np.uint8 and native.std() > 0
    # LlamaGen's FID sampler truncates clamp(127.5 x + 128); the PNG path rounds: equal but for float ties
    assert np.abs(native.astype(int) - vq.decode_codes(codes, 4).astype(int)).max() <= 1
    resized = eval_images(model, codes, vq=vq, eval_size=6)   # bicubic, as --image-size-eval
    assert resized.shape == (3, 6, 6, 3) and resized.dtype == np.uint8
