"""TFRecord face data sets, read and written without TensorFlow (docs/data.md has the schema).

A data set is a directory of shards `train-00000-of-00004.tfrecord` ... and `index.npz`. Each record is a
tf.train.Example: image/encoded (the image file's bytes, never re-encoded), image/format, image/class/label,
image/height, image/width and optionally image/landmarks (10 floats: five x, y pairs in image pixels).
Record i of the data set sits in shard i % S, so ranks that stream disjoint shards still see every identity.
The index holds, per record, its shard, byte offset and label (20 bytes a record: memory stays that of the
index, whatever the data set's size) and per shard its record count and byte size, so the data set has an
exact length and random access without a scan. Framing: uint64 length, uint32 masked CRC-32C of the length,
the data, uint32 masked CRC-32C of the data; every read checks both.
"""
import contextlib
import logging
import os
import re
import struct
import threading
from array import array

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from twinface.atomic import Outputs, atomic_path, check_destination, writing
from twinface.data.images import DamagedDataError

log = logging.getLogger("twinface.data")

INDEX = "index.npz"
SHARD = re.compile(r"^(?P<name>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.tfrecord$")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEAD = 12                              # length + its CRC
MAX_RECORD_BYTES = 2 ** 30              # a face image record is KBs; a larger length is a damaged header
REQUIRED = ("image/encoded", "image/class/label")


