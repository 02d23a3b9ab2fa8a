import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from twinface.registry import HEADS  # noqa: E402
from twinface_tf.heads import GRADIENTS, LinearHead, MarginHead, get_head  # noqa: E402
from twinface_tf.losses import cross_entropy, focal_loss, get_loss  # noqa: E402

EMB, CLASSES = 8, 6
LABELS = np.array([0, 3, -1, 5, 2], np.int64)


def l2_normalize(x):
    return x / np.sqrt(np.maximum((x * x).sum(axis=1, keepdims=True), 1e-24))


def sphereface_psi(phi):
    """SphereFace (Liu et al. 2017, eq. 6): psi = (-1)^k cos(phi) - 2k for phi in [k pi, (k + 1) pi]."""
    k = np.floor(phi / np.pi)
    return (-1.0) ** k * np.cos(phi) - 2 * k


def reference_logits(embeddings, weight, labels, s, m1, m2, m3, interclass_filtering_threshold=0.0,
                     easy_margin=False):
    """The combined-margin formula in float64 numpy (SphereFace's psi for m1 != 1; easy_margin spares cos <= 0)."""
    cos = np.clip(l2_normalize(embeddings) @ l2_normalize(weight).T, -1, 1)
    rows = np.flatnonzero(labels >= 0)
    is_target = np.zeros(cos.shape, bool)
    is_target[rows, labels[rows]] = True
    if interclass_filtering_threshold > 0:
        cos = np.where((cos > interclass_filtering_threshold) & ~is_target, 0.0, cos)
    logits = cos.copy()
    target = cos[rows, labels[rows]]
    phi = m1 * np.arccos(target) + m2
    margined = (np.cos(phi) if m1 == 1 else sphereface_psi(phi)) - m3
    logits[rows, labels[rows]] = np.where(easy_margin & (target <= 0), target, margined)
    return s * logits


def reference_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def random_batch(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, EMB)).astype(np.float32), rng.normal(size=(CLASSES, EMB)).astype(np.float32)


def margin_head(name, weight, **overrides):
    head = get_head(name, EMB, CLASSES, **overrides)
    head.weight.assign(weight)
    return head


def gradients(head, embeddings, labels, loss_fn):
    embeddings = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        loss = loss_fn(head(embeddings, labels))
    return [g.numpy() for g in tape.gradient(loss, [embeddings, head.weight])]


# ---- margin head against the formula ----

