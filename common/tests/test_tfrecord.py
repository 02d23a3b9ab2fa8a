"""TFRecord data sets: conversions both ways, the record framing, damaged data and the index."""
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from twinface import config
from twinface.data import batches, convert, tfrecord
from twinface.data.dataset import TFRecordDataset, open_dataset
from twinface.data.images import encode_image
from twinface.data.recordio import InsightFaceRec
from twinface.data.sampler import EpochSampler, StreamSampler, sampler_for
from twinface.testing import tiny_dataset


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    return os.path.join(tiny_dataset(tmp_path_factory.mktemp("tiny")), "train")


@pytest.fixture(scope="module")
def tfr(rec, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("tfr") / "set")
    stats = convert.rec_to_tfrecord(rec, dst, shards=3, progress=False)
    assert stats["num_images"] == len(InsightFaceRec(rec)) and stats["num_shards"] == 3
    return dst


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.startswith("."):
                with open(os.path.join(folder, name), "rb") as f:
                    out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def test_rec_to_tfrecord_to_folder_gives_back_the_same_bytes_labels_and_order(rec, tfr, tmp_path):
    convert.rec_to_folder(rec, tmp_path / "from_rec", progress=False)
    convert.tfrecord_to_folder(tfr, tmp_path / "from_tfr", progress=False)
    from_rec, from_tfr = _tree(tmp_path / "from_rec"), _tree(tmp_path / "from_tfr")
    assert len(from_rec) == 36 and from_rec == from_tfr            # same names (label/index) and same bytes
    source, copy = InsightFaceRec(rec), open_dataset(tfr)
    assert np.array_equal(source.labels, copy.labels)
    assert all(source.encoded(i) == copy.encoded(i) for i in range(len(source)))


def test_records_are_dealt_round_robin_and_named_by_shard_record_and_offset(tfr):
    records = tfrecord.TFRecordSet(tfr)
    assert [os.path.basename(p) for p in records.shards] == tfrecord.shard_names(3)
    assert records.shard[:7].tolist() == [0, 1, 2, 0, 1, 2, 0]
    shard, k, offset = records.where(4)
    assert k == 1 and offset > 0 and records.source(4) == f"{shard} record 1 (byte offset {offset})"


def test_folder_to_tfrecord_keeps_identity_names_and_skips_unusable_images(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("alice", 2), ("bob", 3)):
        os.makedirs(tmp_path / "src" / name)
        for i in range(count):
            (tmp_path / "src" / name / f"{i}.png").write_bytes(
                encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), ".png"))
    (tmp_path / "src" / "bob" / "9.jpg").write_bytes(b"not a jpeg")
    stats = convert.folder_to_tfrecord(tmp_path / "src", tmp_path / "tfr", shards=2, progress=False)
    assert (stats["num_images"], stats["num_classes"], stats["num_skipped"]) == (5, 2, 1)
    assert stats["skipped"][0].endswith("9.jpg")
    convert.tfrecord_to_folder(tmp_path / "tfr", tmp_path / "back", progress=False)
    back = _tree(tmp_path / "back")
    assert sorted({os.path.dirname(k) for k in back}) == ["alice", "bob"]
    original = {k: v for k, v in _tree(tmp_path / "src").items() if not k.endswith("9.jpg")}
    assert sorted(back.values()) == sorted(original.values())


def test_records_are_tf_train_examples_with_the_documented_features(tfr):
    records = tfrecord.TFRecordSet(tfr)
    shard, _, offset = records.where(0)
    with open(shard, "rb") as f:
        data = tfrecord.read_framed(lambda n, at: os.pread(f.fileno(), n, at), shard, 0, offset)
    ex = tfrecord.Example()
    ex.ParseFromString(data)
    feature = ex.features.feature
    assert sorted(feature) == ["image/class/label", "image/encoded", "image/format", "image/height", "image/width"]
    assert feature["image/format"].bytes_list.value == [b"jpeg"]
    assert (feature["image/height"].int64_list.value, feature["image/width"].int64_list.value) == ([112], [112])


def test_framing_matches_the_tfrecord_specification():
    # masked CRC-32C of TensorFlow's lib/hash/crc32c.h, checked against the known CRC-32C of "123456789"
    crc = 0xE3069283
    expected = ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
    framed = tfrecord.frame(b"123456789")
    assert framed[:8] == struct.pack("<Q", 9) and framed[12:21] == b"123456789"
    assert struct.unpack("<I", framed[21:])[0] == expected


