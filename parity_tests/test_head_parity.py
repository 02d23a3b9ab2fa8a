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
    ("arcface", {"subcenters": 3}),                 # Sub-center ArcFace
    ("cosface", {"subcenters": 3}),
    ("adaface", {}),
]


def _inputs(rows=C):
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(N, D)).astype(np.float32)
    weight = rng.normal(0, 0.1, size=(rows, D)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 4, 5], np.int64)
    # Targets at exactly cos = +1 and -1. acos amplifies a 1-ulp difference in cos near +-1 by 1/sqrt(1 - c^2)
    # (a 6e-8 difference becomes 3.5e-4 rad, 2e-4 relative on the logits), so the cosines must be exactly
    # +-1 in both twins: unit-basis class centres and embeddings of power-of-two norm make them exact.
    weight[0], weight[1] = np.eye(D, dtype=np.float32)[0], np.eye(D, dtype=np.float32)[1]
    emb[0], emb[1] = 2.0 * weight[0], -2.0 * weight[1]
    return emb, weight, labels


def _classes(weight, kw):
    return len(weight) // kw.get("subcenters", 1)


def _torch(name, kw, emb, weight, labels, loss_name):
    import torch
    from twinface_torch.heads import get_head
    from twinface_torch.losses import get_loss
    head = get_head(name, D, _classes(weight, kw), **kw)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        if name == "linear":
            head.bias.copy_(torch.linspace(-0.1, 0.1, C))
    e = torch.from_numpy(emb).requires_grad_(True)
    y = torch.from_numpy(labels)
    logits = head(e, y)
    loss = get_loss(loss_name)(logits, y)
    loss.backward()
    ema = [b.numpy() for b in head.buffers()]                   # AdaFace's norm statistics
    return logits.detach().numpy(), loss.item(), e.grad.numpy(), head.weight.grad.numpy(), ema


def _tf(name, kw, emb, weight, labels, loss_name):
    import tensorflow as tf
    from twinface_tf.heads import get_head
    from twinface_tf.losses import get_loss
    head = get_head(name, D, _classes(weight, kw), **kw)
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
    return logits.numpy(), float(loss), ge.numpy(), gw.numpy(), [v.numpy() for v in head.non_trainable_variables]


@pytest.mark.parametrize("loss_name", ["cross_entropy", "focal"])
@pytest.mark.parametrize("name,kw", SETTINGS, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in SETTINGS])
def test_head_logits_loss_and_gradients_agree(name, kw, loss_name, parity):
    emb, weight, labels = _inputs(C * kw.get("subcenters", 1))
    _check_rows(parity, name + "".join(f" {k_}={v}" for k_, v in kw.items()), "(incl. cos=+-1 targets)", loss_name,
                _torch(name, kw, emb, weight, labels, loss_name), _tf(name, kw, emb, weight, labels, loss_name))


def _check_rows(parity, tag, inputs, loss_name, t, k):
    if loss_name == "cross_entropy":               # logits do not depend on the loss: one row each
        parity.check(f"head {tag}: logits {inputs}", t[0], k[0], 1e-5, relative=True)
        for name, a, b in zip(("batch_mean", "batch_std"), t[4], k[4]):
            parity.check(f"head {tag}: {name} after one training call", a, b, 1e-6, relative=True)
    parity.check(f"head {tag}: {loss_name} loss", [t[1]], [k[1]], 1e-5, relative=True)
    parity.check(f"head {tag}: {loss_name} d loss/d embeddings", t[2], k[2], 1e-4, relative=True)
    parity.check(f"head {tag}: {loss_name} d loss/d class centres", t[3], k[3], 1e-4, relative=True)


def _edge_cases():
    """(tag, head, settings, embeddings, centres, labels) at the edges: one identity, all one identity, targets at
    cos = -1 exactly with margins that push the angle past pi, AdaFace norms that clip the margin scaler."""
    emb, weight, labels = _inputs()
    eye = np.eye(D, dtype=np.float32)
    sub = np.repeat(weight, 3, axis=0)
    sub[0:3], sub[3:6] = eye[0], eye[1]         # all three sub-centres of classes 0 and 1: exact ties
    one = np.stack([eye[0], eye[0] * 0.5 + eye[1], -eye[0], eye[2]])
    scales = np.float32([1e-4, 1e-2, 1.0, 30.0, 1e3, 1e4])[:, None]
    return [
        ("arcface m2=3, theta past pi, a target at cos=-1", "arcface", {"m2": 3.0}, emb, weight, labels),
        ("arcface subcenters=3 m2=3, tied sub-centres at cos=+-1", "arcface", {"m2": 3.0, "subcenters": 3},
         emb, sub, labels),
        ("cosface subcenters=3, all one identity", "cosface", {"subcenters": 3}, emb, sub, np.zeros(N, np.int64)),
        ("arcface subcenters=3, a single identity (1 class), 4 images", "arcface", {"subcenters": 3}, 2 * one,
         np.stack([eye[0], eye[1], eye[2]]), np.zeros(4, np.int64)),
        ("adaface, all one identity", "adaface", {}, emb, weight, np.zeros(N, np.int64)),
        ("adaface h=10, norms 1e-4..1e4 (scaler clips at +-1), cos=-1 target", "adaface", {"h": 10.0},
         emb * scales, weight, labels),
    ]


@pytest.mark.parametrize("case", range(len(_edge_cases())), ids=[c[0] for c in _edge_cases()])
def test_edge_cases_agree(case, parity):
    tag, name, kw, emb, weight, labels = _edge_cases()[case]
    emb, weight = emb.astype(np.float32), weight.astype(np.float32)
    _check_rows(parity, tag, "(edge case)", "cross_entropy", _torch(name, kw, emb, weight, labels, "cross_entropy"),
                _tf(name, kw, emb, weight, labels, "cross_entropy"))
