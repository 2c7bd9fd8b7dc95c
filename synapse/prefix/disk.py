"""L3: chunk files in a local directory, crash-safe and shareable between processes.

Layout: ``<root>/<fingerprint 16 hex>/<key 64 hex>.kv`` (format in ``chunk.py``), so the
caches of different models, dtypes or chunk sizes live side by side and never mix.

Protocol (what makes a ``kill -9`` mid-write and several processes on one directory
safe without a lock on the data path):

- write: the whole file goes to ``.<key>.<pid>.<nonce>.tmp`` in the same directory
  (``O_EXCL``, so no two writers share a temporary), is fsync'd (unless ``fsync=False``)
  and renamed onto its final name with ``os.replace``, which is atomic within a file
  system. A reader therefore sees no file or a whole one; two processes writing the same
  key write the same bytes and the last rename wins.
- read: open, check size, header and CRC; anything wrong is ``ChunkCorrupt`` and the
  caller deletes the file and counts a miss. A file deleted by another process between
  lookup and read is ``FileNotFoundError``: also a miss. An open file stays readable
  after another process unlinks it (POSIX), so eviction never tears a read.
- recovery: ``open`` removes temporaries whose writer process is gone (what a crash
  leaves) and ``scan`` lists the valid names; contents are verified lazily, on load.
- capacity across processes: an eviction sweep takes ``flock`` on ``<dir>/.lock``,
  rescans the directory and deletes the least recently used files, oldest modification
  time first (a hit refreshes the file's mtime), so the directory as a whole stays under
  the limit whichever process sweeps. Without the sweep each process would only count
  the files it knows.

Must be a local file system: ``os.replace`` and ``flock`` are not atomic on every
network file system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from pathlib import Path

import numpy as np

from ..errors import StorageError
from . import chunk as fmt
from .chunk import ChunkCorrupt, ChunkMeta
from .keys import KEY_BYTES, Fingerprint

SUFFIX = ".kv"


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "disk full (No space left on device)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"not writable ({e.strerror})"
    return e.strerror or str(e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


class DiskTier:
    def __init__(self, root, fingerprint: Fingerprint, fsync: bool = True):
        self.fingerprint = fingerprint
        self.fp_digest = fingerprint.digest()
        self.dir = Path(root) / fingerprint.short()
        self.fsync = fsync
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"L3 directory {self.dir}: cannot create it: {_reason(e)}") from None
        probe = self.dir / f".probe.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StorageError(f"L3 directory {self.dir}: {_reason(e)}") from None
        self.stale_removed = self.clean_stale()

    # -- names --------------------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        return self.dir / (key.hex() + SUFFIX)

    def scan(self) -> list[tuple[bytes, int, int]]:
        """(key, payload bytes, mtime ns) of every chunk file, least recently used first."""
        out = []
        with os.scandir(self.dir) as it:
            for e in it:
                name = e.name
                if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[:-len(SUFFIX)])
                    mtime = e.stat().st_mtime_ns
                except (ValueError, FileNotFoundError):
                    continue
                nbytes = self.payload_bytes(key)
                if nbytes is not None:
                    out.append((key, nbytes, mtime))
        out.sort(key=lambda r: (r[2], r[0]))
        return out

    def clean_stale(self) -> int:
        """Delete temporaries left by writers that no longer run (a crash mid-write)."""
        removed = 0
        with os.scandir(self.dir) as it:
            for e in it:
                parts = e.name.split(".")
                # ".<key>.<pid>.<nonce>.tmp" splits into ['', key, pid, nonce, 'tmp']
                if len(parts) != 5 or parts[0] or parts[4] != "tmp" or not parts[2].isdigit():
                    continue
                if _pid_alive(int(parts[2])):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    removed += 1
        return removed

    def payload_bytes(self, key: bytes) -> int | None:
        """The payload size a chunk file declares (what the capacity counts, as in the
        memory tiers); None if there is no such file. A file too damaged to declare one
        counts with its own size, so it still takes room until a load deletes it."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            try:
                return fmt.parse_prefix(os.pread(fd, fmt.PREFIX_BYTES, 0), size)[1]
            except ChunkCorrupt:
                return size
        finally:
            os.close(fd)

    # -- data ---------------------------------------------------------------------------
    def write(self, key: bytes, data, meta: ChunkMeta) -> int:
        """Write one chunk atomically; returns the file's bytes. StorageError (naming the
        directory) when the disk is full or not writable."""
        payload = fmt.host_bytes(data)
        prefix = fmt.encode_prefix(fmt.header_bytes(key, self.fp_digest, meta), payload.nbytes)
        trailer = fmt.encode_trailer(fmt.crc_of([prefix, payload]))
        final = self.path(key)
        tmp = self.dir / f".{key.hex()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, prefix)
                _write_all(fd, payload)
                _write_all(fd, trailer)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"L3 directory {self.dir}: {_reason(e)} writing a chunk of "
                               f"{payload.nbytes} bytes") from None
        return len(prefix) + payload.nbytes + len(trailer)

    def read(self, key: bytes, alloc=None) -> tuple[np.ndarray, ChunkMeta]:
        """The payload bytes and meta of a chunk, verified. ``alloc(nbytes)`` gives the
        uint8 buffer to read into (e.g. a pinned one); default a new NumPy array.
        Raises FileNotFoundError (no such file) or ChunkCorrupt (the file is bad)."""
        path = self.path(key)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, fmt.PREFIX_BYTES, 0)
            hlen, plen = fmt.parse_prefix(raw, size)
            hraw = os.pread(fd, hlen, fmt.PREFIX_BYTES)
            meta = fmt.parse_header(hraw, key, self.fp_digest)
            if meta.nbytes != plen:
                raise ChunkCorrupt(f"payload of {plen} bytes for a {meta.shape} {meta.dtype} array")
            buf = alloc(plen) if alloc is not None else np.empty(plen, np.uint8)
            view = memoryview(buf.numpy() if hasattr(buf, "detach") else buf).cast("B")
            done, off = 0, fmt.PREFIX_BYTES + hlen
            while done < plen:
                n = os.preadv(fd, [view[done:]], off + done)
                if n == 0:
                    raise ChunkCorrupt("truncated while reading")
                done += n
            trailer = os.pread(fd, fmt.TRAILER_BYTES, off + plen)
            fmt.check_trailer(trailer, fmt.crc_of([raw, hraw, view]))
        finally:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.utime(path)  # the directory-wide LRU clock other processes sweep by
        return buf, meta

    def remove(self, key: bytes) -> bool:
        try:
            os.unlink(self.path(key))
            return True
        except FileNotFoundError:
            return False

    # -- sharing and measurement ---------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Exclusive between processes (flock on ``<dir>/.lock``): eviction sweeps."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop the cached pages of every chunk file (clean pages only,
        so after an fsync), for cold-read measurements. No effect on tmpfs."""
        for key, _, _ in self.scan():
            with contextlib.suppress(OSError):
                fd = os.open(self.path(key), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
