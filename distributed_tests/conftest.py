"""Scale-out room: real multi-process runs (torchrun, TF_CONFIG workers) on CPU, compared with one process.

Every comparison is a row of `twinface parity`'s table (the same `parity` fixture as parity_tests; `twinface
parity` runs both rooms). The processes are started by processes.py, each run with a hard timeout.
"""
import pytest

from twinface.testing import Parity, parity_summary


@pytest.fixture(scope="session")
def parity():
    return Parity()


def pytest_terminal_summary(terminalreporter):
    parity_summary(terminalreporter)
