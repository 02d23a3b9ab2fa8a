import os
import struct

import numpy as np
import pytest

from twinface.data.images import CorruptImageError, encode_image
from twinface.data.recordio import (MAGIC, InsightFaceRec, RecordIOError, RecordReader, RecordWriter, pack_record,
                                    unpack_record, write_insightface_rec)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _chunk(cflag, data):
    return struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data + b"\0" * (-len(data) % 4)


def _image(value):
    return encode_image(np.full((8, 8, 3), value, np.uint8), ".png")


def _write(path, records):
    with RecordWriter(path) as w:
        for key, record in records:
            w.write(key, record)


def test_pack_unpack_scalar_label():
    buf = pack_record(7.0, b"jpeg-bytes", id=3, id2=9)
    assert buf == struct.pack("<IfQQ", 0, 7.0, 3, 9) + b"jpeg-bytes"
    header, payload = unpack_record(buf)
    assert header == (0, 7.0, 3, 9) and payload == b"jpeg-bytes"


def test_pack_unpack_vector_label():
    buf = pack_record([4, 1.5], b"img", id=5)
    assert buf == struct.pack("<IfQQ", 2, 0.0, 5, 0) + np.float32([4, 1.5]).tobytes() + b"img"
    header, payload = unpack_record(buf)
    assert header.flag == 2 and header.id == 5 and payload == b"img"
    assert header.label.dtype == np.float32 and header.label.tolist() == [4.0, 1.5]


def test_pack_and_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="at least one value"):
        pack_record([], b"")
    with pytest.raises(ValueError, match="my.rec record 3.*shorter"):
        unpack_record(b"\0" * 10, "my.rec record 3")
    with pytest.raises(ValueError, match="3 float32 labels"):
        unpack_record(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)


def test_writer_reader_round_trip(tmp_path):
    rec = str(tmp_path / "a.rec")
    records = {5: b"x", 2: b"abcd" * 3, 9: b"", 1: b"hello world"}
    _write(rec, records.items())
    assert os.path.getsize(rec) % 4 == 0
    with open(rec, "rb") as f:  # first chunk: magic, cflag 0 | length 1, 'x', 3 padding bytes
        assert f.read(12) == MAGIC_BYTES + struct.pack("<I", 1) + b"x\0\0\0"
    lines = open(tmp_path / "a.idx").read().splitlines()
    assert lines == ["5\t0", "2\t12", "9\t32", "1\t40"]
    reader = RecordReader(rec)
    assert reader.keys == [5, 2, 9, 1]
    assert all(reader.read_idx(k) == v for k, v in records.items())
    assert list(reader) == list(records.values())
    with pytest.raises(ValueError, match=r"a.idx: no record with key 3"):
        reader.read_idx(3)


def test_writer_refuses_duplicate_keys_and_leaves_nothing_on_error(tmp_path):
    rec = tmp_path / "a.rec"
    with pytest.raises(ValueError, match="key 1 written twice"):
        with RecordWriter(rec) as w:
            w.write(1, b"a")
            assert not rec.exists()  # the final name appears only on close
            w.write(1, b"b")
    assert os.listdir(tmp_path) == []


def test_hand_written_split_record_is_joined(tmp_path):
    rec = tmp_path / "split.rec"
    parts = [b"head", b"middle!", b"tail"]
    rec.write_bytes(_chunk(0, b"before") + _chunk(1, parts[0]) + _chunk(2, parts[1]) + _chunk(3, parts[2])
                    + _chunk(0, b"after"))
    joined = MAGIC_BYTES.join(parts)
    assert list(RecordReader(rec)) == [b"before", joined, b"after"]
    (tmp_path / "split.idx").write_text(f"0\t0\n1\t16\n2\t{rec.stat().st_size - 16}\n")
    reader = RecordReader(rec)
    assert reader.read_idx(1) == joined and reader.read_idx(2) == b"after"


def test_writer_splits_on_aligned_magic_like_dmlc(tmp_path):
    rec = tmp_path / "m.rec"
    aligned = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ij"
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    _write(rec, [(0, aligned), (1, unaligned)])
    assert rec.read_bytes() == (_chunk(1, b"abcd") + _chunk(2, b"efgh") + _chunk(3, b"ij")
                                + _chunk(0, unaligned))
    reader = RecordReader(rec)
    assert reader.read_idx(0) == aligned and reader.read_idx(1) == unaligned
    assert list(reader) == [aligned, unaligned]


