"""A full disk while twinface writes, made real with a file-size limit: RLIMIT_FSIZE in the writer's process,
SIGXFSZ ignored, fails every write past the limit with EFBIG ('File too large'), as a full disk fails it with
ENOSPC. (A monkeypatched ENOSPC in a unit test proves less: here the framework's own writer hits the error.)

What must hold: the command fails with one line naming the file being written and the OS's reason; the previous
checkpoint (or output) survives byte for byte and loads; no temporary file remains; and a run without the limit
resumes and finishes, ending bit-identical to a run that never hit the limit.
"""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from twinface.data.convert import folder_to_rec, rec_to_folder
from twinface.data.recordio import InsightFaceRec
from twinface.testing import tiny_dataset

from .killing import FILES, Row, assert_same_backbone, saved_step, sha256, temporaries, tiny_run_config


def _twinface(*argv, limit=None):
    """`twinface ARGV` in a subprocess, writes limited to `limit` bytes per file; returns (rc, last stderr line)."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # else the kernel kills the writer instead of refusing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = subprocess.run([sys.executable, "-m", "twinface.cli", *map(str, argv)], capture_output=True, text=True,
                         preexec_fn=limited if limit else None, timeout=300)
    return run.returncode, (run.stderr.strip().splitlines() or [""])[-1]


def _refused(path) -> str:
    return rf"^twinface \w+: error: {re.escape(str(path))}: (writing failed \()?(\[Errno 27\] )?File too large\b"


@pytest.mark.parametrize("framework", ["torch", "tf"])
def test_a_full_disk_during_a_checkpoint_write(framework, tmp_path, subtests, faults):
    # One epoch, then --resume for a second under a limit: the epoch-2 checkpoint write fails. The backbone is
    # written first, then the state: with the limit between their sizes the state fails (and the run resumes
    # without the limit), with the limit below the backbone's size the backbone fails. torch used to report only
    # "unexpected pos 6715392 vs 6715288", Keras the internals of h5py.
    state_file, backbone_file = FILES[framework]
    one, two = tiny_run_config(tmp_path, 1), tiny_run_config(tmp_path, 2)
    first = tmp_path / "first"
    rc, err = _twinface("train", "--framework", framework, "--config", one, "--output", first)
    assert rc == 0, err
    backbone_size, state_size = (os.path.getsize(first / name) for name in (backbone_file, state_file))
    assert backbone_size < state_size
    row = Row(subtests)
    for failing, limit in [(state_file, (backbone_size + state_size) // 2), (backbone_file, backbone_size // 2)]:
        with row.fault(file=failing):
            run = tmp_path / failing
            shutil.copytree(first, run)
            before = {name: sha256(run / name) for name in (state_file, backbone_file)}
            rc, err = _twinface("train", "--framework", framework, "--config", two, "--output", run, "--resume",
                                limit=limit)
            assert rc == 1 and re.match(_refused(run / failing), err), err
            assert "the previous version of the file, if any, is unchanged" in err
            row.check_kept(sha256(run / state_file), before[state_file], None)
            assert saved_step(framework, run) == 4 and not temporaries(run)
            if failing == backbone_file:                # both files as they were, and readable
                assert sha256(run / backbone_file) == before[backbone_file]
                assert_same_backbone(framework, first, run)
                continue
            epoch_2 = tmp_path / "epoch_2"              # the backbone of epoch 2 came first, whole
            shutil.copytree(run, epoch_2)
            rc, err = _twinface("train", "--framework", framework, "--config", two, "--output", run, "--resume")
            assert rc == 0, err
            assert saved_step(framework, run) == 8 and not temporaries(run)
            assert_same_backbone(framework, epoch_2, run)   # as if the limit had never been there
    row.record(faults, f"disk full (RLIMIT_FSIZE) during a {framework} checkpoint write")


def test_a_full_disk_during_data_conversions(tmp_path, subtests, faults):
    # The error used to name the conversion's source (`twinface data: error: SRC: [Errno 27] File too large`), and
    # folder2rec left its temporaries behind when closing the half-written pair failed again.
    synth = tiny_dataset(tmp_path / "synth")
    folder, small = tmp_path / "folder", tmp_path / "small"
    rec_to_folder(os.path.join(synth, "train"), folder, progress=False)
    os.makedirs(small)
    for identity in sorted(name for name in os.listdir(folder) if os.path.isdir(folder / name))[:2]:
        shutil.copytree(folder / identity, small / identity)
    row = Row(subtests)

    with row.fault(verb="folder2rec"):
        out = tmp_path / "recs"
        folder_to_rec(small, out / "train", progress=False)               # the previous destination
        before = [sha256(out / name) for name in ("train.rec", "train.idx")]
        rc, err = _twinface("data", "folder2rec", folder, out / "train", "--overwrite",
                            limit=os.path.getsize(os.path.join(synth, "train.rec")) // 2)
        assert rc == 1 and re.match(_refused(out / "train.rec"), err), err
        row.check_kept([sha256(out / name) for name in ("train.rec", "train.idx")], before, None)
        assert sorted(os.listdir(out)) == ["train.idx", "train.rec"]
        rc, err = _twinface("data", "folder2rec", folder, out / "train", "--overwrite")
        assert rc == 0, err
        assert len(InsightFaceRec(out / "train")) == 36 and sorted(os.listdir(out)) == ["train.idx", "train.rec"]

    folder_to_rec(small, tmp_path / "small_recs" / "train", progress=False)
    smallest = min(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files
                   if not f.startswith("."))
    for what, limit in [("its first file", 16), ("an image", smallest // 2)]:
        with row.fault(verb="rec2folder", failing=what):
            out = tmp_path / what.replace(" ", "_")
            rec_to_folder(tmp_path / "small_recs" / "train", out / "dst", progress=False)   # the previous destination
            before = _tree(out / "dst")
            rc, err = _twinface("data", "rec2folder", os.path.join(synth, "train"), out / "dst", "--overwrite",
                                limit=limit)
            assert rc == 1 and re.match(_refused(out / "dst"), err), err
            row.check_kept(_tree(out / "dst"), before, None)
            assert os.listdir(out) == ["dst"]
            rc, err = _twinface("data", "rec2folder", os.path.join(synth, "train"), out / "dst", "--overwrite")
            assert rc == 0, err
            assert _tree(out / "dst") == _tree(folder) and os.listdir(out) == ["dst"]
    row.record(faults, "disk full (RLIMIT_FSIZE) during data folder2rec / rec2folder")


def _tree(root):
    """{relative path: sha256} of every file under root."""
    return {os.path.relpath(os.path.join(d, f), root): sha256(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}
