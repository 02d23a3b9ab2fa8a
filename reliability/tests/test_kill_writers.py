"""kill -9 during the writers: `data rec2folder`, `data folder2rec` and `data rec2tfrecord` (at every step of the final swap,
mid-rmtree and mid-write), `convert` and `export` (mid-write, during verification, around the rename).

What must hold after each kill: no output that looks complete but is not; the previous destination intact (or,
for a kill inside a swap, put back by the next writer's clean-up), byte for byte; and a re-run succeeds, leaving
no temporary file behind. Each verb is one row of the room's table: kills injected, survived, data lost (a
previous destination that was neither kept nor replaced by the complete new output).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from twinface.atomic import MARKER, clean_stale
from twinface.cli import main as twinface_main
from twinface.data.convert import folder_to_rec, rec_to_folder, rec_to_tfrecord
from twinface.data.images import encode_image
from twinface.data.recordio import InsightFaceRec
from twinface.data.tfrecord import TFRecordSet
from twinface_convert.convert import convert
from twinface_torch.calibrate import trained_like

from .killing import Row, sha256

# Runs one writer, verb(*args, **kwargs), and kills itself (SIGKILL) at the chosen moment:
#   swap:   before the kill_at-th filesystem rename/link/remove of the commit;
#   rmtree: while the replaced output is being deleted, after a few of its files;
#   write:  after kill_at images (data conversions);
#   before / after / cut: around the kill_at-th call of `hook` (module:function): before it, after it, or after
#           it with the file it wrote (argument `file_at`) cut in half, as a kill in the middle of writing would;
#           with `only`, calls whose argument `file_at` has another file name are not counted.
KILLER = r"""
import importlib, json, os, shutil, signal, sys
from twinface.data import convert
spec = json.loads(sys.argv[1])
count = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def resolve(name):
    module, attr = name.split(":")
    return importlib.import_module(module), attr

