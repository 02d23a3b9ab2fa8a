"""Run a command and report the peak memory of its whole process tree (Linux).

    python -m twinface.peak_rss LABEL REPORT_FILE -- COMMAND...

Appends one line to REPORT_FILE: the peak sum of anonymous RSS over the command and all its descendants
(sampled every 0.2 s; what the OOM killer weighs when a room starts helper processes) and the largest single
process (exact, from the kernel's accounting of waited-for children). Exits with the command's status.
"""
import os
import resource
import subprocess
import sys
import time

INTERVAL_S = 0.2


def _anon_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:                      # the process ended between listing and reading
        pass
    return 0


def tree_anon_rss_kib(root):
    """Sum of RssAnon over `root` and every descendant alive now."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _anon_rss_kib(pid)
        stack.extend(children.get(pid, ()))
    return total


def run(command):
    """(exit status, peak tree RSS in KiB, largest single process's max RSS in KiB) of `command`."""
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_anon_rss_kib(proc.pid))
        time.sleep(INTERVAL_S)
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return proc.returncode, peak, largest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 4 or argv[2] != "--":
        raise SystemExit("usage: python -m twinface.peak_rss LABEL REPORT_FILE -- COMMAND...")
    label, report, command = argv[0], argv[1], argv[3:]
    code, peak, largest = run(command)
    with open(report, "a") as f:
        f.write(f"{label}: peak RSS {peak / 1024:.0f} MiB (process tree, sampled), largest process "
                f"{largest / 1024:.0f} MiB\n")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
