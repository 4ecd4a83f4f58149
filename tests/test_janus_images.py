"""Janus image codes -> pixels (adsa_vllm.janus.images) on a tiny random transformers Janus model saved as a folder:
Janus-Pro's shapes (24x24 codes, 16x upsampling, 384x384 pixels, 16384 codes) with 32 channels. CPU, seconds."""

import numpy as np
import pytest
import torch

from adsa_vllm.janus import images
from janus_tiny import tiny_model


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory):
    model = tiny_model(image_size=384, vq_levels=5, num_embeddings=16384)
    folder = tmp_path_factory.mktemp("janus")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def decoded(janus_dir):
    """(ours: uint8 [N, H, W, 3] from the folder, transformers' decode_image_tokens floats [N, H, W, 3])."""
    model, folder = janus_dir
    codes = np.random.default_rng(0).integers(0, 16384, (2, 576))
    with torch.no_grad():
        return images.decode_images(folder, codes), model.decode_image_tokens(torch.as_tensor(codes)).numpy()


def test_pixels_equal_transformers_decode(decoded):
    out, x = decoded
    assert out.shape == (2, 384, 384, 3) and out.dtype == np.uint8
    # deepseek-ai/Janus generation_inference.py's pixels, bit for bit
    assert np.array_equal(out, np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8))
    assert len(np.unique(out)) > 100   # not a flat picture


def test_pixels_agree_with_the_processor_postprocess(decoded):
    """transformers' JanusImageProcessor.postprocess computes the same map in another float order: equal up to a
    rare off-by-one at an integer boundary."""
    from transformers.models.janus.image_processing_janus import JanusImageProcessor
    out, x = decoded
    post = JanusImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).postprocess(
        torch.as_tensor(x).permute(0, 3, 1, 2), return_tensors="pt")
    theirs = post.pixel_values.permute(0, 2, 3, 1).numpy()
    diff = np.abs(theirs.astype(int) - out)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4


def test_bad_codes_are_refused(janus_dir):
    _, folder = janus_dir
    vq = images.load_vq_decoder(folder)
    with pytest.raises(ValueError, match="0..16383"):
        images.codes_to_pixels(vq, np.full((1, 576), 16384))
    with pytest.raises(RuntimeError):   # 575 codes do not fill the 24x24 grid
        images.codes_to_pixels(vq, np.zeros((1, 575), dtype=np.int64))


def test_a_folder_without_vq_tensors_is_refused(tmp_path, janus_dir):
    _, folder = janus_dir
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match="no model.vqmodel"):
        images.load_vq_decoder(tmp_path)