def counted(fn, when="before"):
    def wrapped(*args, **kwargs):
        if "only" in spec and os.path.basename(args[spec["file_at"]]) != spec["only"]:
            return fn(*args, **kwargs)
        hit = count[0] == spec["kill_at"]
        count[0] += 1
        if hit and when == "before":
            die()
        result = fn(*args, **kwargs)
        if hit and when == "cut":
            path = args[spec["file_at"]]
            os.truncate(path, os.path.getsize(path) // 2)
        if hit:
            die()
        return result
    return wrapped

if spec["kill_in"] == "swap":
    for name in ("link", "rename", "replace", "remove"):
        setattr(os, name, counted(getattr(os, name)))
elif spec["kill_in"] == "rmtree":
    def rmtree(path, *args, **kwargs):
        for root, _, files in os.walk(path):
            for name in files[:2]:
                os.unlink(os.path.join(root, name))
        die()
    shutil.rmtree = rmtree
elif spec["kill_in"] == "write":
    read, write = convert._read_bytes, convert.write_image_folder
    convert._read_bytes = counted(read)
    convert.write_image_folder = lambda root, samples: write(root, (counted(lambda s: s)(s) for s in samples))
else:
    module, attr = resolve(spec["hook"])
    setattr(module, attr, counted(getattr(module, attr), spec["kill_in"]))
module, attr = resolve(spec["verb"])
getattr(module, attr)(*spec["args"], **spec["kwargs"])
print("finished", flush=True)
"""


def _kill(verb, args, kill_in, kill_at, kwargs=None, **hook) -> bool:
    """Run the writer in a subprocess; True when it was killed, False when it finished."""
    args = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in args]
    spec = json.dumps({"verb": verb, "args": args, "kwargs": kwargs or {}, "kill_in": kill_in,
                       "kill_at": kill_at, **hook})
    run = subprocess.run([sys.executable, "-c", KILLER, spec], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, -signal.SIGKILL), run.stderr
    return run.returncode == -signal.SIGKILL


# --- data rec2folder / folder2rec ---------------------------------------------------------------------------
def _make_folder(root, counts):
    for label, count in enumerate(counts):
        os.makedirs(root / f"id{label}")
        for k in range(count):
            img = np.full((8, 8, 3), 40 * label + 20, np.uint8)
            img[0, 0] = k
            (root / f"id{label}" / f"{k}.png").write_bytes(encode_image(img, ".png"))


@pytest.fixture
def sets(tmp_path):
    """Two small image folders, old (4 images) and new (6 images), and their .rec pairs."""
    _make_folder(tmp_path / "old", [2, 2])
    _make_folder(tmp_path / "new", [1, 3, 2])
    (tmp_path / "recs").mkdir()
    for name in ("old", "new"):
        folder_to_rec(tmp_path / name, tmp_path / "recs" / name, progress=False)
    return tmp_path


def _tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files if f != MARKER}


def _pair(prefix):
    """The records of prefix.rec read through its .idx, None when there is no .rec."""
    if not os.path.exists(f"{prefix}.rec"):
        return None
    rec = InsightFaceRec(prefix)
    return [rec.record(i) for i in range(len(rec))]


DATA = {"progress": False, "overwrite": True}


def test_rec2folder_killed(sets, subtests, faults):
    # A kill while --overwrite removed the old folder used to leave a smaller folder that still looked valid.
    rec_to_folder(sets / "recs" / "new", sets / "expected_new", progress=False)
    new, row = _tree(sets / "expected_new"), Row(subtests)
    for kill_in, kill_at in [("write", 3), ("swap", 0), ("swap", 1), ("rmtree", 0)]:
        with row.fault(kill_in=kill_in, kill_at=kill_at):
            out = sets / f"out_{kill_in}_{kill_at}"
            out.mkdir()
            dst = out / "dst"
            rec_to_folder(sets / "recs" / "old", dst, progress=False)
            old = _tree(dst)
            assert _kill("twinface.data.convert:rec_to_folder", [sets / "recs" / "new", dst], kill_in, kill_at, DATA)
            clean_stale(out)                                       # what the next writer into this folder does first
            row.check_kept(_tree(dst), old, new)
            assert _tree(dst) == (new if kill_in == "rmtree" else old)   # whole, old or new, never a mixture
            rec_to_folder(sets / "recs" / "new", dst, progress=False, overwrite=True)
            assert _tree(dst) == new and os.listdir(out) == ["dst"]
    row.record(faults, "kill -9 during data rec2folder")


def _records(root):
    """(label, bytes) of every record of a TFRecord data set, None when there is none."""
    if not os.path.exists(root):
        return None
    records = TFRecordSet(root, progress=False)
    return [records.read(i)[::-1] for i in range(len(records))]


def test_rec2tfrecord_killed(sets, subtests, faults):
    row = Row(subtests)
    rec_to_tfrecord(sets / "recs" / "old", sets / "expected_old", shards=2, progress=False)
    rec_to_tfrecord(sets / "recs" / "new", sets / "expected_new", shards=3, progress=False)
    old, new = _records(sets / "expected_old"), _records(sets / "expected_new")
    for kill_in, kill_at, hook in [("before", 3, {"hook": "twinface.data.tfrecord:encode_example"}), ("swap", 0, {}),
                                   ("swap", 1, {}), ("rmtree", 0, {})]:
        with row.fault(kill_in=kill_in, kill_at=kill_at):
            out = sets / f"tfr_{kill_in}_{kill_at}"
            out.mkdir()
            dst = out / "dst"
            rec_to_tfrecord(sets / "recs" / "old", dst, shards=2, progress=False)
            assert _kill("twinface.data.convert:rec_to_tfrecord", [sets / "recs" / "new", dst], kill_in, kill_at,
                         {**DATA, "shards": 3}, **hook)
            clean_stale(out)
            row.check_kept(_records(dst), old, new)
            assert _records(dst) == (new if kill_in == "rmtree" else old)
            rec_to_tfrecord(sets / "recs" / "new", dst, shards=3, progress=False, overwrite=True)
            assert _records(dst) == new and os.listdir(out) == ["dst"]
    row.record(faults, "kill -9 during data rec2tfrecord")


# The swap of a .rec pair makes 6 calls: link .idx aside, move .rec aside, new .idx in, new .rec in (the
# commit), remove the two asides. Kill before each, and in the middle of writing.
def test_folder2rec_killed(sets, subtests, faults):
    # --overwrite used to remove the old .idx before renaming the new pair in: a kill left the .rec without it.
    old, new, row = _pair(sets / "recs" / "old"), _pair(sets / "recs" / "new"), Row(subtests)
    for kill_in, kill_at in [("write", 3)] + [("swap", k) for k in range(6)]:
        with row.fault(kill_in=kill_in, kill_at=kill_at):
            out = sets / f"out_{kill_in}_{kill_at}"
            prefix = out / "train"
            folder_to_rec(sets / "old", prefix, progress=False)
            assert _kill("twinface.data.convert:folder_to_rec", [sets / "new", prefix], kill_in, kill_at, DATA)
            assert _pair(prefix) in (None, old, new)              # a .rec present always reads with its own .idx
            clean_stale(out)
            row.check_kept(_pair(prefix), old, new)
            assert _pair(prefix) == (new if kill_in == "swap" and kill_at >= 4 else old)
            folder_to_rec(sets / "new", prefix, progress=False, overwrite=True)
            assert _pair(prefix) == new and sorted(os.listdir(out)) == ["train.idx", "train.rec"]
    row.record(faults, "kill -9 during data folder2rec")


# --- convert and export -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small backbone (MobileFaceNet at 32x32) as old.pth and new.pth (different weights): the previous
    destination is written from old.pth, the killed run writes from new.pth."""
    d = tmp_path_factory.mktemp("weights")
    model = trained_like("mbf", input_size=32)
    torch.save(model.state_dict(), d / "new.pth")
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}, d / "old.pth")
    return d


