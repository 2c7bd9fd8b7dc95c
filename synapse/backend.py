"""The backend interface: the one seam between the policy layer and the machine.

Decision (see README, "Architecture"): drivers are Python generators that submit ops to
streams and ``yield`` what they must wait for, exactly as host code drives a GPU:

    t_copy = backend.submit(Copy(...), Stream.H2D)
    t_attn = backend.submit(Attention(...), Stream.COMPUTE, after=[t_copy])
    yield backend.wait([t_attn])           # the host blocks here, nowhere else

Streams run their ops in submission order; ``after`` makes an op wait for tickets of
other streams (CUDA: ``cuStreamWaitEvent``). On the simulator a ticket is a SimPy event,
the generator is a SimPy process and time comes from the hardware profile. On the
hardware backends a ticket wraps a CUDA event (or a finished host call) and a small
executor (``run_sync``) runs the same generator, synchronising on what it yields. The
policy layer never sees which backend it drives, and a scenario is literally the same
code path on all of them.
"""

from __future__ import annotations

import abc
from typing import Any, Generator, Sequence

from .ops import Op, OpRecord, Stream


class Backend(abc.ABC):
    """What every backend implements. Memory comes from ``memory``; work from ``submit``."""

    name: str = "base"
    moves_data: bool = False   # True: ops carry real bytes (workloads must build payloads)
    dma_ingest: bool = False   # True: Ingest.pinned sources are copied with no host work
    simulated: bool = False    # True: time is simulated (``sim_time_s`` in results)

    @abc.abstractmethod
    def memory(self, space: str, nbytes: int, kind: str):
        """Memory for one space ("l1", "staging", "l2", "ring") with the slab/ring over it.

        ``kind`` is "device" or "pinned_host". Returns an object with ``nbytes``,
        ``zero(offset, nbytes)`` and ``address(offset)`` (synapse.hw.memory.Memory).
        """

    def paged_memory(self, space: str, nbytes: int):
        """Device memory for a compacting slot arena (``synapse.kv.slots``), which reports
        its live prefix through ``extent``: on CUDA, virtual memory whose pages are mapped
        as that prefix grows (``synapse.kv.vmm``); elsewhere ``memory(space, nbytes,
        "device")``. Only a caller that reports its extent may use it."""
        return self.memory(space, nbytes, "device")

    @abc.abstractmethod
    def submit(self, op: Op, stream: Stream, after: Sequence[Any] = ()) -> Any:
        """Enqueue ``op`` on ``stream`` after ``after`` completed; return its ticket."""

    @abc.abstractmethod
    def wait(self, tickets: Sequence[Any]) -> Any:
        """Something a driver yields to block until all ``tickets`` completed."""

    def result(self, ticket: Any) -> Any:
        """The op's output (attention output on the hardware; None on the simulator)."""
        return None

    def activation(self, x0):
        """A device activation buffer initialised from host array ``x0`` (hardware only)."""
        raise NotImplementedError(f"{self.name} keeps no activations")

    def read_activation(self, act):
        """The activation's current value as a host array, once its ops completed."""
        raise NotImplementedError(f"{self.name} keeps no activations")

    @abc.abstractmethod
    def now(self) -> float:
        """Seconds since the backend started (simulated or measured)."""

    def host_work(self, seconds: float) -> None:
        """Host-side work the simulator should charge (the hardware just does it)."""

    def delay(self, seconds: float) -> Any:
        """Something a driver yields to hold the host for ``seconds`` (timing protection
        pads a fetch to a quantum); counted as blocked time."""
        return _Wait((), seconds)

    def warm_up_compute(self, rows: int = 64, hidden: int = 64, ffn: int = 64) -> None:
        """Hardware backends: initialise the compute library (PyTorch, cuBLAS) at set-up,
        so its one-off start (about 0.35 s on the H100) is not timed as a stall, and run
        the layer op once at its own shapes ``[rows, hidden] x [hidden, ffn]``: cuBLAS loads
        a kernel per new shape (the first 8k x 16k layer of a streaming run took 52 ms on
        the H200, the next ones 0.12 ms)."""

    def reserve_staging(self, op_bytes: int) -> None:
        """Hardware backends: make room at set-up for ops that carry up to ``op_bytes`` of
        host payload, so no staging memory is allocated in the middle of a run."""

    def step_done(self) -> None:
        """A driver finished a step (a safe point: the virtual-memory L1 unmaps the pages
        past its live prefix here)."""

    def l1_pages(self) -> int | None:
        """Pages the L1 arena has mapped (virtual-memory arena); None where none."""
        return None

    def host_busy_s(self) -> float | None:
        """Seconds the host spent working (not blocked on the device) during ``run``:
        modelled on the simulator, measured on the hardware; None where unknown."""
        return None

    @abc.abstractmethod
    def run(self, process: Generator) -> None:
        """Run a driver generator to completion."""

    @abc.abstractmethod
    def records(self) -> list[OpRecord]:
        """Every op's timing, in completion order."""

    def residency(self, table):
        """Audit that L1 blocks are device memory and L2 blocks page-locked host memory
        (a ``ResidencyReport``); None where the backend has no device memory."""
        return None

    def environment(self) -> dict:
        """Device, versions and profile facts to store with a result."""
        return {}

    def close(self) -> None:
        """Release memory and streams."""


class _Wait:
    __slots__ = ("tickets", "hold_s")

    def __init__(self, tickets, hold_s: float = 0.0):
        self.tickets = list(tickets)
        self.hold_s = hold_s  # then keep the host waiting until this long after the yield


def _hold_until(deadline: float) -> None:
    import time
    left = deadline - time.perf_counter()
    if left > 1e-3:
        time.sleep(left - 1e-3)  # sleep can overshoot by a scheduler tick: spin the rest
    while time.perf_counter() < deadline:
        pass


def run_sync(process: Generator, synchronize) -> float:
    """Execute a driver generator on real hardware: each yielded wait blocks the host.

    ``synchronize(ticket)`` must block until the ticket's work completed (and raise
    KernelError naming the op if it failed). Returns the seconds the host spent blocked,
    so a run's wall time splits into host work and waiting on the device.
    """
    import time
    error: BaseException | None = None
    blocked = 0.0
    while True:
        try:
            waited = process.throw(error) if error is not None else process.send(None)
        except StopIteration:
            return blocked
        error = None
        if not isinstance(waited, _Wait):
            raise TypeError(f"a driver yielded {waited!r}; yield backend.wait([...])")
        t0 = time.perf_counter()
        try:
            for t in waited.tickets:
                synchronize(t)
        except Exception as e:  # delivered at the driver's yield, as SimPy does
            error = e
        if waited.hold_s:
            _hold_until(t0 + waited.hold_s)
        blocked += time.perf_counter() - t0
