"""Atomic file writes: a kill at any moment leaves either the old file or the new one, never half of one."""
import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed.

    `suffix` keeps extensions that writers insist on (Keras wants '.weights.h5').
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix,
                               dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)                  # mkstemp makes 0600; a saved file gets the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