def _killed_writer(row, tmp_path, name, moments, write, verb, args, kwargs=None):
    """The previous destination is what write("old", path) writes, the new output write("new", path). The
    moments are killed in turn, verb(*args(dst), **kwargs), on one destination: each run starts from what the
    kill before it left, so each is also that kill's re-run; the last moment falls after the rename. Then a
    final re-run, write("new", dst)."""
    outputs = {which: tmp_path / which / name for which in ("old", "new")}
    for which, path in outputs.items():
        write(which, path)
    previous, new = sha256(outputs["old"]), sha256(outputs["new"])
    dst = tmp_path / "dst" / name
    dst.parent.mkdir()
    shutil.copyfile(outputs["old"], dst)
    for moment in moments:
        with row.fault(**moment):
            assert _kill(verb, args(dst), kwargs=kwargs, **moment)
            row.check_kept(sha256(dst), previous, new)
            assert sha256(dst) == (new if moment["kill_in"] == "after" else previous)
            assert [f for f in os.listdir(dst.parent) if not f.startswith(".")] == [name]   # no lookalike output
    write("new", dst)
    assert sha256(dst) == new and os.listdir(dst.parent) == [name]


def test_convert_killed(weights, tmp_path, subtests, faults):
    # Killed convert runs used to leave hidden temporaries (7 MB .tmp.onnx files) that nothing removed.
    # torch -> ONNX hub (a temporary, written by formats.write) -> DST .onnx (a copy of the hub), verified: the
    # source's embeddings, then DST's (the second formats.embedder), compared; then the rename.
    moments = [{"hook": "twinface_convert.formats:write", "kill_in": "cut", "kill_at": 0, "file_at": 2},   # the hub
               {"hook": "shutil:copyfile", "kill_in": "cut", "kill_at": 0, "file_at": 1},                  # DST
               {"hook": "twinface_convert.formats:embedder", "kill_in": "before", "kill_at": 1},  # verification
               {"hook": "os:replace", "kill_in": "before", "kill_at": 0, "file_at": 1, "only": "out.onnx"},
               {"hook": "os:replace", "kill_in": "after", "kill_at": 0, "file_at": 1, "only": "out.onnx"}]

    def write(which, dst):
        convert(str(weights / f"{which}.pth"), str(dst), force=True, log=lambda line: None)

    source, row = sha256(weights / "new.pth"), Row(subtests)
    _killed_writer(row, tmp_path, "out.onnx", moments, write, "twinface_convert.convert:convert",
                   lambda dst: [weights / "new.pth", dst], {"force": True})
    assert sha256(weights / "new.pth") == source
    row.record(faults, "kill -9 during convert")