def test_sequential_read_without_idx(tmp_path):
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"one"), (1, b"two")])
    os.remove(tmp_path / "a.idx")
    reader = RecordReader(rec)
    assert list(reader) == [b"one", b"two"]
    with pytest.raises(FileNotFoundError, match="a.idx"):
        reader.read_idx(0)


def _expect_error(reader_call, path, offset):
    with pytest.raises(RecordIOError) as info:
        reader_call()
    assert info.value.path == str(path) and info.value.offset == offset
    assert str(path) in str(info.value) and f"byte offset {offset}" in str(info.value)
    return str(info.value)


def test_truncated_rec(tmp_path):
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"12345678"), (1, b"abcdefgh")])
    rec.write_bytes(rec.read_bytes()[:-3])
    assert "truncated" in _expect_error(lambda: list(RecordReader(rec)), rec, 16)
    assert "truncated" in _expect_error(lambda: RecordReader(rec).read_idx(1), rec, 16)
    rec.write_bytes(rec.read_bytes()[:20])  # cut inside the second chunk header
    assert "truncated" in _expect_error(lambda: list(RecordReader(rec)), rec, 16)


def test_bad_magic(tmp_path):
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"12345678"), (1, b"abcdefgh")])
    data = bytearray(rec.read_bytes())
    data[16:20] = b"JUNK"
    rec.write_bytes(bytes(data))
    assert "bad magic" in _expect_error(lambda: list(RecordReader(rec)), rec, 16)
    assert RecordReader(rec).read_idx(0) == b"12345678"


@pytest.mark.parametrize("line, problem", [
    ("1\t4096", "key 1 at byte offset 4096, outside .*a.rec \\(12 bytes\\)"),
    ("1\t8", "key 1 at byte offset 8, outside"),                 # a chunk header cannot start there
    ("1\t-4", "key 1 at byte offset -4, outside"),
    ("\t0", "expected 'key<TAB>offset' \\(two integers\\), got '\\\\t0'"),
    ("1", "expected 'key<TAB>offset'"),
    ("one\t0", "expected 'key<TAB>offset'"),
    ("1\t0.5", "expected 'key<TAB>offset'"),
])
def test_bad_idx_line_is_one_error_naming_file_and_line(tmp_path, line, problem):
    """Old code: an offset past the end or negative surfaced only when read (a negative one as a raw OSError
    from seek), and not with the .idx line."""
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"1234")])
    (tmp_path / "a.idx").write_text(f"0\t0\n{line}\n")
    with pytest.raises(ValueError, match=rf"a.idx: line 2: {problem}"):
        RecordReader(rec).keys


def test_idx_with_more_entries_than_the_rec_can_hold(tmp_path):
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"1234")])
    (tmp_path / "a.idx").write_text("".join(f"{k}\t0\n" for k in range(3)))
    with pytest.raises(ValueError, match=r"a.idx: line 2: more entries than .*a.rec \(12 bytes\) can hold"):
        RecordReader(rec).keys


def test_absurd_record_length_is_refused_before_reading(tmp_path, monkeypatch):
    """Old code read (allocated) the length a chunk header claims, up to 512 MiB, before noticing the file ends."""
    rec = tmp_path / "a.rec"
    rec.write_bytes(struct.pack("<II", MAGIC, (1 << 29) - 4) + b"tiny")
    reads = []
    reader = RecordReader(rec)
    real_read_chunks = reader._read_chunks

    def spy(f, offset):
        class Spy:
            def __getattr__(self, name):
                return getattr(f, name)

            def read(self, n=-1):
                reads.append(n)
                return f.read(n)
        return real_read_chunks(Spy(), offset)
    monkeypatch.setattr(reader, "_read_chunks", spy)
    assert "truncated: chunk holds 536870908 bytes" in _expect_error(lambda: list(reader), rec, 0)
    assert max(reads) <= 8


def test_malformed_idx_line(tmp_path):
    rec = tmp_path / "a.rec"
    _write(rec, [(0, b"x")])
    (tmp_path / "a.idx").write_text("0\t0\nbroken line\n")
    with pytest.raises(ValueError, match=r"a.idx: line 2"):
        RecordReader(rec).keys


