import numpy as np
import pytest
import torch

from twinface.registry import HEADS
from twinface_torch.heads import AdaFace, LinearHead, MarginHead, get_head
from twinface_torch.losses import cross_entropy, focal_loss, get_loss
from twinface_torch.optim import build_optimizer

RNG = np.random.default_rng(0)


def sphereface_psi(phi):
    """SphereFace (Liu et al. 2017, eq. 6): psi = (-1)^k cos(phi) - 2k for phi in [k pi, (k + 1) pi]."""
    k = np.floor(phi / np.pi)
    return (-1.0) ** k * np.cos(phi) - 2 * k


def numpy_margin_logits(embeddings, weight, labels, s, m1, m2, m3, threshold=0.0, easy_margin=False):
    """The combined-margin formula written out in float64: cos(m1 theta + m2) - m3, SphereFace's psi for m1 != 1,
    the margin left out for targets with cos <= 0 under easy_margin."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(e @ w.T, -1.0, 1.0)
    out = cos.copy()
    for row, label in enumerate(labels):
        if threshold > 0:
            noisy = cos[row] > threshold
            if label >= 0:
                noisy[label] = False
            out[row, noisy] = 0.0
        if label >= 0 and not (easy_margin and cos[row, label] <= 0):
            phi = m1 * np.arccos(cos[row, label]) + m2
            out[row, label] = (np.cos(phi) if m1 == 1 else sphereface_psi(phi)) - m3
    return s * out


def make_head(name, embedding_size=16, num_classes=10, **overrides):
    torch.manual_seed(0)
    return get_head(name, embedding_size, num_classes, **overrides)


@pytest.mark.parametrize("gradient", ["straight_through", "analytic"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_margin_forward_matches_numpy(name, gradient):
    head = make_head(name, gradient=gradient)
    embeddings = RNG.normal(size=(6, 16)).astype(np.float32)
    labels = np.array([0, 3, -1, 9, 3, 5])
    logits = head(torch.from_numpy(embeddings), torch.from_numpy(labels)).detach().numpy()
    expected = numpy_margin_logits(embeddings.astype(np.float64), head.weight.detach().double().numpy(),
                                   labels, **HEADS[name])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=64 * 2e-6)


def test_margin_forward_with_filtering_matches_numpy():
    head = make_head("arcface", interclass_filtering_threshold=0.1)
    embeddings = RNG.normal(size=(6, 16)).astype(np.float32)
    labels = np.array([0, 3, -1, 9, 3, 5])
    logits = head(torch.from_numpy(embeddings), torch.from_numpy(labels)).detach().numpy()
    expected = numpy_margin_logits(embeddings.astype(np.float64), head.weight.detach().double().numpy(),
                                   labels, **HEADS["arcface"], threshold=0.1)
    assert (expected == 0).sum() >= 5                           # the threshold does filter something here
    np.testing.assert_allclose(logits, expected, rtol=0, atol=64 * 2e-6)


@pytest.mark.parametrize("m1", [1.35, 2.0, 4.0])
@pytest.mark.parametrize("gradient", ["straight_through", "analytic"])
def test_sphereface_margin_decreases_over_the_whole_angle_range(m1, gradient):
    head = make_head("sphereface", m1=m1, gradient=gradient)
    theta = torch.linspace(0.0, np.pi, 2001, dtype=torch.float64)
    cos = torch.cos(theta).unsqueeze(1).requires_grad_(gradient == "analytic")
    target = head.logits_from_cos(cos, torch.zeros(len(theta), dtype=torch.int64))[:, 0]
    assert (target[1:] < target[:-1]).all()                      # plain cos(m1 theta) turns back up past pi / m1
    k = np.arange(int(np.ceil(m1)))                               # SphereFace's values at the piece boundaries
    at_bounds = head.logits_from_cos(torch.cos(torch.tensor(k * np.pi / m1)).unsqueeze(1), torch.zeros(len(k),
                                     dtype=torch.int64))[:, 0]
    # analytic clamps cos to 1 - 1e-7 (theta >= 4.5e-4): its value at theta = 0 is off by ~64 * 4e-7 * m1^2
    np.testing.assert_allclose(at_bounds.detach().numpy(), 64.0 * (1 - 2 * k), atol=1e-9 if gradient ==
                               "straight_through" else 1e-3)


@pytest.mark.parametrize("gradient", ["straight_through", "analytic"])
def test_easy_margin_spares_targets_at_or_beyond_ninety_degrees(gradient):
    head = make_head("arcface", easy_margin=True, gradient=gradient)
    cos = cos_input([[0.6, 0.1], [-0.2, 0.3], [0.0, 0.5]])
    logits = head.logits_from_cos(cos, torch.tensor([0, 0, 0]))
    expected = 64.0 * np.array([np.cos(np.arccos(0.6) + 0.5), -0.2, 0.0])
    np.testing.assert_allclose(logits[:, 0].detach().numpy(), expected, atol=1e-9)
    embeddings = RNG.normal(size=(6, 16)).astype(np.float32)
    labels = np.array([0, 3, -1, 9, 3, 5])
    got = head(torch.from_numpy(embeddings), torch.from_numpy(labels)).detach().numpy()
    np.testing.assert_allclose(got, numpy_margin_logits(embeddings.astype(np.float64), head.weight.detach().double()
                               .numpy(), labels, **HEADS["arcface"], easy_margin=True), rtol=0, atol=64 * 2e-6)


def test_m1_must_be_positive():
    with pytest.raises(ValueError, match="MarginHead: m1 multiplies the angle and must be > 0, got 0"):
        make_head("sphereface", m1=0)


def test_weight_shape_and_init():
    head = MarginHead(512, 2000)
    assert head.weight.shape == (2000, 512)
    assert abs(head.weight.std().item() - 0.01) < 2e-4 and abs(head.weight.mean().item()) < 2e-4


def cos_input(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined"])
def test_straight_through_gradient_is_s(name):
    head = make_head(name)
    cos = cos_input([[1.0, 0.2, -0.3], [0.5, -1.0, 0.1], [-1.0, 0.7, 0.0], [0.3, 0.4, 1.0]])
    labels = torch.tensor([0, 1, 0, -1])
    logits = head.logits_from_cos(cos, labels)
    is_target = torch.zeros(4, 3, dtype=torch.bool)
    is_target[0, 0] = is_target[1, 1] = is_target[2, 0] = True
    logits[is_target].sum().backward()
    assert torch.equal(cos.grad, 64.0 * is_target.double())


@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined"])
def test_analytic_gradient_matches_finite_differences(name):
    head = make_head(name, gradient="analytic")
    cos = torch.tensor(RNG.uniform(-0.9, 0.9, size=(5, 4)), dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, -1, 2, 1])
    assert torch.autograd.gradcheck(lambda c: head.logits_from_cos(c, labels), (cos,))


def test_straight_through_gradient_differs_from_analytic():
    cos = cos_input([[0.3, 0.1]])
    labels = torch.tensor([0])
    grads = []
    for gradient in ("straight_through", "analytic"):
        c = cos.detach().clone().requires_grad_()
        make_head("arcface", gradient=gradient).logits_from_cos(c, labels)[0, 0].backward()
        grads.append(c.grad[0, 0].item())
    theta = np.arccos(0.3)
    assert grads[0] == 64.0
    assert grads[1] == pytest.approx(64.0 * np.sin(theta + 0.5) / np.sin(theta), rel=1e-9)


@pytest.mark.parametrize("gradient", ["straight_through", "analytic"])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_no_nan_at_class_centre_and_its_negation(name, gradient):
    head = make_head(name, gradient=gradient)
    labels = torch.tensor([2, 7])
    centre = head.weight.detach()[labels].clone()
    embeddings = torch.cat([centre[:1] * 3.0, -centre[1:]]).requires_grad_()
    loss = cross_entropy(head(embeddings, labels), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(head.weight.grad).all()
    # Exactly +-1 on the cosine itself, where acos' derivative is infinite.
    cos = cos_input([[1.0, 0.0], [0.0, -1.0]])
    head.logits_from_cos(cos, torch.tensor([0, 1])).sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_interclass_filtering_zeroes_similar_non_targets():
    head = make_head("arcface", interclass_filtering_threshold=0.3)
    cos = cos_input([[0.9, 0.5, 0.2, -0.4],     # target 0 above the threshold: kept with its margin
                     [0.35, 0.1, 0.3, 0.8],     # target 3; 0.35 filtered, 0.3 (not above) kept
                     [0.31, 0.6, 0.29, 0.0]])   # no target: every entry above 0.3 filtered
    labels = torch.tensor([0, 3, -1])
    logits = head.logits_from_cos(cos, labels)
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    values = cos.detach().clone()
    values[0, 0] = np.cos(np.arccos(0.9) + 0.5)
    values[1, 3] = np.cos(np.arccos(0.8) + 0.5)
    torch.testing.assert_close(logits, 64.0 * values * keep, rtol=0, atol=1e-9)
    logits.sum().backward()
    torch.testing.assert_close(cos.grad, 64.0 * keep)   # filtered entries get no gradient


def test_rows_labelled_minus_one_are_left_unchanged():
    head = make_head("combined")
    cos = cos_input([[0.9, -0.5, 0.2], [0.3, 0.1, 0.7]])
    logits = head.logits_from_cos(cos, torch.tensor([-1, 2]))
    torch.testing.assert_close(logits[0], 64.0 * cos[0], rtol=0, atol=0)
    assert logits[1, 2].item() == pytest.approx(64.0 * (np.cos(np.arccos(0.7) + 0.3) - 0.2), abs=1e-9)
    torch.testing.assert_close(logits[1, :2], 64.0 * cos[1, :2], rtol=0, atol=0)


def test_margin_head_input_errors():
    head = MarginHead(8, 5)
    with pytest.raises(ValueError, match=r"MarginHead: expected embeddings \[N, 8\], got shape \(2, 7\)"):
        head(torch.zeros(2, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"MarginHead: expected labels \[2\], got shape \(3,\)"):
        head(torch.zeros(2, 8), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="MarginHead: expected int64 labels, got torch.int32"):
        head(torch.zeros(2, 8), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 4\].*max 5"):
        head(torch.ones(2, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="gradient must be one of"):
        MarginHead(8, 5, gradient="exact")


def test_linear_head():
    torch.manual_seed(0)
    head = LinearHead(64, 300)
    bound = 1 / 8.0
    assert head.weight.shape == (300, 64) and head.bias.shape == (300,)
    assert 0.98 * bound < head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    embeddings = torch.randn(4, 64)
    expected = embeddings.double().numpy() @ head.weight.detach().double().numpy().T + head.bias.detach().numpy()
    np.testing.assert_allclose(head(embeddings, torch.zeros(4, dtype=torch.int64)).detach().numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_get_head():
    for name, settings in HEADS.items():
        head = get_head(name, 16, 10)
        assert isinstance(head, MarginHead) and head.weight.shape == (10, 16)
        assert (head.s, head.m1, head.m2, head.m3) == (settings["s"], settings["m1"], settings["m2"], settings["m3"])
    head = get_head("arcface", 16, 10, m2=0.4, gradient="analytic", interclass_filtering_threshold=0.2)
    assert (head.m2, head.gradient, head.interclass_filtering_threshold) == (0.4, "analytic", 0.2)
    assert isinstance(get_head("linear", 16, 10), LinearHead)
    assert isinstance(get_head("adaface", 16, 10), AdaFace)
    with pytest.raises(ValueError, match="unknown head 'magface'") as error:
        get_head("magface", 16, 10)
    assert all(name in str(error.value) for name in [*HEADS, "adaface", "linear"])


def numpy_cross_entropy_per_sample(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels]


def test_losses_match_numpy():
    logits = RNG.normal(scale=3.0, size=(7, 5))
    labels = RNG.integers(0, 5, size=7)
    ce = numpy_cross_entropy_per_sample(logits, labels)
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    assert cross_entropy(t_logits, t_labels).item() == pytest.approx(ce.mean(), rel=1e-12)
    focal = ((1 - np.exp(-ce)) ** 2 * ce).mean()
    assert focal_loss(t_logits, t_labels).item() == pytest.approx(focal, rel=1e-12)
    assert focal_loss(t_logits, t_labels, gamma=0.0).item() == pytest.approx(ce.mean(), rel=1e-12)
    assert focal < ce.mean()
    assert get_loss("focal")(t_logits, t_labels).item() == pytest.approx(focal, rel=1e-12)
    assert get_loss("focal", gamma=0.0)(t_logits, t_labels).item() == pytest.approx(ce.mean(), rel=1e-12)
    assert get_loss("cross_entropy")(t_logits, t_labels).item() == pytest.approx(ce.mean(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown loss 'contrastive'; known: cross_entropy, focal, triplet"):
        get_loss("contrastive")
    with pytest.raises(ValueError, match="scores embeddings, not logits"):
        get_loss("triplet")


LRS = (0.1, 0.05, 0.02)


def run_torch_optimizer(name, start, grads, **kwargs):
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.float64), requires_grad=False)
    optimizer = build_optimizer(name, [param, frozen], lr=LRS[0], **kwargs)
    for lr, grad in zip(LRS, grads):
        for group in optimizer.param_groups:
            group["lr"] = lr
        param.grad = torch.from_numpy(grad.copy())
        optimizer.step()
    assert torch.equal(frozen, torch.ones(3, dtype=torch.float64))
    return param.detach().numpy()


def test_sgd_matches_hand_written_update():
    start, grads = RNG.normal(size=(4, 3)), RNG.normal(size=(3, 4, 3))
    momentum, wd = 0.9, 5e-4
    p, buf = start.copy(), None
    for lr, grad in zip(LRS, grads):
        g = grad + wd * p
        buf = g if buf is None else momentum * buf + g
        p = p - lr * buf
    np.testing.assert_allclose(run_torch_optimizer("sgd", start, grads), p, rtol=1e-12, atol=1e-12)


def test_adamw_matches_hand_written_update():
    start, grads = RNG.normal(size=(4, 3)), RNG.normal(size=(3, 4, 3))
    b1, b2, eps, wd = 0.8, 0.99, 1e-6, 0.05
    p, m, v = start.copy(), np.zeros_like(start), np.zeros_like(start)
    for t, (lr, g) in enumerate(zip(LRS, grads), start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + eps)
    result = run_torch_optimizer("adamw", start, grads, betas=(b1, b2), eps=eps, weight_decay=wd)
    np.testing.assert_allclose(result, p, rtol=1e-12, atol=1e-12)


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'; known: sgd, adamw"):
        build_optimizer("lamb", [torch.nn.Parameter(torch.zeros(1))], lr=0.1)
