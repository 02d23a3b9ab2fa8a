"""Parity harness: every comparison becomes a row (what, max diff, tolerance, pass/fail) of one table.

`make parity` (twinface parity) prints the table and writes it as JSON; under `make test` the same checks run
as ordinary assertions. Tolerances are docs/design.md's (fp32, CPU); a looser one carries its measured reason.
Checks marked `large` (IResNet-100/200) run each in a process of their own, so the room's memory is that of
one large model at a time; `twinface parity --quick` leaves them out.
"""
import json
import os
import subprocess
import sys
import tempfile

from twinface.testing import PARITY_ROWS, Parity, parity_summary, release_memory  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

CHILD = "TWINFACE_PARITY_PARENT"          # set in a large check's own process: the pid of the room's process


@pytest.fixture(scope="session")
def parity():
    return Parity()


@pytest.fixture(autouse=True)
def _release_models():
    """Twins and their ONNX graphs take GBs: after every test drop Keras' global graph state, collect, and hand
    glibc's free heap back to the system (otherwise the process keeps its largest test's footprint)."""
    yield
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    release_memory()


def pytest_configure(config):
    config.addinivalue_line("markers", "large: an IResNet-100/200 check; runs in its own process, and "
                                       "`twinface parity --quick` leaves it out")


def pytest_pyfunc_call(pyfuncitem):
    """Run a `large` check as its own pytest process and take its rows into this room's table."""
    if pyfuncitem.get_closest_marker("large") is None or CHILD in os.environ:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        rows = os.path.join(tmp, "rows.json")
        env = {**os.environ, CHILD: str(os.getpid()), "TWINFACE_PARITY_JSON": rows}
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                               cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True)
        if os.path.exists(rows):
            with open(rows) as f:
                PARITY_ROWS.extend(json.load(f)["rows"])
    assert child.returncode == 0, f"{pyfuncitem.nodeid} failed in its own process:\n{child.stdout[-6000:]}"
    return True


def pytest_terminal_summary(terminalreporter):
    parity_summary(terminalreporter)


# --- building twins with the same weights -------------------------------------------------------------
@pytest.fixture(scope="session")
def make_twins():
    """(torch model, Keras model) of one architecture holding identical weights."""
    def build(arch, batch=4, input_size=112, calibrate=True, **kwargs):
        import torch
        from twinface_convert.mapping import torch_to_keras
        from twinface_tf.backbones import get_model as tf_model
        from twinface_torch.backbones import get_model as torch_model
        from twinface_torch.calibrate import calibrate_batchnorm
        torch.manual_seed(0)
        tm = torch_model(arch, input_size=input_size, **kwargs)
        if calibrate:
            calibrate_batchnorm(tm, torch.from_numpy(images_nchw(batch, input_size, seed=99)))
        km = tf_model(arch, input_size=input_size, **kwargs)
        torch_to_keras(tm.state_dict(), km, source=f"torch {arch}")
        return tm, km
    return build


def images_nchw(n, size=112, seed=0):
    """Normalised float32 images in torch layout; real-looking range [-1, 1]."""
    rng = np.random.default_rng(seed)
    return ((rng.integers(0, 256, (n, 3, size, size)).astype(np.float32) - 127.5) / 127.5)


@pytest.fixture(scope="session")
def images():
    return images_nchw
