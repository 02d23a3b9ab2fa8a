"""The harness itself: a `large` check really runs in a process of its own, and its rows reach the room's table."""
import os

import pytest


@pytest.mark.large
def test_large_checks_run_in_their_own_process(parity):
    room = int(os.environ.get("TWINFACE_PARITY_PARENT", os.getpid()))
    parity.check("harness: a large check runs outside the room's process (1 = yes)", [float(os.getpid() != room)],
                 [1.0], 0.0)
