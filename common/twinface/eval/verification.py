"""The verification protocol of insightface (arcface_torch eval/verification.py), number for number.

Pairs are rows 2i and 2i+1 of L2-normalised embeddings; distance is the squared L2 distance (0..4) and a pair is
predicted "same" when distance < threshold. Folds are contiguous (sklearn KFold without shuffle). Per fold, the
threshold with the first best training accuracy is applied to the held-out fold; VAL is the true accept rate at
the threshold where the training FAR is 1e-3. Counts come from sorted distances (searchsorted) instead of one
pass per threshold, which gives the same integers and therefore the same floats.
"""
from dataclasses import dataclass

import numpy as np
from scipy.interpolate import BSpline

from twinface.eval.embeddings import l2_normalize, pair_embeddings

ROC_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3


@dataclass
class VerificationResult:
    accuracy: np.ndarray          # held-out accuracy of each fold
    acc_mean: float
    acc_std: float
    best_thresholds: np.ndarray   # threshold chosen on the training part of each fold
    thresholds: np.ndarray        # ROC thresholds
    tpr: np.ndarray               # held-out TPR per ROC threshold, mean over folds
    fpr: np.ndarray
    val: float                    # VAL (TAR) at FAR=1e-3, mean over folds
    val_std: float
    far: float                    # FAR actually reached on the held-out folds, mean
    xnorm: float | None = None    # mean norm of the raw embeddings, when evaluate_embeddings saw them
    flip: bool = False            # embeddings are emb(img) + emb(flipped img)
    acc_noflip_mean: float | None = None
    acc_noflip_std: float | None = None

    def summary(self) -> dict:
        """The scalar results as plain floats (for logs, JSON, TensorBoard scalars)."""
        out = {"acc_mean": self.acc_mean, "acc_std": self.acc_std,
               "val": self.val, "val_std": self.val_std, "far": self.far}
        if self.xnorm is not None:
            out["xnorm"] = self.xnorm
        if self.acc_noflip_mean is not None:
            out["acc_noflip_mean"] = self.acc_noflip_mean
            out["acc_noflip_std"] = self.acc_noflip_std
        return out

    def __str__(self) -> str:
        return ", ".join(f"{key} {value:.5f}" for key, value in self.summary().items())