def _samples():
    return [(0, _image(10)), (0, _image(11)), (1, _image(20)), (2, _image(30)), (2, _image(31)), (2, _image(32))]


def test_insightface_layout(tmp_path):
    prefix = str(tmp_path / "train")
    samples = _samples()
    assert write_insightface_rec(prefix, iter(samples)) == {"num_images": 6, "num_classes": 3}

    # Read it the way arcface_torch's MXFaceDataset does: record 0 -> image keys 1 .. label[0]-1.
    reader = RecordReader(prefix + ".rec")
    header0, payload0 = unpack_record(reader.read_idx(0))
    assert header0.flag == 2 and header0.label.tolist() == [7, 10] and payload0 == b""
    for key in range(1, int(header0.label[0])):
        header, payload = unpack_record(reader.read_idx(key))
        assert header.flag == 0 and header.id == key
        assert (header.label, payload) == samples[key - 1]
    identity_ranges = [unpack_record(reader.read_idx(k))[0].label.tolist() for k in range(7, 10)]
    assert identity_ranges == [[1, 3], [3, 4], [4, 7]]
    assert sorted(reader.keys) == list(range(10))

    rec = InsightFaceRec(prefix)
    assert len(rec) == 6 and rec.num_classes == 3 and rec.num_identity_records == 3
    assert rec.labels.dtype == np.int64 and rec.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert [rec.label(i) for i in range(6)] == [0, 0, 1, 2, 2, 2]
    assert all(rec.encoded(i) == samples[i][1] for i in range(6))
    assert rec.image(5).shape == (8, 8, 3) and np.all(rec.image(5) == 32)
    assert rec.source(2) == f"{prefix}.rec record 3"
    with pytest.raises(IndexError, match="index 6 out of range"):
        rec.encoded(6)


def test_insightface_rec_rejects_bad_label_order(tmp_path):
    with pytest.raises(ValueError, match="identity 0 reappears"):
        write_insightface_rec(tmp_path / "a", [(0, b"a"), (1, b"b"), (0, b"c")])
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        write_insightface_rec(tmp_path / "b", [(0, b"a"), (2, b"b")])
    with pytest.raises(ValueError, match="no samples"):
        write_insightface_rec(tmp_path / "c", [])
    assert os.listdir(tmp_path) == []


def test_plain_rec_without_header_record(tmp_path):
    """im2rec-style files: record 0 is an image, labels may be vectors whose first value is the class."""
    rec_path = tmp_path / "plain.rec"
    labels = [[1, 1], [0, 1], [2, 0], [1, 1]]
    _write(rec_path, [(k, pack_record(lab, _image(k), id=k)) for k, lab in enumerate(labels)])
    rec = InsightFaceRec(str(rec_path))  # ".rec" suffix accepted
    assert len(rec) == 4 and rec.num_identity_records is None
    assert rec.labels.tolist() == [1, 0, 2, 1] and rec.num_classes == 3
    assert rec.encoded(0) == _image(0)


def test_long_label_vector_and_split_record_labels(tmp_path):
    """Labels are read from a record's head; a long vector or a split record falls back to the full read."""
    rec_path = tmp_path / "x.rec"
    long_label = [1] + [0] * 20
    split_payload = b"abc\0" + MAGIC_BYTES * 3
    # id == MAGIC puts the magic inside the 24-byte header itself: the first chunk holds only 8 bytes of it.
    records = [pack_record(long_label, b"p"), pack_record(0.0, split_payload, id=MAGIC)]
    _write(rec_path, enumerate(records))
    assert rec_path.read_bytes()[len(_chunk(0, records[0])):][:16] == _chunk(1, records[1][:8])
    rec = InsightFaceRec(tmp_path / "x")
    assert rec.reader.read_head(1, 30) == records[1][:30]
    assert rec.labels.tolist() == [1, 0]
    assert rec.encoded(1) == split_payload


def test_corrupt_image_in_rec_names_record(tmp_path):
    write_insightface_rec(tmp_path / "t", [(0, _image(1)), (0, b"\xff\xd8\xff broken")])
    with pytest.raises(CorruptImageError, match=r"t.rec record 2"):
        InsightFaceRec(tmp_path / "t").image(1)
