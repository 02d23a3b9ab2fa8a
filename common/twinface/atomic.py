"""Every file and directory twinface writes goes through here (docs/design.md, "Writers").

- An output is written into a fresh temporary sibling and renamed into place only once complete: a kill at
  any moment leaves the previous output or the new one, never half of one.
- An existing destination is replaced only when the caller allows it (--overwrite / --force) and only when
  it is ours: a directory holding MARKER (or empty), or a file the caller recognises as its own format.
- An output is never an input, nor a directory holding one.
- Temporaries carry their writer's pid in the name. The next writer into the same directory removes those of
  dead processes, and where a kill fell inside a swap it puts the previous output back (clean_stale).
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile

MARKER = ".twinface-output"
_STALE = re.compile(r"^\.(?P<final>.+)\.twinface-(?P<pid>\d+)-(?P<token>\w+)\.(?P<kind>tmp|old|keep)(\..*)?$")


def is_ours(path) -> bool:
    """A directory twinface wrote (it holds MARKER)."""
    return os.path.isfile(os.path.join(path, MARKER))


def check_destination(path, *, overwrite=False, flag="--overwrite", inputs=(), directory=False, recognise=None,
                      what=None, ext=None) -> str:
    """The absolute destination, or an error naming it: it is (or holds) one of `inputs`, lacks the extension
    `ext`, or exists and may not be replaced. Replaceable with `overwrite`: an empty file or directory, a
    directory holding MARKER, and whatever `recognise(path)` accepts (of the kind `directory` says; a file
    without `recognise` when none is given). `what` names the accepted kind in the message. What killed
    writers left beside `path` is cleaned up first (clean_stale), so the check sees the true state."""
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep) or os.sep
    if os.path.isdir(os.path.dirname(path)):
        clean_stale(os.path.dirname(path))
    if ext and not path.endswith(ext):
        raise ValueError(f"{path}: expected a name ending in {ext}")
    for source in filter(None, inputs):
        if _is_or_holds(path, os.fspath(source)):
            raise ValueError(f"{path}: is or holds the input {source}; an output never replaces an input")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path}: already exists; pass {flag} to replace it")
        if not _replaceable(path, directory, recognise):
            kind = what or (f"a twinface output directory (it holds no {MARKER})" if directory
                            else "a file of this format")
            raise FileExistsError(f"{path}: exists and is not {kind}; refusing to replace it")
    return path


def _replaceable(path, directory, recognise) -> bool:
    if os.path.isdir(path) and not os.path.islink(path):
        return directory and (is_ours(path) or not os.listdir(path) or bool(recognise and recognise(path)))
    if directory:
        return False
    return recognise is None or os.path.getsize(path) == 0 or bool(recognise(path))


def _is_or_holds(destination, source) -> bool:
    d, s = os.path.realpath(destination), os.path.realpath(source)
    if d == s or s.startswith(d.rstrip(os.sep) + os.sep):
        return True
    try:
        return os.path.samefile(destination, source)       # a hard link to the input
    except OSError:
        return False


class Outputs:
    """`with Outputs(paths, writer, ...) as temps:` a fresh temporary sibling per path (a file, or with
    `directory` a directory holding MARKER); when the block succeeds they replace `paths` together, otherwise
    they are removed. `checks` go to check_destination, on entry and again just before the swap (something
    may have appeared meanwhile). `suffixes` keep extensions that writers insist on (Keras: '.weights.h5')."""

    def __init__(self, paths, writer="twinface", *, suffixes=None, directory=False, **checks):
        self.directory, self.checks = directory, checks
        self.finals = [check_destination(p, directory=directory, **checks) for p in paths]
        for final in self.finals:
            os.makedirs(os.path.dirname(final), exist_ok=True)
        self.temps = []
        try:
            for final, suffix in zip(self.finals, suffixes or [""] * len(self.finals)):
                self.temps.append(_new_temp(final, suffix, directory))
                if directory:
                    with writing(final), open(os.path.join(self.temps[-1], MARKER), "w") as f:
                        json.dump({"writer": writer}, f)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        for tmp in self.temps:
            _settle(tmp)
        for final in self.finals:
            check_destination(final, directory=self.directory, **self.checks)
        _swap(list(zip(self.temps, self.finals)))
        self.temps = []

    def discard(self) -> None:
        for tmp in self.temps:
            _remove(tmp)
        self.temps = []

    def __enter__(self):
        return list(self.temps)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()


class OutputsWriter:
    """A writer of open files inside `self._outputs`: `with` closes and commits them on success (close()),
    closes and discards them on an exception (abort()). Subclasses list their files in `_handles()`."""

    def _handles(self) -> list:
        raise NotImplementedError

    def abort(self) -> None:
        for f in self._handles():
            with contextlib.suppress(OSError):     # its flush fails again on a full disk; the file goes anyway
                f.close()
        self._outputs.discard()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.abort() if exc_type else self.close()


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """One file the caller owns (a checkpoint, a run's config): a temporary path beside `path` that replaces
    it when the block succeeds and is removed otherwise."""
    with Outputs([path], suffixes=[suffix], overwrite=True) as (tmp,):
        yield tmp


def file_sha256(path: str) -> str:
    """A file's content digest: how twinface knows a file again (pinned fixtures, converted or compiled copies)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(path: str, data: bytes) -> None:
    """One small file written whole: `data` lands in a temporary beside `path`, renamed over it when complete."""
    with atomic_path(path) as tmp, writing(path), open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def scratch_path(near: str, suffix: str = ""):
    """A temporary file beside `near` that is always removed (by clean_stale if the process is killed)."""
    parent = os.path.dirname(os.path.abspath(near))
    os.makedirs(parent, exist_ok=True)
    tmp = _new_temp(os.path.join(parent, os.path.basename(near.rstrip(os.sep))), suffix, False)
    try:
        yield tmp
    finally:
        _remove(tmp)


_OUT_OF_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def writing(path):
    """A full disk, a file-size limit or a quota fails a write() or a flush, and Python reports it without a
    file name: name `path`, the output being written (its temporary's name would mean nothing to the user)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _OUT_OF_SPACE or e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e


def clean_stale(directory) -> None:
    """Remove what killed twinface writers left in `directory`: their temporaries, and the previous outputs
    they had moved aside once the new ones are in place; a kill inside a swap puts the previous set back."""
    swaps = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            match = _STALE.match(entry.name)
            if not match or _alive(int(match["pid"])):
                continue
            if match["kind"] == "tmp":
                if not entry.is_dir(follow_symlinks=False) or is_ours(entry.path):
                    _remove(entry.path)
            else:
                final = os.path.join(directory, match["final"])
                swaps.setdefault(match["token"], []).append((match["kind"], entry.path, final))
    for members in swaps.values():
        interrupted = any(kind == "old" and not os.path.lexists(final) for kind, _, final in members)
        for _, aside, final in members:
            os.replace(aside, final) if interrupted else _remove(aside)


def _new_temp(final, suffix, directory) -> str:
    parent, name = os.path.split(final)
    prefix, suffix = f".{name}.twinface-{os.getpid()}-", ".tmp" + suffix
    if directory:
        return tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.close(fd)
    return tmp


def _settle(tmp) -> None:
    """Flush a finished file to disk and give it the user's usual permissions (temporaries are 0600 / 0700).
    A directory's files are not fsynced one by one: a kill needs only the rename order, not a flush."""
    mask = os.umask(0)
    os.umask(mask)
    if os.path.isdir(tmp):
        os.chmod(tmp, 0o777 & ~mask)
        return
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~mask)