class TFRecordError(DamagedDataError):
    """A damaged or malformed record; the message names the shard, the record index and the byte offset."""

    def __init__(self, shard, record, offset, problem):
        super().__init__(f"{shard}: record {record} at byte offset {offset}: {problem}")
        self.shard, self.record, self.offset = shard, record, offset


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record as TFRecordWriter writes it."""
    length = _LENGTH.pack(len(data))
    return length + _CRC.pack(_masked_crc(length)) + data + _CRC.pack(_masked_crc(data))


def _example_class():
    """tf.train.Example (tensorflow/core/example/{example,feature}.proto) built in a private descriptor pool:
    the protobuf package parses it, and TensorFlow's own registration of the same names, when imported in
    this process, does not collide with it."""
    f = descriptor_pb2.FileDescriptorProto(name="twinface_example.proto", package="tensorflow", syntax="proto3")
    label, fd = descriptor_pb2.FieldDescriptorProto, f.message_type

    def message(name, *fields, **options):
        m = fd.add(name=name)
        for field_name, number, kind, type_name, repeated in fields:
            m.field.add(name=field_name, number=number, type=kind, type_name=type_name or None,
                        label=label.LABEL_REPEATED if repeated else label.LABEL_OPTIONAL)
        return m

    message("BytesList", ("value", 1, label.TYPE_BYTES, "", True))
    message("FloatList", ("value", 1, label.TYPE_FLOAT, "", True))
    message("Int64List", ("value", 1, label.TYPE_INT64, "", True))
    feature = message("Feature", ("bytes_list", 1, label.TYPE_MESSAGE, ".tensorflow.BytesList", False),
                      ("float_list", 2, label.TYPE_MESSAGE, ".tensorflow.FloatList", False),
                      ("int64_list", 3, label.TYPE_MESSAGE, ".tensorflow.Int64List", False))
    feature.oneof_decl.add(name="kind")
    for fld in feature.field:
        fld.oneof_index = 0
    features = message("Features", ("feature", 1, label.TYPE_MESSAGE, ".tensorflow.Features.FeatureEntry", True))
    entry = features.nested_type.add(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=label.TYPE_STRING, label=label.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=label.TYPE_MESSAGE, type_name=".tensorflow.Feature",
                    label=label.LABEL_OPTIONAL)
    entry.options.map_entry = True
    message("Example", ("features", 1, label.TYPE_MESSAGE, ".tensorflow.Features", False))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _example_class()


def encode_example(data: bytes, label: int, fmt: str, height: int, width: int, landmarks=None) -> bytes:
    ex = Example()
    feature = ex.features.feature
    feature["image/encoded"].bytes_list.value.append(bytes(data))
    feature["image/format"].bytes_list.value.append(fmt.encode())
    feature["image/class/label"].int64_list.value.append(int(label))
    feature["image/height"].int64_list.value.append(int(height))
    feature["image/width"].int64_list.value.append(int(width))
    if landmarks is not None:
        feature["image/landmarks"].float_list.value.extend(np.asarray(landmarks, np.float32).ravel().tolist())
    return ex.SerializeToString()


def decode_example(data: bytes):
    """-> (image bytes, label) of one serialized Example; a ValueError says what is wrong with it."""
    ex = Example()
    try:
        ex.ParseFromString(data)
    except Exception as err:                    # protobuf's DecodeError: the bytes are not an Example
        raise ValueError(f"not a tf.train.Example ({type(err).__name__}: {err})") from None
    feature = ex.features.feature
    for key in REQUIRED:
        if key not in feature:
            raise ValueError(f"the Example has no {key!r} feature (has: {', '.join(sorted(feature)) or 'none'})")
    images, labels = feature["image/encoded"].bytes_list.value, feature["image/class/label"].int64_list.value
    if len(images) != 1 or len(labels) != 1:
        raise ValueError(f"expected one image/encoded bytes value and one image/class/label int64, "
                         f"got {len(images)} and {len(labels)}")
    return images[0], int(labels[0])


def read_example(f, shard: str, record: int, offset: int):
    """-> (image bytes, label, bytes the record takes) of the record at `offset` of the open shard `f`."""
    data = read_framed(f, shard, record, offset)
    try:
        image, label = decode_example(data)
    except ValueError as err:
        raise TFRecordError(shard, record, offset, str(err)) from None
    return image, label, _HEAD + len(data) + 4


def shard_names(num_shards: int, name: str = "train") -> list:
    return [f"{name}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def read_framed(f, shard: str, record: int, offset: int) -> bytes:
    """The data of the record at `offset` of the open shard `f`, both CRCs checked."""
    f.seek(offset)
    head = f.read(_HEAD)
    if len(head) < _HEAD:
        raise TFRecordError(shard, record, offset, f"truncated: {len(head)} of the 12 header bytes")
    length_bytes, (length_crc,) = head[:8], _CRC.unpack(head[8:])
    if _masked_crc(length_bytes) != length_crc:
        raise TFRecordError(shard, record, offset, "length CRC mismatch (damaged header or not a TFRecord)")
    (length,) = _LENGTH.unpack(length_bytes)
    if length > MAX_RECORD_BYTES:
        raise TFRecordError(shard, record, offset, f"announces {length} bytes, over the {MAX_RECORD_BYTES} limit")
    body = f.read(length + 4)
    if len(body) < length + 4:
        raise TFRecordError(shard, record, offset, f"truncated: {len(body)} of {length + 4} data + CRC bytes")
    data, (data_crc,) = body[:length], _CRC.unpack(body[length:])
    if _masked_crc(data) != data_crc:
        raise TFRecordError(shard, record, offset, "data CRC mismatch (damaged bytes)")
    return data


class TFRecordWriter:
    """Writes a sharded data set and its index into a temporary directory that replaces `dst_dir` on a clean
    close (twinface.atomic.Outputs): an interrupted conversion leaves nothing under the final name."""

    def __init__(self, dst_dir, num_shards: int, writer: str, class_names=None, **checks):
        if num_shards < 1:
            raise ValueError(f"--shards must be at least 1, got {num_shards}")
        self.dst_dir = os.fspath(dst_dir)
        self._outputs = Outputs([self.dst_dir], writer, directory=True, **checks)
        (self._tmp,) = self._outputs.temps
        self.names = shard_names(num_shards)
        self._files = [open(os.path.join(self._tmp, n), "wb") for n in self.names]
        self._sizes = [0] * num_shards
        self._counts = [0] * num_shards
        self.class_names = class_names
        # 20 bytes a record, not Python ints: the index of millions of images stays ~100 MB while it is built
        self._shard, self._offset, self._labels = array("i"), array("q"), array("q")

    def write(self, data: bytes, label: int, size, fmt: str = "jpeg", landmarks=None) -> None:
        """Append one image (its bytes as they are); size = (height, width), fmt its format's name."""
        s = len(self._shard) % len(self._files)
        record = frame(encode_example(data, label, fmt, *size, landmarks))
        with writing(self.dst_dir):
            self._files[s].write(record)
        self._shard.append(s)
        self._offset.append(self._sizes[s])
        self._labels.append(label)
        self._sizes[s] += len(record)
        self._counts[s] += 1

    def close(self) -> None:
        try:
            with writing(self.dst_dir):
                for f in self._files:
                    f.close()
                extra = {} if self.class_names is None else {"class_names": np.array(self.class_names, str)}
                np.savez(os.path.join(self._tmp, INDEX), shards=np.array(self.names, str),
                         shard_records=np.array(self._counts, np.int64), shard_bytes=np.array(self._sizes, np.int64),
                         shard=np.frombuffer(self._shard, np.int32), offset=np.frombuffer(self._offset, np.int64),
                         label=np.frombuffer(self._labels, np.int64), **extra)
            self._outputs.commit()
        finally:
            self.abort()

    def abort(self) -> None:
        for f in self._files:
            with contextlib.suppress(OSError):
                f.close()
        self._outputs.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type else self.close()


