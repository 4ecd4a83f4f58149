"""Caption prompts: a T5 encoder run as LlamaGen runs it, its valid rows as the compact prompt (CPU, no downloads:
a tiny random T5 and a word-level tokenizer built here)."""

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from adsa_vllm.llamagen.t5_captions import MAX_LENGTH, caption_prompt, caption_prompts, encode_captions, load_t5
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.reference import LlamaGenReference, official_t2i_logits

WORDS = "a photo of cat dog red blue on the grass sky".split()


def tiny_t5(tmp_path):
    """A random T5 encoder (d_model 32) and a T5-like tokenizer: words, "</s>" appended, "<pad>" on the right."""
    import json

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    seq_a, seq_b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
    eos = {"SpecialToken": {"id": "</s>", "type_id": 0}}
    template = {"type": "TemplateProcessing", "single": [seq_a, eos], "pair": [seq_a, seq_b, eos],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "decoder": None, "post_processor": template,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}
    tk = Tokenizer.from_str(json.dumps(spec))   # words, then "</s>" (T5's template)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64, vocab_size=len(vocab),
                                   pad_token_id=0, eos_token_id=1)
    encoder = transformers.T5EncoderModel(config).eval()
    encoder.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return encoder, tokenizer


def test_encode_captions_pads_right_and_the_valid_rows_do_not_see_the_padding(tmp_path):
    encoder, tokenizer = tiny_t5(tmp_path)
    texts = ["a photo of a cat", "dog", " ".join(WORDS * 20)]         # the last one is truncated
    features, mask = encode_captions(texts, encoder, tokenizer)
    assert features.shape == (3, MAX_LENGTH, 32) and mask.shape == (3, MAX_LENGTH)
    assert mask.sum(1).tolist() == [6, 2, MAX_LENGTH]                 # words + "</s>"
    ids = tokenizer(texts, max_length=MAX_LENGTH, padding="max_length", truncation=True)["input_ids"]
    for b, v in enumerate(mask.sum(1).tolist()):
        assert (mask[b, :v] == 1).all() and (mask[b, v:] == 0).all()  # padding on the right
        assert ids[b][v - 1] == 1 and set(ids[b][v:]) <= {0}           # ends with "</s>", then "<pad>"
        rows = caption_prompt(features[b], mask[b])
        assert rows.shape == (v, 32) and torch.equal(rows, features[b, :v])
        with torch.no_grad():   # the same caption encoded alone, unpadded: padding changed no valid row
            alone = encoder(input_ids=torch.tensor([ids[b][:v]]))["last_hidden_state"][0]
        torch.testing.assert_close(rows, alone, atol=1e-5, rtol=1e-5)
    assert [p.shape[0] for p in caption_prompts(features, mask)] == [6, 2, MAX_LENGTH]
    # load_t5 reads the saved folder back: the same features.
    enc2, tok2 = load_t5(str(tmp_path), dtype=torch.float32)
    f2, m2 = encode_captions(texts, enc2, tok2)
    assert torch.equal(m2, mask)
    torch.testing.assert_close(f2, features, atol=0, rtol=0)


def test_t5_features_to_logits_official_and_compact_agree(tmp_path):
    """End to end: T5 output through LlamaGen's left padding + mask == its valid rows through the compact path."""
    encoder, tokenizer = tiny_t5(tmp_path)
    features, mask = encode_captions(["a red cat on the grass", "sky"], encoder, tokenizer)
    config = LlamaGenConfig(dim=32, n_layer=2, n_head=2, codebook_size=32, grid_size=4, model_type="t2i",
                            cls_token_num=MAX_LENGTH, caption_dim=32)
    m = LlamaGenReference(config).init_random_(0, 0.2).eval()
    idx = torch.randint(0, 32, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        official = official_t2i_logits(m, features, mask, idx)
        for b, rows in enumerate(caption_prompts(features, mask)):
            torch.testing.assert_close(m.forward_caption(idx[b:b + 1], rows[None]), official[b:b + 1],
                                       atol=2e-5, rtol=1e-5)


def test_caption_prompt_errors_name_the_fix():
    with pytest.raises(ValueError, match="selects no row"):
        caption_prompt(torch.randn(120, 8), torch.zeros(120))
    with pytest.raises(ValueError, match="caption_prompts"):
        caption_prompt(torch.randn(2, 120, 8), torch.ones(2, 120))
    with pytest.raises(ValueError, match="floating point"):
        caption_prompt(torch.ones(4, 8, dtype=torch.int64), torch.ones(4))
    with pytest.raises(ValueError, match=r"mask \[B, L\]"):
        caption_prompts(torch.randn(2, 120, 8), torch.ones(120))
    with pytest.raises(ValueError, match="list of captions"):
        encode_captions("a cat", None, None)
    with pytest.raises(ValueError, match="flan-t5-xl folder"):
        load_t5("/nonexistent/flan-t5-xl")
    # A mask that skips rows keeps the valid rows in order.
    f = torch.arange(12.0).view(6, 2)
    assert caption_prompt(f, torch.tensor([1, 0, 1, 1, 0, 0])).tolist() == [[0, 1], [4, 5], [6, 7]]
