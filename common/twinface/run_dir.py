"""A training run's directory: one writer at a time, no silent restarts, no resume under a changed config.

The trainer calls these before it writes anything, so a refused start leaves the directory as it was.
"""
import fcntl
import glob
import os
import re

import yaml

from . import config as config_mod

LOCK_NAME = ".twinface-train.lock"
CONFIG_NAME = "config.yaml"
SUMMARY_NAME = "summary.json"

# Keys a resumed run may change: they alter neither the weights a step computes nor the data order.
# train.epochs moves the end (and the lr schedule of the steps still to come), as asked for.
RESUME_SAFE = ("output", "train.epochs", "train.max_steps", "train.log_every", "train.checkpoint_every",
               "train.max_bad_steps", "train.resume", "train.distributed_timeout_s", "val.", "data.num_workers",
               "data.memory_cache_gb")


class RunLocked(RuntimeError):
    pass


class RunLock:
    """flock on a file in the run directory, holding the owner's pid. The kernel drops the lock when the process
    dies (kill -9 included), so a stale lock file never blocks the next run."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{os.path.dirname(self.path)}: another training (pid {owner}) is running in this "
                            f"directory; wait for it to end or choose another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)                  # releases the lock; the file stays (removing it would race a waiter)
        self.fd = None


def existing_outputs(out_dir: str, names) -> list:
    return [n for n in names if os.path.lexists(os.path.join(out_dir, n))]


def tensorboard_events(tb_dir: str) -> list:
    """A previous run's TensorBoard event files (relative to the run directory): a restart over them would
    show two runs' curves as one."""
    if not os.path.isdir(tb_dir):
        return []
    return [os.path.join(os.path.basename(tb_dir), n) for n in sorted(os.listdir(tb_dir))
            if n.startswith("events.out.tfevents.")]


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_changes(out_dir: str, cfg: config_mod.Config):
    """(breaking, safe): lists of 'key: saved -> now' between the run's saved config.yaml and `cfg`."""
    path = os.path.join(out_dir, CONFIG_NAME)
    try:
        with open(path) as f:
            saved = config_mod.from_dict(yaml.safe_load(f) or {})
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: {path} is missing, so the run's config cannot be checked") from None
    except (yaml.YAMLError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a readable twinface config: {e}") from None
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    for flat, c in ((old, saved), (new, cfg)):   # margins compared as resolved (null = the type's default)
        flat.update({f"head.{k}": c.head_params().get(k) for k in ("s", "m1", "m2", "m3")})
    breaking, safe = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            (safe if key.startswith(RESUME_SAFE) else breaking).append(change)
    return breaking, safe


# -- several ranks: one head shard file per rank and checkpoint ------------------------------------------------
# Ranks write their shards (state.rank1.step00000120.pt) first; rank 0's state file, written once all shards are
# on disk, names the step and so commits the checkpoint. Older shards go only after that, so a kill at any moment
# leaves a state file whose shards all exist.

def shard_path(state_path: str, rank: int, step: int) -> str:
    stem, ext = os.path.splitext(state_path)
    return f"{stem}.rank{rank}.step{step:08d}{ext}"


def shard_files(state_path: str, rank: int = None) -> list:
    """Shard files next to `state_path` (of one rank, or of all), as names relative to its directory."""
    stem, ext = os.path.splitext(state_path)
    pattern = re.compile(re.escape(os.path.basename(stem)) + r"\.rank(\d+)\.step\d{8}" + re.escape(ext) + "$")
    return sorted(os.path.basename(p) for p in glob.glob(f"{glob.escape(stem)}.rank*.step*{ext}")
                  if (m := pattern.match(os.path.basename(p))) and (rank is None or int(m.group(1)) == rank))


def remove_older_shards(state_path: str, rank: int, step: int):
    keep = os.path.basename(shard_path(state_path, rank, step))
    for name in shard_files(state_path, rank):
        if name != keep:
            os.remove(os.path.join(os.path.dirname(state_path), name))


def check_world_size(path: str, meta: dict, world_size: int):
    saved = meta.get("world_size", 1)
    if saved != world_size:
        raise ValueError(f"{path}: the run was trained over {saved} process(es), this resume has {world_size}; the "
                         f"head's class centres are sharded by the process count, so resume with {saved} "
                         f"(--nproc {saved})")
