"""What a driver asks a backend to do: operation descriptors, one per batch of work.

Drivers build these from the tier manager's decisions and submit them to a stream; the
simulator turns each into simulated time from the hardware profile, the hardware backends
into copies and kernel launches. An op carries what both need: byte counts and FLOPs for
the simulator, regions (tier + offset in that tier's memory) and payload sources for the
hardware. Ops are batched per step so the simulator handles a few events per step, not
one per block.
"""

from __future__ import annotations

import enum
from itertools import chain
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .blocks import Fmt, Tier


class Stream(enum.Enum):
    COMPUTE = "compute"
    H2D = "h2d"
    D2H = "d2h"
    DISK_READ = "disk_read"     # host threads reading L3 chunk files (loads never queue
    DISK_WRITE = "disk_write"   # behind the background writes of saves)


# Which stream next writes each space, so a memset queued there is ordered before reuse.
ZERO_STREAM = {"l1": Stream.H2D, "staging": Stream.COMPUTE, "l2": Stream.D2H}
# Ops on these streams flush the pinned ranges waiting to be zeroed (``PinnedZero``):
# the stream that writes pinned host memory, and the disk streams, whose host threads
# read and write it.
PINNED_ZERO_BEFORE = frozenset({Stream.D2H, Stream.DISK_READ, Stream.DISK_WRITE})


@dataclass(frozen=True)
class Region:
    """A byte range in one tier's memory (L1 arena, L1 staging, L2 pool or the ring)."""

    space: str       # "l1", "staging", "l2", "ring"
    offset: int
    nbytes: int
    tenant: str = "default"


def merged_byte_ranges(ranges) -> list:
    """``(offset, nbytes)`` runs covering exactly the bytes of ``ranges``, adjacent and
    overlapping ones merged, in offset order: the tail slots freed one block at a time
    are one memset, not one per block (the bytes cleared are the same)."""
    out: list = []
    for lo, n in sorted(r for r in ranges if r[1] > 0):
        if out and lo <= out[-1][0] + out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], lo + n - out[-1][0]))
        else:
            out.append((lo, n))
    return out


def merged_ranges(regions) -> list:
    """``(space, offset, nbytes)``: ``merged_byte_ranges`` of the regions of each space."""
    spaces: dict = {}
    for r in regions:
        spaces.setdefault(r.space, []).append((r.offset, r.nbytes))
    return [(sp, lo, n) for sp in sorted(spaces) for lo, n in merged_byte_ranges(spaces[sp])]


@dataclass(frozen=True)
class Op:
    """Base: every op names a kind (for telemetry) and a purpose (why it was issued)."""

    purpose: str = ""

    @property
    def kind(self) -> str:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return 0

    @property
    def count(self) -> int:
        return 1


class _SizedRows:
    """``nbytes`` and ``count`` of an op whose rows are its ``sizes`` column."""

    @property
    def nbytes(self):
        return int(self.sizes.sum())

    @property
    def count(self):
        return len(self.sizes)


@dataclass(frozen=True, eq=False)
class Copy(_SizedRows, Op):
    """A batch of copies in one direction between two spaces, as columns of byte
    offsets and sizes: one batched launch on the hardware, whatever the number of rows.
    ``d2d`` (a compacting L1) and ``h2h`` (a compacting pinned L2) copies gather every
    source before writing any destination, so rows may overlap each other's places."""

    direction: str = "h2d"  # "h2d", "d2h", "d2d" or "h2h"
    src_space: str = "l2"
    dst_space: str = "l1"
    src_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dst_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def between(cls, purpose: str, direction: str, src: "Region", dst: "Region") -> "Copy":
        return cls(purpose=purpose, direction=direction, src_space=src.space,
                   dst_space=dst.space, src_offsets=np.array([src.offset], np.int64),
                   dst_offsets=np.array([dst.offset], np.int64),
                   sizes=np.array([src.nbytes], np.int64))

    @property
    def kind(self):
        return f"copy_{self.direction}"


ZERO_PAGE_BYTES = 4 << 20  # the device page of zeros that pinned ranges are cleared from


