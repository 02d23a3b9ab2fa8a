"""Triplet loss, torch vs TF: loss, valid count and gradients for every mining, then a 20-step finetuning curve."""
import os

import numpy as np
import pytest

from twinface import schedule
from twinface.data import dataset as dataset_mod
from twinface.data.sampler import IdentitySampler
from twinface.registry import TRIPLET_MINING
from twinface.testing import curve_tolerance, loss_curves, tiny_config, triplet_reference

MARGIN = 0.3


def _batch(case):
    """(embeddings, labels) of one test batch."""
    rng = np.random.default_rng(5)
    if case == "4 identities x 3":
        return rng.normal(size=(12, 16)).astype(np.float32), np.repeat(np.arange(4), 3)
    if case == "one identity x K + singletons":     # positives for identity 0 only; the singletons are anchors of none
        return rng.normal(size=(7, 16)).astype(np.float32), np.array([0, 0, 0, 0, 1, 2, 3])
    if case == "exact ties":
        # rows 1 and 2 (and 4 and 5) are the same image twice: equal distances, the lowest index must win in both
        # twins, or the gradient lands on another row
        emb = rng.normal(size=(8, 16)).astype(np.float32)
        emb[2], emb[5] = emb[1], emb[4]
        return emb, np.array([0, 0, 0, 1, 1, 1, 2, 2])
    if case == "all one identity":                  # no negative anywhere: no valid triplet, loss 0, no gradient
        return rng.normal(size=(6, 16)).astype(np.float32), np.zeros(6, np.int64)
    raise ValueError(case)


def _torch(emb, labels, mining, squared):
    import torch
    from twinface_torch.losses import triplet_loss
    e = torch.from_numpy(emb).requires_grad_(True)
    loss, valid = triplet_loss(e, torch.from_numpy(labels.astype(np.int64)), MARGIN, mining, squared)
    loss.backward()
    return loss.item(), valid, e.grad.numpy()


def _tf(emb, labels, mining, squared):
    import tensorflow as tf
    from twinface_tf.losses import triplet_loss
    e = tf.Variable(emb)
    with tf.GradientTape() as tape:
        loss, valid = triplet_loss(e, tf.constant(labels.astype(np.int64)), MARGIN, mining, squared)
    return float(loss), int(valid), tape.gradient(loss, e).numpy()


CASES = ["4 identities x 3", "one identity x K + singletons", "exact ties", "all one identity"]


@pytest.mark.parametrize("squared", [False, True], ids=["euclidean", "squared"])
@pytest.mark.parametrize("mining", TRIPLET_MINING)
@pytest.mark.parametrize("case", CASES)
def test_triplet_loss_and_gradients_agree(case, mining, squared, parity):
    emb, labels = _batch(case)
    t, k = _torch(emb, labels, mining, squared), _tf(emb, labels, mining, squared)
    ref_loss, ref_valid = triplet_reference(emb, labels, MARGIN, mining, squared)
    assert t[1] == k[1] == ref_valid, "valid triplet counts differ"
    tag = f"triplet {mining}{' squared' if squared else ''}, {case}"
    if ref_valid == 0:
        assert t[0] == k[0] == 0.0
        parity.check(f"{tag}: no triplet, gradients are zero (torch, TF)", np.abs(t[2]) + np.abs(k[2]),
                     np.zeros_like(t[2]), 0.0)
        return
    parity.check(f"{tag}: loss torch vs float64 reference", [t[0]], [ref_loss], 1e-5, relative=True)
    parity.check(f"{tag}: loss torch vs TF", [t[0]], [k[0]], 1e-5, relative=True)
    parity.check(f"{tag}: d loss/d embeddings torch vs TF", t[2], k[2], 1e-4, relative=True)


STEPS = 20


def test_twenty_triplet_finetuning_steps_give_the_same_loss_curve(tmp_path, parity):
    """Triplet finetuning of a margin-trained backbone: r18 trained 8 steps with ArcFace in torch, converted to the
    TF twin (the converter's mapping), then 20 steps of batch-hard triplet loss on P x K batches (10 identities x
    5 images, lr 0.01) in torch, TF and torch with the weights nudged by 1e-7 (about one fp32 ulp). As for the
    fp32 margin curve, torch vs TF is held to 10x the nudged run's drift, floored at 1e-4 and capped at
    CURVE_CAP (twinface.testing.curve_tolerance); steps 1-3 keep 1e-4. Measured in two runs (2-core Xeon, AVX-512):
    steps 1-3 2.1e-6 / 1.4e-5, the curve 3.4e-3 / 9.6e-3 against nudge drifts of 4.9e-3 / 5.9e-3. With
    MobileFaceNet instead of r18 steps 1-3 differed by 7e-4 in one run (not investigated: a hard-mining choice
    flipping on a near tie is the likely cause), so the row keeps the r18 of the margin curve."""
    import torch
    from twinface.data import synth
    from twinface_convert.mapping import torch_to_keras
    from twinface_tf.train import TFTwin
    from twinface_torch.train import TorchTwin
    data = str(tmp_path / "synth")
    synth.ensure_dataset(data, num_identities=10, images_per_identity=26, val_identities=4, val_pairs=20, seed=0,
                         formats=("rec",), workers=1, progress=False)
    dataset = dataset_mod.open_dataset(os.path.join(data, "train.rec"))
    common = dict(backbone={"name": "r18"}, optimizer={"lr": 0.01})
    pre_cfg = tiny_config(data, tmp_path, **common, train={"epochs": 1, "batch_size": 32})
    pretrained = TorchTwin()
    pretrained.build(pre_cfg, dataset.num_classes)
    images, labels = next(pretrained.batches(dataset, IdentitySampler(dataset.labels, 32, 4), 0, 0))
    for _ in range(8):
        pretrained.train_step(images, labels, 0.01, 0.01)
    cfg = tiny_config(data, tmp_path, **common, head={"type": "none"}, loss={"type": "triplet"},
                      data={"path": data, "sampler": "identity", "images_per_identity": 5},
                      train={"epochs": 4, "batch_size": 50})
    sampler = IdentitySampler(dataset.labels, 50, 5, seed=cfg.seed)
    assert sampler.steps_per_epoch() * cfg.train.epochs == STEPS
    twins = TorchTwin(), TFTwin(), TorchTwin()
    for twin in twins:
        twin.build(cfg, dataset.num_classes)
    state = pretrained.backbone.state_dict()
    twins[0].backbone.load_state_dict(state)
    torch_to_keras(state, twins[1].backbone, source="pretrained torch backbone")
    g = torch.Generator().manual_seed(7)
    twins[2].backbone.load_state_dict(state)
    with torch.no_grad():
        for p in twins[2].backbone.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    lr_of = schedule.from_config(cfg, STEPS, sampler.steps_per_epoch())
    t, k, n = loss_curves(twins, cfg, dataset, sampler, lr_of)
    assert t[-4:].mean() < t[:4].mean()                       # it learns
    parity.check("r18 triplet finetuning, loss at steps 1-3, torch vs TF", t[:3], k[:3], 1e-4, relative=True)
    drift = float(np.max(np.abs(t - n) / np.abs(t)))
    parity.check(f"r18 triplet finetuning, loss curve over {STEPS} steps, torch vs TF (tol 10x the nudge drift "
                 f"{drift:.2g})", [float(np.max(np.abs(t - k) / np.abs(t)))], [0.0], curve_tolerance(drift))
