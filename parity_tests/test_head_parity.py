"""Margin heads and losses: logits, loss values and gradients, torch vs TF, for every margin setting."""
import numpy as np
import pytest

from twinface.registry import HEADS

N, D, C = 6, 16, 10
SETTINGS = [(name, {}) for name in sorted(HEADS)] + [
    ("arcface", {"gradient": "analytic"}),
    ("arcface", {"easy_margin": True}),
    ("sphereface", {"m1": 4.0}),                    # SphereFace's piecewise psi across all four pieces
    ("sphereface", {"m1": 4.0, "gradient": "analytic"}),
    ("cosface", {"interclass_filtering_threshold": 0.1}),
    ("linear", {}),
]


def _inputs():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(N, D)).astype(np.float32)
    weight = rng.normal(0, 0.1, size=(C, D)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5], np.int64)
    # Targets at exactly cos = +1 and -1. acos amplifies a 1-ulp difference in cos near +-1 by 1/sqrt(1 - c^2)
    # (a 6e-8 difference becomes 3.5e-4 rad, 2e-4 relative on the logits), so the cosines must be exactly
    # +-1 in both twins: unit-basis class centres and embeddings of power-of-two norm make them exact.
    weight[0], weight[1] = np.eye(D, dtype=np.float32)[0], np.eye(D, dtype=np.float32)[1]
    emb[0], emb[1] = 2.0 * weight[0], -2.0 * weight[1]
    return emb, weight, labels


def _torch(name, kw, emb, weight, labels, loss_name):
    import torch
    from twinface_torch.heads import get_head
    from twinface_torch.losses import get_loss
    head = get_head(name, D, C, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        if name == "linear":
            head.bias.copy_(torch.linspace(-0.1, 0.1, C))
    e = torch.from_numpy(emb).requires_grad_(True)
    y = torch.from_numpy(labels)
    logits = head(e, y)
    loss = get_loss(loss_name)(logits, y)
    loss.backward()
    return logits.detach().numpy(), loss.item(), e.grad.numpy(), head.weight.grad.numpy()


def _tf(name, kw, emb, weight, labels, loss_name):
    import tensorflow as tf
    from twinface_tf.heads import get_head
    from twinface_tf.losses import get_loss
    head = get_head(name, D, C, **kw)
    head.build((None, D))
    head.weight.assign(weight)
    if name == "linear":
        head.bias.assign(np.linspace(-0.1, 0.1, C).astype(np.float32))
    e = tf.Variable(emb)
    y = tf.constant(labels)
    with tf.GradientTape() as tape:
        logits = head(e, y)
        loss = get_loss(loss_name)(logits, y)
    ge, gw = tape.gradient(loss, [e, head.weight])
    return logits.numpy(), float(loss), ge.numpy(), gw.numpy()


@pytest.mark.parametrize("loss_name", ["cross_entropy", "focal"])
@pytest.mark.parametrize("name,kw", SETTINGS, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in SETTINGS])
def test_head_logits_loss_and_gradients_agree(name, kw, loss_name, parity):
    emb, weight, labels = _inputs()
    t = _torch(name, kw, emb, weight, labels, loss_name)
    k = _tf(name, kw, emb, weight, labels, loss_name)
    tag = name + "".join(f" {k_}={v}" for k_, v in kw.items())
    if loss_name == "cross_entropy":               # logits do not depend on the loss: one row each
        parity.check(f"head {tag}: logits (incl. cos=+-1 targets)", t[0], k[0], 1e-5, relative=True)
    parity.check(f"head {tag}: {loss_name} loss", [t[1]], [k[1]], 1e-5, relative=True)
    parity.check(f"head {tag}: {loss_name} d loss/d embeddings", t[2], k[2], 1e-4, relative=True)
    parity.check(f"head {tag}: {loss_name} d loss/d class centres", t[3], k[3], 1e-4, relative=True)