@dataclass(frozen=True, eq=False)
class PinnedZero(Copy):
    """Zero-on-free of pinned host ranges as one D2H batch from a device page of zeros
    (space ``"zeros"``, ``ZERO_PAGE_BYTES``): a copy engine clears them on the stream
    that next writes them, where a host memset cost the loop's thread 0.2 ms per 2 MiB
    slab. A copy to the link model (its bytes cross it), a memset to the telemetry (they
    are not KV traffic)."""

    purpose: str = "zero_pinned"
    direction: str = "d2h"
    src_space: str = "zeros"

    @classmethod
    def of(cls, space: str, ranges) -> "PinnedZero":
        """The op clearing ``ranges`` ((offset, nbytes) in ``space``); rows longer than
        the page are cut into pages."""
        # fromiter over the flattened pairs: several times faster than np.array on a
        # list of tuples (hundreds of ranges per demotion round), the same array
        rows = np.fromiter(chain.from_iterable(ranges), np.int64, 2 * len(ranges)).reshape(-1, 2) \
            if isinstance(ranges, list) else np.array(ranges, np.int64).reshape(-1, 2)
        dst, sizes = rows[:, 0], rows[:, 1]
        if (sizes > ZERO_PAGE_BYTES).any():
            cuts = [(o + lo, min(ZERO_PAGE_BYTES, n - lo)) for o, n in rows.tolist()
                    for lo in range(0, n, ZERO_PAGE_BYTES)]
            dst, sizes = np.array(cuts, np.int64).reshape(-1, 2).T
        return cls(dst_space=space, src_offsets=np.zeros(len(dst), np.int64),
                   dst_offsets=np.ascontiguousarray(dst), sizes=np.ascontiguousarray(sizes))

    @property
    def kind(self):
        return "memset"


@dataclass(frozen=True)
class Ingest(Op):
    """New data from the host (a prompt's KV, a model's weights) into device regions.

    ``source(i)`` returns the bytes (uint8 array) for region ``i``; or ``fill(i, out)``
    writes them into ``out`` (uint8, the region's size: a staging slice, so the payload
    is copied once). The simulator calls neither, so large workloads cost it nothing.
    """

    dst: tuple = ()
    source: Optional[Callable[[int], np.ndarray]] = None
    fill: Optional[Callable[[int, np.ndarray], None]] = None
    # Where a backend can DMA from page-locked memory (``Backend.dma_ingest``):
    # ``pinned(i)`` is ``(host address, key)`` of region i's bytes already there, or None
    # to use ``fill``. ``key`` (fp16, kd values, or None) is then written by the device
    # over the start of every key row of the region's tokens, whose layout is
    # [token][2][key_rows][head_dim] fp16.
    pinned: Optional[Callable[[int], Optional[tuple]]] = None
    key_rows: int = 0
    head_dim: int = 0

    def write_into(self, i: int, out: np.ndarray) -> None:
        """Region ``i``'s bytes into ``out``; ValueError if the source's size differs."""
        if self.fill is not None:
            self.fill(i, out)
            return
        data = self.source(i)
        if data.nbytes != out.nbytes:
            raise ValueError(f"{data.nbytes} bytes for a region of {out.nbytes}")
        out[:] = data.view(np.uint8).reshape(-1)

    @property
    def kind(self):
        return "copy_h2d"

    @property
    def nbytes(self):
        return sum(r.nbytes for r in self.dst)

    @property
    def count(self):
        return len(self.dst)


@dataclass(frozen=True)
class Prefill(Ingest):
    """A forward pass over new prompt tokens that leaves their KV in ``dst`` (L1).

    The simulator charges ``flops`` at the profile's GEMM rate (prefill is compute-bound);
    the hardware backends write what ``source`` gives, as an ``Ingest``: they run no
    model, so on them the op's time is a copy's, not a prefill's (a real model's time to
    first token is measured by ``benchmarks/prefix_reuse.py``).
    """

    flops: float = 0.0
    tokens: int = 0

    @property
    def kind(self):
        return "prefill"


@dataclass(frozen=True, eq=False)
class DiskIO(_SizedRows, Op):
    """Whole chunk files read from or written to the L3 directory, from or into pinned
    host memory. The simulator charges the profile's disk rates per file; the hardware
    backends call ``run()``, which does the I/O (the simulator never calls it)."""

    direction: str = "read"   # "read" (L3 -> L2) or "write" (L2 -> L3)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    run: Optional[Callable[[], None]] = None

    @property
    def kind(self):
        return f"disk_{self.direction}"


