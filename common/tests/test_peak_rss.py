import re
import subprocess
import sys

# A parent holding 120 MiB starts a child that holds 80 MiB; both are alive together for 1.5 s.
TREE = ("import subprocess, sys, time; held = b'x' * (120 << 20); "
        "subprocess.run([sys.executable, '-c', \"import time; held = b'y' * (80 << 20); time.sleep(1.5)\"])")


def _wrapped(tmp_path, code):
    report = tmp_path / "peaks.txt"
    run = subprocess.run([sys.executable, "-m", "twinface.peak_rss", "room-a", str(report), "--", sys.executable,
                          "-c", code])
    return run.returncode, report.read_text()


def test_peak_counts_the_whole_process_tree_and_names_the_largest_process(tmp_path):
    code, line = _wrapped(tmp_path, TREE)
    assert code == 0 and line.count("\n") == 1
    peak, largest = map(int, re.fullmatch(r"room-a: peak RSS (\d+) MiB \(process tree, sampled\), "
                                          r"largest process (\d+) MiB\n", line).groups())
    assert 190 < peak < 400                      # parent + child together, not just one of them
    assert 120 < largest < peak


def test_the_command_status_is_passed_on(tmp_path):
    assert _wrapped(tmp_path, "raise SystemExit(3)")[0] == 3
