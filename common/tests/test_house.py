"""Rules that keep the house standing (docs/design.md, "Rooms and their rules")."""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FRAMEWORKS = {"torch", "tensorflow", "keras", "tf2onnx", "tf_keras"}


def test_no_init_in_tensorflow_folder():
    assert not (ROOT / "tensorflow" / "__init__.py").exists()


def test_import_tensorflow_from_root_loads_the_installed_package():
    out = subprocess.run([sys.executable, "-c", "import tensorflow; print(tensorflow.__file__)"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True)
    path = pathlib.Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert "site-packages" in path.parts, path
    assert ROOT / "tensorflow" not in path.parents


def test_common_never_imports_a_framework_statically():
    offenders = []
    for path in (ROOT / "common" / "twinface").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders, offenders


def test_importing_common_loads_no_framework():
    code = ("import importlib, pkgutil, sys, twinface\n"
            "for m in pkgutil.walk_packages(twinface.__path__, 'twinface.'):\n"
            "    if m.name != 'twinface.cli': importlib.import_module(m.name)\n"
            "import twinface.cli\n"
            f"print(sorted(set(sys.modules) & set({sorted(FRAMEWORKS)!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _modules(room):
    return {p.relative_to(room).as_posix() for p in room.rglob("*.py")}


def test_twins_mirror_file_for_file():
    torch_files = _modules(ROOT / "pytorch" / "twinface_torch")
    tf_files = _modules(ROOT / "tensorflow" / "twinface_tf")
    # Keras needs a torch-semantics BatchNorm (torch has nn.BatchNorm2d); TFLite is TF's own deployment format
    tf_only = {"layers.py", "tflite.py"}
    # data-like weights for checks and the bench (the TF twin gets its weights from the torch twin's); AOTInductor
    # packages are torch's own compiled format
    torch_only = {"calibrate.py", "aot.py"}
    assert torch_files - torch_only == tf_files - tf_only
