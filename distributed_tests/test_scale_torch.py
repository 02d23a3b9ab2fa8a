"""torch twin over 2 processes (torchrun, gloo) against one process: Partial FC, one training step, guard rails.

Tolerances: losses 1e-5 relative (docs/design.md); Partial FC gradients 1e-4 relative to their largest entry;
weights after one step: difference / the step's update, at most test_step_parity's cap (1e-3; measured values
are in the table).
"""
import numpy as np
import torch
import torch.nn.functional as F

from .processes import alone, torchrun
from .torch_worker import ARCFACE, CLASSES, D, HEAD_CLASSES, embeddings, global_batch
from twinface import partial_fc as plan
from twinface.testing import STEP_CAP
from twinface_torch.heads import MarginHead


def _ranks(out, world=2):
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(world)]


def _reference(index_of_rank=None):
    """One process: MarginHead + cross-entropy over the centres every rank used, in rank order."""
    centres = plan.init_centres(0, 0, HEAD_CLASSES, D)
    labels = global_batch(classes=HEAD_CLASSES)[1]
    columns = np.arange(HEAD_CLASSES) if index_of_rank is None else np.concatenate(
        [plan.shard(HEAD_CLASSES, 2, r)[0] + index_of_rank[r] for r in range(2)])
    head = MarginHead(D, len(columns), **ARCFACE)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(centres[columns]))
    target = torch.from_numpy(np.searchsorted(columns, labels))
    emb = torch.from_numpy(embeddings()).requires_grad_()
    loss = F.cross_entropy(head(emb, target), target)
    loss.backward()
    return loss.item(), emb.grad.numpy(), head.weight.grad.numpy(), columns


def test_partial_fc_at_sample_rate_1_is_the_full_softmax(tmp_path, parity):
    torchrun(["torch_worker.py", "head", "1.0", str(tmp_path)])
    ranks = _ranks(tmp_path)
    loss, emb_grad, weight_grad, _ = _reference()
    what = "torch Partial FC 1.0, 2 ranks vs MarginHead + CE, 1 process"
    for r in ranks:
        parity.check(f"{what}: loss (rank {int(r['class_start'] > 0)})", [loss], [float(r["loss"])], 1e-5,
                     relative=True)
    parity.check(f"{what}: d loss / d embeddings", emb_grad, np.concatenate([r["emb_grad"] for r in ranks]), 1e-4,
                 relative=True)
    parity.check(f"{what}: d loss / d centres", weight_grad, np.concatenate([r["weight_grad"] for r in ranks]),
                 1e-4, relative=True)


def test_partial_fc_samples_the_planned_centres(tmp_path, parity):
    torchrun(["torch_worker.py", "head", "0.3", str(tmp_path)])
    ranks = _ranks(tmp_path)
    labels = global_batch(classes=HEAD_CLASSES)[1]
    for rank, r in enumerate(ranks):
        start, num_local = plan.shard(HEAD_CLASSES, 2, rank)
        expected, _ = plan.select(labels, start, num_local, 0.3, seed=0, step=0, rank=rank)
        assert r["index"].tolist() == expected.tolist()
        assert len(expected) == plan.num_sampled(num_local, 0.3)
        positives = {c - start for c in labels if start <= c < start + num_local}
        assert positives < set(r["index"].tolist())          # every positive centre kept, and negatives drawn
        unsampled = np.setdiff1d(np.arange(num_local), r["index"])
        assert len(unsampled) and not r["weight_grad"][unsampled].any()   # the others get no gradient
    loss, emb_grad, weight_grad, columns = _reference([r["index"] for r in ranks])
    what = "torch Partial FC 0.3, 2 ranks vs CE over the same sampled centres, 1 process"
    parity.check(f"{what}: loss", [loss], [float(ranks[0]["loss"])], 1e-5, relative=True)
    parity.check(f"{what}: d loss / d embeddings", emb_grad, np.concatenate([r["emb_grad"] for r in ranks]), 1e-4,
                 relative=True)
    sampled = np.concatenate([r["weight_grad"][r["index"]] for r in ranks])
    parity.check(f"{what}: d loss / d sampled centres", weight_grad, sampled, 1e-4, relative=True)


def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path, parity):
    """2 ranks x 4 vs 1 process x 8 whose backbone sees the two halves separately (BatchNorm statistics are per
    rank in data-parallel training, as in arcface_torch); head: Partial FC over 2 ranks vs the plain MarginHead."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    torchrun(["torch_worker.py", "step", str(tmp_path / "two")])
    alone(["torch_worker.py", "step", str(tmp_path / "one"), "2"])
    two, (one,) = _ranks(tmp_path / "two"), _ranks(tmp_path / "one", world=1)
    what = "torch mbf one SGD step, 2 ranks x 4 vs 1 process x 8"
    parity.check(f"{what}: loss", [float(one["loss"])], [float(two[0]["loss"])], 1e-5, relative=True)
    assert float(two[0]["loss"]) == float(two[1]["loss"])
    params = [k for k in one if k.startswith("backbone/") and "running" not in k]
    update = max(np.abs(one[k] - one[k.replace("backbone/", "start/", 1)]).max() for k in params)
    for r in two:                                        # both ranks hold the same backbone
        diff = max(np.abs(one[k] - r[k]).max() for k in params) / update
        parity.check(f"{what}: backbone params (rank {int(r['class_start'] > 0)}), / update", [diff], [0.0], STEP_CAP)
    centres = np.concatenate([r["head"] for r in two])
    head_update = np.abs(one["head"] - plan.init_centres(0, 0, CLASSES, D)).max()
    parity.check(f"{what}: class centres, / update", [np.abs(one["head"] - centres).max() / head_update], [0.0],
                 STEP_CAP)
    stats = [k for k in two[0] if "running" in k]
    assert stats and all(np.array_equal(two[0][k], two[1][k]) for k in stats)   # averaged: one set for all ranks

