import cv2
import numpy as np
import pytest

from twinface import align
from twinface.data import transforms
from twinface.data.sampler import EpochSampler


def test_sampler_is_deterministic_and_covers_each_sample_once_per_epoch():
    s = EpochSampler(103, 10, seed=7)
    batches = list(s.batches(0))
    assert len(batches) == s.steps_per_epoch() == 10
    idx = np.concatenate([b for b, _ in batches])
    assert len(set(idx.tolist())) == 100                       # drop_last: 3 left out, no repeats
    again = list(EpochSampler(103, 10, seed=7).batches(0))
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(batches, again))
    other_epoch = np.concatenate([b for b, _ in s.batches(1)])
    assert not (other_epoch == idx).all()
    flips = np.concatenate([f for _, f in batches])
    assert 0.3 < flips.mean() < 0.7
    assert not np.concatenate([f for _, f in EpochSampler(103, 10, flip=False).batches(0)]).any()


def test_sampler_shards_disjointly_and_resumes_mid_epoch():
    full = EpochSampler(100, 5, seed=3)
    shards = [EpochSampler(100, 5, seed=3, rank=r, world_size=4) for r in range(4)]
    seen = np.concatenate([b for s in shards for b, _ in s.batches(2)])
    assert sorted(seen.tolist()) == sorted(np.concatenate([b for b, _ in full.batches(2)]).tolist())
    rest = list(full.batches(2, start_step=3))
    assert (rest[0][0] == list(full.batches(2))[3][0]).all() and len(rest) == full.steps_per_epoch() - 3


def test_sampler_errors_are_clear():
    with pytest.raises(ValueError, match="cannot fill one batch"):
        EpochSampler(10, 64)
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0, 1)


def test_to_model_input_layouts_and_range():
    imgs = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    nchw = transforms.to_model_input(imgs, "NCHW")
    nhwc = transforms.to_model_input(imgs, "NHWC")
    assert nchw.shape == (2, 3, 4, 5) and nchw.dtype == np.float32
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), nhwc)
    assert transforms.to_model_input(np.array([[[[0, 255, 127]]]], np.uint8), "NHWC").tolist() == \
        [[[[-1.0, 1.0, -0.003921568859368563]]]]
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        transforms.to_model_input(imgs[0])
    flipped = transforms.apply_flips(imgs, np.array([True, False]))
    np.testing.assert_array_equal(flipped[0], imgs[0][:, ::-1])
    np.testing.assert_array_equal(flipped[1], imgs[1])


def test_similarity_transform_recovers_a_known_warp_and_aligns():
    angle, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = align.ARCFACE_TEMPLATE.astype(np.float64)
    dst = src @ (scale * rot).T + t
    m = align.similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-5)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-4)
    # a white dot at each landmark in a big image ends up on the template after alignment
    big = np.zeros((300, 300, 3), np.uint8)
    pts = align.ARCFACE_TEMPLATE * 2.0 + 40
    for x, y in pts:
        big[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2] = 255
    out = align.norm_crop(big, pts)
    assert out.shape == (112, 112, 3)
    for x, y in align.ARCFACE_TEMPLATE:
        assert out[int(round(y)), int(round(x))].max() > 100
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align.norm_crop(big, pts[:4])


def _least_squares_similarity(src, dst):
    """The same fit by hand: x' = a x - b y + tx, y' = b x + a y + ty, linear least squares in (a, b, tx, ty)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("size", [112, 224, 128, 256, 96])
def test_estimate_norm_matches_a_hand_solved_least_squares_fit(size):
    rng = np.random.default_rng(size)
    angle = 0.4
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    photo_points = align.ARCFACE_TEMPLATE @ (2.3 * rot).T + [300.0, 120.0] + rng.normal(0, 1.5, (5, 2))
    m = align.estimate_norm(photo_points, size)
    expected_template = (align.ARCFACE_TEMPLATE.astype(np.float64) * size / 112.0 if size % 112 == 0
                         else align.ARCFACE_TEMPLATE.astype(np.float64) * size / 128.0 + [8.0 * size / 128.0, 0.0])
    np.testing.assert_allclose(align.template(size), expected_template, rtol=1e-6)
    expected_template = align.template(size).astype(np.float64)
    np.testing.assert_allclose(m, _least_squares_similarity(photo_points, expected_template), atol=1e-9)


def test_norm_crop_on_exact_template_points_is_insightfaces_warp():
    # points already on the 128 template: identity warp, so the crop is the image's top-left 128 x 128
    image = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    m = align.estimate_norm(align.template(128), 128)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    np.testing.assert_array_equal(align.norm_crop(image, align.template(128), 128), image[:128, :128])
    # 112 template points taken to 224: a pure 2x zoom, the same pixels cv2.warpAffine gives for that matrix
    out = align.norm_crop(image, align.template(112), 224)
    np.testing.assert_array_equal(out, cv2.warpAffine(image, np.array([[2.0, 0, 0], [0, 2.0, 0]]), (224, 224)))
    with pytest.raises(ValueError, match="finite"):
        align.estimate_norm(np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="all at one point"):
        align.estimate_norm(np.full((5, 2), 40.0))


def test_estimate_norm_never_mirrors_a_mirrored_face():
    """Landmarks of a mirrored face (left and right swapped in x): the best *similarity* has no reflection, so the
    fit is the hand-solved least squares among rotations, not an exact mirror."""
    mirrored = align.ARCFACE_TEMPLATE.astype(np.float64) * [-1.0, 1.0] + [200.0, 0.0]
    m = align.estimate_norm(mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, _least_squares_similarity(mirrored, align.template(112).astype(np.float64)),
                               atol=1e-9)
