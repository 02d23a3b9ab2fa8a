"""Starting the processes of a scale-out check: torchrun, TF_CONFIG workers, or one plain process, each with a
hard timeout that kills the whole process tree (a hang is a failure, not a stuck suite)."""
import os
import signal
import subprocess
import sys

from twinface.launch import LAUNCHED, free_ports, tf_config, worker_env

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def run(cmd, env=None, timeout=TIMEOUT_S, expect_ok=True):
    """Run `cmd` in a session of its own: at the timeout the whole tree goes (a launcher's workers included)."""
    proc = subprocess.Popen(cmd, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung: still running after {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if expect_ok:
        assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{out[-4000:]}\n{err[-6000:]}"
    return done


def torchrun(script_args, nproc=2, timeout=TIMEOUT_S, expect_ok=True):
    """torchrun --standalone over `nproc` CPU processes of HERE/<script_args>."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script_args]
    return run(cmd, worker_env(nproc, {LAUNCHED: "1"}), timeout, expect_ok)


def alone(script_args, timeout=TIMEOUT_S, expect_ok=True):
    """The same script as one plain process (world size 1)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TF_CONFIG")}
    return run([sys.executable, *script_args], env, timeout, expect_ok)


def tf_workers(script_args, nproc=2, timeout=TIMEOUT_S):
    """`nproc` TF processes with the TF_CONFIG MultiWorkerMirroredStrategy reads; returns their exit codes and
    outputs (all must end within `timeout`)."""
    ports = free_ports(nproc)
    procs = [subprocess.Popen([sys.executable, *script_args], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=worker_env(nproc, {"TF_CONFIG": tf_config(ports, i)})) for i in range(nproc)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"TF workers {' '.join(script_args)} hung: still running after {timeout} s")
    return [p.returncode for p in procs], outs
