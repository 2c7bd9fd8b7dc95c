"""The L3 disk tier: a bad file is a counted miss and never data; a crash mid-write and
other processes on the same directory leave it usable; a full or read-only disk is one
clear error naming the directory."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from synapse.errors import StorageError
from synapse.prefix import Fingerprint, PrefixStore
from synapse.prefix import disk as disk_mod

CT = 8
FP = Fingerprint("tiny-disk", chunk_tokens=CT)
ROOT = Path(__file__).resolve().parents[1]


def kv_of(tokens):
    return [np.full((2, CT, 16), tokens[i * CT] % 1000, np.float16) for i in range(len(tokens) // CT)]


def prompt(seed, n_chunks=3):
    return np.random.default_rng(seed).integers(0, 32000, n_chunks * CT + 1)


def disk_store(root, **kw):
    kw.setdefault("l3_bytes", 1 << 20)
    return PrefixStore(FP, l3_dir=root, **kw)


def files(root):
    return sorted((Path(root) / FP.short()).glob("*.kv"))


def saved(root, toks):
    with disk_store(root) as s:
        s.save(toks, kv_of(toks))
    return [Path(root) / FP.short() / (k.hex() + ".kv") for k in s.keys(toks)]


@pytest.mark.parametrize("damage", ["flip a payload byte", "flip a header byte", "truncate",
                                    "append garbage", "empty"])
def test_a_damaged_file_is_detected_counted_deleted_and_recomputed(tmp_path, damage):
    toks = prompt(0)
    paths = saved(tmp_path, toks)
    raw = bytearray(paths[1].read_bytes())
    if damage == "flip a payload byte":
        raw[-20] ^= 0x40
    elif damage == "flip a header byte":
        raw[40] ^= 0x01
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "append garbage":
        raw += b"\0" * 16
    else:
        raw = bytearray()
    paths[1].write_bytes(bytes(raw))
    with disk_store(tmp_path) as s:
        got = s.load(toks)
        assert got.tokens == CT                       # chunk 0 only: 1 is bad, 2 follows it
        assert np.array_equal(got.chunks[0], kv_of(toks)[0])
        rep = s.report()
        assert rep["checksum_failures"] == 1
        assert not paths[1].exists() and paths[0].exists() and paths[2].exists()
        s.save(toks, kv_of(toks))                     # the caller recomputes and saves again
        s.flush()
        assert s.load(toks).tokens == 3 * CT


def test_a_file_of_another_model_is_refused_even_under_the_right_name(tmp_path):
    toks = prompt(1)
    other = Fingerprint("another-model", chunk_tokens=CT)
    with PrefixStore(other, l3_dir=tmp_path, l3_bytes=1 << 20) as s:
        s.save(toks, kv_of(toks))
    mine = saved(tmp_path / "mine", toks)
    theirs = tmp_path / other.short() / mine[0].name.replace(
        mine[0].stem, PrefixStore(other, l2_bytes=1).keys(toks)[0].hex())
    mine[0].write_bytes(theirs.read_bytes())       # right file name, another model's bytes
    with disk_store(tmp_path / "mine") as s:
        assert s.load(toks).tokens == 0
        assert s.report()["checksum_failures"] == 1


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from synapse.prefix import Fingerprint, PrefixStore
    store = PrefixStore(Fingerprint("crash", chunk_tokens=16), l3_dir=sys.argv[1],
                        l3_bytes=1 << 40, io_workers=2)
    big = np.ones(8 << 20, np.float16)            # 16 MiB a chunk: writes take a while
    i = 0
    while True:
        tokens = np.arange(i * 16, (i + 1) * 16)  # prompt i: one chunk
        store.save(tokens, [big * (i % 1000)])
        store.flush()                             # prompt i is on disk once it is printed
        print(i, flush=True)
        i += 1
""")


def test_a_kill_9_in_the_middle_of_a_write_leaves_nothing_corrupt_and_the_index_recovers(tmp_path):
    fp = Fingerprint("crash", chunk_tokens=16)
    d = tmp_path / fp.short()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        done = [int(child.stdout.readline()) for _ in range(3)]   # some saves completed
        deadline = time.monotonic() + 60
        while not list(d.glob(".*.tmp")):                          # a write in progress
            assert time.monotonic() < deadline and child.poll() is None
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert list(d.glob(".*.tmp")), "the kill did not land mid-write"
    with PrefixStore(fp, l3_dir=tmp_path, l3_bytes=1 << 40) as s:
        assert s.disk.stale_removed >= 1 and not list(d.glob(".*.tmp"))
        on_disk = len(list(d.glob("*.kv")))
        assert on_disk >= len(done)
        for i in range(on_disk + 2):                 # everything written, and what was not
            got = s.load(np.arange(i * 16, (i + 1) * 16))
            if got.tokens:
                assert np.all(got.chunks[0] == np.float16(i % 1000)), f"prompt {i} corrupt"
        rep = s.report()
        assert rep["checksum_failures"] == 0
        assert rep["restored_tokens"] == 16 * on_disk   # every complete file, nothing else


def test_processes_sharing_a_directory_find_each_others_chunks(tmp_path):
    toks = prompt(2)
    code = textwrap.dedent(f"""
        import numpy as np, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_prefix_disk import disk_store, kv_of, prompt
        with disk_store(sys.argv[1]) as s:
            s.save(prompt(2), kv_of(prompt(2)))
    """)
    with disk_store(tmp_path, l2_bytes=1 << 20) as s:  # opened before the other process writes
        assert s.check(toks) == 0
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True)
        got = s.load(toks)
        assert got.tokens == 3 * CT and got.tiers == ["l3"] * 3
        assert all(np.array_equal(a, b) for a, b in zip(got.chunks, kv_of(toks)))
        assert s.report()["adopted_files"] == 3


def test_the_directory_stays_under_the_capacity_whichever_process_fills_it(tmp_path):
    chunk = 2 * CT * 16 * 2
    with disk_store(tmp_path) as a:
        for seed in range(6):
            a.save(prompt(10 + seed, 1), kv_of(prompt(10 + seed, 1)))
    assert len(files(tmp_path)) == 6
    with disk_store(tmp_path, l3_bytes=4 * chunk, high_watermark=0.9, low_watermark=0.5) as b:
        b.save(prompt(99, 1), kv_of(prompt(99, 1)))    # b's sweep counts a's files too
        b.flush()
    names = {p.name for p in files(tmp_path)}
    assert len(names) == 2
    assert b.keys(prompt(99, 1))[0].hex() + ".kv" in names  # the newest survives


def test_a_directory_that_cannot_be_used_is_one_error_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match=str(blocker)):
        disk_store(blocker / "kv")
    if os.geteuid() != 0:                            # root may write anywhere
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(StorageError, match="not writable"):
            disk_store(ro)


def test_a_full_disk_is_reported_naming_the_directory_and_nothing_half_written_stays(
        tmp_path, monkeypatch):
    real_write = os.write

    def full(fd, data):
        if memoryview(data).nbytes > 100:           # headers pass, payloads do not fit
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    toks = prompt(3)
    s = disk_store(tmp_path)
    monkeypatch.setattr(disk_mod.os, "write", full)
    s.save(toks, kv_of(toks))
    with pytest.raises(StorageError, match=rf"{FP.short()}: disk full"):
        s.flush()
    monkeypatch.undo()
    rep = s.report()
    assert rep["write_errors"] == 3 and "disk full" in rep["last_error"]
    assert s.check(toks) == 0 and s.load(toks).tokens == 0
    assert not files(tmp_path)
    assert not list((tmp_path / FP.short()).glob(".*.tmp"))
    s.close()
