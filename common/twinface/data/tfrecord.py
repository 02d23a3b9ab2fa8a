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
import functools
import logging
import os
import struct
import threading
from array import array

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from twinface.atomic import Outputs, OutputsWriter, atomic_path, check_destination, writing
from twinface.data.images import DamagedDataError

log = logging.getLogger("twinface.data")

INDEX = "index.npz"
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


def read_example(read, shard: str, record: int, offset: int):
    """-> (image bytes, label, bytes the record takes) of the record at `offset`; read(n, at) reads the shard."""
    data = read_framed(read, shard, record, offset)
    try:
        image, label = decode_example(data)
    except ValueError as err:
        raise TFRecordError(shard, record, offset, str(err)) from None
    return image, label, _HEAD + len(data) + 4


def shard_names(num_shards: int, name: str = "train") -> list:
    return [f"{name}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def read_framed(read, shard: str, record: int, offset: int) -> bytes:
    """The data of the record at `offset`, both CRCs checked; read(n, at) -> up to n bytes of the shard at `at`."""
    head = read(_HEAD, offset)
    if len(head) < _HEAD:
        raise TFRecordError(shard, record, offset, f"truncated: {len(head)} of the 12 header bytes")
    length_bytes, (length_crc,) = head[:8], _CRC.unpack(head[8:])
    if _masked_crc(length_bytes) != length_crc:
        raise TFRecordError(shard, record, offset, "length CRC mismatch (damaged header or not a TFRecord)")
    (length,) = _LENGTH.unpack(length_bytes)
    if length > MAX_RECORD_BYTES:
        raise TFRecordError(shard, record, offset, f"announces {length} bytes, over the {MAX_RECORD_BYTES} limit")
    body = read(length + 4, offset + _HEAD)
    if len(body) < length + 4:
        raise TFRecordError(shard, record, offset, f"truncated: {len(body)} of {length + 4} data + CRC bytes")
    data, (data_crc,) = body[:length], _CRC.unpack(body[length:])
    if _masked_crc(data) != data_crc:
        raise TFRecordError(shard, record, offset, "data CRC mismatch (damaged bytes)")
    return data


def allow_open_files(n: int, what: str) -> None:
    """Raise this process's soft limit on open files to n + 64 (up to the hard limit), or say why it cannot."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(f"{what} needs {n} open files, but this process may open at most {hard} "
                             "(`ulimit -Hn`); use fewer shards")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class TFRecordWriter(OutputsWriter):
    """Writes a sharded data set and its index into a temporary directory that replaces `dst_dir` on a clean
    close (twinface.atomic.Outputs): an interrupted conversion leaves nothing under the final name."""

    def __init__(self, dst_dir, num_shards: int, writer: str, class_names=None, num_classes=None, **checks):
        if num_shards < 1:
            raise ValueError(f"--shards must be at least 1, got {num_shards}")
        self.dst_dir = os.fspath(dst_dir)
        self._outputs = Outputs([self.dst_dir], writer, directory=True, **checks)
        (self._tmp,) = self._outputs.temps
        self.names = shard_names(num_shards)
        self._files = []
        try:
            allow_open_files(num_shards, f"writing {num_shards} shards")
            self._files = [open(os.path.join(self._tmp, n), "wb") for n in self.names]
        except BaseException:
            self.abort()
            raise
        self._sizes = [0] * num_shards
        self.class_names, self.num_classes = class_names, num_classes
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

    def close(self) -> None:
        try:
            with writing(self.dst_dir):
                for f in self._files:
                    f.close()
                extra = {} if self.class_names is None else {"class_names": np.array(self.class_names, str)}
                if self.num_classes is not None:        # identities without usable images keep their label
                    extra["num_classes"] = np.array([self.num_classes], np.int64)
                shard = np.frombuffer(self._shard, np.int32)
                np.savez(os.path.join(self._tmp, INDEX), shards=np.array(self.names, str),
                         shard_records=np.bincount(shard, minlength=len(self.names)).astype(np.int64),
                         shard_bytes=np.array(self._sizes, np.int64), shard=shard,
                         offset=np.frombuffer(self._offset, np.int64),
                         label=np.frombuffer(self._labels, np.int64), **extra)
            self._outputs.commit()
        finally:
            self.abort()

    def _handles(self) -> list:
        return self._files


def is_tfrecord_dir(path) -> bool:
    return os.path.isdir(path) and any(n.endswith(".tfrecord") for n in os.listdir(path))


def _shard_files(root) -> list:
    names = sorted(n for n in os.listdir(root) if n.endswith(".tfrecord"))
    if not names:
        raise FileNotFoundError(f"{root}: no .tfrecord shards")
    return names


def scan_index(root, progress: bool = True) -> dict:
    """The index of shards as they are: one pass over every record (CRCs and Examples checked). Records are
    numbered round robin (record i in shard i % S, as twinface writes) when the shards' record counts allow it,
    else shard by shard."""
    from tqdm import tqdm
    names = _shard_files(root)
    offsets, labels = [], []
    bar = tqdm(total=sum(os.path.getsize(os.path.join(root, n)) for n in names), unit="B", unit_scale=True,
               desc="index tfrecord", disable=not progress)
    for name in names:
        path = os.path.join(root, name)
        size, pos, found = os.path.getsize(path), 0, ([], [])
        with open(path, "rb") as f:
            read = functools.partial(os.pread, f.fileno())
            while pos < size:
                _, label, step = read_example(read, path, len(found[0]), pos)
                found[0].append(pos), found[1].append(label)
                pos += step
                bar.update(step)
        offsets.append(np.array(found[0], np.int64)), labels.append(np.array(found[1], np.int64))
    bar.close()
    counts = np.array([len(o) for o in offsets], np.int64)
    shard = np.concatenate([np.full(c, s, np.int32) for s, c in enumerate(counts)])
    position = np.concatenate([np.arange(c) for c in counts])
    if len(counts) and np.all(np.diff(counts) <= 0) and counts[0] - counts[-1] <= 1:
        order = np.lexsort((shard, position))               # round robin: position-major, then shard
    else:
        order = np.arange(len(shard))
    return {"shards": np.array(names, str), "shard_records": counts,
            "shard_bytes": np.array([os.path.getsize(os.path.join(root, n)) for n in names], np.int64),
            "shard": shard[order], "offset": np.concatenate(offsets)[order], "label": np.concatenate(labels)[order]}


def write_index(root, overwrite: bool = False, progress: bool = True) -> dict:
    """`twinface data tfrecord-index DIR`: scan the shards and save DIR/index.npz (atomically). The identity
    names and class count of an index it replaces are kept (they live nowhere else)."""
    path = check_destination(os.path.join(root, INDEX), overwrite=overwrite, recognise=lambda p: p.endswith(INDEX))
    index = scan_index(root, progress)
    if os.path.isfile(path):
        try:
            old = _load_index(path)
            index.update({k: old[k] for k in ("class_names", "num_classes") if k in old})
        except ValueError as err:
            log.warning(f"{err}: its identity names (if any) are lost")
    with atomic_path(path, ".npz") as tmp:
        np.savez(tmp, **index)
    return {"num_images": int(len(index["label"])), "num_shards": int(len(index["shards"])), "index": path}


def _positions_in_groups(groups: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its group (its record index in its shard); `order` is
    np.argsort(groups, kind="stable")."""
    counts = np.bincount(groups)
    firsts = np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.empty(len(groups), np.int32)
    positions[order] = np.arange(len(groups)) - firsts
    return positions


INDEX_KEYS = {"shards": "U", "shard_records": "i", "shard_bytes": "i", "shard": "i", "offset": "i", "label": "i"}
OPTIONAL_KEYS = {"class_names": "U", "num_classes": "i"}
_MIN_RECORD = _HEAD + 4                 # an empty record: length, its CRC, the data CRC


def _load_index(path) -> dict:
    """index.npz, its arrays checked by name and kind (no pickles: an object array is refused unread)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            index = {k: z[k] for k in z.files}
    except Exception as err:                    # not a zip, a damaged member, a pickled array
        raise ValueError(f"{path}: not a readable TFRecord index ({type(err).__name__}: {err}); rebuild it with "
                         f"`twinface data tfrecord-index {os.path.dirname(path)} --overwrite`") from None
    for key, kind in {**INDEX_KEYS, **OPTIONAL_KEYS}.items():
        if key not in index:
            if key in OPTIONAL_KEYS:
                continue
            raise ValueError(f"{path}: no {key!r} array; rebuild it with `twinface data tfrecord-index "
                             f"{os.path.dirname(path)} --overwrite`")
        if index[key].dtype.kind != kind or index[key].ndim != 1:
            raise ValueError(f"{path}: expected a 1-d {'string' if kind == 'U' else 'integer'} array {key!r}, "
                             f"got {index[key].dtype} {index[key].shape}")
    return index


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and os.path.basename(name) == name and "\0" not in name


class TFRecordSet:
    """Random access to a TFRecord data set through its index. Each process opens every shard once and reads
    with pread (safe across the threads of a tf.data map); DataLoader workers open their own.

    damaged="skip" opens a set with a truncated shard (its records past the end then fail to read, and are
    skipped by the loaders); "fail" refuses it at open, naming the first record cut off.
    """

    def __init__(self, root, progress: bool = True, damaged: str = "fail"):
        self.root = os.fspath(root)
        path = os.path.join(self.root, INDEX)
        if os.path.isfile(path):
            index = _load_index(path)
        else:
            log.warning(f"{self.root}: no {INDEX}; scanning the shards once (`twinface data tfrecord-index "
                        f"{self.root}` saves it)")
            index = scan_index(self.root, progress)
        self.shards = [os.path.join(self.root, n) for n in index["shards"].tolist()]
        self.shard, self.offset, self.labels = index["shard"], index["offset"], index["label"]
        order = np.argsort(self.shard, kind="stable")           # each shard's records, in index order
        self._check(index, damaged, order)
        self.num_classes = int(index["num_classes"][0]) if "num_classes" in index else \
            (int(self.labels.max()) + 1 if len(self.labels) else 0)
        self.class_names = index["class_names"].tolist() if "class_names" in index else None
        self.record_in_shard = _positions_in_groups(self.shard, order)
        self._fds, self._lock = {}, threading.Lock()

    def _check(self, index, damaged, order):
        where = f"{self.root}/{INDEX}"
        names, n = index["shards"].tolist(), len(self.shard)
        sizes = index["shard_bytes"]
        if len(index["shard_records"]) != len(names) or len(sizes) != len(names):
            raise ValueError(f"{where}: {len(names)} shards but {len(index['shard_records'])} record counts and "
                             f"{len(sizes)} sizes")
        for name in names:
            if not _safe_name(name) or not name.endswith(".tfrecord"):
                raise ValueError(f"{where}: shard name {name!r} is not a .tfrecord file name in {self.root}")
        if not (len(self.offset) == len(self.labels) == n == int(index["shard_records"].sum())):
            raise ValueError(f"{where}: inconsistent: {n} shard entries, {len(self.offset)} offsets, "
                             f"{len(self.labels)} labels, the shards hold {int(index['shard_records'].sum())} records")
        if n and (self.shard.min() < 0 or self.shard.max() >= len(names)
                  or np.any(np.bincount(self.shard, minlength=len(names)) != index["shard_records"])):
            raise ValueError(f"{where}: the records' shards disagree with the shard list and its record counts")
        # each shard's records in index order: the first at byte 0, each at least one empty record after the
        # last, the last inside the shard (the stream reader relies on index order being file order)
        shard, offset = self.shard[order], self.offset[order]
        same = shard[1:] == shard[:-1]
        if n and (np.any(offset[np.r_[True, ~same]] != 0) or np.any(np.diff(offset)[same] < _MIN_RECORD)
                  or np.any(offset > sizes[shard] - _MIN_RECORD)):
            raise ValueError(f"{where}: record offsets do not follow each other through their shards (each "
                             f"shard's first at 0, in index order, inside the shard)")
        for s, (path, size) in enumerate(zip(self.shards, sizes)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: shard listed in {where} is missing")
            actual = os.path.getsize(path)
            if actual > size:
                raise ValueError(f"{path}: {actual} bytes, but {INDEX} says {size}: the index is stale (rebuild "
                                 f"it with `twinface data tfrecord-index {self.root} --overwrite`)")
            if actual < size:
                starts = offset[shard == s]
                cut = int(np.argmax(np.r_[starts[1:], size] > actual))     # the first record that ends past it
                error = TFRecordError(path, cut, int(starts[cut]),
                                      f"truncated: the shard is {actual} bytes, {INDEX} says {size}")
                if damaged != "skip":
                    raise error
                log.warning(f"{error}; its records from there on will be skipped (data.damaged_records: skip)")
        num_classes = int(index["num_classes"][0]) if "num_classes" in index else None
        if n and (self.labels.min() < 0 or (num_classes is not None and self.labels.max() >= num_classes)
                  or (num_classes is None and len(np.unique(self.labels)) != self.labels.max() + 1)):
            raise ValueError(f"{self.root}: labels must be 0..C-1 without gaps (they span {self.labels.min()}.."
                             f"{self.labels.max()} over {len(np.unique(self.labels))} classes"
                             f"{'' if num_classes is None else f', the index declares {num_classes}'})")
        if "class_names" in index:
            names = index["class_names"].tolist()
            if len(set(names)) != len(names) or not all(map(_safe_name, names)) or \
                    len(names) < (num_classes or (int(self.labels.max()) + 1 if n else 0)):
                raise ValueError(f"{where}: class_names must be unique folder names (no path separators, not '.' "
                                 "or '..'), one per identity")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_fds", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _fds={}, _lock=threading.Lock())

    def __len__(self):
        return len(self.shard)

    def where(self, i: int):
        """(shard path, record index in the shard, byte offset) of record i."""
        return self.shards[self.shard[i]], int(self.record_in_shard[i]), int(self.offset[i])

    def source(self, i: int) -> str:
        shard, record, offset = self.where(i)
        return f"{shard} record {record} (byte offset {offset})"

    def _fd(self, s: int) -> int:
        key = (os.getpid(), s)
        with self._lock:
            if key not in self._fds:
                if not self._fds:
                    allow_open_files(len(self.shards), f"reading {self.root} ({len(self.shards)} shards)")
                self._fds[key] = os.open(self.shards[s], os.O_RDONLY)
            return self._fds[key]

    def read(self, i: int):
        """-> (image bytes, label) of record i; framing, CRCs, the Example and its label checked. What cannot be
        read, for whatever reason, is a TFRecordError naming the shard, the record and its byte offset."""
        shard, record, offset = self.where(i)
        try:
            image, label, _ = read_example(functools.partial(os.pread, self._fd(int(self.shard[i]))), shard, record,
                                           offset)
        except OSError as err:
            raise TFRecordError(shard, record, offset, f"cannot read: {err.strerror or err}") from None
        if label != self.labels[i]:
            raise TFRecordError(shard, record, offset, f"label {label}, but {INDEX} says {self.labels[i]} (the "
                                "index does not describe this shard: stale?)")
        return image, label