def kfold_splits(nrof_pairs: int, nrof_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices as sklearn KFold(nrof_folds, shuffle=False); one fold means train = test = all."""
    indices = np.arange(nrof_pairs)
    if nrof_folds == 1:
        return [(indices, indices)]
    sizes = np.full(nrof_folds, nrof_pairs // nrof_folds)
    sizes[:nrof_pairs % nrof_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(np.concatenate([indices[:start], indices[stop:]]), indices[start:stop])
            for start, stop in zip(bounds[:-1], bounds[1:])]


def _accept_counts(dist, issame, thresholds):
    """Per threshold: same pairs accepted (TP), different pairs accepted (FP); plus the class sizes."""
    same, diff = np.sort(dist[issame]), np.sort(dist[~issame])
    tp = np.searchsorted(same, thresholds, side="left")  # side="left" counts dist < t, strictly
    fp = np.searchsorted(diff, thresholds, side="left")
    return tp, fp, same.size, diff.size


def calculate_roc(dist, issame, folds):
    """Held-out accuracy per fold at the best training threshold, and the ROC averaged over folds."""
    thresholds = ROC_THRESHOLDS
    tprs = np.zeros((len(folds), thresholds.size))
    fprs = np.zeros((len(folds), thresholds.size))
    accuracy = np.zeros(len(folds))
    best_thresholds = np.zeros(len(folds))
    for fold, (train, test) in enumerate(folds):
        tp, fp, _, n_diff = _accept_counts(dist[train], issame[train], thresholds)
        best = np.argmax(tp + (n_diff - fp))  # first maximum, as np.argmax over the accuracies
        best_thresholds[fold] = thresholds[best]
        tp, fp, n_same, n_diff = _accept_counts(dist[test], issame[test], thresholds)
        tprs[fold] = tp / n_same if n_same else 0.0
        fprs[fold] = fp / n_diff if n_diff else 0.0
        accuracy[fold] = (tp[best] + n_diff - fp[best]) / test.size
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best_thresholds


def threshold_at_far(far, thresholds, far_target=FAR_TARGET) -> float:
    """Threshold at which the non-decreasing FAR curve far(thresholds) reaches far_target.

    insightface calls interp1d(far, thresholds, kind='slinear'), which in scipy <= 1.8 is the degree-1 B-spline
    with knots [far[0], far..., far[-1]]: the line from the last point with far <= target to the first with
    far > target. Newer scipy refuses the repeated FAR values every such curve has (scipy PR #16780,
    insightface issues #2152 and #2290), so the same spline is built here directly.
    """
    return float(BSpline(np.r_[far[0], far, far[-1]], thresholds, 1)(far_target))


def calculate_val(dist, issame, folds):
    """VAL and FAR on the held-out folds at the threshold where the training FAR reaches 1e-3."""
    val = np.zeros(len(folds))
    far = np.zeros(len(folds))
    for fold, (train, test) in enumerate(folds):
        _, fp, _, n_diff = _accept_counts(dist[train], issame[train], VAL_THRESHOLDS)
        far_train = fp / n_diff
        threshold = threshold_at_far(far_train, VAL_THRESHOLDS) if np.max(far_train) >= FAR_TARGET else 0.0
        accepted = dist[test] < threshold
        val[fold] = np.sum(accepted & issame[test]) / np.sum(issame[test])
        far[fold] = np.sum(accepted & ~issame[test]) / np.sum(~issame[test])
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


def _check_issame(issame, nrof_pairs: int) -> np.ndarray:
    issame = np.asarray(issame)
    if issame.ndim != 1 or issame.size != nrof_pairs:
        raise ValueError(f"issame: expected shape ({nrof_pairs},), one flag per pair of embedding rows, "
                         f"got shape {issame.shape}")
    if issame.dtype != bool:
        if not np.issubdtype(issame.dtype, np.number) or not np.isin(issame, (0, 1)).all():
            raise ValueError(f"issame: expected booleans or 0/1 values, got dtype {issame.dtype}")
        issame = issame.astype(bool)
    return issame


def _check_folds(issame: np.ndarray, nrof_folds: int) -> list:
    if isinstance(nrof_folds, bool) or not isinstance(nrof_folds, (int, np.integer)) \
            or not 1 <= nrof_folds <= issame.size:
        raise ValueError(f"nrof_folds: expected an integer in [1, {issame.size}] (number of pairs), got {nrof_folds!r}")
    folds = kfold_splits(issame.size, nrof_folds)
    # insightface divides by these class sizes in VAL/FAR and stops with ZeroDivisionError; say why instead
    for fold, (train, test) in enumerate(folds):
        for part, indices in (("training", train), ("held-out", test)):
            for kind, count in (("same", issame[indices].sum()), ("different", (~issame[indices]).sum())):
                if count == 0:
                    raise ValueError(f"issame: fold {fold} of {nrof_folds} has no {kind} pairs in its {part} part, "
                                     f"so VAL/FAR is undefined; use fewer folds or interleave same and different pairs")
    return folds


def evaluate(embeddings, issame, nrof_folds: int = 10) -> VerificationResult:
    """10-fold verification of L2-normalised embeddings [2N, dim] (pair i = rows 2i, 2i+1) against issame [N]."""
    embeddings1, embeddings2 = pair_embeddings(embeddings)
    if not np.issubdtype(embeddings1.dtype, np.floating):
        raise ValueError(f"embeddings: expected a float array, got dtype {embeddings1.dtype}")
    if not np.isfinite(embeddings1).all() or not np.isfinite(embeddings2).all():
        raise ValueError("embeddings: contain NaN or inf (a diverged model?)")
    issame = _check_issame(issame, embeddings1.shape[0])
    folds = _check_folds(issame, nrof_folds)
    # same expression and dtype as insightface, then widened exactly: thresholds are float64 in its comparisons
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1).astype(np.float64)
    tpr, fpr, accuracy, best_thresholds = calculate_roc(dist, issame, folds)
    val, val_std, far = calculate_val(dist, issame, folds)
    return VerificationResult(accuracy=accuracy, acc_mean=float(np.mean(accuracy)), acc_std=float(np.std(accuracy)),
                              best_thresholds=best_thresholds, thresholds=ROC_THRESHOLDS.copy(), tpr=tpr, fpr=fpr,
                              val=val, val_std=val_std, far=far)


def evaluate_embeddings(emb, emb_flip, issame, nrof_folds: int = 10) -> VerificationResult:
    """insightface's test(): raw model outputs in, XNorm, flip sum, L2 normalisation, then evaluate.

    emb and emb_flip are the raw embeddings [2N, dim] of the images and of their horizontal flips (emb_flip may
    be None). The result is that of emb + emb_flip when flipped embeddings are given, with the no-flip accuracy
    alongside; else that of emb alone.
    """
    pair_embeddings(emb)  # shape check [2N, dim], before the cast can fail less clearly
    # insightface collects outputs in float64 arrays before any arithmetic
    emb = np.asarray(emb, dtype=np.float64)
    raw = [emb]
    if emb_flip is not None:
        emb_flip = np.asarray(emb_flip, dtype=np.float64)
        if emb_flip.shape != emb.shape:
            raise ValueError(f"emb_flip: expected the shape of emb {emb.shape}, got {emb_flip.shape}")
        raw.append(emb_flip)
    xnorm = float(np.mean(np.linalg.norm(np.concatenate(raw), axis=1)))
    noflip = evaluate(l2_normalize(emb), issame, nrof_folds)
    if emb_flip is None:
        noflip.xnorm = xnorm
        return noflip
    result = evaluate(l2_normalize(emb + emb_flip), issame, nrof_folds)
    result.xnorm, result.flip = xnorm, True
    result.acc_noflip_mean, result.acc_noflip_std = noflip.acc_mean, noflip.acc_std
    return result


def format_result(name: str, result: VerificationResult, step: int | None = None) -> str:
    """The lines insightface logs, joined by newlines (its format strings; `step` adds arcface_torch's
    [global_step]), plus VAL@FAR."""
    tag = f"[{name}]" if step is None else "[%s][%d]" % (name, step)
    lines = []
    if result.xnorm is not None:
        lines.append("%sXNorm: %f" % (tag, result.xnorm))
    if result.flip:
        if result.acc_noflip_mean is not None:
            lines.append("%sAccuracy: %1.5f+-%1.5f" % (tag, result.acc_noflip_mean, result.acc_noflip_std))
        lines.append("%sAccuracy-Flip: %1.5f+-%1.5f" % (tag, result.acc_mean, result.acc_std))
    else:
        lines.append("%sAccuracy: %1.5f+-%1.5f" % (tag, result.acc_mean, result.acc_std))
    # facenet's wording (insightface's file derives from it); insightface computes VAL but does not print it
    lines.append("%sValidation rate: %2.5f+-%2.5f @ FAR=%2.5f" % (tag, result.val, result.val_std, result.far))
    return "\n".join(lines)