def test_export_killed(weights, tmp_path, subtests, faults):
    # twinface export (torch): the ONNX graph is written, rewritten with its initializers and metadata, verified
    # with onnxruntime, then renamed into place (twinface.atomic).
    moments = [{"hook": "torch.onnx:export", "kill_in": "cut", "kill_at": 0, "file_at": 2},
               {"hook": "twinface_torch.export:verify_onnx", "kill_in": "before", "kill_at": 0},
               {"hook": "os:replace", "kill_in": "before", "kill_at": 0, "file_at": 1, "only": "out.onnx"},
               {"hook": "os:replace", "kill_in": "after", "kill_at": 0, "file_at": 1, "only": "out.onnx"}]

    def argv(which, dst):
        return ["export", "--weights", str(weights / f"{which}.pth"), "--arch", "mbf", "--input-size", "32",
                "--out", str(dst), "--force"]

    source, row = sha256(weights / "new.pth"), Row(subtests)
    _killed_writer(row, tmp_path, "out.onnx", moments, lambda which, dst: twinface_main(argv(which, dst)),
                   "twinface.cli:main", lambda dst: [argv("new", dst)])
    assert sha256(weights / "new.pth") == source
    row.record(faults, "kill -9 during export (torch)")


# --- twinface align -----------------------------------------------------------------------------------------
def _aligned(dst):
    """What an align run leaves for the user: crops (decoded), landmarks.json, report.tsv; not its journal."""
    out = {}
    for rel, data in _tree(dst).items():
        if rel.endswith(".jpg"):
            out[rel] = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).astype(np.int16)
        elif rel in ("landmarks.json", "report.tsv"):
            out[rel] = data
    return out


def _same_alignment(found, expected) -> bool:
    return found.keys() == expected.keys() and all(
        np.abs(found[k] - expected[k]).max() <= 2 if k.endswith(".jpg") else found[k] == expected[k] for k in found)


def test_align_killed(tmp_path, subtests, faults):
    """kill -9 at a crop's write, inside its rename, between a crop and its journal line, and at landmarks.json's
    and report.tsv's writes; a re-run resumes and ends with what an uninterrupted run writes."""
    from twinface import fixtures
    src = tmp_path / "photos"
    for person, names in {"obama": ["obama2.jpg", "32bit.png"], "biden": ["biden.jpg"]}.items():
        (src / person).mkdir(parents=True)
        for name in names:
            shutil.copy(fixtures.photo(name), src / person / name)
    (src / "biden" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    argv = lambda dst: ["align", os.fspath(src), os.fspath(dst), "--framework", "onnx"]   # noqa: E731
    twinface_main(argv(tmp_path / "expected"))
    expected, row = _aligned(tmp_path / "expected"), Row(subtests)
    hook = "twinface.detect.align_folder:"
    for moment in [{"hook": hook + "_write_crop", "kill_in": "before", "kill_at": 1},
                   {"hook": "os:replace", "kill_in": "before", "kill_at": 3},
                   {"hook": hook + "_write_crop", "kill_in": "after", "kill_at": 2},
                   {"hook": hook + "_write_text", "kill_in": "before", "kill_at": 1},
                   {"hook": hook + "_write_text", "kill_in": "before", "kill_at": 2}]:
        with row.fault(**moment):
            dst = tmp_path / f"dst_{moment['hook'].split(':')[1]}_{moment['kill_in']}_{moment['kill_at']}"
            assert _kill("twinface.cli:main", [argv(dst)], **moment)
            twinface_main(argv(dst))                             # the re-run resumes
            found = _aligned(dst)
            row.check_kept(_same_alignment(found, expected), False, True)
            assert _same_alignment(found, expected)
            assert not [f for d, _, files in os.walk(dst) for f in files if ".twinface-" in f and f != MARKER]
    row.record(faults, "kill -9 during align")
