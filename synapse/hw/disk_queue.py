"""Disk I/O ops off the loop's thread: one worker thread per disk stream, in order.

The simulator runs a scenario's L3 reads and writes on their own streams, overlapped with
everything else; the hardware backends ran them inside ``submit`` on the loop's thread, so
a prefix_reuse run on the H200 spent 15.8 s of host time where the simulator's whole run
took 1.1 s (most of it ``write``, ``fsync`` and CRCs of chunk files, which release the
GIL). Each disk stream gets one worker, so ops on a stream keep their order as a CUDA
stream's would; a job first waits for the disk jobs of other streams it depends on.
Device work a disk op depends on is waited for by the backend before it submits, so every
CUDA call stays on the loop's thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Sequence


class DiskQueue:
    def __init__(self) -> None:
        self._workers: dict[str, ThreadPoolExecutor] = {}

    def submit(self, stream: str, run: Callable[[], None] | None,
               deps: Sequence[Future] = ()) -> Future:
        """Run ``run`` after ``deps`` on ``stream``'s worker. The future's result is the
        job's (start, end) in ``time.perf_counter`` seconds; a failed dependency fails it
        with the dependency's error."""
        worker = self._workers.get(stream)
        if worker is None:
            worker = self._workers[stream] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"synapse-{stream}")
        deps = [d for d in deps if d is not None]

        def job():
            for d in deps:
                d.result()
            t0 = time.perf_counter()
            if run is not None:
                run()
            return t0, time.perf_counter()
        return worker.submit(job)

    def close(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=True)
        self._workers = {}
