"""`train --nproc N` for TF: N workers with their TF_CONFIG, watched together."""
import json
import sys
import time

from twinface import launch

WORKER = """
import json, os, sys, time
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
if index == 1:
    time.sleep(1)
    sys.exit(3)
time.sleep(120)
"""


def test_a_failing_worker_stops_the_others_and_is_named(capfd):
    t0 = time.time()
    code = launch.run_tf_workers(2, [sys.executable, "-c", WORKER], grace_s=5)
    assert code == 3 and time.time() - t0 < 30                 # the sleeping worker did not hold the job
    assert "worker rank 1 of 2 exited with code 3; stopped the other worker(s)" in capfd.readouterr().err


def test_workers_get_a_cluster_of_free_ports_and_their_share_of_the_cores():
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    config = json.loads(launch.tf_config(ports, 2))
    assert config == {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": 2}}
    env = launch.worker_env(2, {})
    assert env[launch.LAUNCHED] == "1" and int(env["TF_NUM_INTRAOP_THREADS"]) >= 1


def test_torch_goes_through_torchrun_standalone():
    cmd = launch.torchrun_command(4, ["train", "--framework", "torch"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    assert cmd[-4:] == ["twinface.cli", "train", "--framework", "torch"]
