"""`twinface train --nproc N` on one machine: each twin's own multi-process engine, started for the user.

torch: torchrun (`--standalone` picks a free rendezvous port; it stops every worker when one fails and names the
failed rank). TensorFlow has no launcher: N processes, each with the TF_CONFIG that MultiWorkerMirroredStrategy
reads, on 127.0.0.1 ports found free, watched here so that one failing stops the others. Across hosts the user
starts the processes as docs/distributed.md shows; this module is not involved.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

LAUNCHED = "TWINFACE_LAUNCHED"            # set in the workers: they train, never launch again


def launched() -> bool:
    return os.environ.get(LAUNCHED) == "1"


def torchrun_command(nproc: int, argv: list, module: str = "twinface.cli") -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *argv]


def free_ports(count: int) -> list:
    """Ports the kernel hands out as free (held together while asking, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: list, index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def worker_env(nproc: int, extra: dict) -> dict:
    """Each worker gets its share of the cores (as torchrun sets OMP_NUM_THREADS), unless the user chose."""
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    env = {**os.environ, LAUNCHED: "1", **extra}
    for key in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env.setdefault(key, threads)
    return env


def run_tf_workers(nproc: int, command: list, grace_s: float = 10.0) -> int:
    """Start `command` as the workers; when one exits with an error stop the others, and return that error's
    exit code."""
    ports = free_ports(nproc)
    procs = [subprocess.Popen(command, env=worker_env(nproc, {"TF_CONFIG": tf_config(ports, i)}))
             for i in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                _stop(procs, grace_s)
                print(f"twinface train: worker rank {rank} of {nproc} exited with code {code}; stopped the "
                      f"other worker(s)", file=sys.stderr)
                return code if code > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise


def _stop(procs, grace_s: float):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(framework: str, nproc: int, argv: list) -> int:
    """Run `twinface <argv>` as `nproc` processes of `framework`'s engine; the exit code of the job."""
    if framework == "torch":
        return subprocess.call(torchrun_command(nproc, argv), env=worker_env(nproc, {}))
    return run_tf_workers(nproc, [sys.executable, "-m", "twinface.cli", *argv])
