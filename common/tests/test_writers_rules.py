"""The writer rules of twinface.atomic: temporary siblings, only our outputs replaced, never an input, and
the stale temporaries of killed writers cleaned up (or the previous output put back)."""
import json
import os

import pytest

from twinface import cli
from twinface.atomic import MARKER, Outputs, atomic_path, check_destination, clean_stale, is_ours

DEAD_PID = 2 ** 22 + 1                      # above Linux's pid_max limit: never a live process


def test_a_directory_output_appears_whole_with_our_marker_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with Outputs([out], "test writer", directory=True) as (tmp,):
            (open(os.path.join(tmp, "half"), "w")).close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with Outputs([out], "test writer", directory=True) as (tmp,):
        (open(os.path.join(tmp, "one"), "w")).close()
    assert sorted(os.listdir(out)) == [MARKER, "one"]
    assert json.loads((out / MARKER).read_text()) == {"writer": "test writer"}
    with Outputs([out], "test writer", directory=True, overwrite=True) as (tmp,):
        (open(os.path.join(tmp, "two"), "w")).close()
    assert sorted(os.listdir(out)) == [MARKER, "two"] and os.listdir(tmp_path) == ["out"]


def test_what_may_be_replaced(tmp_path):
    mine, foreign, empty, weights = tmp_path / "mine", tmp_path / "foreign", tmp_path / "empty", tmp_path / "w.pth"
    for d in (mine, foreign, empty):
        d.mkdir()
    (mine / MARKER).write_text("{}")
    (foreign / "a.txt").write_text("mine")
    weights.write_bytes(b"weights")
    with pytest.raises(FileExistsError, match=f"{mine}: already exists; pass --force to replace it"):
        check_destination(mine, directory=True, flag="--force")
    assert check_destination(mine, directory=True, overwrite=True) == str(mine)
    assert check_destination(empty, directory=True, overwrite=True) == str(empty)
    with pytest.raises(FileExistsError, match=f"{foreign}: exists and is not a twinface output directory"):
        check_destination(foreign, directory=True, overwrite=True)
    with pytest.raises(FileExistsError, match=f"{weights}: exists and is not a file of this format"):
        check_destination(weights, overwrite=True, recognise=lambda p: False)
    with pytest.raises(FileExistsError, match=f"{mine}: exists and is not a file of this format"):
        check_destination(mine, overwrite=True)                     # a file never replaces a directory
    with pytest.raises(ValueError, match=f"{weights}: expected a name ending in .onnx"):
        check_destination(weights, overwrite=True, ext=".onnx")
    (tmp_path / "link.onnx").symlink_to(weights)
    os.link(weights, tmp_path / "hard.onnx")
    for out in ("link.onnx", "hard.onnx", "."):
        with pytest.raises(ValueError, match="is or holds the input .*w.pth; an output never replaces an input"):
            check_destination(tmp_path / out, overwrite=True, inputs=[weights])
    with pytest.raises(FileExistsError):
        with atomic_path(str(mine)):
            pass
    assert (foreign / "a.txt").read_text() == "mine" and weights.read_bytes() == b"weights"


def test_export_never_writes_into_its_input(tmp_path):
    # `export --weights w.pth --out w.pth --force` wrote the ONNX model into the weights file.
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    (tmp_path / "w.onnx").symlink_to(weights)
    with pytest.raises(SystemExit, match=f"twinface export: error: {weights}: expected a name ending in .onnx"):
        cli.main(["export", "--weights", str(weights), "--arch", "r18", "--out", str(weights), "--force"])
    with pytest.raises(SystemExit, match="w.onnx: is or holds the input"):
        cli.main(["export", "--weights", str(weights), "--arch", "r18", "--out", str(tmp_path / "w.onnx"), "--force"])
    assert weights.read_bytes() == b"weights"


def _temp(parent, final, token="abc123", kind="tmp", pid=DEAD_PID):
    return parent / f".{final}.twinface-{pid}-{token}.{kind}"


def test_clean_stale_removes_only_our_dead_temporaries(tmp_path):
    dead_file = _temp(tmp_path, "a.pth")
    dead_file.write_bytes(b"half")
    dead_dir = _temp(tmp_path, "out", kind="tmp")
    dead_dir.mkdir()
    (dead_dir / MARKER).write_text("{}")
    unmarked = _temp(tmp_path, "other", kind="tmp")
    unmarked.mkdir()                                                 # our name, but no marker: not ours
    alive = _temp(tmp_path, "b.pth", pid=os.getpid())               # a writer still at work
    alive.write_bytes(b"busy")
    for name in ("out.partial", ".a.pth.tmp", "a.pth.twinface-1-x.tmp"):
        (tmp_path / name).write_text("user's")
    clean_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, unmarked.name, "out.partial", ".a.pth.tmp",
                                                   "a.pth.twinface-1-x.tmp"])


def test_clean_stale_finishes_or_undoes_an_interrupted_swap(tmp_path):
    # killed after the .rec was moved aside and the new .idx put in place: the previous pair comes back
    (tmp_path / "t.idx").write_text("new idx")
    _temp(tmp_path, "t.rec", kind="old").write_text("old rec")
    _temp(tmp_path, "t.idx", kind="keep").write_text("old idx")
    # killed after the commit, before the asides were removed: the new output stays
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "new").write_text("")
    _temp(tmp_path, "d", token="f00", kind="old").mkdir()
    clean_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["d", "t.idx", "t.rec"] and os.listdir(tmp_path / "d") == ["new"]
    assert (tmp_path / "t.rec").read_text() == "old rec" and (tmp_path / "t.idx").read_text() == "old idx"


def test_temporaries_never_take_a_fixed_name(tmp_path):
    # save_bin wrote through `<path>.partial`, save_resolved through `config.yaml.tmp`, RecordWriter through
    # `<rec>.partial`: a user's file of that name was overwritten, then renamed away.
    from twinface import config
    from twinface.data.recordio import write_insightface_rec
    from twinface.data.verification_bin import load_bin, save_bin
    names = ["v.bin.partial", "config.yaml.tmp", "t.rec.partial", "t.idx.partial"]
    for name in names:
        (tmp_path / name).write_text("mine")
    save_bin(tmp_path / "v.bin", [b"a", b"b"], [True])
    config.save_resolved(config.Config(), str(tmp_path))
    write_insightface_rec(tmp_path / "t", [(0, b"image")])
    assert all((tmp_path / name).read_text() == "mine" for name in names)
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["v.bin", "config.yaml", "t.rec", "t.idx"])
    assert load_bin(tmp_path / "v.bin")[1].tolist() == [True]


def test_a_swap_cut_by_a_kill_is_undone_before_the_next_check(tmp_path):
    # killed between moving the old output aside and renaming the new one in: the output seems absent
    _temp(tmp_path, "out", kind="old").mkdir()
    (_temp(tmp_path, "out", kind="old") / MARKER).write_text("{}")
    with pytest.raises(FileExistsError, match="out: already exists"):
        Outputs([tmp_path / "out"], "test writer", directory=True)
    assert os.listdir(tmp_path) == ["out"] and is_ours(tmp_path / "out")
