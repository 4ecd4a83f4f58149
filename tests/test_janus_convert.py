"""Original DeepSeek Janus checkpoint -> transformers JanusForConditionalGeneration folder (adsa_vllm.janus.convert),
round-tripped through a tiny random model: every tensor equal, the folder loads, the outputs are identical."""

import json

import pytest
import torch
from safetensors.torch import load_file

from adsa_vllm.janus import convert as conv
from janus_tiny import VISION_HEADS, tiny_model, write_original


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    model = tiny_model()
    src = write_original(model, tmp_path_factory.mktemp("original"))
    out = tmp_path_factory.mktemp("hf") / "janus"
    conv.main([str(src), str(out), "--vision-heads", str(VISION_HEADS)])
    return model, src, out


def test_every_tensor_round_trips_exactly(converted):
    model, _, out = converted
    want, got = model.state_dict(), load_file(str(out / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_the_folder_loads_and_gives_identical_outputs(converted):
    from transformers import JanusForConditionalGeneration
    model, _, out = converted
    loaded = JanusForConditionalGeneration.from_pretrained(out).eval()
    assert loaded.config.vision_config.num_attention_heads == VISION_HEADS
    assert not loaded.config.tie_word_embeddings     # the original lm_head is its own tensor
    torch.manual_seed(1)
    image_tokens = 4 * 4   # 64 px / patch 16, squared
    ids = torch.tensor([[1] + [5] * image_tokens + [7, 9]])       # 5 = image_token_id
    pixels = torch.randn(1, 3, 64, 64)
    codes = torch.randint(0, 40, (2, image_tokens))
    with torch.no_grad():
        for m in (model, loaded):   # understanding (vision tower + aligner + LLM), generation head and embeddings,
            out_m = m(input_ids=ids, pixel_values=pixels, output_hidden_states=True)   # and the VQ decoder
            m.outputs = (out_m.logits, m.model.generation_head(out_m.hidden_states[-1]),
                         m.prepare_embeddings_for_image_generation(codes), m.decode_image_tokens(codes))
    for a, b in zip(model.outputs, loaded.outputs):
        assert torch.equal(a, b)


def test_config_keeps_token_ids_and_sizes(converted):
    model, _, out = converted
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["JanusForConditionalGeneration"]
    assert cfg["vq_config"]["num_patches"] == 4 and cfg["vq_config"]["channel_multiplier"] == [1, 2]
    assert cfg["text_config"]["num_key_value_heads"] == 2
    # Token ids come from the source's tokenizer.json; its files travel with the weights.
    assert cfg["image_token_id"] == 5
    assert [cfg["text_config"][f"{r}_token_id"] for r in ("bos", "eos", "pad")] == [1, 2, 3]
    assert (out / "tokenizer.json").exists() and (out / "special_tokens_map.json").exists()


def test_a_missing_rename_is_refused(tmp_path, converted, monkeypatch):
    """The converted keys are checked against the model the config describes: a rule lost is an error."""
    _, src, _ = converted
    monkeypatch.setattr(conv, "VQ_RENAMES", conv.VQ_RENAMES[1:])
    with pytest.raises(conv.ConversionError, match=r"missing: \['model\.vqmodel\.encoder\.down\.0\.block"):
        conv.convert(src, tmp_path / "out", vision_heads=VISION_HEADS)


def test_errors_name_the_fix(tmp_path, converted):
    _, src, _ = converted
    with pytest.raises(conv.ConversionError, match="--vision-heads"):
        conv.convert(src, tmp_path / "a")   # width 32 is no SigLIP preset
    (tmp_path / "hf.json").write_text(json.dumps({"text_config": {}}))
    with pytest.raises(conv.ConversionError, match="not an original Janus config"):
        conv.convert(src / "pytorch_model.bin", tmp_path / "b", config_path=tmp_path / "hf.json")
