"""Labels and headers of a .rec are claims: checked against the .idx, the identity records and each other."""
import numpy as np
import pytest

from twinface.data.dataset import RecDataset
from twinface.data.images import encode_image
from twinface.data.recordio import InsightFaceRec, RecordWriter, pack_record

IMAGE = encode_image(np.zeros((8, 8, 3), np.uint8), ".png")


def _rec(tmp_path, labels, header=None, identities=None, skip_keys=()):
    """An insightface-layout .rec: image keys 1..N with `labels`, then the header and identity records (by
    default the consistent ones); `header=False` writes a plain .rec without them."""
    prefix = tmp_path / "train"
    n, classes = len(labels), (max(labels) + 1 if labels else 0)
    with RecordWriter(f"{prefix}.rec") as writer:
        for key, label in enumerate(labels, 1):
            if key not in skip_keys:
                writer.write(key, pack_record(float(label), IMAGE, id=key))
        if header is False:
            return prefix
        writer.write(0, pack_record(header or [n + 1, n + 1 + classes], b""))
        ranges = identities or [[1 + labels.index(c), 1 + n - labels[::-1].index(c)] for c in range(classes)]
        for c, span in enumerate(ranges):
            writer.write(n + 1 + c, pack_record(span, b""))
    return prefix


def test_consistent_rec_passes(tmp_path):
    rec = InsightFaceRec(_rec(tmp_path, [0, 0, 1, 2]))
    assert rec.labels.tolist() == [0, 0, 1, 2] and rec.num_classes == 3


def test_header_claiming_far_more_records_than_the_idx_lists(tmp_path):
    """Old code: np.arange over the claimed keys (1e9 of them took 7.8 GB), then a KeyError. Here 1e7."""
    prefix = _rec(tmp_path, [0, 1], header=[1e7, 1e7 + 5])
    with pytest.raises(ValueError, match=r"train.rec record 0 \(header\): claims 9999999 images and 5 identities "
                                         r"\(keys up to 10000004\), but .*train.idx lists only 5 records"):
        InsightFaceRec(prefix)


def test_header_naming_a_record_the_idx_lacks(tmp_path):
    prefix = _rec(tmp_path, [0, 0, 1, 1], skip_keys=(3,))
    with open(f"{prefix}.idx", "a") as f:     # keep the count right: an extra key instead of 3
        f.write("99\t0\n")
    with pytest.raises(ValueError, match=r"record 0 \(header\): image record 3 is not in .*train.idx"):
        InsightFaceRec(prefix)


@pytest.mark.parametrize("header", [[float("nan"), 4.0], [3.5, 4.0], [0.0, 4.0], [4.0, 3.0]])
def test_header_that_is_no_key_range(tmp_path, header):
    with pytest.raises(ValueError, match=r"record 0 \(header\): label .* is not \[first identity key, end key\]"):
        InsightFaceRec(_rec(tmp_path, [0, 1], header=header))


def test_label_beyond_the_header_identities_is_refused(tmp_path):
    """Old code: one image labelled 2,000,000 in a 20-identity .rec trained with 2,000,001 classes."""
    labels = list(range(20)) + [2_000_000]
    prefix = _rec(tmp_path, labels, header=[22, 42], identities=[[1 + c, 2 + c] for c in range(20)])
    dataset = RecDataset(prefix)
    message = r"train.rec record 21: label 2000000, but the header \(record 0\) declares 20 identities"
    with pytest.raises(ValueError, match=message):
        dataset.num_classes
    with pytest.raises(ValueError, match=message):           # the read rec2folder makes
        dataset.rec.record(20)


def test_plain_rec_labels_must_not_leave_gaps(tmp_path):
    """Without a header the class count is max + 1: a stray label would make a head of millions of classes."""
    prefix = _rec(tmp_path, [0, 1, 2_000_000, 1], header=False)
    with pytest.raises(ValueError, match=r"train.rec: labels run up to 2000000 \(record 3\) but only 3 of classes "
                                         r"0..2000000 have images"):
        RecDataset(prefix).num_classes
    (tmp_path / "big").mkdir()
    prefix = _rec(tmp_path / "big", [0, 2 ** 100], header=False)       # exact in float32, not in int64
    with pytest.raises(ValueError, match=r"train.rec record 2: label 1.26.*e\+30 is not a class index \(an integer "
                                         r"in 0..2147483647\)"):
        RecDataset(prefix).num_classes


def test_identity_records_are_checked(tmp_path, caplog):
    prefix = _rec(tmp_path, [0, 0, 1, 1], identities=[[1, 2], [2, 5]])     # image 2 listed under identity 1
    with caplog.at_level("WARNING", "twinface.data"):
        assert InsightFaceRec(prefix).labels.tolist() == [0, 0, 1, 1]
    assert "train.rec: 1 images lie in another identity's range than their label says, e.g. record 2" in caplog.text
    (tmp_path / "x").mkdir()
    prefix = _rec(tmp_path / "x", [0, 1], identities=[[1, 2], [2, 9]])                # range past the images
    with pytest.raises(ValueError, match=r"train.rec record 4 \(identity 1\): label \[2.0, 9.0\] is not an image "
                                         r"key range \[start, end\) within 1..3"):
        InsightFaceRec(prefix).labels
