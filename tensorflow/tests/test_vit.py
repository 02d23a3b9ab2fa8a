"""The Keras ViT: the torch twin's module tree and numerics (arcface_torch backbones/vit.py)."""
import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from twinface.testing import VIT_REFUSED, run_tiny, seeded_noise, tiny_dataset  # noqa: E402
from twinface_convert.mapping import keras_to_torch  # noqa: E402
from twinface_tf.backbones import get_model  # noqa: E402
from twinface_tf.backbones.vit import DropPath, set_noise  # noqa: E402
from twinface_tf.train import TFTwin  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vit():
    return get_model("vit_t", num_features=16, input_size=27)        # 3x3 grid: int(9 * 0.9) = 8 tokens kept


def test_canonical_names_are_arcface_torchs(tiny_vit):
    names = keras_to_torch(tiny_vit)
    assert names["pos_embed"].shape == (1, 9, 256) and names["mask_token"].shape == (1, 1, 256)
    assert names["patch_embed.proj.weight"].shape == (256, 3, 9, 9)
    assert names["blocks.11.attn.qkv.weight"].shape == (768, 256) and "blocks.11.attn.qkv.bias" not in names
    assert names["blocks.0.norm2.bias"].shape == (256,) and names["blocks.0.mlp.fc1.weight"].shape == (1024, 256)
    assert names["feature.0.weight"].shape == (256, 9 * 256) and names["feature.3.running_var"].shape == (16,)
    assert len(names) == 2 + 2 + 2 + 12 * 11 + 1 + 2 * 4 + 1   # pos, mask, patch, norm, blocks, feature.*


def test_numerics_conventions(tiny_vit):
    norms = [layer for layer in tiny_vit.layers if "norm" in layer.name]
    assert len(norms) == 25 and all(layer.epsilon == 1e-5 for layer in norms)
    assert tiny_vit.get_layer("blocks.0.mlp.act").max_value == 6.0
    assert tiny_vit.get_layer("feature.1").epsilon == tiny_vit.get_layer("feature.3").epsilon == 2e-5


def test_masking_keeps_the_lowest_noise_and_restore_puts_mask_tokens_back(tiny_vit):
    masking = tiny_vit.get_layer("random_masking")
    restore = tiny_vit.get_layer("mask_token")
    x = np.arange(2 * 9 * 256, dtype=np.float32).reshape(2, 9, 256)
    noise = np.array([[.5, .1, .9, .2, .3, .4, .6, .7, .8], [.9, .8, .7, .6, .5, .4, .3, .2, .1]], np.float32)
    masking.noise = lambda shape: noise
    try:
        kept, ids = masking(x, training=True)
    finally:
        masking.noise = None
    np.testing.assert_array_equal(kept[0], x[0, [1, 3, 4, 5, 0, 6, 7, 8]])
    np.testing.assert_array_equal(kept[1], x[1, [8, 7, 6, 5, 4, 3, 2, 1]])
    back = restore([kept, ids], training=True).numpy()
    token = restore.value.numpy()[0, 0]
    np.testing.assert_array_equal(back[0, [0, 1, 3, 4, 5, 6, 7, 8]], x[0, [0, 1, 3, 4, 5, 6, 7, 8]])
    np.testing.assert_array_equal(back[0, 2], token)               # the highest noise (0.9) was masked
    np.testing.assert_array_equal(back[1, 0], token)
    np.testing.assert_array_equal(masking(x, training=False)[0], x)


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    drop = DropPath(0.25)
    drop.noise = lambda shape: np.array([0.1, 0.9, 0.76], np.float32).reshape(shape)
    x = np.ones((3, 2, 4), np.float32)
    np.testing.assert_array_equal(drop(x, training=True).numpy()[:, 0, 0], np.float32([0.0, 4 / 3, 4 / 3]))
    np.testing.assert_array_equal(drop(x, training=False), x)


def test_forward_train_and_inference(tiny_vit):
    x = np.random.default_rng(0).uniform(-1, 1, (4, 27, 27, 3)).astype(np.float32)
    np.testing.assert_array_equal(tiny_vit(x, training=False), tiny_vit(x, training=False))
    shapes = []
    noise = seeded_noise(0)
    set_noise(tiny_vit, lambda shape: shapes.append(tuple(shape)) or noise(shape))
    try:
        y = tiny_vit(x, training=True)
    finally:
        set_noise(tiny_vit, None)
    assert y.shape == (4, 16) and np.isfinite(y.numpy()).all()
    assert shapes == [(4, 9)] + [(4, 1, 1)] * 22            # as the torch twin: masking, then the blocks' drops


@pytest.mark.parametrize("kwargs, message", VIT_REFUSED)
def test_refused_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_model("vit_t", **kwargs)


def test_trains_tiny(tmp_path):
    data = tiny_dataset(tmp_path / "synth")
    summary, twin = run_tiny(TFTwin, data, tmp_path / "run", backbone={"name": "vit_t", "num_features": 32},
                             train={"epochs": 1})
    assert summary["finished"] and summary["steps"] == 4 and twin.backbone.name == "vit_t"
    assert math.isfinite(summary["results"]["val"]["acc_mean"])


def test_bf16_runs_the_linears_mixed_and_attention_residual_norm_feature_in_float32():
    model = get_model("vit_t", num_features=16, input_size=27, precision="bf16")
    assert {model.get_layer(n).compute_dtype for n in ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc2")} \
        == {"bfloat16"}
    assert {model.get_layer(n).compute_dtype for n in ("blocks.0.attn", "blocks.0.add1", "norm", "feature.0")} \
        == {"float32"}
    assert model(np.zeros((2, 27, 27, 3), np.float32), training=False).dtype == "float32"
