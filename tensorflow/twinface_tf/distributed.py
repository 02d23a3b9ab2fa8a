"""tf.distribute as the training loop uses it: MultiWorkerMirroredStrategy from TF_CONFIG, one replica per
worker process, and the collectives of a training step, with the torch twin's gradient rules
(twinface_torch.distributed).

The strategy serves only for its collectives. Variables are created outside its scope, so they are plain
per-process variables that every worker updates identically from the same reduced gradients, as DDP ranks do.
That keeps the two reductions a Partial FC step needs apart: the backbone's gradients are summed over workers
here (sum_gradients, once), the head shard's are never reduced (each worker holds other centres, of possibly
other shapes). Keras' optimizers then apply outside strategy.run, where they reduce nothing.

Collectives run inside strategy.run (replica context). Every function is the identity when the replica context
has one replica, so a single process is the world-size-1 case of the same code. Every worker must issue the
same collectives in the same order (tf.function traces included), as with torch.distributed.
"""
import contextlib
import json
import os
import re

import tensorflow as tf


def world() -> tuple:
    """(rank, world_size) from TF_CONFIG: this worker's task index and the number of workers; (0, 1) without."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster = config.get("cluster", {})
    workers = cluster.get("worker", [])
    others = sorted(set(cluster) - {"worker"})
    if others:
        raise ValueError(f"TF_CONFIG: the cluster may name only 'worker' tasks (worker 0 is the chief), "
                         f"got {others}")
    if len(workers) <= 1:
        return 0, 1
    task = config.get("task", {})
    if task.get("type") != "worker" or not 0 <= int(task.get("index", -1)) < len(workers):
        raise ValueError(f"TF_CONFIG: task must be {{'type': 'worker', 'index': 0..{len(workers) - 1}}} "
                         f"(one of cluster.worker), got {task}")
    return int(task["index"]), len(workers)


def strategy(world_size: int, timeout_s: float):
    """MultiWorkerMirroredStrategy over TF_CONFIG's workers; the default (no-op) strategy for one process.
    A worker that dies is noticed by its peers' next collective (connection reset, well under a second here), and
    one that hangs or whose host vanishes by the coordination service's missed heartbeats (about 10 s);
    `timeout_s` bounds any collective beyond that (it must outlast rank 0's evaluation and checkpoints, which
    the others wait through)."""
    if world_size == 1:
        return tf.distribute.get_strategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO,     # RING on CPU, NCCL on GPU
        timeout_seconds=timeout_s)
    try:
        s = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except tf.errors.UnknownError as e:                # TF's only words for a busy port
        rank = world()[0]
        address = json.loads(os.environ["TF_CONFIG"])["cluster"]["worker"][rank]
        raise OSError(f"TF_CONFIG: worker {rank} cannot serve {address} (is the port in use?): {e}") from None
    if s.num_replicas_in_sync != world_size:
        raise ValueError(f"TF_CONFIG names {world_size} workers but the strategy has {s.num_replicas_in_sync} "
                         f"replicas: each worker process must see exactly one device (set CUDA_VISIBLE_DEVICES "
                         f"per worker)")
    return s


def run(s, fn, *args):
    """fn(*args) as this worker's replica of `s`; its outputs as plain tensors (one replica per worker)."""
    if s.num_replicas_in_sync == 1:
        return fn(*args)
    return tf.nest.map_structure(lambda t: s.experimental_local_results(t)[0], s.run(fn, args))


def barrier(s):
    """Every worker waits here until all have arrived."""
    if s.num_replicas_in_sync > 1:
        _barrier(s)


@tf.function
def _barrier(s):
    run(s, lambda: _context().all_reduce("sum", tf.ones([1])))


# what a collective raises when a peer worker went away (connection reset, missed heartbeats)
PEER_LOST = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
             tf.errors.DeadlineExceededError)


@contextlib.contextmanager
def peers_lost_explained(rank: int, world_size: int):
    """A collective that failed because a peer went away becomes one line naming that worker."""
    try:
        yield
    except PEER_LOST as e:
        if world_size == 1:
            raise
        text = str(e)
        tasks = sorted(set(re.findall(r"task:(\d+)", text)) - {str(rank)})
        who = f"worker {', '.join(tasks)}" if tasks else "another worker"
        reason = re.search(r"aborted by: (.*)", text)      # the collective's own words, e.g. connection reset
        reason = reason.group(1).strip() if reason else text.strip().split("\n")[-1]
        raise RuntimeError(f"TF worker {rank} of {world_size}: {who} of the run stopped or is unreachable, so "
                           f"the training cannot go on ({type(e).__name__}: {reason})") from None


def _context():
    """The replica context when more than one replica takes part, else None."""
    ctx = tf.distribute.get_replica_context()
    return ctx if ctx is not None and ctx.num_replicas_in_sync > 1 else None


def running() -> bool:
    return _context() is not None


def _sum(values):
    # tf.identity: a tensor fed into tf.function has no device, and the all-reduce needs one as its destination
    return _context().all_reduce("sum", tf.nest.map_structure(tf.identity, values))


def all_agree(flag):
    """True only if `flag` (a scalar bool tensor) is True on every worker: a step is skipped by all or none."""
    if not running():
        return flag
    return _sum(tf.cast(flag, tf.int32)) == _context().num_replicas_in_sync


def sum_gradients(grads):
    """Backbone gradients summed over workers: every worker's loss is the global batch's, and its gradient
    covers only its own samples, so the sum is the gradient of that loss (the torch twin's DDP hook)."""
    return _sum(grads) if running() and grads else grads


def average(values):
    """The mean over workers (BatchNorm moving statistics, as the torch twin's average_buffers)."""
    if not running():
        return values
    n = float(_context().num_replicas_in_sync)
    return [v / n for v in _sum(values)]


def all_max(x):
    """Elementwise max over workers, no gradient. tf.distribute reduces by SUM or MEAN only: gather, then max."""
    x = tf.stop_gradient(x)
    if not running():
        return x
    return tf.reduce_max(_context().all_gather(tf.identity(x)[None], axis=0), axis=0)


def sum_over_ranks(x):
    """Forward: the sum over workers. Backward: the incoming gradient, unchanged (every worker computes the same
    loss from the sum, so d loss / d (this worker's part) is d loss / d sum)."""
    if not running():
        return x

    @tf.custom_gradient
    def _sum_identity_grad(x):
        return _sum(tf.stop_gradient(x)), lambda dy: dy
    return _sum_identity_grad(x)


def gather(x):
    """[n, ...] per worker -> [world * n, ...] in rank order. Backward: this worker's rows of the gradient summed
    over workers, since each worker's loss term reaches every gathered row (through its own shard of centres)."""
    if not running():
        return x

    @tf.custom_gradient
    def _gather(x):
        def grad(dy):
            rows = tf.shape(x)[0]
            start = tf.cast(_context().replica_id_in_sync_group, tf.int32) * rows
            return _sum(dy)[start:start + rows]
        return _context().all_gather(tf.identity(tf.stop_gradient(x)), axis=0), grad
    return _gather(x)


def gather_labels(labels):
    return _context().all_gather(tf.identity(labels), axis=0) if running() else labels
