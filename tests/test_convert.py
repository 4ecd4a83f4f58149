"""Official checkpoint -> model folder conversion, and the embedded default model (CPU, fast)."""

import argparse
import json

import pytest
import torch

from adsa_vllm.llamagen import convert as conv
from adsa_vllm.default_model import (DEFAULT_CONFIG, SHIPPED_DIR, default_model_dir, make_random_model_dir,
                                     random_model_dir)
from adsa_vllm.llamagen.config import LlamaGenConfig, preset
from adsa_vllm.reference import LlamaGenReference, generate

CONFIG = LlamaGenConfig(dim=64, n_layer=2, n_head=4, codebook_size=64, num_classes=10, grid_size=4)


def official_model(config=CONFIG, seed=1):
    return LlamaGenReference(config).init_random_(seed, 0.2).eval()


def wrap_plain(sd):
    return {"model": sd, "steps": 100}


def wrap_ddp_with_buffers(sd):
    inner = {f"module.{k}": v for k, v in sd.items()}
    inner["module.freqs_cis"] = torch.zeros(17, 8, 2)
    inner["module.layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 16)
    return {"model": inner}


def wrap_compiled(sd):
    return {"state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}}


@pytest.mark.parametrize("wrap", [wrap_plain, wrap_ddp_with_buffers, wrap_compiled, lambda sd: sd])
def test_round_trip_gives_identical_greedy_tokens(tmp_path, wrap):
    ref = official_model()
    torch.save(wrap(ref.state_dict()), tmp_path / "c2i.pt")
    out = conv.convert(tmp_path / "c2i.pt", tmp_path / "folder", n_head=4, grid_size=4)
    loaded = conv.load_reference(out)
    assert loaded.config == CONFIG
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaGenForCausalLM"]
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a, b = generate(ref, [3, 7], greedy=True), generate(loaded, [3, 7], greedy=True)
    assert torch.equal(a.tokens, b.tokens)


def test_cli_gqa_bfloat16_and_untrusted_pickle_fallback(tmp_path, capsys):
    config = LlamaGenConfig(dim=64, n_layer=2, n_head=4, n_kv_head=2, codebook_size=64, num_classes=10, grid_size=4)
    ref = official_model(config)
    # Official training checkpoints also pickle an argparse Namespace, which weights_only loading refuses.
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(lr=1e-4)}, tmp_path / "c2i.pt")
    with pytest.warns(UserWarning, match="weights_only"):
        conv.main([str(tmp_path / "c2i.pt"), str(tmp_path / "out"), "--n-head", "4", "--image-size", "64",
                   "--dtype", "bfloat16"])
    assert "wrote" in capsys.readouterr().out
    loaded = conv.load_reference(tmp_path / "out")
    assert loaded.config == config and loaded.config.kv_heads == 2 and loaded.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_missing_heads_and_grid_errors_name_the_fix(tmp_path):
    torch.save({"model": official_model().state_dict()}, tmp_path / "c2i.pt")
    with pytest.raises(conv.ConversionError, match="--n-head"):
        conv.convert(tmp_path / "c2i.pt", tmp_path / "o", grid_size=4)
    with pytest.raises(conv.ConversionError, match="--image-size"):
        conv.convert(tmp_path / "c2i.pt", tmp_path / "o", n_head=4)
    with pytest.raises(SystemExit) as e:
        conv.main([str(tmp_path / "c2i.pt"), str(tmp_path / "o"), "--grid-size", "4"])
    assert e.value.code == 2