def _damage(tfr, tmp_path, how):
    """A copy of the data set with record 4 (shard 1, its record 1) damaged in one way."""
    dst = tmp_path / "damaged"
    subprocess.run(["cp", "-r", tfr, dst], check=True)
    records = tfrecord.TFRecordSet(dst)
    shard, _, offset = records.where(4)
    data = bytearray(open(shard, "rb").read())
    if how == "data":
        data[offset + 12 + 40] ^= 0x01
    elif how == "length":
        data[offset] ^= 0x01
    elif how == "missing-label":
        ex = tfrecord.Example()
        ex.features.feature["image/encoded"].bytes_list.value.append(b"x")
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        record = tfrecord.frame(ex.SerializeToString())
        data[offset:offset + 16 + length] = record
        index = dict(np.load(dst / tfrecord.INDEX))
        delta = len(record) - (16 + length)
        later = (index["shard"] == 1) & (index["offset"] > offset)
        index["offset"][later] += delta
        index["shard_bytes"][1] += delta
        np.savez(dst / tfrecord.INDEX, **index)
    open(shard, "wb").write(bytes(data))
    return dst, shard, offset


@pytest.mark.parametrize("how, problem", [("data", "data CRC mismatch"), ("length", "length CRC mismatch"),
                                          ("missing-label", "no 'image/class/label' feature")])
def test_a_damaged_record_stops_the_run_naming_shard_record_and_offset(tfr, tmp_path, how, problem):
    dst, shard, offset = _damage(tfr, tmp_path, how)
    dataset = open_dataset(dst)
    with pytest.raises(tfrecord.TFRecordError) as err:
        batches.load_sample(dataset, 4, False)
    assert str(err.value).startswith(f"{shard}: record 1 at byte offset {offset}: ") and problem in str(err.value)
    assert batches.load_sample(dataset, 3, False)[1] == dataset.labels[3]        # the others still read


def test_the_skip_switch_skips_and_counts_a_damaged_record(tfr, tmp_path, caplog):
    dst, shard, _ = _damage(tfr, tmp_path, "data")
    dataset = open_dataset(dst, damaged="skip")
    with caplog.at_level(logging.WARNING, "twinface.data"):
        image, label = batches.load_sample(dataset, 4, False)
    assert label == dataset.labels[5] and np.array_equal(image, dataset.image(5))    # the next readable sample
    assert "skipped an unusable image" in caplog.text and f"{shard}: record 1" in caplog.text


def test_a_truncated_shard_is_refused_at_open_and_found_by_a_scan(tfr, tmp_path):
    dst = tmp_path / "cut"
    subprocess.run(["cp", "-r", tfr, dst], check=True)
    shard = dst / tfrecord.shard_names(3)[2]
    size = os.path.getsize(shard)
    os.truncate(shard, size - 100)
    with pytest.raises(tfrecord.TFRecordError, match=rf"{shard}: record 11 at byte offset \d+: truncated: the shard is "
                                                     f"{size - 100} bytes, index.npz says {size}"):
        TFRecordDataset(dst)
    os.remove(dst / tfrecord.INDEX)
    with pytest.raises(tfrecord.TFRecordError, match=rf"{shard}: record 11 at byte offset \d+: truncated"):
        tfrecord.TFRecordSet(dst, progress=False)


def test_shards_from_another_writer_are_indexed_by_one_scan(tfr, tmp_path):
    dst = tmp_path / "foreign"
    os.makedirs(dst)
    for name in tfrecord.shard_names(3):             # shards only: as another tool would leave them
        subprocess.run(["cp", os.path.join(tfr, name), dst / name.replace("train", "faces")], check=True)
    scanned, ours = tfrecord.TFRecordSet(dst, progress=False), tfrecord.TFRecordSet(tfr)
    assert np.array_equal(scanned.labels[np.argsort(scanned.shard, kind="stable")],
                          ours.labels[np.argsort(ours.shard, kind="stable")])
    stats = tfrecord.write_index(dst, progress=False)
    assert stats["num_images"] == 36 and os.path.isfile(dst / tfrecord.INDEX)
    with pytest.raises(FileExistsError, match="--overwrite"):
        tfrecord.write_index(dst, progress=False)


