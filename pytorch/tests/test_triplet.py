"""The triplet loss against its float64 definition, and in training: batches without a triplet are skipped."""
import numpy as np
import pytest
import torch

from twinface_torch.losses import TripletLoss, pairwise_distances, triplet_loss
from twinface_torch.train import TorchTwin as Twin

from twinface.registry import TRIPLET_MINING
from twinface.testing import check_triplet_batches_without_triplets_are_skipped, tiny_dataset, triplet_reference


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("mining", TRIPLET_MINING)
def test_triplet_loss_matches_its_definition(mining, squared):
    rng = np.random.default_rng(11)
    emb, labels = rng.normal(size=(10, 6)), np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])
    loss, valid = TripletLoss(0.5, mining, squared)(torch.from_numpy(emb).float(), torch.from_numpy(labels))
    ref_loss, ref_valid = triplet_reference(emb, labels, 0.5, mining, squared)
    assert valid == ref_valid > 0 and loss.item() == pytest.approx(ref_loss, rel=1e-5)


def test_hard_mining_ties_go_to_the_lowest_index():
    """Rows 1 and 2 are the same image twice: for anchor 0 they are equally far positives. The gradient must be
    that of the triplets written out with index 1 chosen (choosing 2, or splitting, moves it to another row)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 0, 0, 1])
    emb = x.clone().requires_grad_(True)
    torch.autograd.backward(triplet_loss(emb, labels, 1.0, "batch_hard")[0])
    chosen = x.clone().requires_grad_(True)
    d = pairwise_distances(chosen)
    # per anchor (farthest positive, closest negative): 0 -> (1 not 2, 3); 1 -> (0, 3); 2 -> (0, 3); 3 has none
    terms = [d[0, 1] - d[0, 3], d[1, 0] - d[1, 3], d[2, 0] - d[2, 3]]
    torch.autograd.backward(sum(torch.relu(t + 1.0) for t in terms) / 3)
    assert d[0, 1] == d[0, 2]
    torch.testing.assert_close(emb.grad, chosen.grad, rtol=0, atol=1e-7)
    assert not torch.allclose(emb.grad[1], emb.grad[2])


def test_unknown_mining_is_refused():
    with pytest.raises(ValueError, match="mining must be one of"):
        triplet_loss(torch.zeros(2, 2), torch.tensor([0, 1]), mining="hardest")


def test_batches_without_triplets_are_skipped_and_counted(tmp_path):
    def weights(twin):
        return {k: v.detach().numpy().copy() for k, v in twin.backbone.state_dict().items()}
    check_triplet_batches_without_triplets_are_skipped(Twin, weights, tiny_dataset(tmp_path / "synth"), tmp_path)