def is_tfrecord_dir(path) -> bool:
    return os.path.isdir(path) and any(SHARD.match(n) or n.endswith(".tfrecord") for n in os.listdir(path))


def _shard_files(root) -> list:
    names = sorted(n for n in os.listdir(root) if n.endswith(".tfrecord"))
    if not names:
        raise FileNotFoundError(f"{root}: no .tfrecord shards")
    return names


def scan_index(root, progress: bool = True) -> dict:
    """The index of shards written by another tool: one pass over every record (CRCs and Examples checked)."""
    from tqdm import tqdm
    names = _shard_files(root)
    shard, offset, labels, counts, sizes = [], [], [], [], []
    bar = tqdm(total=sum(os.path.getsize(os.path.join(root, n)) for n in names), unit="B", unit_scale=True,
               desc="index tfrecord", disable=not progress)
    for s, name in enumerate(names):
        path = os.path.join(root, name)
        size, pos, k = os.path.getsize(path), 0, 0
        with open(path, "rb") as f:
            while pos < size:
                _, label, step = read_example(f, path, k, pos)
                labels.append(label), shard.append(s), offset.append(pos)
                pos, k = pos + step, k + 1
                bar.update(step)
        counts.append(k), sizes.append(size)
    bar.close()
    return {"shards": np.array(names, str), "shard_records": np.array(counts, np.int64),
            "shard_bytes": np.array(sizes, np.int64), "shard": np.array(shard, np.int32),
            "offset": np.array(offset, np.int64), "label": np.array(labels, np.int64)}


def write_index(root, overwrite: bool = False, progress: bool = True) -> dict:
    """`twinface data tfrecord-index DIR`: scan shards another tool wrote and save DIR/index.npz (atomically)."""
    path = check_destination(os.path.join(root, INDEX), overwrite=overwrite, recognise=lambda p: p.endswith(INDEX))
    index = scan_index(root, progress)
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **index)
    return {"num_images": int(len(index["label"])), "num_shards": int(len(index["shards"])), "index": path}


