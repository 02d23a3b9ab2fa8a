"""Backbone precision (float32 / mixed_float16 / mixed_bfloat16 trunk, float32 embedding) and IResNet / ResNeXt
gradient checkpointing."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from twinface_tf.backbones import get_model  # noqa: E402
from twinface_tf.layers import TorchBatchNorm  # noqa: E402

SIZE = 32
TRUNK = {"r18": ("layer4.1.add", "fc"), "mbf": ("layers.7.layers.1.add", "conv_sep.layers.0")}


def images(n=4, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize("name", ["r18", "mbf"])
@pytest.mark.parametrize("precision, policy", [("fp32", "float32"), ("fp16", "mixed_float16"),
                                               ("bf16", "mixed_bfloat16")])
def test_trunk_runs_reduced_embedding_and_variables_stay_float32(name, precision, policy):
    model = get_model(name, num_features=16, input_size=SIZE, precision=precision)
    last_trunk, head = TRUNK[name]
    assert model.get_layer(last_trunk).dtype_policy.name == policy
    assert model.get_layer(head).dtype_policy.name == "float32"
    probe = keras.Model(model.inputs[0], model.get_layer(last_trunk).output)
    assert probe(images(2)).dtype == policy.replace("mixed_", "")
    with tf.GradientTape() as tape:
        out = model(images(2), training=True)
        loss = tf.reduce_sum(out * out)
    grads = tape.gradient(loss, model.trainable_variables)
    assert out.dtype == "float32" and {v.dtype for v in model.weights} == {"float32"}
    assert all(g is not None and g.dtype == "float32" and np.isfinite(g.numpy()).all() for g in grads)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_batchnorm_statistics_stay_float32_under_mixed_policies(policy):
    # Inputs exact in the reduced type: a float32 layer must then compute exactly the same statistics.
    x = tf.cast(tf.cast(images(4) * 3 + 1, policy.replace("mixed_", "")), "float32")
    reduced, full = TorchBatchNorm(dtype=policy), TorchBatchNorm()
    y = reduced(x, training=True)
    full(x, training=True)
    assert y.dtype == policy.replace("mixed_", "") and reduced.moving_variance.dtype == "float32"
    np.testing.assert_array_equal(reduced.moving_mean.numpy(), full.moving_mean.numpy())
    np.testing.assert_array_equal(reduced.moving_variance.numpy(), full.moving_variance.numpy())


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_fp16_flag_is_an_alias(name):
    policy = get_model(name, input_size=SIZE, num_features=8, fp16=True).layers[1].dtype_policy.name
    assert policy == "mixed_float16"


def test_get_model_refuses_bad_values():             # every message: common/tests/test_precision.py
    with pytest.raises(ValueError, match="mbf: precision must be one of fp32, fp16, bf16, got 'fp8'"):
        get_model("mbf", input_size=SIZE, precision="fp8")
    with pytest.raises(ValueError, match="mbf_large: gradient checkpointing"):
        get_model("mbf_large", input_size=SIZE, checkpointing=True)


def train_step(checkpointing, precision, compiled, name="r18"):
    """(loss, gradients, BatchNorm moving statistics, calls of one BN layer) after one training step of `name`."""
    keras.utils.set_random_seed(0)
    model = get_model(name, num_features=16, input_size=SIZE, precision=precision, checkpointing=checkpointing)
    bn, calls = model.get_layer("layer2.1.bn2"), []
    bn.call = (lambda call: lambda *a, **k: calls.append(1) or call(*a, **k))(bn.call)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = (tf.function(step) if compiled else step)(images())
    stats = [v.numpy() for v in model.weights if "moving_" in v.path]
    return loss.numpy(), [g.numpy() for g in grads], stats, len(calls)


@pytest.mark.parametrize("name, precision, compiled", [("r18", "fp32", False), ("r18", "fp32", True),
                                                     ("r18", "bf16", True), ("resnext50", "fp32", True)])
def test_checkpointing_recomputes_with_identical_numbers(name, precision, compiled):
    loss, grads, stats, calls = train_step(False, precision, compiled, name)
    loss_c, grads_c, stats_c, calls_c = train_step(True, precision, compiled, name)
    assert (calls, calls_c) == (1, 2)                       # each block really runs again in backprop
    # Same ops on the same inputs: measured bitwise equal, so held bitwise.
    assert loss == loss_c and len(grads) == len(grads_c)
    assert all(np.array_equal(g, h) for g, h in zip(grads, grads_c))
    # The recomputation must not apply the momentum update a second time.
    assert all(np.array_equal(s, t) for s, t in zip(stats, stats_c))


def test_checkpointed_model_keeps_the_one_graph_of_layers():
    plain = get_model("r18", num_features=8, input_size=SIZE)
    checkpointed = get_model("r18", num_features=8, input_size=SIZE, checkpointing=True)
    assert [v.path for v in checkpointed.weights] == [v.path for v in plain.weights]
    x = images(2)
    checkpointed.set_weights(plain.get_weights())
    np.testing.assert_array_equal(checkpointed(x, training=False).numpy(), plain(x, training=False).numpy())
