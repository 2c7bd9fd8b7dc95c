"""Where sweep points run: local processes, or a Dask cluster.

Both executors have one method that matters, ``map(fn, tasks)``, yielding ``(task,
result)`` as points finish, with ``result`` None when the worker running it died (the
point is then not recorded, and a rerun retries it). ``fn`` only computes and returns
data; the caller writes files, so Dask workers need no shared file system.
"""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Iterator

from .errors import ScenarioError

EXECUTORS = ("local", "dask")


class LocalExecutor:
    """Points in local processes (``concurrent.futures``); ``jobs == 1`` runs them here,
    in order, which is what a debugger or a test counting executions wants."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs

    def describe(self) -> str:
        return "this process" if self.jobs <= 1 else f"{self.jobs} local processes"

    def map(self, fn, tasks) -> Iterator[tuple[dict, dict | None]]:
        """(task, result) as points finish; result None when the worker died."""
        if self.jobs <= 1:
            for t in tasks:
                yield t, fn(t)
            return
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool

        # spawn: workers start clean (no threads or locks copied from this process).
        pool = ProcessPoolExecutor(max_workers=min(self.jobs, len(tasks)) or 1,
                                   mp_context=mp.get_context("spawn"))
        try:
            futures = {pool.submit(fn, t): t for t in tasks}
            for fut in as_completed(futures):
                try:
                    yield futures[fut], fut.result()
                except (BrokenProcessPool, CancelledError):
                    yield futures[fut], None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        pass


class DaskExecutor:
    """Points on Dask: the cluster at ``scheduler``, or a LocalCluster of ``jobs``
    single-threaded worker processes. Connects on construction, so a bad address is
    refused before anything is written."""

    def __init__(self, jobs: int, scheduler: str | None = None) -> None:
        import logging

        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise ScenarioError("--executor dask needs dask.distributed: pip install "
                                "'synapse-tiers[whatif]'") from None
        self.scheduler, self.jobs, self.cluster = scheduler, jobs, None
        if scheduler:
            try:
                self.client = Client(scheduler)  # timeout: distributed.comm.timeouts.connect
            except (OSError, TimeoutError) as e:
                raise ScenarioError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        else:
            self.cluster = LocalCluster(n_workers=max(1, jobs), threads_per_worker=1,
                                        processes=True, dashboard_address=None,
                                        silence_logs=logging.ERROR)
            self.client = Client(self.cluster)

    def describe(self) -> str:
        return (f"dask at {self.scheduler}" if self.scheduler
                else f"a local dask cluster of {self.jobs} workers")

    def map(self, fn, tasks) -> Iterator[tuple[dict, dict | None]]:
        from dask.distributed import as_completed
        if not tasks:
            return
        futures = self.client.map(fn, tasks, pure=False)
        by_key = {f.key: t for f, t in zip(futures, tasks)}
        try:
            for fut in as_completed(futures):
                try:
                    yield by_key[fut.key], fut.result()
                except Exception:  # KilledWorker, a lost connection: not the point's fault
                    yield by_key[fut.key], None
        finally:
            self.client.cancel(futures)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def open_executor(executor: str, jobs: int, scheduler: str | None = None):
    if executor == "local":
        if scheduler:
            raise ScenarioError("--scheduler: only with --executor dask")
        return LocalExecutor(jobs)
    if executor == "dask":
        return DaskExecutor(jobs, scheduler)
    raise ScenarioError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
