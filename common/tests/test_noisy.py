"""Sub-center ArcFace's noise rule (twinface.noisy.noisy_samples) on constructed sub-centres and mislabelled samples."""
import numpy as np

from twinface.noisy import angle_report, noisy_samples


def _at(angle_deg, towards, away):
    """A unit vector at angle_deg from `towards`, turned towards `away` (orthonormal pair)."""
    a = np.radians(angle_deg)
    return np.cos(a) * towards + np.sin(a) * away


def test_mislabelled_samples_are_dropped_clean_ones_kept_with_the_reason():
    e = np.eye(8)
    # 3 classes x 3 sub-centres (class-major). Class c's samples gather at e[c] (sub-centre 0). Class 0's sub-centre
    # 1 has drawn in the samples of identity 5 mislabelled as class 0; class 1's sub-centres 1, 2 point elsewhere.
    centres = np.stack([e[0], e[5], e[6],  e[1], e[6], e[7],  e[2], _at(80, e[2], e[3]), e[7]]).reshape(3, 3, 8)
    samples, labels, mislabelled = [], [], []
    for c in range(3):
        for k, angle in enumerate([0, 10, 20, 30, 60, 70]):       # clean, up to 70 degrees from their centre
            samples.append(_at(angle, e[c], e[4]))
            labels.append(c)
    for identity, label in [(5, 0), (5, 0), (3, 1)]:              # two near class 0's noise sub-centre, one far off
        samples.append(_at(5, e[identity], e[4]))
        labels.append(label)
        mislabelled.append(len(samples) - 1)
    samples, labels = np.array(samples), np.array(labels)
    own = np.einsum("ne,nke->nk", samples, centres[labels])
    dropped, angle, nearest_dominant = noisy_samples(own, labels, 3, 75.0)
    assert np.flatnonzero(dropped).tolist() == mislabelled
    np.testing.assert_allclose(angle[:18], np.tile([0, 10, 20, 30, 60, 70], 3), atol=1e-6)
    assert nearest_dominant[mislabelled].tolist() == [False, False, True]     # the reasons told apart
    # a stricter threshold drops the 70-degree clean samples too
    assert np.flatnonzero(noisy_samples(own, labels, 3, 65.0)[0]).tolist() == [5, 11, 17] + mislabelled


def test_the_dominant_sub_centre_is_the_majority_s_not_the_nearest():
    # 2 samples nearest sub-centre 1, 1 sample nearest sub-centre 0: sub-centre 1 dominates, and the lone sample,
    # 90 degrees from it, is dropped although its own nearest sub-centre is at 0 degrees
    own = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.99]])
    dropped, angle, nearest_dominant = noisy_samples(own, np.zeros(3, np.int64), 1, 75.0)
    assert dropped.tolist() == [True, False, False] and nearest_dominant.tolist() == [False, True, True]
    assert angle[0] == 90.0
    # a tie in the votes goes to the lower sub-centre
    assert noisy_samples(np.array([[1.0, 0.0], [0.0, 1.0]]), np.zeros(2, np.int64), 1, 75.0)[0].tolist() == \
        [False, True]


def test_the_report_gives_percentiles_and_warns_when_most_would_go():
    angle = np.arange(100, dtype=float)
    report = angle_report(angle, angle > 75)
    assert report["angle to the dominant sub-centre (p50 / p90 / p99)"] == "49.5 / 89.1 / 98.0 degrees"
    assert "warning" not in report
    assert "60% of the samples are beyond the threshold" in angle_report(angle, angle > 39.5)["warning"]