@dataclass(frozen=True, eq=False)
class _Transcode(Op):
    """Rows of whole KV blocks converted between fp16 and INT4 on the GPU: row ``i``
    reads ``src_sizes[i]`` bytes at ``src_offsets[i]`` and writes ``dst_sizes[i]`` at
    ``dst_offsets[i]``; each row holds ``numel`` values of ``block_tokens`` tokens, in
    the INT4 key format ``int4_keys`` (``synapse.hw.kv_layout``)."""

    src_space: str = "l1"
    dst_space: str = "staging"
    src_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dst_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    src_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dst_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    numel: int = 0
    group_size: int = 64
    int4_keys: str = "token"
    block_tokens: int = 0

    @property
    def nbytes(self):  # bytes read + written, the kernel's traffic
        return int(self.src_sizes.sum() + self.dst_sizes.sum())

    @property
    def count(self):
        return len(self.src_offsets)


@dataclass(frozen=True, eq=False)
class Quantize(_Transcode):
    """fp16 blocks in ``src_space`` (L1) -> the INT4 layout in ``dst_space`` (staging):
    the way out of a block demoted to an INT4 L2."""

    @property
    def kind(self):
        return "int4_quantize"


@dataclass(frozen=True, eq=False)
class Dequantize(_Transcode):
    """INT4 blocks in ``src_space`` (device staging) -> full precision in ``dst_space``
    (L1): the way in of a block that L2 holds in INT4."""

    src_space: str = "staging"
    dst_space: str = "l1"

    @property
    def kind(self):
        return "int4_dequantize"


@dataclass(frozen=True, eq=False)
class Attention(Op):
    """One decode attention step over KV blocks resident in ``space`` (fp16 or INT4).

    Blocks are columns, not objects, so a step over thousands of blocks costs the
    simulator nothing per block: byte offsets, formats (``Fmt`` values), valid tokens and
    sizes. ``query`` is [layers, heads, head_dim] float32 (None on the simulator); the
    result is the attention output [layers, heads, head_dim] and the per-block
    log-sum-exp [layers, heads, num_blocks].

    With ``segments`` (int64 [S + 1], from 0 to the number of blocks), the op is S
    requests' attention in one launch: request s reads blocks
    ``segments[s]:segments[s + 1]`` with its own query ``query[s]`` (``query``: S arrays
    of [layers, heads, head_dim], or one [S, layers, heads, head_dim] array), and the
    result is a list of S ``(output, block lse)`` pairs, each what the one-request op over
    that request's blocks returns. The simulator charges it as one op: the bytes and FLOPs
    of all requests, one launch.
    """

    space: str = "l1"
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fmts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    n_valid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    query: Optional[np.ndarray] = None
    layout: object = None    # synapse.hw.kv_layout.KVLayout
    group_size: int = 64
    flops: float = 0.0
    softmax_scale: float = 1.0
    # False: the output stays on the device, as a model's next layer would read it (the
    # serving drivers never read it; copying it back cost 33 us of host time per op).
    readback: bool = True
    segments: Optional[np.ndarray] = None

    @property
    def kind(self):
        return "attention"

    @property
    def num_segments(self) -> int:
        """Requests in the op (1 without ``segments``)."""
        return 1 if self.segments is None else len(self.segments) - 1

    @property
    def nbytes(self):
        return int(self.sizes.sum())

    @property
    def count(self):
        return len(self.offsets)


@dataclass(frozen=True)
class LayerCompute(Op):
    """One layer of a weight-streamed model, reading its weights from ``weights``:
    ``x = rmsnorm(x + gelu_tanh(x @ W1) @ W2)`` with W1 [hidden, ffn] and W2 [ffn, hidden]
    fp16 back to back in the region (the normalisation keeps fp16 activations finite
    through any number of layers)."""

    layer: int = 0
    weights: Optional[Region] = None
    act: object = None       # the activation handle the layer updates in place
    hidden: int = 0
    ffn: int = 0
    flops: float = 0.0
    weight_bytes: int = 0

    @property
    def kind(self):
        return "layer"

    @property
    def nbytes(self):
        return self.weight_bytes


@dataclass(frozen=True)
class Zero(Op):
    """Clear freed regions before reuse (zero-on-free, tenant isolation)."""

    regions: tuple = ()

    @property
    def kind(self):
        return "memset"

    @property
    def nbytes(self):
        return sum(r.nbytes for r in self.regions)

    @property
    def count(self):
        return len(self.regions)


@dataclass
class OpRecord:
    """When an op ran, as the backend saw it (simulated or measured), in seconds."""

    kind: str
    purpose: str
    stream: str
    submit_s: float
    start_s: float
    end_s: float
    nbytes: int
    count: int

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s
