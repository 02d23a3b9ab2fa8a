"""kill -9 during `data rec2folder` and `data folder2rec`, at every step of the final swap and mid-write.

What must hold afterwards: no output that looks complete but is not; the previous destination intact (or, for
a kill inside the swap, put back by the next writer's clean-up); and a re-run succeeds, leaving nothing behind.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from twinface.atomic import MARKER, clean_stale
from twinface.data.convert import folder_to_rec, rec_to_folder
from twinface.data.images import encode_image
from twinface.data.recordio import InsightFaceRec

# Runs one conversion with overwrite=True and kills itself (SIGKILL) at the chosen moment:
#   swap:   before the kill_at-th filesystem rename/link/remove of the commit;
#   rmtree: while the replaced output is being deleted, after a few of its files;
#   write:  after kill_at images.
KILLER = r"""
import json, os, shutil, signal, sys
from twinface.data import convert
spec = json.loads(sys.argv[1])
count = [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted(fn):
    def wrapped(*args, **kwargs):
        if count[0] == spec["kill_at"]:
            die()
        count[0] += 1
        return fn(*args, **kwargs)
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
else:
    read, write = convert._read_bytes, convert.write_image_folder
    convert._read_bytes = counted(read)
    convert.write_image_folder = lambda root, samples: write(root, (counted(lambda s: s)(s) for s in samples))
getattr(convert, spec["verb"])(*spec["args"], progress=False, overwrite=True)
print("finished", flush=True)
"""


def _kill(verb, args, kill_in, kill_at) -> bool:
    """Run the conversion in a subprocess; True when it was killed, False when it finished."""
    spec = json.dumps({"verb": verb, "args": [str(a) for a in args], "kill_in": kill_in, "kill_at": kill_at})
    run = subprocess.run([sys.executable, "-c", KILLER, spec], capture_output=True, text=True, timeout=120)
    assert run.returncode in (0, -signal.SIGKILL), run.stderr
    return run.returncode == -signal.SIGKILL


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
    (tmp_path / "out").mkdir()
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


@pytest.mark.parametrize("kill_in, kill_at", [("write", 3), ("swap", 0), ("swap", 1), ("rmtree", 0)])
def test_rec2folder_killed(sets, kill_in, kill_at):
    # A kill while --overwrite removed the old folder used to leave a smaller folder that still looked valid.
    dst = sets / "dst"
    rec_to_folder(sets / "recs" / "old", dst, progress=False)
    old = _tree(dst)
    new_dir = sets / "expected_new"
    rec_to_folder(sets / "recs" / "new", new_dir, progress=False)
    new = _tree(new_dir)
    assert _kill("rec_to_folder", [sets / "recs" / "new", dst], kill_in, kill_at)
    clean_stale(sets)                                          # what the next writer into this folder does first
    assert _tree(dst) == (new if kill_in == "rmtree" else old)  # whole, old or new, never a mixture
    rec_to_folder(sets / "recs" / "new", dst, progress=False, overwrite=True)
    assert _tree(dst) == new
    assert sorted(os.listdir(sets)) == ["dst", "expected_new", "new", "old", "out", "recs"]


# The swap of a .rec pair makes 6 calls: link .idx aside, move .rec aside, new .idx in, new .rec in (the
# commit), remove the two asides. Kill before each, and in the middle of writing.
@pytest.mark.parametrize("kill_in, kill_at", [("write", 3)] + [("swap", k) for k in range(6)])
def test_folder2rec_killed(sets, kill_in, kill_at):
    # --overwrite used to remove the old .idx before renaming the new pair in: a kill left the .rec without it.
    prefix = sets / "out" / "train"
    folder_to_rec(sets / "old", prefix, progress=False)
    old, new = _pair(sets / "recs" / "old"), _pair(sets / "recs" / "new")
    assert _kill("folder_to_rec", [sets / "new", prefix], kill_in, kill_at)
    assert _pair(prefix) in (None, old, new)                  # a .rec present always reads with its own .idx
    clean_stale(sets / "out")
    assert _pair(prefix) == (new if kill_in == "swap" and kill_at >= 4 else old)
    folder_to_rec(sets / "new", prefix, progress=False, overwrite=True)
    assert _pair(prefix) == new and sorted(os.listdir(sets / "out")) == ["train.idx", "train.rec"]
