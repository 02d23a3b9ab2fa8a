"""Sub-center ArcFace and AdaFace in the torch twin: against numpy formulas, and their state in training."""
import numpy as np
import pytest
import torch

from twinface.testing import (SUBCENTRE_TARGETS, adaface_reference, check_resume_matches_uninterrupted,
                              head_test_batch, subcentre_reference, tiny_config, tiny_dataset)
from twinface_torch.heads import AdaFace, MarginHead, get_head
from twinface_torch.train import TorchTwin

N, D, C, K = 6, 16, 5, 3


def _batch(seed=0):
    return head_test_batch(seed, N, D)


@pytest.mark.parametrize("name", sorted(SUBCENTRE_TARGETS))
def test_subcentre_logits_are_the_margin_on_each_class_best_subcentre(name):
    emb, labels = _batch()
    head = get_head(name, D, C, subcenters=K)
    assert tuple(head.weight.shape) == (C * K, D)
    expected = subcentre_reference(emb, head.weight.detach().numpy(), labels, K, name)
    got = head(torch.from_numpy(emb), torch.from_numpy(labels)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_the_layout_is_class_major():
    head = MarginHead(D, C, s=1.0, subcenters=K)
    with torch.no_grad():
        head.weight.copy_(torch.randn(C * K, D) * 1e-3)
        head.weight[3 * K + 2] = torch.eye(D)[0]               # sub-centre 2 of class 3 is the embedding's direction
    logits = head(torch.eye(D)[:1] * 2, torch.tensor([-1])).detach()
    assert int(logits.argmax()) == 3 and float(logits[0, 3]) == pytest.approx(1.0)


def test_one_subcentre_is_today_s_head_bit_for_bit():
    emb, labels = _batch(1)
    heads = []
    for kw in ({}, {"subcenters": 1}):
        torch.manual_seed(0)
        heads.append(get_head("arcface", D, C, **kw))
    outs = []
    for head in heads:
        e = torch.from_numpy(emb).requires_grad_(True)
        logits = head(e, torch.from_numpy(labels))
        logits.logsumexp(1).sum().backward()
        outs.append((head.weight.detach(), logits.detach(), e.grad, head.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_subcentres_init_draw_is_n_0_001_of_the_full_shape():
    torch.manual_seed(0)
    w = MarginHead(64, 100, subcenters=4).weight.detach()
    torch.manual_seed(0)
    assert torch.equal(w, torch.normal(0.0, 0.01, (400, 64)))


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_bad_subcentre_counts_are_refused(k):
    with pytest.raises(ValueError, match="MarginHead: subcenters must be an integer >= 1"):
        MarginHead(D, C, subcenters=k)


def test_adaface_matches_the_official_formula_over_three_training_calls_then_eval():
    head = get_head("adaface", D, C)
    assert (float(head.batch_mean), float(head.batch_std)) == (20.0, 100.0)
    weight = head.weight.detach().numpy()
    mean, std = 20.0, 100.0
    for call in range(3):
        emb, labels = _batch(call)
        emb *= np.linspace(0.5, 30, N, dtype=np.float32)[:, None]       # norms spread so the scaler varies
        labels[0] = -1                                                  # no target: no margin
        got = head(torch.from_numpy(emb), torch.from_numpy(labels)).detach().numpy()
        expected, mean, std = adaface_reference(emb, weight, labels, mean, std)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=64 * 1e-6)
        np.testing.assert_allclose([float(head.batch_mean), float(head.batch_std)], [mean, std], rtol=1e-6)
    head.eval()
    got = head(torch.from_numpy(emb), torch.from_numpy(labels)).detach().numpy()
    expected, mean_after, _ = adaface_reference(emb, weight, labels, mean, std, training=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=64 * 1e-6)
    assert mean_after == mean and float(head.batch_mean) == pytest.approx(mean, rel=1e-6)


def test_adaface_state_is_its_buffers_and_needs_two_samples_to_train():
    head = AdaFace(D, C)
    state = head.state_dict()
    assert set(state) == {"weight", "batch_mean", "batch_std"} and state["batch_mean"].dtype == torch.float32
    assert tuple(state["batch_std"].shape) == (1,)
    with pytest.raises(ValueError, match=r"AdaFace: a training batch needs >= 2 samples"):
        head(torch.ones(1, D), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"AdaFace: labels must be in \[-1, 4\]"):
        head(torch.ones(2, D), torch.tensor([0, 5]))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("synth"))


def test_a_skipped_step_restores_adaface_s_norm_ema(data, tmp_path):
    twin = TorchTwin()
    twin.build(tiny_config(data, tmp_path, head={"type": "adaface"}), 6)
    images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(8) % 6
    twin.train_step(images, labels, 0.1, 0.1)
    before = [b.clone() for b in twin.head.buffers()]
    assert float(before[0]) != 20.0                                # the EMA moved on a good step
    with torch.no_grad():
        next(twin.backbone.parameters()).fill_(float("nan"))
    assert np.isnan(twin.train_step(images, labels, 0.1, 0.1))
    for old, now in zip(before, twin.head.buffers()):
        assert torch.equal(old, now)


def test_resume_restores_adaface_s_ema(data, tmp_path):
    def weights(twin):
        state = {**twin.backbone.state_dict(), **{f"head.{k}": v for k, v in twin.head.state_dict().items()}}
        assert float(state["head.batch_mean"]) != 20.0
        return {k: v.detach().numpy().copy() for k, v in state.items()}
    check_resume_matches_uninterrupted(
        TorchTwin, weights, lambda run: torch.load(run / "state.pt", weights_only=True)["meta"]["step"],
        data, tmp_path, head={"type": "adaface"})


def test_drop_noisy_cli_on_a_torch_run(data, tmp_path, capsys):
    from twinface.testing import check_drop_noisy
    check_drop_noisy(TorchTwin, lambda twin: twin.head.weight.detach().numpy(), data, tmp_path, capsys)
