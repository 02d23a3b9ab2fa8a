"""MXNet RecordIO (.rec + .idx) read and written without mxnet, byte-compatible with dmlc-core.

A chunk is: uint32 magic, uint32 lrecord = cflag << 29 | length, payload, zero padding to 4 bytes.
dmlc's writer splits a record wherever the magic appears at a 4-byte aligned offset in it (cflag 1 = first,
2 = middle, 3 = last part) and drops that magic; the reader joins the parts, putting the magic back.
The .idx file holds "key<TAB>byte offset" lines. A record payload starts with struct '<IfQQ'
(flag, label, id, id2); when flag > 0, `flag` float32 labels follow, then the encoded image.
"""
import logging
import numbers
import os
import re
import struct
import threading
from collections import namedtuple

import numpy as np

from twinface.atomic import Outputs, OutputsWriter, writing
from twinface.data.images import decode_image

log = logging.getLogger("twinface.data")

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_CHUNK_HEAD = struct.Struct("<II")
_LENGTH_MASK = (1 << 29) - 1
_IR_HEADER = struct.Struct("<IfQQ")
MAX_CLASSES = 2 ** 31                   # far above any face data set; keeps labels in int64 and heads finite

IRHeader = namedtuple("IRHeader", ["flag", "label", "id", "id2"])


class RecordIOError(ValueError):
    """A malformed .rec/.idx; the message names the file and the byte offset."""

    def __init__(self, path, offset, problem):
        super().__init__(f"{path}: byte offset {offset}: {problem}")
        self.path, self.offset, self.problem = path, offset, problem