def _swap(moves) -> None:
    """Put each temporary in its final place. One file: os.replace, atomic. A directory, or several files that
    belong together (a .rec and its .idx): the last final is the commit point. It is moved aside before the
    others are replaced and comes back only as the new one, so a reader never finds it beside a partner of the
    other generation (a .rec with the old .idx); meanwhile the outputs are merely absent, never mismatched.
    The replaced finals stay under aside names (hard links for the partners) until the commit, so
    clean_stale can put the previous set back if a kill falls in between."""
    token = secrets.token_hex(4)
    *partners, (_, last) = moves
    asides = []
    for _, final in partners:
        if os.path.lexists(final):
            asides.append(_aside(final, token, "keep"))
            try:
                os.link(final, asides[-1])
            except OSError:                            # no hard links here: a partner is small, copy it
                shutil.copy2(final, asides[-1])
    if os.path.lexists(last) and (partners or os.path.isdir(last)):
        asides.append(_aside(last, token, "old"))
        os.rename(last, asides[-1])
    for tmp, final in moves:
        os.replace(tmp, final)
    for aside in asides:
        _remove(aside)


def _aside(final, token, kind) -> str:
    parent, name = os.path.split(final)
    return os.path.join(parent, f".{name}.twinface-{os.getpid()}-{token}.{kind}")


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                            # someone else's process
        return True
    return True


def _remove(path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)