def _positions_in_groups(groups: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group (its record index in its shard)."""
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups)
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.empty(len(groups), np.int32)
    positions[order] = np.arange(len(groups)) - firsts
    return positions


INDEX_KEYS = {"shards": "U", "shard_records": "i", "shard_bytes": "i", "shard": "i", "offset": "i", "label": "i"}


def _load_index(path) -> dict:
    """index.npz, its arrays checked by name and kind (no pickles: an object array is refused unread)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            index = {k: z[k] for k in z.files}
    except Exception as err:                    # not a zip, a damaged member, a pickled array
        raise ValueError(f"{path}: not a readable TFRecord index ({type(err).__name__}: {err}); rebuild it with "
                         f"`twinface data tfrecord-index {os.path.dirname(path)} --overwrite`") from None
    for key, kind in INDEX_KEYS.items():
        if key not in index or index[key].dtype.kind != kind or index[key].ndim != 1:
            raise ValueError(f"{path}: expected a 1-d {'string' if kind == 'U' else 'integer'} array {key!r}, "
                             f"got {index[key].dtype} {index[key].shape}" if key in index else
                             f"{path}: no {key!r} array; rebuild it with `twinface data tfrecord-index "
                             f"{os.path.dirname(path)} --overwrite`")
    return index


class TFRecordSet:
    """Random access to a TFRecord data set through its index; files are opened lazily per process and thread
    (data workers and tf.data threads each get their own handles)."""

    def __init__(self, root, progress: bool = True):
        self.root = os.fspath(root)
        path = os.path.join(self.root, INDEX)
        if os.path.isfile(path):
            index = _load_index(path)
        else:
            log.warning(f"{self.root}: no {INDEX}; scanning the shards once (`twinface data tfrecord-index "
                        f"{self.root}` saves it)")
            index = scan_index(self.root, progress)
        self.shards = [os.path.join(self.root, n) for n in index["shards"].tolist()]
        self.class_names = index["class_names"].tolist() if "class_names" in index else None
        self.shard, self.offset, self.labels = index["shard"], index["offset"], index["label"]
        self._check(index)
        self.record_in_shard = _positions_in_groups(self.shard)
        self._files = {}

    def _check(self, index):
        where = f"{self.root}/{INDEX}"
        names, n = index["shards"].tolist(), len(self.shard)
        if len(index["shard_records"]) != len(names) or len(index["shard_bytes"]) != len(names):
            raise ValueError(f"{where}: {len(names)} shards but {len(index['shard_records'])} record counts and "
                             f"{len(index['shard_bytes'])} sizes")
        for name in names:
            if os.path.basename(name) != name or not name.endswith(".tfrecord"):
                raise ValueError(f"{where}: shard name {name!r} is not a .tfrecord file name in {self.root}")
        if not (len(self.offset) == len(self.labels) == n == int(index["shard_records"].sum())):
            raise ValueError(f"{where}: inconsistent: {n} shard entries, {len(self.offset)} offsets, "
                             f"{len(self.labels)} labels, the shards hold {int(index['shard_records'].sum())} records")
        if n and (self.shard.min() < 0 or self.shard.max() >= len(names) or self.offset.min() < 0
                  or np.any(np.bincount(self.shard, minlength=len(names)) != index["shard_records"])):
            raise ValueError(f"{where}: record shards or offsets disagree with the shard list and counts")
        for path, size in zip(self.shards, index["shard_bytes"]):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard listed in {where} is missing")
            actual = os.path.getsize(path)
            if actual != size:
                raise ValueError(f"{path}: {actual} bytes, but {INDEX} says {size} (truncated, or the index is "
                                 f"stale: rebuild it with `twinface data tfrecord-index {self.root} --overwrite`)")
        if n and np.any(self.offset > index["shard_bytes"][self.shard] - _HEAD):
            raise ValueError(f"{where}: a record offset lies past the end of its shard")
        if n and (self.labels.min() < 0 or len(np.unique(self.labels)) != self.labels.max() + 1):
            raise ValueError(f"{self.root}: labels must be 0..C-1 without gaps (they span {self.labels.min()}.."
                             f"{self.labels.max()} over {len(np.unique(self.labels))} classes)")

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    def __len__(self):
        return len(self.shard)

    def where(self, i: int):
        """(shard path, record index in the shard, byte offset) of record i."""
        return self.shards[self.shard[i]], int(self.record_in_shard[i]), int(self.offset[i])

    def source(self, i: int) -> str:
        shard, record, offset = self.where(i)
        return f"{shard} record {record} (byte offset {offset})"

    def read(self, i: int):
        """-> (image bytes, label) of record i; framing, CRCs, the Example and its label checked."""
        shard, record, offset = self.where(i)
        key = (os.getpid(), threading.get_ident(), shard)
        if key not in self._files:
            self._files[key] = open(shard, "rb")
        image, label, _ = read_example(self._files[key], shard, record, offset)
        if label != self.labels[i]:
            raise TFRecordError(shard, record, offset, f"label {label}, but {INDEX} says {self.labels[i]} "
                                "(stale index?)")
        return image, label
