"""Fault-injection room: every test records what it did to twinface as rows of one table.

A row is one fault class (say "kill -9 during torch training"): how many faults were injected, how many the
product survived (the outcome the test demands: resumed, refused with a one-line error naming the file, the
previous output intact ...), and how many left data lost (a finished epoch, a previous output, the user's input).
A test asserts its own outcomes; the table is the figures the README quotes, printed at the end of the room.
"""
import pytest

from twinface.testing import write_report

ROWS = []


class Faults:
    def record(self, fault: str, injected: int, survived: int, data_lost: int = 0):
        """Add one row; the test itself asserts survived == injected and data_lost == 0."""
        ROWS.append({"fault": fault, "injected": injected, "survived": survived, "data_lost": data_lost})


@pytest.fixture(scope="session")
def faults():
    return Faults()


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    width = max(len(r["fault"]) for r in ROWS)
    tr.section("twinface reliability")
    tr.write_line(f"{'fault':<{width}}  {'injected':>8}  {'survived':>8}  {'data lost':>9}")
    for r in ROWS:
        tr.write_line(f"{r['fault']:<{width}}  {r['injected']:>8}  {r['survived']:>8}  {r['data_lost']:>9}")
    total = {k: sum(r[k] for r in ROWS) for k in ("injected", "survived", "data_lost")}
    tr.write_line(f"{'all':<{width}}  {total['injected']:>8}  {total['survived']:>8}  {total['data_lost']:>9}")
    write_report(tr, "TWINFACE_RELIABILITY_JSON", {"rows": ROWS, "total": total})
