"""twinface.eval.verification against a literal re-statement of insightface's protocol (sklearn KFold, one
pass per threshold, 'slinear' interpolation), plus the edge cases, the flip post-processing and the ROC plot."""
import cv2
import numpy as np
import pytest
from scipy.interpolate import interp1d
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from twinface.eval import verification
from twinface.eval.roc_plot import roc_figure, save_roc_plot
from twinface.eval.verification import evaluate, evaluate_embeddings, format_result, kfold_splits, threshold_at_far


# ---- the reference: insightface's evaluate(), straightforwardly, with its loops --------------------------------

def _reference_rates(threshold, dist, issame):
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    fp = np.sum(np.logical_and(predict, np.logical_not(issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict), issame))
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _reference_val_far(threshold, dist, issame):
    predict = np.less(dist, threshold)
    val = float(np.sum(np.logical_and(predict, issame))) / float(np.sum(issame))
    far = float(np.sum(np.logical_and(predict, np.logical_not(issame)))) / float(np.sum(np.logical_not(issame)))
    return val, far


def reference_slinear(x, y, u):
    """interp1d(x, y, kind='slinear')(u) as scipy <= 1.8 computed it for non-decreasing x with repeats (newer
    scipy refuses repeats): the line from the last point with x <= u to the first point with x > u."""
    for i in range(len(x) - 1):
        if x[i] <= u < x[i + 1]:
            return y[i] + (u - x[i]) / (x[i + 1] - x[i]) * (y[i + 1] - y[i])
    raise AssertionError(f"{u} outside the reference's domain")


def reference_evaluate(embeddings, issame, nrof_folds=10):
    issame = np.asarray(issame)
    dist = np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)
    folds = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(issame.size)))

    thresholds = np.arange(0, 4, 0.01)
    tprs = np.zeros((nrof_folds, thresholds.size))
    fprs = np.zeros((nrof_folds, thresholds.size))
    accuracy, best_thresholds = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for fold, (train, test) in enumerate(folds):
        acc_train = np.zeros(thresholds.size)
        for i, threshold in enumerate(thresholds):
            _, _, acc_train[i] = _reference_rates(threshold, dist[train], issame[train])
        best = np.argmax(acc_train)
        best_thresholds[fold] = thresholds[best]
        for i, threshold in enumerate(thresholds):
            tprs[fold, i], fprs[fold, i], _ = _reference_rates(threshold, dist[test], issame[test])
        _, _, accuracy[fold] = _reference_rates(thresholds[best], dist[test], issame[test])

    thresholds = np.arange(0, 4, 0.001)
    val, far = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for fold, (train, test) in enumerate(folds):
        far_train = np.zeros(thresholds.size)
        for i, threshold in enumerate(thresholds):
            _, far_train[i] = _reference_val_far(threshold, dist[train], issame[train])
        if np.max(far_train) >= 1e-3:
            threshold = reference_slinear(far_train, thresholds, 1e-3)
        else:
            threshold = 0.0
        val[fold], far[fold] = _reference_val_far(threshold, dist[test], issame[test])
    return dict(accuracy=accuracy, best_thresholds=best_thresholds, tpr=np.mean(tprs, 0), fpr=np.mean(fprs, 0),
                val=np.mean(val), val_std=np.std(val), far=np.mean(far))


def reference_lines(name, xnorm, acc1, std1, acc2, std2, val, val_std, far):
    """What insightface prints (its format strings) followed by facenet's VAL line."""
    return ["[%s]XNorm: %f" % (name, xnorm),
            "[%s]Accuracy: %1.5f+-%1.5f" % (name, acc1, std1),
            "[%s]Accuracy-Flip: %1.5f+-%1.5f" % (name, acc2, std2),
            "[%s]Validation rate: %2.5f+-%2.5f @ FAR=%2.5f" % (name, val, val_std, far)]


# ---- data --------------------------------------------------------------------------------------------------------

def make_pairs(nrof_pairs, noise, seed, dim=16):
    """Raw (unnormalised) embeddings [2N, dim]: same pairs are a vector and a noisy copy, different pairs unrelated.

    Pairs come in blocks of same / different, in a shuffled order, so folds hold unequal class counts."""
    rng = np.random.default_rng(seed)
    issame = rng.permutation(np.arange(nrof_pairs) % 2 == 0)
    first = rng.normal(size=(nrof_pairs, dim))
    second = np.where(issame[:, None], first + noise * rng.normal(size=(nrof_pairs, dim)),
                      rng.normal(size=(nrof_pairs, dim)))
    emb = np.empty((2 * nrof_pairs, dim))
    emb[0::2], emb[1::2] = first, second
    return emb * rng.uniform(0.5, 30.0, size=(2 * nrof_pairs, 1)), issame  # raw norms vary, as models' do


