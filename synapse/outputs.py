"""Where results go: checked before the work starts, written whole or not at all.

An hour-long run must not end in a traceback because ``--out`` names a file, so every
command that writes results checks the location first:

- ``check_dir(path, what)``: ``path`` is, or can be created as, a folder this process can
  write. Checked by doing it (create what is missing, write and delete a probe file, then
  remove what was created): permission bits do not tell a read-only mount, ``/proc`` or
  root's view of a ``chmod 500`` folder apart, a probe does.
- ``check_file(path, what)``: ``path`` can be replaced by a regular file: its folder
  passes ``check_dir`` and ``path`` is not a folder, a device (``/dev/null``) or a socket.
- ``atomic_write(path, data)``: a temporary file in the target's folder, flushed to disk,
  then renamed over the target, so a reader or an interrupted run sees the old file or the
  new one, never half of one.
- ``make_dir(path, what)``: ``mkdir -p`` whose failure is one line.

Every failure is an ``OutputError`` naming the path and the reason.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp gives 0600


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a folder"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def check_dir(path: str | Path, what: str = "--out") -> None:
    """Refuse (``OutputError``) unless ``path`` is or can become a writable folder.

    Leaves the file system as it was: folders created for the probe are removed again."""
    p = Path(path)
    try:
        created = []
        probe_at = p
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"{what} {p}: is {_kind(p.stat())}, expected a folder")
        else:
            parent = p
            while not parent.exists() and parent != parent.parent:
                created.append(parent)
                parent = parent.parent
            if parent.exists() and not parent.is_dir():
                raise OutputError(f"{what} {p}: {parent} is {_kind(parent.stat())}, expected a "
                                  f"folder")
            for d in reversed(created):
                try:
                    d.mkdir()
                except OSError as e:
                    created = created[created.index(d) + 1:]
                    raise OutputError(f"{what} {p}: cannot create {d} ({_reason(e)})") from None
        try:
            fd, tmp = tempfile.mkstemp(dir=probe_at, prefix=".synapse-probe-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise OutputError(f"{what} {p}: cannot write there ({_reason(e)})") from None
    except ValueError as e:  # an embedded NUL byte, say
        raise OutputError(f"{what} {p!r}: not a usable path ({e})") from None
    finally:
        for d in created:
            try:
                d.rmdir()
            except OSError:
                pass


def check_file(path: str | Path, what: str) -> None:
    """Refuse (``OutputError``) unless ``path`` can be (re)written as a regular file."""
    p = Path(path)
    try:
        if p.is_dir():
            raise OutputError(f"{what} {p}: is a folder, expected a file name")
        if p.exists() and not p.is_file():
            # a rename would replace the device node itself (as root, /dev/null)
            raise OutputError(f"{what} {p}: is {_kind(p.stat())}, expected a regular file")
    except ValueError as e:
        raise OutputError(f"{what} {p!r}: not a usable path ({e})") from None
    check_dir(p.parent, f"{what} {p}: its folder")


def make_dir(path: str | Path, what: str = "") -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        reason = _reason(e) if isinstance(e, OSError) else str(e)
        raise OutputError(f"{what + ' ' if what else ''}{p}: cannot create the folder "
                          f"({reason})") from None
    return p


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``path`` whole or not at all: a temporary file beside it, then a rename."""
    path = Path(path)
    make_dir(path.parent)
    if path.exists() and not path.is_file():
        raise OutputError(f"{path}: is {_kind(path.stat())}, expected a regular file")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_reason(e)})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write ({_reason(e)})") from None
        raise
    return path
