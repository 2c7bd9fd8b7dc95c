"""One exception root for the whole toolkit.

The simulator raises the same types as the hardware backends, so a scenario that is
refused, out of capacity or denied access fails the same way on every backend. The CLI
turns a ``SynapseError`` into one line and exit code 2; anything else is a bug.
"""


class SynapseError(Exception):
    """Root of every error Synapse raises on purpose."""


class ScenarioError(SynapseError):
    """A scenario, profile or override is invalid (names file, YAML path, value, expectation)."""


class CapacityError(SynapseError):
    """A tier, arena, pool or ring cannot hold what was asked of it."""


class AdmissionRefused(CapacityError):
    """Backpressure: a request was refused because no tier can take its blocks.

    Raised instead of dropping data silently; callers count it as a refusal.
    """


class AccessDenied(SynapseError):
    """A tenant touched a block, slab or chunk that belongs to another tenant."""


class AllocatorError(SynapseError):
    """Misuse of an allocator handle: double free, foreign handle, use after free."""


class KernelError(SynapseError):
    """A device operation (kernel launch, copy, synchronisation) failed; names the operation."""


class BackendUnavailable(SynapseError):
    """The requested backend cannot run on this machine (no GPU, no PyCUDA, ...)."""


class StorageError(SynapseError):
    """The disk tier cannot use its directory (not writable, disk full, not a directory);
    the message names the directory."""


class OutputError(SynapseError):
    """A result cannot be written where it was asked to go (names the path and why)."""
