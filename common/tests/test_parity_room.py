"""`twinface parity`: --quick really leaves out the large backbones, and large checks run in their own process."""
import json
import os
import subprocess

from twinface.cli import PARITY_ROOMS, parity_command


def _pytest(quick, test_file, *extra, env=None, room_index=0):
    cmd = parity_command(quick)
    rooms = cmd[-len(PARITY_ROOMS):]
    return subprocess.run([*cmd[:-len(PARITY_ROOMS)], *extra, os.path.join(rooms[room_index], test_file)],
                          cwd=os.path.dirname(rooms[0]), capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_parity_runs_the_scale_out_room_too():
    cmd = parity_command(False)
    assert [os.path.basename(p) for p in cmd[-2:]] == ["parity_tests", "distributed_tests"]
    both = subprocess.run([*cmd, "--collect-only", "-q"], cwd=os.path.dirname(cmd[-1]), capture_output=True,
                          text=True)
    assert both.returncode == 0, both.stdout[-3000:]
    assert "distributed_tests/test_scale_torch.py" in both.stdout and "parity_tests/test_step_parity.py" in both.stdout


def test_quick_leaves_out_the_large_backbones():
    full = _pytest(False, "test_backbone_parity.py", "--collect-only").stdout
    quick = _pytest(True, "test_backbone_parity.py", "--collect-only").stdout
    assert "[r100]" in full and "[r200]" in full
    assert "[r50]" in quick and "[mbf_large]" in quick
    assert "[r100]" not in quick and "[r200]" not in quick


def test_a_large_check_runs_in_its_own_process_and_its_rows_reach_the_table(tmp_path):
    report = tmp_path / "parity.json"
    run = _pytest(False, "test_own_process.py", env={"TWINFACE_PARITY_JSON": str(report)})
    assert run.returncode == 0, run.stdout[-3000:]
    rows = json.loads(report.read_text())["rows"]
    assert [(r["what"].split(":")[0], r["result"]) for r in rows] == [("harness", "pass")]
