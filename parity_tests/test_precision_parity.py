"""Reduced precision across the twins (bf16 trunk, torch vs TF) and gradient checkpointing within each twin."""
import numpy as np
import pytest

# bf16 keeps 8 significant bits: machine epsilon 2^-8 (rounding error up to half of it). The twins round at
# different places (torch rounds BatchNorm outputs inside autocast and multiplies by fp32 PReLU slopes; TF
# normalises in fp32 and casts, with bf16 slopes), so their L2-normalised embeddings differ by a few epsilons.
# Measured on this CPU, max over 10 seeds of 4 images at 112x112, in epsilons: r18 eval 0.94, train 2.8;
# mbf eval 3.3, train 12.4 (train mode normalises with statistics of 4 images, the embedding BatchNorm1d
# included, which amplifies differences between samples). Tolerances: 8 eps in eval, 16 eps in training,
# never above the fixed cap 2^-4 = 6.25e-2 (docs/design.md, "Tolerances, and why").
BF16_EPS = 2.0 ** -8
BF16_CAP = 2.0 ** -4
BF16_NORMED = {False: min(8 * BF16_EPS, BF16_CAP), True: min(16 * BF16_EPS, BF16_CAP)}
SEEDS = (1, 2, 3)
CKPT_SIZE = 64


def _l2(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("arch", ["r18", "mbf"])
def test_bf16_embeddings_torch_vs_tf(arch, training, make_twins, images, parity):
    import torch
    tm, km = make_twins(arch, precision="bf16")
    tm.train(training)
    t, k = [], []
    for seed in SEEDS:
        x = images(4, seed=seed)
        with torch.no_grad():
            t.append(tm(torch.from_numpy(x)).numpy())
        k.append(km(x.transpose(0, 2, 3, 1), training=training).numpy())
    mode = "train" if training else "eval"
    parity.check(f"{arch} bf16 {mode} embeddings torch vs TF (L2-normalised, {len(SEEDS)} batches)",
                 _l2(np.concatenate(t)), _l2(np.concatenate(k)), BF16_NORMED[training])


def _torch_step(checkpointing, x):
    """(loss, gradients, BatchNorm buffers) of one r18 training step, all flattened, torch twin."""
    import torch
    from twinface_torch.backbones import get_model
    torch.manual_seed(0)
    model = get_model("r18", num_features=64, input_size=CKPT_SIZE, checkpointing=checkpointing).train()
    loss = model(torch.from_numpy(x)).square().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    stats = torch.cat([b.double().flatten() for b in model.buffers()])
    return loss.detach(), grads, stats


def _tf_step(checkpointing, x):
    import keras
    import tensorflow as tf
    from twinface_tf.backbones import get_model
    keras.utils.set_random_seed(0)
    model = get_model("r18", num_features=64, input_size=CKPT_SIZE, checkpointing=checkpointing)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        return loss, tape.gradient(loss, model.trainable_variables)

    loss, grads = step(x.transpose(0, 2, 3, 1))
    stats = np.concatenate([v.numpy().ravel() for v in model.weights if "moving_" in v.path])
    return loss.numpy(), np.concatenate([g.numpy().ravel() for g in grads]), stats


# Checkpointing recomputes the same ops on the same inputs (and updates BatchNorm statistics once): the numbers are
# identical, measured bitwise on this CPU in both twins, so the tolerance is 0.
@pytest.mark.parametrize("twin, step", [("torch", _torch_step), ("TF", _tf_step)])
def test_checkpointing_leaves_one_training_step_unchanged(twin, step, images, parity):
    x = images(4, CKPT_SIZE, seed=21)
    plain, checkpointed = step(False, x), step(True, x)
    for what, a, b in zip(("loss", "gradients", "BN running stats"), plain, checkpointed):
        parity.check(f"r18 {twin} {what}, gradient checkpointing vs not (one step)", np.ravel(a), np.ravel(b), 0.0)
