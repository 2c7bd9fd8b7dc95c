"""The local disk's sequential write and cold read rates, for ``synapse calibrate`` and the
prefix benchmark. No GPU needed.

Per size, a fresh temporary file in the directory under test is written whole
(``O_EXCL``, then ``fsync``: the time includes getting the bytes to the device, as the
L3 tier's writes do) and then read back cold. "Cold" is what page-cache handling is
about, and is done two ways, the first that works:

1. ``O_DIRECT`` reads into a page-aligned buffer: the page cache is bypassed.
2. otherwise (tmpfs, some overlay file systems) ``posix_fadvise(DONTNEED)`` on the
   fsync'd file, which drops its clean pages without root.

Then the same file is read again through the page cache (``cached_read_gb_per_s``). If the
"cold" rate comes within 20% of that, the cache was evidently not dropped (tmpfs keeps
files in RAM by design) and the record says so in ``cache_effects``: the figure is then
memory bandwidth, not the disk's. Files are removed afterwards.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
import statistics
import time
from pathlib import Path

MiB = 1 << 20
DISK_SIZES = (1 * MiB, 8 * MiB, 64 * MiB, 256 * MiB)
QUICK_SIZES = (1 * MiB, 4 * MiB, 16 * MiB)
PIECE = 8 * MiB


def _filesystem(path: Path) -> str:
    """The mount's file system type and device, from /proc/mounts (Linux), else ''."""
    try:
        best = ("", "", "")
        target = str(path.resolve())
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, fstype)
        return f"{best[2]} on {best[0]} (mounted at {best[1]})" if best[1] else ""
    except OSError:
        return ""


def _write(path: Path, data: memoryview) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = data
        while view.nbytes:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _read(path: Path, nbytes: int, buf: mmap.mmap, direct: bool) -> float:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags)
    try:
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:min(nbytes, done + PIECE)]], done)
            if n <= 0:
                raise OSError(f"short read of {path} at byte {done}")
            done += n
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _direct_works(path: Path, buf: mmap.mmap) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        _read(path, MiB, buf, direct=True)
        return True
    except OSError:
        return False


class ColdFile:
    """One file of ``nbytes`` written (fsync'd) once in ``directory``, read cold on each
    ``read_gb_per_s()`` call: the disk's rate at that moment, for a figure taken next to
    the work it is compared with. Removed on ``close`` (a context manager)."""

    def __init__(self, directory, nbytes: int = 256 * MiB):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f".synapse-disk-{os.getpid()}-{secrets.token_hex(4)}"
        self.nbytes = nbytes
        self.buf = mmap.mmap(-1, nbytes)
        try:
            _write(self.path, memoryview(os.urandom(nbytes)))
            self.direct = _direct_works(self.path, self.buf)
        except BaseException:
            self.close()
            raise

    def read_gb_per_s(self) -> float:
        if not self.direct:
            _drop(self.path)
        return self.nbytes / _read(self.path, self.nbytes, self.buf, direct=self.direct) / 1e9

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.buf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def disk_sweep(directory, sizes=DISK_SIZES, repeats: int = 3, progress=None) -> dict:
    """Sequential write (with fsync) and cold read of one file per size, ``repeats``
    times each; medians. Returns the record ``calibrate`` fits (bytes, seconds, calls per
    direction) plus the method, the file system and the cache check."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    need = max(sizes) * 2
    if free < need:
        raise OSError(f"{d}: {free} bytes free, the disk measurement needs {need}")
    payload = memoryview(os.urandom(max(sizes)))
    buf = mmap.mmap(-1, max(sizes))           # page-aligned, as O_DIRECT wants
    out = {"directory": str(d.resolve()), "filesystem": _filesystem(d),
           "read": {"bytes": [], "seconds": [], "calls": 1},
           "write": {"bytes": [], "seconds": [], "calls": 1}}
    method = None
    cached = []
    try:
        for n in sizes:
            if progress:
                progress(f"disk: {n // MiB} MiB files in {d}")
            w, r = [], []
            for _ in range(repeats):
                path = d / f".synapse-disk-{os.getpid()}-{secrets.token_hex(4)}"
                try:
                    w.append(_write(path, payload[:n]))
                    if method is None:
                        method = "o_direct" if _direct_works(path, buf) else "fadvise_dontneed"
                    if method == "fadvise_dontneed":
                        _drop(path)
                    r.append(_read(path, n, buf, direct=method == "o_direct"))
                    _read(path, n, buf, direct=False)          # fills the page cache
                    cached.append(n / _read(path, n, buf, direct=False))
                finally:
                    path.unlink(missing_ok=True)
            out["write"]["bytes"].append(n)
            out["write"]["seconds"].append(statistics.median(w))
            out["read"]["bytes"].append(n)
            out["read"]["seconds"].append(statistics.median(r))
    finally:
        buf.close()
    big = max(sizes)
    cold = big / out["read"]["seconds"][-1]
    hot = statistics.median(cached[-repeats:])
    out["method"] = method
    out["read_gb_per_s"] = cold / 1e9
    out["write_gb_per_s"] = big / out["write"]["seconds"][-1] / 1e9
    out["cached_read_gb_per_s"] = hot / 1e9
    out["cache_effects"] = (
        "cold reads ran at page-cache speed: the cache was not dropped (tmpfs or a file "
        "system that ignores fadvise), so the read figure is memory, not the disk"
        if cold >= 0.8 * hot else "none seen (cold reads well below cached reads)")
    return out
