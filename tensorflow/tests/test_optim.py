import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from twinface_tf.layers import TorchBatchNorm  # noqa: E402
from twinface_tf.optim import SGD, AdamW, build_optimizer  # noqa: E402

LRS = (0.1, 0.05, 0.02)                 # lr changes between steps, as a warmup/decay schedule does
MOMENTUM, WEIGHT_DECAY, BETAS, EPS = 0.9, 5e-4, (0.9, 0.999), 1e-8


def torch_sgd(params, grads_per_step, lrs):
    """torch.optim.SGD(momentum, weight_decay), written out in float64."""
    params, buffers = [p.astype(np.float64) for p in params], [None] * len(params)
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g + WEIGHT_DECAY * params[i]
            buffers[i] = g if buffers[i] is None else MOMENTUM * buffers[i] + g
            params[i] = params[i] - lr * buffers[i]
    return params


def torch_adamw(params, grads_per_step, lrs):
    """torch.optim.AdamW, written out in float64; step counts are per parameter."""
    params = [p.astype(np.float64) for p in params]
    m, v, steps = [0.0] * len(params), [0.0] * len(params), [0] * len(params)
    (b1, b2) = BETAS
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            if g is None:
                continue
            steps[i] += 1
            params[i] = params[i] * (1 - lr * WEIGHT_DECAY)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            denom = np.sqrt(v[i]) / np.sqrt(1 - b2 ** steps[i]) + EPS
            params[i] = params[i] - lr / (1 - b1 ** steps[i]) * m[i] / denom
    return params


REFERENCES = {"sgd": torch_sgd, "adamw": torch_adamw}


def three_steps_of_gradients():
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2,)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    steps = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in LRS]
    steps[0][1] = None                              # no gradient yet: torch leaves it alone, no state, no step
    steps[1][2] = np.zeros(2, np.float32)           # zero gradient: weight decay still applies
    return params, steps


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_three_steps_match_torch_with_lr_changes_and_weight_decay(name, graph):
    params, steps = three_steps_of_gradients()
    variables = [keras.Variable(p) for p in params]
    optimizer = build_optimizer(name, variables, LRS[0], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                betas=BETAS, eps=EPS)

    def apply(grads):
        optimizer.apply_gradients([(g, var) for g, var in zip(grads, variables) if g is not None])

    step_fn = tf.function(apply) if graph else apply
    for grads, lr in zip(steps, LRS):
        optimizer.learning_rate.assign(lr)
        step_fn([None if g is None else tf.constant(g) for g in grads])
    expected = REFERENCES[name](params, steps, LRS)
    for var, want in zip(variables, expected):
        np.testing.assert_allclose(var.numpy(), want, rtol=2e-6, atol=1e-7)
    assert abs(float(optimizer.learning_rate) - LRS[-1]) < 1e-9


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_frozen_and_non_trainable_variables_are_untouched(name):
    inputs = keras.Input((4,))
    outputs = TorchBatchNorm(gamma_trainable=False, name="features")(keras.layers.Dense(3, name="fc")(inputs))
    model = keras.Model(inputs, outputs)
    optimizer = build_optimizer(name, model.trainable_variables, 0.1)
    x = np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) ** 3)
    grads = tape.gradient(loss, model.trainable_variables)
    frozen = {v.path: v.numpy() for v in model.non_trainable_variables}
    trained = {v.path: v.numpy() for v in model.trainable_variables}
    assert "features/gamma" in frozen and "features/beta" in trained
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    for v in model.non_trainable_variables:
        np.testing.assert_array_equal(v.numpy(), frozen[v.path])
    for v in model.trainable_variables:
        assert not np.array_equal(v.numpy(), trained[v.path])


def test_config_round_trip_and_unknown_name():
    sgd = SGD(0.2, momentum=0.8, weight_decay=1e-3)
    again = SGD.from_config(sgd.get_config())
    assert (again.momentum, again.torch_weight_decay, float(again.learning_rate)) == (0.8, 1e-3, pytest.approx(0.2))
    assert sgd.weight_decay is None                  # Keras' decoupled decay stays off
    adamw = AdamW(1e-3, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.05)
    again = AdamW.from_config(adamw.get_config())
    assert (again.beta_1, again.beta_2, again.epsilon, again.torch_weight_decay) == (0.8, 0.99, 1e-6, 0.05)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; known: adamw, sgd"):
        build_optimizer("adam", [], 0.1)