@pytest.mark.parametrize("gradient", GRADIENTS)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_margin_head_matches_formula_for_every_registry_setting(name, gradient):
    embeddings, weight = random_batch()
    head = margin_head(name, weight, gradient=gradient)
    expected = reference_logits(embeddings.astype(np.float64), weight.astype(np.float64), LABELS, **HEADS[name])
    np.testing.assert_allclose(head(embeddings, LABELS).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("m1", [1.35, 2.0, 4.0])
@pytest.mark.parametrize("gradient", GRADIENTS)
def test_sphereface_margin_decreases_over_the_whole_angle_range(m1, gradient):
    weight = np.eye(CLASSES, EMB, dtype=np.float32)
    theta = np.linspace(0.0, np.pi, 2001)
    embeddings = np.zeros((len(theta), EMB), np.float32)
    embeddings[:, 0], embeddings[:, 1] = np.cos(theta), np.sin(theta)       # angle theta to class 0
    head = margin_head("sphereface", weight, m1=m1, gradient=gradient)
    target = head(embeddings, np.zeros(len(theta), np.int64)).numpy()[:, 0]
    assert (target[1:] <= target[:-1]).all() and target[-1] < target[0] - 64   # cos(m1 theta) turns back up
    np.testing.assert_allclose(target, reference_logits(embeddings.astype(np.float64), weight.astype(np.float64),
                               np.zeros(len(theta), np.int64), **{**HEADS["sphereface"], "m1": m1})[:, 0],
                               atol=64 * 1e-3)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_easy_margin_spares_targets_at_or_beyond_ninety_degrees(gradient):
    embeddings, weight = random_batch()
    head = margin_head("arcface", weight, easy_margin=True, gradient=gradient)
    expected = reference_logits(embeddings.astype(np.float64), weight.astype(np.float64), LABELS,
                                **HEADS["arcface"], easy_margin=True)
    rows = np.flatnonzero(LABELS >= 0)
    assert (expected[rows, LABELS[rows]] <= 0).any() and (expected[rows, LABELS[rows]] > 0).any()   # both cases
    np.testing.assert_allclose(head(embeddings, LABELS).numpy(), expected, atol=1e-4)
    assert head.get_config()["easy_margin"] is True


def test_m1_must_be_positive():
    with pytest.raises(ValueError, match="MarginHead: m1 multiplies the angle and must be > 0, got -1"):
        get_head("sphereface", EMB, CLASSES, m1=-1.0)


def test_interclass_filtering_zeroes_only_non_target_cosines_above_threshold():
    rng = np.random.default_rng(3)
    _, weight = random_batch()
    labels = np.array([0, 2, -1], np.int64)
    embeddings = (weight[[1, 2, 3]] + 0.05 * rng.normal(size=(3, EMB))).astype(np.float32)
    head = margin_head("arcface", weight, interclass_filtering_threshold=0.3)
    logits = head(embeddings, labels).numpy()
    assert logits[0, 1] == 0 and logits[2, 3] == 0       # near-duplicate non-target classes dropped
    assert logits[1, 2] > 0.3 * 64 * 0.8                   # the target keeps its (margined) value
    expected = reference_logits(embeddings.astype(np.float64), weight.astype(np.float64), labels,
                                interclass_filtering_threshold=0.3, **HEADS["arcface"])
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    unfiltered = margin_head("arcface", weight)(embeddings, labels).numpy()
    assert unfiltered[0, 1] > 50


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_rows_labelled_minus_one_are_plain_scaled_cosines(gradient):
    embeddings, weight = random_batch()
    margined = margin_head("combined", weight, gradient=gradient)(embeddings, LABELS).numpy()
    plain = margin_head("softmax", weight)(embeddings, LABELS).numpy()
    np.testing.assert_array_equal(margined[2], plain[2])
    rows = np.flatnonzero(LABELS >= 0)
    differs = margined != plain
    assert differs[rows, LABELS[rows]].all()
    differs[rows, LABELS[rows]] = False
    assert not differs.any()                                # nothing else changed


def test_int32_and_int64_labels_agree_and_graph_mode_works():
    embeddings, weight = random_batch()
    head = margin_head("arcface", weight)
    eager = head(embeddings, LABELS).numpy()
    np.testing.assert_array_equal(head(embeddings, LABELS.astype(np.int32)).numpy(), eager)
    traced = tf.function(head, input_signature=[tf.TensorSpec([None, EMB]), tf.TensorSpec([None], tf.int64)])
    np.testing.assert_array_equal(traced(embeddings, LABELS).numpy(), eager)


# ---- gradients ----

@pytest.mark.parametrize("name", ["arcface", "cosface", "sphereface", "combined"])
def test_straight_through_gradient_is_s_times_the_cosine_gradient(name):
    embeddings, weight = random_batch()
    upstream = tf.constant(np.random.default_rng(4).normal(size=(5, CLASSES)), tf.float32)

    def weighted_sum(logits):
        return tf.reduce_sum(logits * upstream)

    margined = gradients(margin_head(name, weight), embeddings, LABELS, weighted_sum)
    plain = gradients(margin_head("softmax", weight), embeddings, LABELS, weighted_sum)   # s * cos everywhere
    for got, expected in zip(margined, plain):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gradient", GRADIENTS)
def test_no_nan_at_cos_plus_and_minus_one(gradient):
    _, weight = random_batch()
    embeddings = np.stack([weight[0], -weight[1], weight[2]])
    labels = np.array([0, 1, 2], np.int64)
    head = margin_head("arcface", weight, gradient=gradient)
    logits = head(embeddings, labels).numpy()
    # analytic clamps cos to 1 - 1e-7 (0.99999988 in float32), i.e. theta >= 4.9e-4 rad
    rtol = 1e-5 if gradient == "straight_through" else 1e-3
    np.testing.assert_allclose(logits[0, 0], 64 * np.cos(0.5), rtol=rtol)          # theta = 0
    np.testing.assert_allclose(logits[1, 1], 64 * np.cos(np.pi + 0.5), rtol=rtol)  # theta = pi
    for g in gradients(head, embeddings, labels, lambda z: cross_entropy(z, labels)):
        assert np.isfinite(g).all()


@pytest.mark.parametrize("name", ["arcface", "sphereface", "combined"])
def test_analytic_gradient_matches_finite_differences(name):
    embeddings, weight = random_batch(seed=5)
    settings = {**HEADS[name], "s": 8.0}                   # an unsaturated softmax keeps every term visible
    labels = np.array([0, 3, -1, 5, 2], np.int64)

    def loss_of(emb):
        logits = reference_logits(emb, weight.astype(np.float64), labels, **settings)
        return reference_cross_entropy(logits, labels.clip(0)).mean()

    emb64, step = embeddings.astype(np.float64), 1e-6
    numeric = np.zeros_like(emb64)
    for index in np.ndindex(emb64.shape):
        delta = np.zeros_like(emb64)
        delta[index] = step
        numeric[index] = (loss_of(emb64 + delta) - loss_of(emb64 - delta)) / (2 * step)

    def ce(logits):
        return cross_entropy(logits, labels.clip(0))

    analytic = gradients(margin_head(name, weight, gradient="analytic", s=8.0), embeddings, labels, ce)[0]
    np.testing.assert_allclose(analytic, numeric, rtol=2e-3, atol=2e-5)
    straight = gradients(margin_head(name, weight, s=8.0), embeddings, labels, ce)[0]
    assert not np.allclose(straight, numeric, rtol=2e-3, atol=2e-5)   # the two modes really differ


# ---- construction, names, errors ----

def test_registry_settings_and_overrides():
    for name, settings in HEADS.items():
        head = get_head(name, EMB, CLASSES)
        assert isinstance(head, MarginHead)
        assert (head.s, head.m1, head.m2, head.m3) == (settings["s"], settings["m1"], settings["m2"], settings["m3"])
    head = get_head("arcface", EMB, CLASSES, s=32.0, interclass_filtering_threshold=0.2, gradient="analytic")
    assert (head.s, head.m2, head.interclass_filtering_threshold, head.gradient) == (32.0, 0.5, 0.2, "analytic")
    with pytest.raises(ValueError, match=r"unknown head 'arc'; known: adaface, arcface, .*linear"):
        get_head("arc", EMB, CLASSES)
    with pytest.raises(ValueError, match="gradient must be one of"):
        get_head("arcface", EMB, CLASSES, gradient="exact")


def test_margin_head_weight_name_shape_and_init():
    head = MarginHead(64, 1000)
    assert [v.path.split("/")[-1] for v in head.weights] == ["weight"]
    assert head.weight.shape == (1000, 64)                  # [num_classes, embedding_size], no transpose
    values = head.weight.numpy()
    assert abs(values.std() - 0.01) < 0.0003 and abs(values.mean()) < 0.0003


def test_linear_head_formula_names_and_init():
    head = get_head("linear", EMB, CLASSES)
    assert isinstance(head, LinearHead)
    assert [v.path.split("/")[-1] for v in head.weights] == ["weight", "bias"]
    assert head.weight.shape == (CLASSES, EMB) and head.bias.shape == (CLASSES,)
    bound = 1 / np.sqrt(EMB)
    assert np.abs(head.weight.numpy()).max() <= bound and np.abs(head.bias.numpy()).max() <= bound
    embeddings, _ = random_batch()
    expected = embeddings @ head.weight.numpy().T + head.bias.numpy()
    np.testing.assert_allclose(head(embeddings, LABELS.clip(0)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bad_batches_raise_clear_errors():
    embeddings, weight = random_batch()
    head = margin_head("arcface", weight)
    with pytest.raises(ValueError, match=r"MarginHead: expected embeddings \[N, 8\], got shape \(5, 4\)"):
        head(embeddings[:, :4], LABELS)
    with pytest.raises(ValueError, match=r"MarginHead: expected labels \[5\], got shape \(5, 1\)"):
        head(embeddings, LABELS[:, None])
    with pytest.raises(ValueError, match="expected int32 or int64 labels, got float32"):
        head(embeddings, LABELS.astype(np.float32))
    for bad in (6, -2):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels must be in \[-1, 5\]"):
            head(embeddings, np.array([0, 1, 2, 3, bad]))


# ---- losses ----

def test_cross_entropy_and_focal_match_numpy():
    rng = np.random.default_rng(6)
    logits, labels = rng.normal(size=(7, 5)) * 3, rng.integers(0, 5, 7)
    ce = reference_cross_entropy(logits, labels)
    np.testing.assert_allclose(float(cross_entropy(logits.astype(np.float32), labels)), ce.mean(), rtol=1e-5)
    p = np.exp(-ce)
    for gamma in (2.0, 0.5):
        np.testing.assert_allclose(float(focal_loss(logits.astype(np.float32), labels, gamma=gamma)),
                                   ((1 - p) ** gamma * ce).mean(), rtol=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy_values_and_gradients():
    logits = np.array([[100.0, 0.0, 0.0], [0.3, -1.2, 2.0]], np.float32)   # row 0: ce == 0 exactly
    labels = np.array([0, 1], np.int32)
    results = []
    for loss_fn in (cross_entropy, lambda z, y: focal_loss(z, y, gamma=0.0)):
        variable = tf.Variable(logits)
        with tf.GradientTape() as tape:
            loss = loss_fn(variable, labels)
        results.append((float(loss), tape.gradient(loss, variable).numpy()))
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert np.isfinite(results[1][1]).all()


def test_get_loss_defaults_overrides_and_errors():
    rng = np.random.default_rng(7)
    logits, labels = rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 1, 2, 0], np.int64)
    assert float(get_loss("focal")(logits, labels)) == float(focal_loss(logits, labels, gamma=2.0))
    assert float(get_loss("focal", gamma=1.0)(logits, labels)) == float(focal_loss(logits, labels, gamma=1.0))
    assert float(get_loss("cross_entropy")(logits, labels)) == float(cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="unknown loss 'arcface'"):
        get_loss("arcface")
    with pytest.raises(ValueError, match=r"focal_loss: expected logits \[N, C\] float and labels \[N\] int"):
        focal_loss(logits, labels[:3])
    with pytest.raises(ValueError, match=r"cross_entropy: expected .* got logits \(4, 3\) and labels \(4,\) float"):
        cross_entropy(logits, labels.astype(np.float32))