@pytest.fixture(scope="module", params=[(6000, 0.9), (1003, 0.9)], ids=["6000pairs", "1003pairs"])
def case(request):
    nrof_pairs, noise = request.param
    emb, issame = make_pairs(nrof_pairs, noise, seed=nrof_pairs)
    embeddings = normalize(emb)
    return emb, issame, evaluate(embeddings, issame), reference_evaluate(embeddings, issame)


# ---- equality with the reference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("nrof_pairs, nrof_folds", [(6000, 10), (1003, 10), (17, 5), (12, 12)])
def test_folds_are_sklearn_kfold(nrof_pairs, nrof_folds):
    ours = kfold_splits(nrof_pairs, nrof_folds)
    theirs = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(nrof_pairs)))
    assert len(ours) == len(theirs)
    for (train, test), (ref_train, ref_test) in zip(ours, theirs):
        np.testing.assert_array_equal(train, ref_train)
        np.testing.assert_array_equal(test, ref_test)


def test_single_fold_trains_and_tests_on_everything():
    (train, test), = kfold_splits(7, 1)
    np.testing.assert_array_equal(train, np.arange(7))
    np.testing.assert_array_equal(test, np.arange(7))


def test_threshold_at_far_is_scipys_slinear_without_repeats():
    far = np.sort(np.random.default_rng(1).uniform(0, 0.01, 50))
    thresholds = np.arange(50) * 0.001
    for target in (far[0], 1e-3, far[10], 0.005, far[-1]):
        assert threshold_at_far(far, thresholds, target) == interp1d(far, thresholds, kind="slinear")(target)


def test_threshold_at_far_with_repeated_far_values():
    far = np.array([0, 0, 0, 0.0005, 0.0005, 0.0005, 0.002, 0.002, 0.004, 1.0])
    thresholds = np.arange(10) * 0.001
    # between the last 0.0005 (threshold 0.005) and the first 0.002 (threshold 0.006): 0.005 + 1/3 * 0.001
    assert threshold_at_far(far, thresholds, 1e-3) == pytest.approx(0.005 + 0.001 / 3, rel=1e-12)
    for target in (0.0, 0.0002, 0.0005, 0.0011, 0.003, 0.5):
        assert threshold_at_far(far, thresholds, target) == pytest.approx(
            reference_slinear(far, thresholds, target), rel=1e-12, abs=1e-15)