def test_wrong_shapes_are_reported_by_key(tmp_path):
    sd = official_model().state_dict()
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 100)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(conv.ConversionError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        conv.convert(tmp_path / "bad.pt", tmp_path / "o", n_head=4, grid_size=4)
    with pytest.raises(conv.ConversionError, match="--preset B means dim=768"):
        conv.convert(tmp_path / "bad.pt", tmp_path / "o", preset="B", grid_size=4)
    sd = official_model().state_dict()
    del sd["norm.weight"]
    with pytest.raises(conv.ConversionError, match="missing keys.*norm.weight"):
        conv.infer_config(sd, n_head=4, grid_size=4)
    with pytest.raises(conv.ConversionError, match="--n-head"):
        conv.infer_config(official_model().state_dict(), n_head=5, grid_size=4)   # 64 % 5 != 0


def test_official_sizes_are_recognised_without_n_head():
    with torch.device("meta"):  # shapes only: no memory for a 111M-parameter model
        sd = LlamaGenReference(preset("B", grid_size=16)).state_dict()
    config = conv.infer_config(sd, image_size=384)
    assert (config.n_head, config.grid_size, config.codebook_size, config.num_classes) == (12, 24, 16384, 1000)


def test_random_model_is_deterministic_and_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("ADSA_CACHE_DIR", str(tmp_path / "cache"))
    first = random_model_dir()
    assert first.parent == tmp_path / "cache" and first.name.startswith("default-")
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert random_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == mtime
    from adsa_vllm.default_model import DEFAULT_SEED, DEFAULT_STD
    again = make_random_model_dir(tmp_path / "again", DEFAULT_CONFIG, DEFAULT_SEED, DEFAULT_STD)
    for name in ("config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (first / name).read_bytes()
    model = conv.load_reference(first)
    assert model.config == DEFAULT_CONFIG
    assert generate(model, [0], greedy=True, max_new_tokens=8).tokens.shape == (1, 8)


def test_default_model_is_the_shipped_fashion_model(tmp_path, monkeypatch):
    from adsa_vllm.data import fashion_mnist as fm
    monkeypatch.setenv("ADSA_CACHE_DIR", str(tmp_path / "cache"))   # nothing may be written for the default
    d = default_model_dir()
    assert d == SHIPPED_DIR and not (tmp_path / "cache").exists()
    assert (d / "model.safetensors").stat().st_size <= 12 * 2 ** 20
    model = conv.load_reference(d)
    config = model.config
    assert (config.grid_size, config.codebook_size, config.num_classes, config.cls_token_num) == \
        (fm.GRID_SIZE, fm.NUM_LEVELS, fm.NUM_CLASSES, 1)
    assert (config.dim, config.n_layer, config.n_head) == (256, 8, 8)
    # Trained, not random: on a plain black image (50% of Fashion-MNIST pixels are 0) the model is confident
    # that the next pixel is black, far from the uniform 4 bits a random model gives.
    black = torch.zeros(1, fm.IMAGE_TOKENS, dtype=torch.int64)
    with torch.no_grad():
        lp = model.forward_full(black[:, :-1], torch.tensor([8])).float().log_softmax(-1)
    bits = -lp[0, :, 0].mean().item() / 0.6931471805599453
    assert bits < 0.5, bits


def test_pyproject_ships_every_asset():
    """`pip install .` must carry the default model and the classifier: every file in adsa_vllm/assets/ matches a
    package-data glob (setuptools includes exactly those)."""
    import fnmatch
    import tomllib
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["adsa_vllm"]
    files = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_file())
    assert {"config.json", "model.safetensors", "fashion_classifier.pt"} <= set(files)
    for f in files:
        assert any(fnmatch.fnmatch(f"assets/{f}", g) for g in globs), f"{f} is not in pyproject package-data"


T2I_CONFIG = LlamaGenConfig(dim=64, n_layer=2, n_head=4, codebook_size=64, grid_size=4, model_type="t2i",
                            cls_token_num=12, caption_dim=96)


def test_t2i_round_trip_is_exact(tmp_path):
    from adsa_vllm.reference import generate_t2i
    ref = official_model(T2I_CONFIG)
    sd = ref.state_dict()
    assert "cls_embedding.embedding_table.weight" not in sd and sd["cls_embedding.uncond_embedding"].shape == (12, 96)
    torch.save(wrap_ddp_with_buffers(sd), tmp_path / "t2i.pt")
    out = conv.convert(tmp_path / "t2i.pt", tmp_path / "folder", n_head=4, image_size=64)
    loaded = conv.load_reference(out)
    assert loaded.config == T2I_CONFIG
    hf = json.loads((out / "config.json").read_text())
    assert hf["vocab_size"] == 64 and hf["projection_dim"] == 96
    assert set(loaded.state_dict()) == set(sd)
    for k, v in sd.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    caps = [torch.randn(5, 96), torch.randn(12, 96)]
    a = generate_t2i(ref, caps, greedy=True, cfg_scale=2.0, max_new_tokens=6)
    assert torch.equal(a.tokens, generate_t2i(loaded, caps, greedy=True, cfg_scale=2.0, max_new_tokens=6).tokens)
    # make_random_model_dir writes the same layout for a t2i config
    rnd = conv.load_reference(make_random_model_dir(tmp_path / "rnd", T2I_CONFIG, seed=3))
    assert rnd.config == T2I_CONFIG and rnd.state_dict()["cls_embedding.uncond_embedding"].abs().sum() > 0


def test_t2i_mismatches_name_the_fix(tmp_path):
    sd = official_model(T2I_CONFIG).state_dict()
    torch.save({"model": sd}, tmp_path / "t2i.pt")
    with pytest.raises(conv.ConversionError, match="drop --cls-token-num"):
        conv.convert(tmp_path / "t2i.pt", tmp_path / "o", n_head=4, grid_size=4, cls_token_num=120)
    with pytest.raises(conv.ConversionError, match="drop --num-classes"):
        conv.convert(tmp_path / "t2i.pt", tmp_path / "o", n_head=4, grid_size=4, num_classes=1000)
    bad = dict(sd, **{"cls_embedding.cap_proj.fc1.weight": torch.zeros(64, 80)})   # caption width 80 != 96
    with pytest.raises(conv.ConversionError, match=r"cap_proj\.fc1\.weight: checkpoint \(64, 80\)"):
        conv.infer_config(bad, n_head=4, grid_size=4)
    no_null = {k: v for k, v in sd.items() if k != "cls_embedding.uncond_embedding"}
    with pytest.raises(conv.ConversionError, match="uncond_embedding"):
        conv.infer_config(no_null, n_head=4, grid_size=4)
    # A t2i config cannot be saved over c2i weights (and vice versa): the keys say which is which.
    with pytest.raises(conv.ConversionError, match="missing keys.*cap_proj"):
        conv.save_model_folder(official_model().state_dict(), T2I_CONFIG, tmp_path / "o")


def test_official_t2i_xl_is_recognised():
    from adsa_vllm.llamagen.config import T2I
    with torch.device("meta"):
        sd = LlamaGenReference(preset("XL", **T2I)).state_dict()
    config = conv.infer_config(sd, image_size=256)
    assert config == preset("XL", **T2I, grid_size=16)
    assert conv.infer_config(sd, image_size=512).grid_size == 32