def test_conversions_never_overwrite_without_the_flag_and_leave_nothing_when_they_fail(rec, tfr, tmp_path):
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.rec_to_tfrecord(rec, tfr, shards=2, progress=False)
    assert len(tfrecord.TFRecordSet(tfr).shards) == 3                     # untouched
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to replace it"):
        convert.rec_to_tfrecord(rec, tmp_path / "mine", shards=2, progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"

    def failing():
        yield 0, encode_image(np.zeros((8, 8, 3), np.uint8))
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        convert._write_tfrecord(tmp_path / "half", failing(), 2, "test", [], False)
    assert not os.path.exists(tmp_path / "half") and os.listdir(tmp_path) == ["mine"]


def test_rec_and_its_tfrecord_copy_give_the_same_samples_in_sampler_order(rec, tfr):
    """The sampler decides the order in common; both data sets hold the same records in the same order."""
    a, b = open_dataset(rec + ".rec"), open_dataset(tfr)
    sampler = EpochSampler(len(a), 8, seed=3)
    for idx, flips in sampler.batches(1):
        for i, f in zip(idx, flips):
            x, y = batches.load_sample(a, int(i), bool(f), 32), batches.load_sample(b, int(i), bool(f), 32)
            assert x[1] == y[1] and np.array_equal(x[0], y[0])


def test_the_common_reader_does_not_import_tensorflow(tfr):
    code = (f"import sys; from twinface.data.dataset import open_dataset; d = open_dataset({tfr!r}); d.image(0); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


SHARD_OF = np.arange(50) % 4              # 50 records dealt round robin: shards of 13, 13, 12, 12


def test_the_stream_sampler_reads_shards_in_turn_and_permutes_windows():
    s = StreamSampler(SHARD_OF, 8, 7, seed=1)
    shards, stream, perms, flips = s.plan(0)
    assert sorted(shards) == [0, 1, 2, 3] and sorted(stream) == list(range(50))
    first_round = stream[:4]
    assert SHARD_OF[first_round].tolist() == shards.tolist()      # one record of each shard, in the drawn order
    assert [len(p) for p in perms] == [7] * 7 + [1]
    order, flips = s.epoch_order(0)
    assert s.steps_per_epoch() == 6 and len(order) == len(flips) == 48
    for k in range(6):                    # every window holds the same records as the stream slice it permutes
        assert sorted(order[7 * k:7 * k + 7]) == sorted(stream[7 * k:7 * k + 7])
    again = StreamSampler(SHARD_OF, 8, 7, seed=1)
    assert np.array_equal(again.epoch_order(0)[0], order) and not np.array_equal(s.epoch_order(1)[0], order)
    batches = list(s.batches(0, start_step=4))
    assert len(batches) == 2 and np.array_equal(batches[0][0], order[32:40])


def test_stream_ranks_own_disjoint_shards_and_run_the_same_number_of_steps():
    ranks = [StreamSampler(SHARD_OF, 8, 5, seed=0, rank=r, world_size=2) for r in range(2)]
    orders = [r.epoch_order(3)[0] for r in ranks]
    assert set(SHARD_OF[orders[0]]) == {0, 2} and set(SHARD_OF[orders[1]]) == {1, 3}
    assert ranks[0].steps_per_epoch() == ranks[1].steps_per_epoch() == 3            # 24 // 8 (25 on rank 0)
    with pytest.raises(ValueError, match="4 shard.s. cannot give each of 5 ranks its own; write the data set with "
                                         "--shards"):
        StreamSampler(SHARD_OF, 8, 5, world_size=5)
    with pytest.raises(ValueError, match="rank 1 holds 12 records, fewer than one batch of 16"):
        StreamSampler(np.arange(25) % 2, 16, 5, rank=0, world_size=2)


def test_the_config_picks_the_stream_sampler_only_for_tfrecord(tfr):
    cfg = config.from_dict({"data": {"source": "tfrecord", "path": tfr, "sampler": "stream", "stream_window": 5},
                            "train": {"batch_size": 4}})
    sampler = sampler_for(cfg, open_dataset(tfr))
    assert isinstance(sampler, StreamSampler) and sampler.window == 5
    with pytest.raises(config.ConfigError, match="data.sampler' is stream, which reads TFRecord shards in turn; it "
                                                 "needs data.source tfrecord, not rec"):
        config.from_dict({"data": {"source": "rec", "sampler": "stream"}})


def test_source_tfrecord_refuses_another_format(rec):
    from twinface.trainer import prepare_data
    cfg = config.from_dict({"data": {"source": "tfrecord", "path": os.path.dirname(rec)}})
    with pytest.raises(ValueError, match="data.source' is tfrecord, but .* holds no .tfrecord shards "
                                         r"\(it reads as RecDataset\)"):
        prepare_data(cfg)


def _rewrite_index(root, **arrays):
    path = os.path.join(root, tfrecord.INDEX)
    with np.load(path) as z:
        index = {k: z[k] for k in z.files}
    np.savez(path, **{**index, **arrays})


def _copy(tfr, dst):
    subprocess.run(["cp", "-r", tfr, dst], check=True)
    return dst


@pytest.mark.parametrize("names", [["../../escaped"] + [f"id{i}" for i in range(5)], ["a"] * 6, ["."] + list("bcdef"),
                                   list("abc")])
def test_class_names_in_the_index_must_be_folder_names_one_per_identity(tfr, tmp_path, names):
    dst = _copy(tfr, tmp_path / "set")
    _rewrite_index(dst, class_names=np.array(names))
    with pytest.raises(ValueError, match="class_names must be unique folder names"):
        convert.tfrecord_to_folder(dst, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path.parent / "escaped")


def test_offsets_out_of_file_order_are_refused(tfr, tmp_path):
    dst = _copy(tfr, tmp_path / "set")
    records = tfrecord.TFRecordSet(dst)
    offset, label = records.offset.copy(), records.labels.copy()
    offset[[0, 3]], label[[0, 3]] = offset[[3, 0]], label[[3, 0]]     # records 0 and 3: shard 0, swapped
    _rewrite_index(dst, offset=offset, label=label)
    with pytest.raises(ValueError, match="record offsets do not follow each other through their shards"):
        open_dataset(dst)


def test_an_identity_without_usable_images_keeps_its_label_as_in_the_rec(tmp_path):
    rng = np.random.default_rng(1)
    samples = [(label, encode_image(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))) for label in (0, 0, 2, 2)]
    samples[2:2] = [(1, b"garbage"), (1, b"garbage too")]
    from twinface.data.recordio import write_insightface_rec
    write_insightface_rec(str(tmp_path / "gap"), samples)
    stats = convert.rec_to_tfrecord(tmp_path / "gap", tmp_path / "tfr", shards=2, progress=False)
    assert (stats["num_images"], stats["num_classes"], stats["num_skipped"]) == (4, 3, 2)
    dataset = open_dataset(tmp_path / "tfr")
    assert dataset.num_classes == InsightFaceRec(tmp_path / "gap").num_classes == 3
    assert dataset.labels.tolist() == [0, 0, 2, 2]
    assert convert.tfrecord_to_folder(tmp_path / "tfr", tmp_path / "back", progress=False)["num_images"] == 4


def test_a_truncated_shard_is_named_by_its_first_lost_record_and_skipped_on_request(tfr, tmp_path, caplog):
    dst = _copy(tfr, tmp_path / "set")
    records = tfrecord.TFRecordSet(dst)
    shard, k, offset = records.where(7)                      # shard 1, its record 2 of 4
    os.truncate(shard, offset + 20)
    with pytest.raises(tfrecord.TFRecordError, match=f"{shard}: record {k} at byte offset {offset}: truncated: "
                                                     "the shard is"):
        open_dataset(dst)
    with caplog.at_level(logging.WARNING, "twinface.data"):
        dataset = open_dataset(dst, damaged="skip")
    assert "will be skipped (data.damaged_records: skip)" in caplog.text
    image, label = batches.load_sample(dataset, 7, False)
    assert label == dataset.labels[8]                        # 7 (cut off) and later records of shard 1 are skipped
    assert batches.load_sample(dataset, 4, False)[1] == dataset.labels[4]


def test_a_read_failure_of_the_storage_stops_the_run_naming_the_record(tfr, monkeypatch):
    import errno
    dataset = open_dataset(tfr)

    def failing(fd, n, at):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(tfrecord.os, "pread", failing)
    shard, k, offset = dataset.set.where(5)
    with pytest.raises(tfrecord.TFRecordError, match=f"{shard}: record {k} at byte offset {offset}: cannot read: "
                                                     "Input/output error"):
        batches.load_sample(dataset, 5, False)


def test_reindexing_keeps_identity_names_and_the_writers_numbering(tmp_path):
    for name, count in (("alice", 3), ("bob", 3), ("carol", 2)):
        os.makedirs(tmp_path / "src" / name)
        for i in range(count):
            (tmp_path / "src" / name / f"{i}.png").write_bytes(encode_image(np.full((8, 8, 3), 30 * i, np.uint8), ".png"))
    convert.folder_to_tfrecord(tmp_path / "src", tmp_path / "tfr", shards=3, progress=False)
    before = tfrecord.TFRecordSet(tmp_path / "tfr")
    tfrecord.write_index(tmp_path / "tfr", overwrite=True, progress=False)
    after = tfrecord.TFRecordSet(tmp_path / "tfr")
    assert after.class_names == before.class_names == ["alice", "bob", "carol"]
    assert np.array_equal(after.labels, before.labels) and np.array_equal(after.offset, before.offset)


def test_more_shards_than_the_process_may_open_is_a_clear_error(rec, tmp_path):
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100)); "
            "from twinface.data.convert import rec_to_tfrecord; "
            f"rec_to_tfrecord({rec!r}, {str(tmp_path / 'many')!r}, shards=200, progress=False)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 1 and "writing 200 shards needs 200 open files, but this process may open at most 100" \
        in run.stderr
    assert os.listdir(tmp_path) == []                                    # its temporary directory is gone