def test_numbers_equal_reference(case):
    _, _, ours, ref = case
    assert 0.75 < ours.acc_mean < 0.99 and 0.0 < ours.val < 1.0  # a case where thresholds and VAL matter
    np.testing.assert_array_equal(ours.accuracy, ref["accuracy"])
    np.testing.assert_array_equal(ours.best_thresholds, ref["best_thresholds"])
    assert ours.acc_mean == np.mean(ref["accuracy"]) and ours.acc_std == np.std(ref["accuracy"])
    assert (ours.val, ours.val_std, ours.far) == (ref["val"], ref["val_std"], ref["far"])
    np.testing.assert_allclose(ours.tpr, ref["tpr"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.fpr, ref["fpr"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ours.thresholds, np.arange(0, 4, 0.01))


def test_float32_embeddings_equal_reference():
    emb, issame = make_pairs(300, 0.8, seed=3)
    embeddings = normalize(emb).astype(np.float32)
    ours, ref = evaluate(embeddings, issame, nrof_folds=5), reference_evaluate(embeddings, issame, nrof_folds=5)
    np.testing.assert_array_equal(ours.accuracy, ref["accuracy"])
    assert (ours.val, ours.val_std, ours.far) == (ref["val"], ref["val_std"], ref["far"])


def test_uneven_small_folds_equal_reference():
    emb, issame = make_pairs(53, 0.8, seed=4)
    embeddings = normalize(emb)
    ours, ref = evaluate(embeddings, issame, nrof_folds=4), reference_evaluate(embeddings, issame, nrof_folds=4)
    assert ours.accuracy.shape == (4,)
    np.testing.assert_array_equal(ours.accuracy, ref["accuracy"])
    np.testing.assert_array_equal(ours.best_thresholds, ref["best_thresholds"])
    assert (ours.val, ours.val_std, ours.far) == (ref["val"], ref["val_std"], ref["far"])


def test_flip_result_and_lines_equal_reference(monkeypatch):
    emb, issame = make_pairs(1003, 0.6, seed=11)
    rng = np.random.default_rng(7)
    # flipped outputs with other norms: a sum of normalised vectors would differ from the raw sum
    emb_flip = emb * rng.uniform(0.1, 10.0, size=(emb.shape[0], 1)) + 0.3 * rng.normal(size=emb.shape)

    seen = []
    real_evaluate = verification.evaluate
    monkeypatch.setattr(verification, "evaluate", lambda e, s, n: seen.append(e) or real_evaluate(e, s, n))
    result = evaluate_embeddings(emb.astype(np.float32), emb_flip.astype(np.float32), issame)

    # insightface's test(): float64 copies, raw sum, then sklearn normalize; no-flip from emb alone
    emb64, flip64 = emb.astype(np.float32).astype(np.float64), emb_flip.astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(seen[0], normalize(emb64))
    np.testing.assert_array_equal(seen[1], normalize(emb64 + flip64))
    noflip, ref_flip = evaluate(seen[0], issame), reference_evaluate(seen[1], issame)  # noflip: proven above
    xnorm = 0.0
    for row in np.concatenate([emb64, flip64]):
        xnorm += np.linalg.norm(row)
    xnorm /= 2 * emb.shape[0]

    assert result.flip
    np.testing.assert_allclose(result.xnorm, xnorm, rtol=1e-12)
    np.testing.assert_array_equal(result.accuracy, ref_flip["accuracy"])
    assert (result.val, result.val_std, result.far) == (ref_flip["val"], ref_flip["val_std"], ref_flip["far"])
    assert (result.acc_noflip_mean, result.acc_noflip_std) == (noflip.acc_mean, noflip.acc_std)
    assert format_result("lfw", result).split("\n") == reference_lines(
        "lfw", xnorm, noflip.acc_mean, noflip.acc_std,
        np.mean(ref_flip["accuracy"]), np.std(ref_flip["accuracy"]), ref_flip["val"], ref_flip["val_std"],
        ref_flip["far"])


def test_without_flip_xnorm_is_over_emb_only_and_one_accuracy_line():
    emb, issame = make_pairs(40, 0.5, seed=5)
    result = evaluate_embeddings(emb, None, issame, nrof_folds=2)
    ref = reference_evaluate(normalize(emb), issame, nrof_folds=2)
    assert not result.flip and result.acc_noflip_mean is None
    np.testing.assert_allclose(result.xnorm, np.mean([np.linalg.norm(row) for row in emb]), rtol=1e-12)
    np.testing.assert_array_equal(result.accuracy, ref["accuracy"])
    lines = format_result("agedb_30", result, step=2000).split("\n")
    assert lines == ["[agedb_30][2000]XNorm: %f" % result.xnorm,
                     "[agedb_30][2000]Accuracy: %1.5f+-%1.5f" % (np.mean(ref["accuracy"]), np.std(ref["accuracy"])),
                     "[agedb_30][2000]Validation rate: %2.5f+-%2.5f @ FAR=%2.5f" % (ref["val"], ref["val_std"],
                                                                                   ref["far"])]


def test_emb_flip_of_other_shape_is_rejected():
    emb, issame = make_pairs(10, 0.5, seed=6)
    with pytest.raises(ValueError, match=r"emb_flip: expected the shape of emb \(20, 16\), got \(20, 8\)"):
        evaluate_embeddings(emb, emb[:, :8], issame, nrof_folds=2)


# ---- edge cases ----------------------------------------------------------------------------------------------------

def _pairs_at(dist_same, dist_diff, issame):
    """Unit embeddings [2N, 2] whose same / different pairs lie at the given squared distances (0..4)."""
    def partner(dist):
        cos = 1 - dist / 2
        return np.array([cos, np.sqrt(1 - cos * cos)])
    rows = []
    for same in issame:
        rows += [np.array([1.0, 0.0]), partner(dist_same if same else dist_diff)]
    return np.array(rows)


def test_perfect_separation_gives_accuracy_one_and_full_val():
    issame = np.arange(100) % 3 == 0
    embeddings = _pairs_at(0.0, 2.0005, issame)  # between two VAL thresholds, so FAR jumps 0 -> 1 past 2.0
    result = evaluate(embeddings, issame, nrof_folds=5)
    np.testing.assert_array_equal(result.accuracy, np.ones(5))
    assert (result.acc_mean, result.acc_std) == (1.0, 0.0)
    assert (result.val, result.far) == (1.0, 0.0)  # the FAR=1e-3 threshold is 2.0 + 1e-6
    ref = reference_evaluate(embeddings, issame, nrof_folds=5)
    np.testing.assert_array_equal(result.best_thresholds, ref["best_thresholds"])
    assert result.best_thresholds[0] == 0.01  # first threshold that accepts the identical pairs


def test_far_never_reaching_target_uses_threshold_zero():
    issame = np.arange(100) % 2 == 0
    embeddings = _pairs_at(0.0, 4.0, issame)  # opposite vectors: no threshold below 4 accepts a different pair
    result = evaluate(embeddings, issame, nrof_folds=5)
    assert result.acc_mean == 1.0
    assert (result.val, result.val_std, result.far) == (0.0, 0.0, 0.0)  # insightface's threshold 0.0 accepts nothing
    ref = reference_evaluate(embeddings, issame, nrof_folds=5)
    assert (result.val, result.far) == (ref["val"], ref["far"])


def test_constant_embeddings():
    issame = np.arange(30) % 3 == 0  # one third same: "all different" wins on every training part
    embeddings = np.tile(normalize(np.ones((1, 4))), (60, 1))
    result = evaluate(embeddings, issame, nrof_folds=3)
    ref = reference_evaluate(embeddings, issame, nrof_folds=3)
    np.testing.assert_array_equal(result.best_thresholds, [0.0, 0.0, 0.0])  # dist 0 is never < 0: all rejected
    np.testing.assert_array_equal(result.accuracy, ref["accuracy"])
    assert result.acc_mean == pytest.approx(2 / 3)
    assert (result.val, result.far) == (1.0, 1.0) == (ref["val"], ref["far"])
    np.testing.assert_allclose(result.tpr, ref["tpr"], rtol=0, atol=1e-12)


def test_issame_as_zero_one_integers_equals_booleans():
    emb, issame = make_pairs(50, 0.7, seed=8)
    embeddings = normalize(emb)
    as_bool, as_int = evaluate(embeddings, issame, 5), evaluate(embeddings, issame.astype(int).tolist(), 5)
    np.testing.assert_array_equal(as_bool.accuracy, as_int.accuracy)
    assert as_bool.summary() == as_int.summary()


@pytest.mark.parametrize("embeddings, issame, folds, message", [
    (np.zeros((7, 4)), [True] * 3, 2, r"embeddings: expected an even number of rows \[2N, dim\].*\(7, 4\)"),
    (np.zeros(8), [True] * 4, 2, r"embeddings: expected a 2-D array \[rows, dim\].*\(8,\)"),
    (np.zeros((8, 4), dtype=int), [True, False] * 2, 2, r"embeddings: expected a float array, got dtype int"),
    (np.zeros((8, 4)), [True, False] * 3, 2, r"issame: expected shape \(4,\).*got shape \(6,\)"),
    (np.zeros((8, 4)), [0, 1, 2, 0], 2, r"issame: expected booleans or 0/1 values"),
    (np.zeros((8, 4)), [True, False] * 2, 5, r"nrof_folds: expected an integer in \[1, 4\].*got 5"),
    (np.zeros((8, 4)), [True, False] * 2, 0, r"nrof_folds: expected an integer in \[1, 4\].*got 0"),
    (np.full((8, 4), np.nan), [True, False] * 2, 2, r"embeddings: contain NaN or inf"),
    (np.zeros((8, 4)), [True, True, False, False], 2, r"fold 0 of 2 has no same pairs in its training part"),
])
def test_bad_input_is_named(embeddings, issame, folds, message):
    with pytest.raises(ValueError, match=message):
        evaluate(embeddings, issame, folds)


def test_summary_holds_plain_floats():
    emb, issame = make_pairs(40, 0.5, seed=9)
    summary = evaluate_embeddings(emb, emb, issame, nrof_folds=2).summary()
    assert set(summary) == {"acc_mean", "acc_std", "val", "val_std", "far", "xnorm", "acc_noflip_mean",
                            "acc_noflip_std"}
    assert all(type(value) is float for value in summary.values())


# ---- ROC plot ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def noisy_result():
    emb, issame = make_pairs(200, 0.9, seed=12)
    return evaluate(normalize(emb), issame), issame


def test_roc_plot_writes_a_png_cv2_can_read(tmp_path, noisy_result):
    result, issame = noisy_result
    perfect = evaluate(_pairs_at(0.0, 2.0005, issame), issame)
    path = save_roc_plot({"noisy": result, "perfect": perfect}, tmp_path / "plots" / "roc.png", title="test")
    image = cv2.imread(str(path))
    assert path.stat().st_size > 1000
    assert image is not None and image.ndim == 3 and min(image.shape[:2]) > 100
    assert image.std() > 0  # something was drawn


def test_roc_figure_has_one_log_curve_per_set(noisy_result):
    result, _ = noisy_result
    figure = roc_figure({"a": result, "b": result})
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    assert [line.get_label() for line in axes.get_lines()] == [
        f"{name}  acc {result.acc_mean:.5f}+-{result.acc_std:.5f}" for name in "ab"]
    np.testing.assert_array_equal(axes.get_lines()[0].get_ydata(), result.tpr)


def test_roc_figure_needs_results():
    with pytest.raises(ValueError, match="results: expected at least one"):
        roc_figure({})
