"""Disk I/O ops run off the loop's thread, in order per stream, after what they follow."""

import threading

import numpy as np
import pytest

from synapse.errors import KernelError
from synapse.hw.disk_queue import DiskQueue
from synapse.hw.host_backend import HostBackend
from synapse.ops import DiskIO, Ingest, Region, Stream


def test_jobs_on_one_stream_run_in_order_and_wait_for_other_streams():
    q = DiskQueue()
    order, gate = [], threading.Event()
    try:
        first = q.submit("write", lambda: (gate.wait(5), order.append("w1")))
        second = q.submit("write", lambda: order.append("w2"))
        read = q.submit("read", lambda: order.append("r"), [second])  # follows w2
        assert not read.done()  # w1 is still held at the gate
        gate.set()
        read.result(timeout=5)
        assert order == ["w1", "w2", "r"]
        t0, t1 = first.result()
        assert t1 >= t0
    finally:
        q.close()


def test_a_failed_dependency_fails_what_follows_it():
    q = DiskQueue()
    try:
        bad = q.submit("write", lambda: (_ for _ in ()).throw(KernelError("disk full")))
        after = q.submit("read", lambda: None, [bad])
        with pytest.raises(KernelError, match="disk full"):
            after.result(timeout=5)
    finally:
        q.close()


def test_the_cpu_backend_returns_from_a_disk_op_at_once_and_orders_what_reads_after_it():
    be = HostBackend()
    be.memory("l1", 64, "device")
    gate, wrote = threading.Event(), []

    def slow_read():
        gate.wait(5)
        wrote.append(True)
    try:
        disk = be.submit(DiskIO(purpose="t", direction="read", sizes=np.array([64]),
                                run=slow_read), Stream.DISK_READ)
        assert not disk.future.done()  # submit did not wait for the I/O
        gate.set()
        be.submit(Ingest(purpose="t", dst=(Region("l1", 0, 64),),
                         fill=lambda i, out: out.fill(7)), Stream.H2D, [disk])
        assert wrote == [True]  # the op after it waited for it
        kinds = [r.kind for r in be.records()]
        assert kinds == ["disk_read", "copy_h2d"]
    finally:
        be.close()
