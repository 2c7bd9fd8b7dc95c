"""Which memory each tracked kind must be, and the default way to ask.

A memory-type function maps a pointer to what it really is: 'device', 'pinned_host',
'managed', 'unregistered' (pageable), or anything else (always wrong). On a machine with
an NVIDIA driver the default is ``synapse.hw.driver_api.pointer_kind``
(``cuPointerGetAttributes``); elsewhere there is none, and the monitor says residency is
unverified rather than pretending. Tests inject their own function.
"""

from __future__ import annotations

# tracked kind -> what the driver must report for it. Managed memory is never accepted:
# the VRAM-only policy forbids unified memory for every tier.
EXPECTED = {"device": "device", "pinned_host": "pinned_host", "host": "unregistered",
            "managed": None}


def is_violation(kind: str, found: str) -> bool:
    want = EXPECTED[kind]
    return want is None or found != want


class DriverMemoryType:
    """The CUDA driver's answer; ``enter_thread`` binds the primary context in the
    monitor's thread (contexts are per thread)."""

    name = "cuda-driver"

    def __init__(self) -> None:
        from ..hw import driver_api
        self._drv = driver_api
        self._release = None

    def enter_thread(self) -> None:
        self._release = self._drv.bind_primary_context(0)

    def exit_thread(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __call__(self, ptr: int) -> str:
        return self._drv.pointer_kind(ptr)


def driver_memory_type() -> DriverMemoryType | None:
    """The driver's memory-type function, or None where cuda-bindings or a driver is
    missing (a CPU machine)."""
    from ..errors import SynapseError
    try:
        from ..hw import driver_api
        driver_api.init_driver()
        return DriverMemoryType()
    except (ImportError, SynapseError):
        return None