def pack_record(label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Payload of one record, as mxnet.recordio.pack: a scalar label in the header, a vector after it."""
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), id, id2) + bytes(payload)
    labels = np.asarray(label, np.float32).ravel()
    if labels.size == 0:
        raise ValueError("pack_record: a label vector needs at least one value (flag 0 means a scalar label)")
    return _IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(payload)


def unpack_record(buf: bytes, source: str = "record"):
    """-> (IRHeader, payload); header.label is a float when flag == 0, else a float32 array of length flag."""
    if len(buf) < _IR_HEADER.size:
        raise ValueError(f"{source}: {len(buf)} bytes is shorter than the {_IR_HEADER.size}-byte record header")
    header = IRHeader(*_IR_HEADER.unpack_from(buf))
    body = buf[_IR_HEADER.size:]
    if header.flag == 0:
        return header, body
    if len(body) < 4 * header.flag:
        raise ValueError(f"{source}: header announces {header.flag} float32 labels but only {len(body)} bytes follow")
    labels = np.frombuffer(body, np.float32, header.flag).copy()
    return header._replace(label=labels), body[4 * header.flag:]


def _chunks(record: bytes):
    """(cflag, data) chunks exactly as dmlc's RecordIOWriter::WriteRecord emits them."""
    start = 0
    pos = record.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            yield (1 if start == 0 else 2), record[start:pos]
            start = pos + 4
            pos = record.find(_MAGIC_BYTES, start)
        else:
            pos = record.find(_MAGIC_BYTES, pos + 1)
    yield (3 if start else 0), record[start:]


def is_recordio(path) -> bool:
    """A .rec (starts with the magic) or an .idx ("key<TAB>offset" lines), as far as its first bytes tell."""
    with open(path, "rb") as f:
        head = f.read(64)
    return head.startswith(_MAGIC_BYTES) or re.match(rb"\d+\t\d+\r?\n", head) is not None


def _default_idx(rec_path):
    return os.path.splitext(rec_path)[0] + ".idx"


class RecordWriter(OutputsWriter):
    """Writes rec_path and its .idx into temporary siblings that replace both together on a clean close
    (twinface.atomic.Outputs), so an interrupted run never leaves a half-written or mismatched pair under the
    final names. `checks` go to twinface.atomic.check_destination (default: replace a RecordIO pair)."""

    def __init__(self, rec_path, idx_path=None, writer="twinface RecordWriter", **checks):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path else _default_idx(self.rec_path)
        # The .rec goes last, as the commit point of the swap: it vanishes before the new .idx comes in and
        # returns only as the new .rec, so no .rec is ever found beside the other generation's .idx.
        self._outputs = Outputs([self.idx_path, self.rec_path], writer,
                                **{"overwrite": True, "recognise": is_recordio, "what": "a RecordIO file", **checks})
        tmp_idx, tmp_rec = self._outputs.temps
        self._rec = open(tmp_rec, "wb")
        self._idx = open(tmp_idx, "w")
        self._offset = 0
        self._keys = set()

    def write(self, key: int, record: bytes) -> None:
        if not isinstance(key, numbers.Integral):
            raise TypeError(f"{self.rec_path}: record keys are integers, got {key!r}")
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: key {key} written twice")
        if len(record) > _LENGTH_MASK:
            raise ValueError(f"{self.rec_path}: key {key}: RecordIO records must be under 2**29 bytes")
        self._keys.add(key)
        with writing(self.idx_path):
            self._idx.write(f"{int(key)}\t{self._offset}\n")
        for cflag, data in _chunks(bytes(record)):
            padding = -len(data) % 4
            with writing(self.rec_path):
                self._rec.write(_CHUNK_HEAD.pack(MAGIC, cflag << 29 | len(data)) + data + b"\0" * padding)
            self._offset += _CHUNK_HEAD.size + len(data) + padding

    def close(self) -> None:
        if self._rec.closed:
            return
        try:
            with writing(self.rec_path):
                self._rec.close()
            with writing(self.idx_path):
                self._idx.close()
            self._outputs.commit()
        finally:
            self.abort()

    def _handles(self) -> list:
        return [self._rec, self._idx]


class RecordReader:
    """Random access through the .idx (read_idx, keys) and sequential iteration (no .idx needed).

    The file is opened lazily per process and thread, so a reader can be handed to forked or spawned data
    workers and to the threads of a tf.data map (a shared handle would race between seek and read).
    """

    def __init__(self, rec_path, idx_path=None):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path) if idx_path else _default_idx(self.rec_path)
        if not os.path.isfile(self.rec_path):
            raise FileNotFoundError(f"{self.rec_path}: RecordIO file not found")
        self._size = os.path.getsize(self.rec_path)
        self._offsets = None
        self._files = {}

    def __getstate__(self):
        return {**self.__dict__, "_files": {}}

    @property
    def keys(self) -> list:
        return list(self._index())

    def __contains__(self, key) -> bool:
        return key in self._index()

    @property
    def num_keys(self) -> int:              # not __len__: list(reader) would read the .idx it does not need
        return len(self._index())

    def read_idx(self, key: int) -> bytes:
        return self._record(self._handle(), key)

    def read_head(self, key: int, nbytes: int) -> bytes:
        """First nbytes of a record without reading the rest (labels of millions of images, fast)."""
        offset = self._offset_of(key)
        f = self._handle()
        f.seek(offset)
        head = f.read(_CHUNK_HEAD.size)
        if len(head) == _CHUNK_HEAD.size:
            magic, lrec = _CHUNK_HEAD.unpack(head)
            if magic == MAGIC and lrec >> 29 == 0:
                data = f.read(min(nbytes, lrec & _LENGTH_MASK))
                if len(data) == min(nbytes, lrec & _LENGTH_MASK):
                    return data
        return self._record(f, key)[:nbytes]  # split or damaged: the full path reports or joins it

    def __iter__(self):
        with open(self.rec_path, "rb") as f:
            offset = 0
            while offset < self._size:
                record, offset = self._read_chunks(f, offset)
                yield record

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _handle(self):
        key = (os.getpid(), threading.get_ident())
        if key not in self._files:
            self._files[key] = open(self.rec_path, "rb")
        return self._files[key]

    def _offset_of(self, key) -> int:
        index = self._index()
        if key not in index:
            raise ValueError(f"{self.idx_path}: no record with key {key}")
        return index[key]

    def _index(self) -> dict:
        if self._offsets is None:
            if not os.path.isfile(self.idx_path):
                raise FileNotFoundError(f"{self.idx_path}: index not found; random access into {self.rec_path} "
                                        "needs it (iterating the reader works without)")
            offsets = {}
            with open(self.idx_path, errors="replace") as f:
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        key, offset = self._parse_idx_line(line, line_no)
                        if key in offsets:
                            raise ValueError(f"{self.idx_path}: line {line_no}: key {key} listed twice")
                        # every record takes at least a chunk header: more entries than that is not this .rec's
                        if len(offsets) >= self._size // _CHUNK_HEAD.size:
                            raise ValueError(f"{self.idx_path}: line {line_no}: more entries than {self.rec_path} "
                                             f"({self._size} bytes) can hold records")
                        offsets[key] = offset
            self._offsets = offsets
        return self._offsets

    def _parse_idx_line(self, line: str, line_no: int):
        """-> (key, offset) of one "key<TAB>offset" line, the offset inside the .rec."""
        fields = line.split("\t")
        try:
            if len(fields) < 2:
                raise ValueError
            key, offset = int(fields[0]), int(fields[1])
        except ValueError:
            raise ValueError(f"{self.idx_path}: line {line_no}: expected 'key<TAB>offset' (two integers), "
                             f"got {line.rstrip()[:80]!r}") from None
        if not 0 <= offset <= self._size - _CHUNK_HEAD.size:
            raise ValueError(f"{self.idx_path}: line {line_no}: key {key} at byte offset {offset}, outside "
                             f"{self.rec_path} ({self._size} bytes)")
        return key, offset

    def _record(self, f, key) -> bytes:
        """Record `key` where the .idx places it; a damaged one is reported with that place (a wrong offset in
        the .idx reads as a bad record)."""
        offset = self._offset_of(key)
        try:
            return self._read_chunks(f, offset)[0]
        except RecordIOError as e:
            raise RecordIOError(self.rec_path, e.offset, f"{e.problem} (reading key {key}, which {self.idx_path} "
                                f"places at byte {offset})") from None

    def _read_chunks(self, f, offset):
        """-> (record, offset of the next record); joins split chunks."""
        parts, pos = [], offset
        while True:
            f.seek(pos)
            head = f.read(_CHUNK_HEAD.size)
            if len(head) < _CHUNK_HEAD.size:
                raise RecordIOError(self.rec_path, pos, f"truncated: file ends {len(head)} bytes into a chunk header")
            magic, lrec = _CHUNK_HEAD.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(self.rec_path, pos, f"bad magic 0x{magic:08x}, expected 0x{MAGIC:08x}")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag > 3 or (cflag in (0, 1)) != (not parts):
                raise RecordIOError(self.rec_path, pos, f"unexpected chunk flag {cflag} "
                                    + ("after a split record's first part" if parts else "at a record start"))
            padded = length + (-length % 4)
            if pos + _CHUNK_HEAD.size + padded > self._size:     # checked before reading: no allocation
                raise RecordIOError(self.rec_path, pos, f"truncated: chunk holds {length} bytes (+padding) "
                                    f"but the file ends after {self._size - pos - _CHUNK_HEAD.size}")
            data = f.read(padded)
            if len(data) < padded:
                raise RecordIOError(self.rec_path, pos, f"truncated: chunk holds {length} bytes (+padding) "
                                    f"but the file ends after {len(data)}")
            parts.append(data[:length])
            pos += _CHUNK_HEAD.size + padded
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos


def write_insightface_rec(prefix, samples, **checks) -> dict:
    """Write prefix.rec/.idx in insightface's training layout from (label, encoded image) pairs.

    Keys 1..N: images (label float(class), id = key). Key 0: flag 2, label [N+1, N+1+C].
    Keys N+1+c: identity c, label [first image key, last image key + 1]. Streams: one image in memory at a time.
    `checks` (writer, overwrite, inputs, ...) go to RecordWriter.
    """
    prefix = os.fspath(prefix)
    ranges, current, key = {}, None, 1
    with RecordWriter(prefix + ".rec", prefix + ".idx", **checks) as writer:
        for label, data in samples:
            if label != current:
                if not float(label).is_integer() or label < 0:
                    raise ValueError(f"{prefix}.rec: image {key - 1}: labels are integers >= 0, got {label!r}")
                label = int(label)
                if label in ranges:
                    raise ValueError(f"{prefix}.rec: identity {label} reappears at image {key - 1} after identity "
                                     f"{current}; the images of each identity must be contiguous")
                if current is not None:
                    ranges[current][1] = key
                ranges[label], current = [key, None], label
            writer.write(key, pack_record(float(label), data, id=key))
            key += 1
        if current is None:
            raise ValueError(f"{prefix}.rec: no samples to write")
        ranges[current][1] = key
        num_images, num_classes = key - 1, len(ranges)
        missing = sorted(set(range(num_classes)) - set(ranges))
        if missing:
            raise ValueError(f"{prefix}.rec: labels must be 0..{num_classes - 1} without gaps; "
                             f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        first_identity = num_images + 1
        writer.write(0, pack_record([first_identity, first_identity + num_classes], b"", id=0))
        for c in range(num_classes):
            writer.write(first_identity + c, pack_record(ranges[c], b"", id=first_identity + c))
    return {"num_images": num_images, "num_classes": num_classes}


def _class_of(header: IRHeader, source: str) -> int:
    """Class of an image record; a vector label's first value is the class, as arcface_torch's MXFaceDataset."""
    value = header.label if header.flag == 0 else header.label[0]
    if not float(value).is_integer() or not 0 <= value < MAX_CLASSES:
        raise ValueError(f"{source}: label {value} is not a class index (an integer in 0..{MAX_CLASSES - 1})")
    return int(value)


def _require_no_gaps(labels, source, keys):
    """Labels 0..C-1 with an image in every class, as write_insightface_rec writes them."""
    classes = np.unique(labels)         # not bincount: a label may be 1e30
    if len(classes) and classes[-1] + 1 != len(classes):
        top = int(np.argmax(labels))
        raise ValueError(f"{source}: labels run up to {labels[top]} (record {keys[top]}) but only "
                         f"{len(classes)} of classes 0..{labels[top]} have images; labels must be 0..C-1 "
                         "without gaps")


class InsightFaceRec:
    """Random access to an insightface training .rec (header record 0, images, identity records),
    or to a plain .rec whose record 0 is an image: then every record listed in the .idx is an image."""

    def __init__(self, prefix):
        prefix = os.fspath(prefix)
        self.prefix = prefix[:-4] if prefix.endswith(".rec") else prefix
        self.reader = RecordReader(self.prefix + ".rec", self.prefix + ".idx")
        self._labels = None
        self.num_identity_records = None
        header, payload = IRHeader(0, 0.0, 0, 0), b""
        if 0 in self.reader:
            header, payload = unpack_record(self.reader.read_idx(0), self.source_of_key(0))
        # arcface_torch takes any vector-labelled record 0 for the header; requiring the header's empty payload
        # as well keeps an im2rec file whose first image has a vector label readable.
        if header.flag >= 2 and not payload:
            self._keys = self._header_image_keys(header.label[:2])
        else:
            self._keys = np.asarray(self.reader.keys, dtype=np.int64)
        if not len(self._keys):             # an empty or lost .idx must not read as an empty data set
            raise ValueError(f"{self.prefix}.rec: no image records ({self.reader.idx_path} lists "
                             f"{self.reader.num_keys} records in all)")

    def _header_image_keys(self, label) -> np.ndarray:
        """Image keys 1..first-1 of header label [first identity key, end key], checked against the .idx before
        anything is allocated: a header is only a claim (one said [1e9, 1e9 + 5] and cost 7.8 GB)."""
        where = f"{self.source_of_key(0)} (header)"
        first, end = (float(v) for v in label)
        if not (first.is_integer() and end.is_integer() and 1 <= first <= end):
            raise ValueError(f"{where}: label {label.tolist()} is not [first identity key, end key] with "
                             "1 <= first <= end")
        first, end = int(first), int(end)
        if end > self.reader.num_keys:
            raise ValueError(f"{where}: claims {first - 1} images and {end - first} identities (keys up to "
                             f"{end - 1}), but {self.reader.idx_path} lists only {self.reader.num_keys} records")
        missing = next((k for k in range(1, end) if k not in self.reader), None)
        if missing is not None:
            kind = "image" if missing < first else "identity"
            raise ValueError(f"{where}: {kind} record {missing} is not in {self.reader.idx_path}")
        self.num_identity_records = end - first
        return np.arange(1, first, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def key(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.prefix}.rec: image index {i} out of range for {len(self)} images")
        return int(self._keys[i])

    def source(self, i: int) -> str:
        return self.source_of_key(self.key(i))

    def source_of_key(self, key: int) -> str:
        return f"{self.prefix}.rec record {key}"

    def record(self, i: int):
        """-> (label, encoded image bytes) from one read."""
        key = self.key(i)
        source = self.source_of_key(key)
        header, payload = unpack_record(self.reader.read_idx(key), source)
        return self._checked_class(header, source), payload

    def _checked_class(self, header: IRHeader, source: str) -> int:
        label = _class_of(header, source)
        if self.num_identity_records is not None and label >= self.num_identity_records:
            raise ValueError(f"{source}: label {label}, but the header (record 0) declares "
                             f"{self.num_identity_records} identities (labels 0..{self.num_identity_records - 1})")
        return label

    def encoded(self, i: int) -> bytes:
        return self.record(i)[1]

    def image(self, i: int) -> np.ndarray:
        return decode_image(self.encoded(i), self.source(i))

    def label(self, i: int) -> int:
        if self._labels is not None:
            return int(self._labels[i])
        key = self.key(i)
        source = self.source_of_key(key)
        try:  # room for 16 float labels in the head; a longer label vector takes the full read
            header, _ = unpack_record(self.reader.read_head(key, _IR_HEADER.size + 64), source)
        except ValueError:
            header, _ = unpack_record(self.reader.read_idx(key), source)
        return self._checked_class(header, source)

    @property
    def labels(self) -> np.ndarray:
        """Every image's class, checked once: within the header's identities, or, without a header, classes
        0..C-1 without gaps (one image labelled 2,000,000 must not make a 2,000,001-class head)."""
        if self._labels is None:
            labels = np.fromiter((self.label(i) for i in range(len(self))), np.int64, len(self))
            if self.num_identity_records is None:
                _require_no_gaps(labels, self.prefix + ".rec", self._keys)
            else:
                self._check_identity_records(labels)
            self._labels = labels
        return self._labels

    def _check_identity_records(self, labels):
        """Identity record c holds [first image key, end key) of class c; images whose own label disagrees
        keep their own (as arcface_torch does) and are counted in a warning."""
        first = len(self) + 1
        disagree = []
        for c in range(self.num_identity_records):
            key = first + c
            header, _ = unpack_record(self.reader.read_idx(key), self.source_of_key(key))
            span = [int(v) for v in np.ravel(header.label)[:2] if float(v).is_integer()]
            if header.flag < 2 or len(span) != 2 or not 1 <= span[0] <= span[1] <= first:
                raise ValueError(f"{self.source_of_key(key)} (identity {c}): label {np.ravel(header.label).tolist()}"
                                 f" is not an image key range [start, end) within 1..{first}")
            start, end = span
            disagree.extend((np.flatnonzero(labels[start - 1:end - 1] != c) + start).tolist())
        if disagree:
            log.warning(f"{self.prefix}.rec: {len(disagree)} images lie in another identity's range than their "
                        f"label says, e.g. record {disagree[0]} (label {labels[disagree[0] - 1]}); the labels are used")

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0
