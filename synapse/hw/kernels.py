"""Loader and thin typed wrappers for Synapse's CUDA kernels (``cuda/*.cu``).

This module and the cuda backend's device module are the only places that import PyCUDA;
``import synapse.hw`` does not import this module. Without PyCUDA (or without a driver)
the module still imports, so its pure helpers (source lookup, nvcc compilation, launch
planning) work on any machine; the wrappers then raise ``BackendUnavailable``.

Device and context: an NVIDIA GPU through the caller's **current** CUDA context. This
module never creates a context (no ``pycuda.autoinit``): the device module pushes the
device's primary context, which PyTorch shares. Kernel modules are loaded once per
context.

Sources and compilation: the ``.cu`` files ship as package data ``synapse._cuda`` (the
top-level ``cuda/`` directory, mapped in setup.cfg), so they are found after a plain
``pip install .``; in a checkout without an install we fall back to ``<repo>/cuda``. They
are compiled with nvcc to a cubin for the current device (``-arch=sm_XY`` from its compute
capability) into ``$SYNAPSE_CACHE`` or ``~/.cache/synapse/kernels``, keyed by the source's
hash, the arch, the nvcc version and the flags (the sources include only CUDA headers), and
loaded with ``pycuda.driver.module_from_file``.

Conventions of every wrapper:

* pointers are plain ints (device addresses; a ``DeviceAllocation`` or anything with
  ``__int__`` is accepted too) and their alignment is checked;
* launches are asynchronous on ``stream`` (a PyCUDA ``Stream``, or None for the default
  stream); a launch the driver refuses raises ``KernelError`` naming the operation, while a
  fault inside a kernel surfaces at the next synchronising call;
* bad arguments raise ``ValueError`` before anything is launched.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from synapse.errors import BackendUnavailable, KernelError
from synapse.hw import int4 as int4_ref
from synapse.hw.kv_layout import FMT_FP16, FMT_INT4, check_key_format

try:
    import pycuda.driver as _cuda
except (ImportError, OSError) as _exc:  # no PyCUDA, or PyCUDA without a driver
    _cuda = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None

SOURCES = ("int4.cu", "attention_decode.cu", "kv_fill.cu")
# Same optimisation flags as .ci/check-cuda, so its register report matches these cubins.
# No fast-math: the INT4 kernels rely on IEEE division and exact float->half rounding.
NVCC_FLAGS = ("-O3", "-std=c++17")
NVCC_TIMEOUT_S = 600

# Launch shapes; must match the constants at the top of the .cu files.
INT4_THREADS = 256  # kThreads in int4.cu
INT4_VEC_ELEMS = 8  # elements per thread per vector (kVec)
QUANT_VECS_PER_THREAD = 2  # kQuantUnroll
DEQUANT_VECS_PER_THREAD = 4  # kDequantUnroll
STAGED_VECS_PER_THREAD = 4  # kStageVecs / kThreads: one staged tile = 8192 elements
BULK_VECS_PER_THREAD = 4  # kBulkVecs / kThreads: one "bulk" tile = 8192 elements
BULK4K_VECS_PER_THREAD = 2  # kBulk4kVecs / kThreads: one "bulk4k" tile = 4096 elements
# Variants of the INT4 kernels (int4.cu, "Faster variants"): name -> (kernel infix, vectors
# per thread per tile). All write the same bytes; benchmarks/int4_kernels.py times them on
# the GPU and prints which to put here. "warp" is the kernel measured on the H200 on
# 2026-12-01 (quantize 55%, dequantize 83% of the device copy).
INT4_QUANT_VARIANTS = {"warp": ("", QUANT_VECS_PER_THREAD),
                       "lean": ("_lean", QUANT_VECS_PER_THREAD),
                       "lean4": ("_lean4", 2 * QUANT_VECS_PER_THREAD),
                       "staged": ("_staged", STAGED_VECS_PER_THREAD)}
INT4_DEQUANT_VARIANTS = {"warp": ("", DEQUANT_VECS_PER_THREAD),
                         "stream": ("_stream", DEQUANT_VECS_PER_THREAD),
                         "staged": ("_staged", STAGED_VECS_PER_THREAD),
                         "bulk": ("_bulk", BULK_VECS_PER_THREAD),
                         "bulk4k": ("_bulk4k", BULK4K_VECS_PER_THREAD)}
# Variants built on the Tensor Memory Accelerator (bulk copies, mbarriers): sm_90 and newer.
INT4_TMA_VARIANTS = frozenset({"staged", "bulk", "bulk4k"})
MAX_INT4_NUMEL = 1 << 40  # the bulk kernels count tiles in 32 bits (int4.cu)
# Defaults from benchmarks/int4_kernels.py on the H200 (2026-12-01, results in
# benchmarks/results/h200-2026-12-01-s2/int4_kernels.json): quantize staged 3464 GB/s =
# 82% of the device copy (warp 58%), G=64. Dequantize "bulk" since 2026-12-02
# (benchmarks/results/h200-2026-12-02-s7/call3/int4_kernels.json): the fastest at the
# largest size timed (64 Mi elements, launches back to back) for every G: 3505 GB/s at
# G=64 against staged's 3401 (84% against 81% of the 1 GiB device copy), 1701 against
# 1295 at 8 Mi elements. The TMA kernels need sm_90: before it the *_PRE_SM90 ones.
QUANT_VARIANT = "staged"  # what quantize_int4 launches by default
DEQUANT_VARIANT = "bulk"  # what dequantize_int4 launches by default
QUANT_VARIANT_PRE_SM90, DEQUANT_VARIANT_PRE_SM90 = "lean", "stream"
# The channel-key KV block quantize kernel: name -> kernel infix (same bytes). lean: 359
# GB/s against warp's 181 at 256-token blocks of 32x8x128 (both launch-bound there).
KV_QUANT_VARIANTS = {"warp": "", "lean": "_lean"}
KV_QUANT_VARIANT = "lean"  # what quantize_kv_block_int4 launches by default
ATTN_THREADS = 128  # kAttnThreads in attention_decode.cu
ATTN_HEAD_DIMS = (64, 128, 256)
MAX_GRID_Y = 65535
DEFAULT_SHARED_BYTES_PER_BLOCK = 48 * 1024  # without opting in to more
ATTN_CTAS_PER_SM = 8  # planning figure: resident split CTAs per SM
ATTN_WAVES = 2  # aim for this many waves of split CTAs over the chip


# --------------------------------------------------------------------------- sources


def source_path(name: str):
    """A readable path (Traversable) of a kernel source, installed or in the checkout."""
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}; known: {SOURCES}")
    try:
        candidate = resources.files("synapse._cuda") / name
        if candidate.is_file():
            return candidate
    except ModuleNotFoundError:
        pass  # a checkout that was never installed: synapse._cuda exists only once mapped
    checkout = Path(__file__).resolve().parents[2] / "cuda" / name
    if checkout.is_file():
        return checkout
    raise KernelError(
        f"kernel source {name} not found in package synapse._cuda nor at {checkout}; "
        "was the package installed without its package data?"
    )


def nvcc_path() -> str:
    """The nvcc to use: $SYNAPSE_NVCC, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin."""
    candidates = [os.environ.get("SYNAPSE_NVCC"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise KernelError(
        "compiling kernels: nvcc not found (set SYNAPSE_NVCC, put nvcc on PATH or set CUDA_HOME)"
    )


@lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    """nvcc's full ``--version`` text (part of the cache key)."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelError(f"compiling kernels: cannot run {nvcc} --version: {exc}") from exc
    if done.returncode != 0:
        raise KernelError(f"compiling kernels: {nvcc} --version failed: {_first_lines(done.stderr)}")
    return done.stdout.strip()


def cache_dir() -> Path:
    """Where compiled cubins live: $SYNAPSE_CACHE, else ~/.cache/synapse/kernels."""
    env = os.environ.get("SYNAPSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "synapse" / "kernels"


def arch_of(compute_capability: tuple[int, int]) -> str:
    """``(9, 0)`` -> ``'sm_90'``."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"


def _first_lines(text: str, n: int = 20) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    more = f"\n... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return "\n".join(lines[:n]) + more


def compile_cubin(name: str, arch: str, nvcc: str | None = None, out_dir: Path | None = None) -> Path:
    """Compile kernel source ``name`` for ``arch`` (e.g. 'sm_90') unless cached; return the cubin."""
    if not arch.startswith("sm_") or not arch[3:].isdigit():
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    src = source_path(name)
    nvcc = nvcc or nvcc_path()
    source_bytes = src.read_bytes()
    key = hashlib.sha256()
    for part in (source_bytes, arch.encode(), nvcc_version(nvcc).encode(), " ".join(NVCC_FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    cubin = out_dir / f"{Path(name).stem}-{arch}-{key.hexdigest()[:24]}.cubin"
    if cubin.is_file():
        return cubin
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"compiling {name}: cannot create cache dir {out_dir}: {exc}") from exc
    # unique temp name, then an atomic rename: concurrent compilers never see half a file
    tmp = cubin.with_name(f"{cubin.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with resources.as_file(src) as src_file:
        cmd = [nvcc, "-cubin", f"-arch={arch}", *NVCC_FLAGS, str(src_file), "-o", str(tmp)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelError(f"compiling {name} for {arch}: cannot run nvcc: {exc}") from exc
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise KernelError(
            f"compiling {name} for {arch}: nvcc exited with {done.returncode}:\n"
            + _first_lines(done.stderr + done.stdout)
        )
    os.replace(tmp, cubin)
    return cubin


# --------------------------------------------------------------------------- planning


def resident_blocks_per_sm(
    threads: int,
    regs_per_thread: int,
    shared_bytes: int,
    max_threads_per_sm: int = 2048,
    max_regs_per_sm: int = 65536,
    max_shared_per_sm: int = 228 * 1024,
    max_blocks_per_sm: int = 32,
) -> int:
    """How many CTAs of this shape fit on one SM at once (>= 1); defaults are sm_90's."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256  # allocated per warp, 256 at a time
    by_regs = max_regs_per_sm // (regs_per_warp * warps)
    by_threads = max_threads_per_sm // threads
    by_shared = max_shared_per_sm // shared_bytes if shared_bytes > 0 else max_blocks_per_sm
    return max(1, min(by_regs, by_threads, by_shared, max_blocks_per_sm))


def int4_grid(n: int, vecs_per_thread: int, num_sms: int, blocks_per_sm: int,
              threads: int = INT4_THREADS) -> int:
    """Grid size for an INT4 kernel over ``n`` elements: enough tiles, at most one full wave."""
    tiles = -(-(n // INT4_VEC_ELEMS) // (vecs_per_thread * threads))
    return max(1, min(tiles, num_sms * blocks_per_sm))


def kv_block_grid(block_tokens: int, channels: int, vecs_per_thread: int, num_sms: int,
                  blocks_per_sm: int, threads: int = INT4_THREADS) -> int:
    """x-size of the grid of a channel-key KV block kernel (``gridDim.y == 2``): enough CTAs
    for a thread per 8 key channels and for the values' tiles, at most one full wave."""
    keys = -(-(channels // INT4_VEC_ELEMS) // threads)
    values = int4_grid(block_tokens * channels, vecs_per_thread, num_sms, blocks_per_sm, threads)
    return max(1, min(max(keys, values), num_sms * blocks_per_sm))


@dataclass(frozen=True)
class AttentionPlan:
    """How one attention decode call is launched (see cuda/attention_decode.cu)."""

    blocks_per_split: int
    num_splits: int
    split_grid: tuple[int, int]
    split_block: tuple[int, int, int]
    shared_bytes: int  # dynamic shared memory of the split kernel
    combine_grid: tuple[int, int]
    combine_block: tuple[int, int, int]
    workspace_bytes: int  # part_m, part_l [L*H, S] and part_acc [L*H, S, D], float32

    def workspace_offsets(self, layers: int, heads: int) -> tuple[int, int, int]:
        """Byte offsets of part_m, part_l and part_acc inside the workspace."""
        parts = layers * heads * self.num_splits * 4
        return 0, parts, 2 * parts


def attention_plan(layers: int, heads: int, head_dim: int, block_tokens: int, num_blocks: int,
                   num_sms: int, ctas_per_sm: int = ATTN_CTAS_PER_SM) -> AttentionPlan:
    """Split the blocks so that L*H*num_splits CTAs cover the chip about ATTN_WAVES times.

    Each split CTA walks ``blocks_per_split`` consecutive blocks; more splits mean more
    parallelism but more partials to combine (``D + 2`` floats each, tiny next to a block).
    """
    lh = layers * heads
    if lh <= 0 or lh > 2**31 - 1:
        raise ValueError(f"layers * heads must be in [1, 2**31 - 1], got {lh}")
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if num_blocks == 0:
        bps, splits = 1, 0
    else:
        target = max(1, -(-ATTN_WAVES * num_sms * ctas_per_sm // lh))
        bps = max(-(-num_blocks // target), -(-num_blocks // MAX_GRID_Y))
        splits = -(-num_blocks // bps)
    return AttentionPlan(
        blocks_per_split=bps,
        num_splits=splits,
        split_grid=(lh, splits),
        split_block=(ATTN_THREADS, 1, 1),
        shared_bytes=4 * block_tokens,
        combine_grid=(lh, 1),
        combine_block=(head_dim, 1, 1),
        workspace_bytes=max(16, 4 * lh * splits * (head_dim + 2)),
    )


def segment_plan(layers: int, heads: int, seg_starts: np.ndarray, num_sms: int,
                 ctas_per_sm: int = ATTN_CTAS_PER_SM) -> tuple[int, np.ndarray]:
    """Work items of a launch over several requests' blocks (``attention_decode_segments``).

    ``seg_starts`` (int, [S + 1], non-decreasing, from 0): segment s owns blocks
    ``seg_starts[s]:seg_starts[s + 1]``. Returns ``(blocks_per_split, item_starts)``:
    segment s is cut into ``item_starts[s + 1] - item_starts[s]`` items of at most
    ``blocks_per_split`` consecutive blocks (none when it has no block), so that
    ``L*H*items`` CTAs cover the chip about ATTN_WAVES times, as ``attention_plan`` does
    for one request; ``item_starts`` is int32 [S + 1]. Host cost: a few NumPy calls, as
    it runs once per decode step.
    """
    lh = layers * heads
    seg_starts = np.asarray(seg_starts)
    counts = np.diff(seg_starts)
    nb = int(seg_starts[-1]) if len(seg_starts) else 0
    if lh <= 0 or len(seg_starts) < 2 or int(seg_starts[0]) != 0 or (counts < 0).any():
        raise ValueError(f"seg_starts must start at 0 and not decrease, with layers * heads "
                         f">= 1; got {seg_starts.tolist()[:8]} with {lh}")
    if len(counts) > MAX_GRID_Y:
        raise ValueError(f"at most {MAX_GRID_Y} segments per launch, got {len(counts)}")
    target = max(1, -(-ATTN_WAVES * num_sms * ctas_per_sm // lh))
    bps = max(1, -(-nb // target))
    while True:
        items = (counts + (bps - 1)) // bps
        total = int(items.sum())
        if total <= MAX_GRID_Y:
            break
        bps *= 2  # more segments than the grid holds at this size: longer items
    item_starts = np.zeros(len(seg_starts), np.int32)
    np.cumsum(items, out=item_starts[1:])
    return bps, item_starts


# --------------------------------------------------------------------------- checks


def _ptr(value, what: str, align: int) -> int:
    try:
        p = int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a device address (int), got {value!r}") from exc
    if p <= 0:
        raise ValueError(f"{what} must be a non-null device address, got {p}")
    if p % align:
        raise ValueError(f"{what} = {p:#x} must be {align}-byte aligned")
    return p


def _positive(value, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_int4_args(n, group_size) -> tuple[int, int]:
    group_size = int4_ref.check_group_size(group_size)
    n = _positive(n, "n")
    if n % group_size:
        raise ValueError(f"n = {n} is not divisible by group_size {group_size}")
    if n >= MAX_INT4_NUMEL:
        raise ValueError(f"n = {n} is too large for the INT4 kernels (limit {MAX_INT4_NUMEL})")
    return n, group_size


# --------------------------------------------------------------------------- driver side


def _driver():
    if _cuda is None:
        raise BackendUnavailable(f"the CUDA kernels need PyCUDA and an NVIDIA driver: {_IMPORT_ERROR}")
    return _cuda


@dataclass
class _ContextState:
    arch: str
    num_sms: int
    max_threads_per_sm: int
    max_regs_per_sm: int
    max_shared_per_sm: int
    modules: dict = field(default_factory=dict)  # source name -> Module
    functions: dict = field(default_factory=dict)  # kernel name -> prepared Function
    workspace: "AttentionWorkspace | None" = None
    launchers: dict = field(default_factory=dict)  # attention_launcher's, by shape


_STATES: dict[int, _ContextState] = {}
_LOCK = threading.Lock()


def _state() -> _ContextState:
    cuda = _driver()
    try:
        ctx = cuda.Context.get_current()
    except cuda.Error as exc:
        raise KernelError(f"no usable CUDA context (was pycuda.driver.init() called?): {exc}") from exc
    if ctx is None:
        raise KernelError(
            "no current CUDA context: push the device's primary context first "
            "(Device(i).retain_primary_context().push())"
        )
    with _LOCK:
        state = _STATES.get(ctx.handle)
        if state is None:
            dev = cuda.Context.get_device()
            attr = cuda.device_attribute
            state = _ContextState(
                arch=arch_of(dev.compute_capability()),
                num_sms=dev.get_attribute(attr.MULTIPROCESSOR_COUNT),
                max_threads_per_sm=dev.get_attribute(attr.MAX_THREADS_PER_MULTIPROCESSOR),
                max_regs_per_sm=dev.get_attribute(attr.MAX_REGISTERS_PER_MULTIPROCESSOR),
                max_shared_per_sm=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            )
            _STATES[ctx.handle] = state
        return state


def forget_context() -> None:
    """Drop the modules, kernels and default workspace cached for the current context.

    Call before popping a context for good (e.g. at shutdown), so no device allocation
    outlives it in this module's caches.
    """
    cuda = _driver()
    ctx = cuda.Context.get_current()
    if ctx is None:
        return
    with _LOCK:
        state = _STATES.pop(ctx.handle, None)
    if state is not None and state.workspace is not None:
        state.workspace.free()


# argument formats for prepared launches (pycuda struct codes)
_ARG_FORMATS = {
    "int4_quantize": "PPQ",
    "int4_dequantize": "PPQ",
    "attention_decode_split": "PPPPiiiiifPPPP",
    "attention_decode_combine": "PPPiiP",
    "attention_decode_segments_split": "PPPPPPiiiiifPPPP",
    "attention_decode_segments_combine": "PPPPiiP",
    "kv_assemble_int4": "PPPPPIIIIII",
    "kv_quantize_layer_rows_int4": "PPPPQIIIII",
    "kv_block_quantize_int4_kc": "PPII",
    "kv_block_dequantize_int4_kc": "PPII",
    "kv_key_prefix": "PPPiii",
}


def _function(source: str, name: str, family: str):
    """A prepared kernel from ``source`` in the current context (compiled and loaded once)."""
    cuda = _driver()
    state = _state()
    with _LOCK:
        fn = state.functions.get(name)
        if fn is not None:
            return fn, state
        module = state.modules.get(source)
        if module is None:
            cubin = compile_cubin(source, state.arch)
            try:
                module = cuda.module_from_file(str(cubin))
            except cuda.Error as exc:
                raise KernelError(f"loading {cubin}: {exc}") from exc
            state.modules[source] = module
        try:
            fn = module.get_function(name)
        except cuda.Error as exc:
            raise KernelError(f"kernel {name} not found in {source}: {exc}") from exc
        fn.prepare(_ARG_FORMATS[family])
        state.functions[name] = fn
        return fn, state


def preload(sources=SOURCES) -> None:
    """Compile (nvcc, cached on disk) and load every kernel module in the current context
    now, so a run does not pay seconds of nvcc at its first launch."""
    cuda = _driver()
    state = _state()
    with _LOCK:
        for source in sources:
            if source not in state.modules:
                cubin = compile_cubin(source, state.arch)
                try:
                    state.modules[source] = cuda.module_from_file(str(cubin))
                except cuda.Error as exc:
                    raise KernelError(f"loading {cubin}: {exc}") from exc


def _launch(op: str, fn, grid, block, stream, args, shared_bytes: int = 0) -> None:
    cuda = _driver()
    try:
        fn.prepared_async_call(grid, block, stream, *args, shared_size=shared_bytes)
    except cuda.Error as exc:
        raise KernelError(f"{op}: launch failed (grid {grid}, block {block}): {exc}") from exc


def _blocks_per_sm(fn, state: _ContextState, threads: int, dynamic_shared: int = 0) -> int:
    return resident_blocks_per_sm(
        threads,
        fn.num_regs,
        fn.shared_size_bytes + dynamic_shared,
        state.max_threads_per_sm,
        state.max_regs_per_sm,
        state.max_shared_per_sm,
    )


def int4_kernel(direction: str, variant: str | None = None) -> tuple[str, int]:
    """(kernel name stem, vectors per thread per tile) of an INT4 kernel variant;
    ``variant`` None: the default (QUANT_VARIANT / DEQUANT_VARIANT)."""
    table = INT4_QUANT_VARIANTS if direction == "quantize" else INT4_DEQUANT_VARIANTS
    variant = variant or (QUANT_VARIANT if direction == "quantize" else DEQUANT_VARIANT)
    if variant not in table:
        raise ValueError(f"int4 {direction} variant must be one of {sorted(table)}, got {variant!r}")
    infix, vecs_per_thread = table[variant]
    return f"int4_{direction}{infix}", vecs_per_thread


def _int4(direction: str, variant, src_ptr, dst_ptr, n, group_size, stream) -> None:
    stem, vecs_per_thread = int4_kernel(direction, variant)
    n, group_size = _check_int4_args(n, group_size)
    src = _ptr(src_ptr, "src_ptr", 16)
    dst = _ptr(dst_ptr, "dst_ptr", 16)
    name = variant or (QUANT_VARIANT if direction == "quantize" else DEQUANT_VARIANT)
    if variant is None and int(_state().arch[3:]) < 90:
        name = QUANT_VARIANT_PRE_SM90 if direction == "quantize" else DEQUANT_VARIANT_PRE_SM90
        stem, vecs_per_thread = int4_kernel(direction, name)
    family = f"int4_{direction}"
    fn, state = _function("int4.cu", f"{stem}_g{group_size}", family)
    if name in INT4_TMA_VARIANTS and int(state.arch[3:]) < 90:
        raise KernelError(f"int4 {direction}: the {name} variant needs TMA (sm_90 or newer); "
                          f"this device is {state.arch}")
    grid = int4_grid(n, vecs_per_thread, state.num_sms, _blocks_per_sm(fn, state, INT4_THREADS))
    _launch(f"int4 {direction}", fn, (grid, 1), (INT4_THREADS, 1, 1), stream, (src, dst, n))


def quantize_int4(src_ptr, dst_ptr, n: int, group_size: int, stream=None,
                  variant: str | None = None) -> None:
    """Quantize ``n`` fp16 values at ``src_ptr`` into the INT4 byte layout at ``dst_ptr``.

    Device: current context. ``src``: fp16[n], finite, 16-byte aligned. ``dst``:
    ``int4_nbytes(n, G)`` bytes, 16-byte aligned, laid out
    ``[packed n/2][scales fp16 n/G][zeros fp16 n/G]`` (bit-exact with ``int4.pack_into``).
    ``n % group_size == 0``, ``group_size`` in {32, 64, 128}. Buffers must not overlap.
    ``variant``: a key of ``INT4_QUANT_VARIANTS`` (same bytes), default ``QUANT_VARIANT``.
    """
    _int4("quantize", variant, src_ptr, dst_ptr, n, group_size, stream)


def dequantize_int4(src_ptr, dst_ptr, n: int, group_size: int, stream=None,
                    variant: str | None = None) -> None:
    """Dequantize the INT4 byte layout at ``src_ptr`` (``n`` elements) into fp16 at ``dst_ptr``.

    Device: current context. ``src``: ``int4_nbytes(n, G)`` bytes, 16-byte aligned.
    ``dst``: fp16[n], 16-byte aligned. Bit-exact with ``int4.unpack_from(..., float16)``.
    ``variant``: a key of ``INT4_DEQUANT_VARIANTS``, default ``DEQUANT_VARIANT``.
    """
    _int4("dequantize", variant, src_ptr, dst_ptr, n, group_size, stream)


def _check_kv_block_args(block_tokens, channels, group_size) -> tuple[int, int, int]:
    group_size = int4_ref.check_group_size(group_size)
    bt = _positive(block_tokens, "block_tokens")
    c = _positive(channels, "channels")
    if bt % 4 or c % group_size:
        raise ValueError(f"a channel-key KV block needs block_tokens % 4 == 0 and channels "
                         f"% group_size == 0; got block_tokens {bt}, channels {c}, group_size "
                         f"{group_size}")
    if bt * c // INT4_VEC_ELEMS >= 1 << 32:
        raise ValueError(f"a KV block of {bt} x {c} elements is too large for one launch "
                         f"(2^32 vectors of 8)")
    return bt, c, group_size


def _kv_block(direction: str, vecs_per_thread: int, src_ptr, dst_ptr, block_tokens, channels,
              group_size, stream, infix: str = "") -> None:
    bt, c, group_size = _check_kv_block_args(block_tokens, channels, group_size)
    src = _ptr(src_ptr, "src_ptr", 16)
    dst = _ptr(dst_ptr, "dst_ptr", 16)
    family = f"kv_block_{direction}_int4_kc"
    fn, state = _function("int4.cu", f"{family}{infix}_g{group_size}", family)
    grid = kv_block_grid(bt, c, vecs_per_thread, state.num_sms,
                         _blocks_per_sm(fn, state, INT4_THREADS))
    _launch(f"kv block {direction}", fn, (grid, 2), (INT4_THREADS, 1, 1), stream,
            (src, dst, bt, c))


def quantize_kv_block_int4(src_ptr, dst_ptr, block_tokens: int, channels: int,
                           group_size: int, stream=None, variant: str | None = None) -> None:
    """Quantize one token-major KV block to the channel-key INT4 layout.

    Device: current context. ``src``: fp16 ``[block_tokens][2][channels]`` (a token's
    keys of every layer and head, then its values: ``channels = L*H*D``), finite, 16-byte
    aligned. ``dst``: ``kv_layout.int4_block_nbytes(...)`` bytes, 16-byte aligned: the keys
    as one per-channel row, then the values per token in groups of ``group_size``
    (bit-exact with ``kv_layout.pack_int4_block(..., "channel")``). ``block_tokens % 4 ==
    0``, ``channels % group_size == 0``. Buffers must not overlap. ``variant``: a key of
    ``KV_QUANT_VARIANTS`` (same bytes), default ``KV_QUANT_VARIANT``.
    """
    variant = variant or KV_QUANT_VARIANT
    if variant not in KV_QUANT_VARIANTS:
        raise ValueError(f"kv block quantize variant must be one of {sorted(KV_QUANT_VARIANTS)}, "
                         f"got {variant!r}")
    _kv_block("quantize", QUANT_VECS_PER_THREAD, src_ptr, dst_ptr, block_tokens, channels,
              group_size, stream, KV_QUANT_VARIANTS[variant])


def dequantize_kv_block_int4(src_ptr, dst_ptr, block_tokens: int, channels: int,
                             group_size: int, stream=None) -> None:
    """``quantize_kv_block_int4``'s inverse, into fp16 ``[block_tokens][2][channels]`` at
    ``dst`` (16-byte aligned); bit-exact with ``kv_layout.unpack_int4_block(..., "channel")``."""
    _kv_block("dequantize", DEQUANT_VECS_PER_THREAD, src_ptr, dst_ptr, block_tokens, channels,
              group_size, stream)


_PUSHED: dict = {}


def use_primary_context(device: int = 0) -> None:
    """Make ``device``'s primary context (PyTorch's) current for PyCUDA in this thread, once;
    popped at interpreter exit (a context left pushed then aborts the process)."""
    cuda = _driver()
    if device in _PUSHED:
        return
    cuda.init()
    ctx = cuda.Device(device).retain_primary_context()
    ctx.push()
    _PUSHED[device] = ctx
    import atexit

    def _pop():
        try:
            forget_context()
            cuda.Context.pop()
        except Exception:  # noqa: BLE001 (exit path: nothing to report to)
            pass
    atexit.register(_pop)


def kv_assemble_int4(l1k_ptr, l1v_ptr, rows_ptr, outk_ptr, outv_ptr, cut: int, m: int, bt: int,
                     tok_elems: int, n_tok: int, group_size: int, key_channel: bool = False,
                     stream=None) -> None:
    """One layer's keys and values for attention, from the L1 planes and the layer's INT4
    L2 rows, in one launch (see ``kv_assemble_int4_g*`` in int4.cu for the layout).

    Device: current context. ``l1k``/``l1v``: fp16 [tokens][tok_elems]; ``rows``: ``m``
    layer rows of ``bt * tok_elems`` elements each (``synapse.hf.int4.quantize_layer_rows``:
    the key row, per channel when ``key_channel`` else per token, then the value row);
    ``outk``/``outv``: fp16 [n_tok][tok_elems]. All pointers 16-byte aligned,
    ``tok_elems % 8 == 0``, ``bt % 4 == 0``."""
    kv_assemble_int4_launcher(cut, m, bt, tok_elems, n_tok, group_size, key_channel,
                              stream)(l1k_ptr, l1v_ptr, rows_ptr, outk_ptr, outv_ptr)


_ASSEMBLE_PTRS = ("l1k", "l1v", "rows", "outk", "outv")


def kv_assemble_int4_launcher(cut: int, m: int, bt: int, tok_elems: int, n_tok: int,
                              group_size: int, key_channel: bool = False, stream=None):
    """``kv_assemble_int4`` with its shape checks, kernel and grid resolved once, as
    ``launch(l1k_ptr, l1v_ptr, rows_ptr, outk_ptr, outv_ptr)``: the layers of a decode step
    differ only in their pointers, and resolving the kernel (the current context, the
    occupancy) cost more host time than the launch itself. The context current when it
    was made must be current at each launch."""
    if tok_elems % INT4_VEC_ELEMS or bt % 4 or group_size not in int4_ref.GROUP_SIZES:
        raise ValueError(f"kv_assemble_int4: tok_elems {tok_elems} must be a multiple of "
                         f"{INT4_VEC_ELEMS}, bt {bt} of 4 and group_size in "
                         f"{int4_ref.GROUP_SIZES}")
    fn, state = _function("int4.cu", f"kv_assemble_int4_g{group_size}", "kv_assemble_int4")
    vecs = n_tok * tok_elems // INT4_VEC_ELEMS
    per_sm = _blocks_per_sm(fn, state, INT4_THREADS)
    grid = (max(1, min(-(-vecs // INT4_THREADS), state.num_sms * per_sm)), 2)
    tail = (cut, m, bt, tok_elems, n_tok, int(bool(key_channel)))
    block = (INT4_THREADS, 1, 1)

    def launch(l1k_ptr, l1v_ptr, rows_ptr, outk_ptr, outv_ptr) -> None:
        ptrs = (l1k_ptr, l1v_ptr, rows_ptr, outk_ptr, outv_ptr)
        if any(type(p) is not int or p <= 0 or p % 16 for p in ptrs):
            ptrs = tuple(_ptr(p, name, 16) for p, name in zip(ptrs, _ASSEMBLE_PTRS))
        _launch("kv assemble", fn, grid, block, stream, (*ptrs, *tail))
    return launch


def _check_layer_rows_shape(block_tokens, channels, group_size, key_format) -> tuple[int, int, int]:
    group_size = int4_ref.check_group_size(group_size)
    bt = _positive(block_tokens, "block_tokens")
    c = _positive(channels, "channels")
    check_key_format(key_format)
    if bt % 4 or c % group_size:
        raise ValueError(f"kv_quantize_layer_rows_int4 needs block_tokens % 4 == 0 and channels "
                         f"% group_size == 0; got block_tokens {bt}, channels {c}, group_size "
                         f"{group_size}")
    return bt, c, group_size


def _check_layer_rows_runs(rows, run_rows, run_stride, n: int) -> tuple[int, int, int]:
    """(rows, run_rows, run_stride) checked: ``run_rows`` None means one run of every row."""
    rows = _positive(rows, "rows")
    run_rows = rows if run_rows is None else _positive(run_rows, "run_rows")
    if not isinstance(run_stride, (int, np.integer)) or run_stride < 0 or run_stride % INT4_VEC_ELEMS:
        raise ValueError(f"run_stride must be a non-negative multiple of {INT4_VEC_ELEMS} "
                         f"elements, got {run_stride!r}")
    if rows * n // INT4_VEC_ELEMS >= 1 << 32:
        raise ValueError(f"{rows} rows of {n} elements are too many for one launch (2^32 vectors of 8)")
    return rows, min(run_rows, rows), int(run_stride)


def layer_rows_grid(rows: int, block_tokens: int, channels: int, key_channel: bool,
                    num_sms: int, blocks_per_sm: int, threads: int = INT4_THREADS) -> int:
    """x-size of the grid of ``kv_quantize_layer_rows_int4`` (``gridDim.y == 2``: keys,
    values): enough CTAs for a thread per 8 channels of every key row (per-channel keys) or
    for the rows' tiles, at most one full wave."""
    vecs = rows * block_tokens * channels // INT4_VEC_ELEMS
    tiles = -(-vecs // (QUANT_VECS_PER_THREAD * threads))
    keys = -(-(rows * channels // INT4_VEC_ELEMS) // threads) if key_channel else tiles
    return max(1, min(max(keys, tiles), num_sms * blocks_per_sm))


_LAYER_ROWS_PTRS = (("k_ptr", 16), ("v_ptr", 16), ("dst_ptr", 16), ("sums_ptr", 8))


def kv_quantize_layer_rows_launcher(block_tokens: int, channels: int, group_size: int,
                                    key_format: str = int4_ref.DEFAULT_KEY_FORMAT, stream=None):
    """``quantize_layer_rows_int4`` for one shape, its kernel and occupancy resolved once:
    returns ``launch(k_ptr, v_ptr, dst_ptr, sums_ptr, rows, run_rows=None, run_stride=0)``
    (the same contract). A backend's demotions all have one shape and differ in their rows."""
    bt, c, group_size = _check_layer_rows_shape(block_tokens, channels, group_size, key_format)
    n, key_channel = bt * c, key_format == "channel"
    fn, state = _function("int4.cu", f"kv_quantize_layer_rows_int4_g{group_size}",
                          "kv_quantize_layer_rows_int4")
    per_sm = _blocks_per_sm(fn, state, INT4_THREADS)
    block = (INT4_THREADS, 1, 1)

    def launch(k_ptr, v_ptr, dst_ptr, sums_ptr, rows: int, run_rows=None, run_stride: int = 0) -> None:
        rows, run_rows, run_stride = _check_layer_rows_runs(rows, run_rows, run_stride, n)
        ptrs = tuple(_ptr(p, name, align)
                     for p, (name, align) in zip((k_ptr, v_ptr, dst_ptr, sums_ptr), _LAYER_ROWS_PTRS))
        grid = (layer_rows_grid(rows, bt, c, key_channel, state.num_sms, per_sm), 2)
        _launch("kv quantize layer rows", fn, grid, block, stream,
                (*ptrs, run_stride, rows, bt, c, run_rows, int(key_channel)))
    return launch


def quantize_layer_rows_int4(k_ptr, v_ptr, dst_ptr, sums_ptr, rows: int, block_tokens: int,
                             channels: int, group_size: int,
                             key_format: str = int4_ref.DEFAULT_KEY_FORMAT, run_rows=None,
                             run_stride: int = 0, stream=None) -> None:
    """Keys and values of ``rows`` blocks of one layer each into INT4 layer rows, and the
    squared reconstruction error, in one launch (``kv_quantize_layer_rows_int4_g*`` in
    int4.cu).

    Device: current context. ``k``/``v``: fp16, finite; row ``r`` (``block_tokens x
    channels`` elements, C order) starts at element ``(r // run_rows) * run_stride + (r %
    run_rows) * block_tokens * channels`` (``run_rows`` None: ``[rows][bt * channels]``
    back to back). ``dst``: ``rows`` layer rows back to back, bit-exact with
    ``synapse.hf.int4.quantize_layer_rows(k, v, key_format, group_size)``. ``sums``: two
    float64, to which the kernel adds sum((x_hat - x)^2) and sum(x^2) over every element
    (x_hat: the float32 dequantization; the order of the additions varies from run to run).
    ``block_tokens % 4 == 0``, ``channels % group_size == 0``, ``run_stride % 8 == 0``;
    ``k``, ``v``, ``dst`` 16-byte and ``sums`` 8-byte aligned; ``dst`` overlaps nothing."""
    bt, c, g = _check_layer_rows_shape(block_tokens, channels, group_size, key_format)
    _check_layer_rows_runs(rows, run_rows, run_stride, bt * c)
    for p, (name, align) in zip((k_ptr, v_ptr, dst_ptr, sums_ptr), _LAYER_ROWS_PTRS):
        _ptr(p, name, align)
    kv_quantize_layer_rows_launcher(bt, c, g, key_format, stream)(
        k_ptr, v_ptr, dst_ptr, sums_ptr, rows, run_rows, run_stride)


@dataclass(frozen=True)
class DeviceBlockTable:
    """Device addresses of a block table: uint64 ptrs[nb], int32 fmts[nb], int32 n_valid[nb].

    ``owners`` keeps the device allocations alive when this table owns them.
    """

    ptrs: int
    fmts: int
    n_valid: int
    num_blocks: int
    owners: tuple = field(default=(), repr=False, compare=False)


def upload_block_table(ptrs, fmts, n_valid, block_tokens: int) -> DeviceBlockTable:
    """Validate a block table on the host and copy it to the device (synchronously).

    ``ptrs``: block base addresses (16-byte aligned); ``fmts``: 'fp16'/'int4' or 0/1;
    ``n_valid``: valid tokens per block in [0, block_tokens].
    """
    cuda = _driver()
    from synapse.hw.kv_layout import format_code

    p = np.asarray([int(x) for x in ptrs], dtype=np.uint64)
    f = np.asarray([format_code(x) for x in fmts], dtype=np.int32)
    v = np.asarray(n_valid, dtype=np.int64).reshape(-1)
    if not (p.size == f.size == v.size):
        raise ValueError(f"block table columns differ in length: {p.size}, {f.size}, {v.size}")
    for i, addr in enumerate(p.tolist()):
        _ptr(addr, f"block {i} address", 16)
    bad = np.flatnonzero((v < 0) | (v > block_tokens))
    if bad.size:
        raise ValueError(
            f"n_valid must be in [0, {block_tokens}]; block {int(bad[0])} has {int(v[bad[0]])}"
        )
    owners = []
    addrs = []
    for host in (p, f, v.astype(np.int32)):
        try:
            dev = cuda.mem_alloc(max(host.nbytes, 16))
            if host.nbytes:
                cuda.memcpy_htod(dev, host)
        except cuda.Error as exc:
            raise KernelError(f"uploading block table: {exc}") from exc
        owners.append(dev)
        addrs.append(int(dev))
    return DeviceBlockTable(addrs[0], addrs[1], addrs[2], int(p.size), tuple(owners))


class AttentionWorkspace:
    """Device scratch for the split partials of ``attention_decode``; grows on demand.

    One workspace must not serve two launches that can run at the same time (different
    streams): give each stream its own. Growing frees the old buffer, which is safe for
    launches already queued on the same stream only if the caller synchronised first.
    """

    def __init__(self) -> None:
        self._alloc = None
        self.nbytes = 0

    def free(self) -> None:
        """Release the device buffer now (the next ``ensure`` allocates again)."""
        if self._alloc is not None:
            self._alloc.free()
        self._alloc, self.nbytes = None, 0

    def ensure(self, nbytes: int) -> int:
        """Device address of at least ``nbytes`` bytes of scratch."""
        cuda = _driver()
        if nbytes > self.nbytes:
            try:
                alloc = cuda.mem_alloc(nbytes)
            except cuda.Error as exc:
                raise KernelError(f"attention workspace of {nbytes} bytes: {exc}") from exc
            if self._alloc is not None:
                self._alloc.free()
            self._alloc, self.nbytes = alloc, nbytes
        return int(self._alloc)


def attention_decode(q_ptr, table, layers: int, heads: int, head_dim: int, block_tokens: int,
                     group_size: int, softmax_scale: float, out_ptr, lse_ptr, stream=None,
                     workspace: AttentionWorkspace | None = None) -> AttentionPlan:
    """One decode step of attention over a table of KV blocks (semantics: attention_ref.py).

    Device: current context. ``q``: float32 [L, H, D], 16-byte aligned. ``table``: a
    ``DeviceBlockTable`` (or ``(ptrs, fmts, n_valid, num_blocks)`` device addresses) of
    blocks in the ``KVLayout(L, H, D, block_tokens, group_size)`` byte layout, fp16 (0) or
    int4 (1) in the token key format (``int4_keys="token"``; L1, which this reads, holds
    full precision only, so the scenario drivers never hand it an INT4 block). ``out``: float32 [L, H, D]; ``lse``: float32 [L, H, num_blocks] (per-block
    log-sum-exp of the scaled scores, -inf for an empty block). D in {64, 128, 256},
    D % group_size == 0. Uses ``workspace`` (default: one per context, see
    ``AttentionWorkspace`` for the stream caveat). Returns the launch plan.
    """
    if not isinstance(table, DeviceBlockTable):
        table = DeviceBlockTable(*table)
    num_blocks = int(table.num_blocks)
    split_fn, combine_fn, plan, state = _attention_kernels(layers, heads, head_dim, block_tokens,
                                                           group_size, num_blocks)
    layers, heads, block_tokens = int(layers), int(heads), int(block_tokens)
    q = _ptr(q_ptr, "q_ptr", 16)
    out = _ptr(out_ptr, "out_ptr", 4)
    lse = _ptr(lse_ptr, "lse_ptr", 4) if num_blocks else 0  # nothing to write when nb == 0
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    if workspace is None:
        if state.workspace is None:
            state.workspace = AttentionWorkspace()
        workspace = state.workspace
    ws = workspace.ensure(plan.workspace_bytes)
    off_m, off_l, off_acc = plan.workspace_offsets(layers, heads)

    if plan.num_splits:
        _ptr(table.ptrs, "table.ptrs", 8)
        _ptr(table.fmts, "table.fmts", 4)
        _ptr(table.n_valid, "table.n_valid", 4)
        _launch(
            "attention decode (split)", split_fn, plan.split_grid, plan.split_block, stream,
            (q, table.ptrs, table.fmts, table.n_valid, num_blocks, layers, heads, block_tokens,
             plan.blocks_per_split, scale, lse, ws + off_m, ws + off_l, ws + off_acc),
            plan.shared_bytes,
        )
    _launch(
        "attention decode (combine)", combine_fn, plan.combine_grid, plan.combine_block, stream,
        (ws + off_m, ws + off_l, ws + off_acc, plan.num_splits, head_dim, out),
    )
    return plan


def _check_attention_shape(layers, heads, head_dim, block_tokens, group_size):
    """(layers, heads, block_tokens, group_size) checked for the attention kernels."""
    layers = _positive(layers, "layers")
    heads = _positive(heads, "heads")
    block_tokens = _positive(block_tokens, "block_tokens")
    group_size = int4_ref.check_group_size(group_size)
    if head_dim not in ATTN_HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {ATTN_HEAD_DIMS}, got {head_dim!r}")
    if head_dim % group_size:
        raise ValueError(f"head_dim {head_dim} must be a multiple of group_size {group_size}")
    return layers, heads, block_tokens, group_size


def _check_score_memory(split_fn, shared_bytes: int, block_tokens: int) -> None:
    if split_fn.shared_size_bytes + shared_bytes > DEFAULT_SHARED_BYTES_PER_BLOCK:
        raise ValueError(
            f"block_tokens {block_tokens} needs {shared_bytes} B of shared memory for scores; "
            f"at most {DEFAULT_SHARED_BYTES_PER_BLOCK - split_fn.shared_size_bytes} B fit"
        )


def _attention_kernels(layers, heads, head_dim, block_tokens, group_size, num_blocks):
    """The checked shape's split and combine kernels, launch plan and context state."""
    layers, heads, block_tokens, group_size = _check_attention_shape(
        layers, heads, head_dim, block_tokens, group_size)
    split_fn, state = _function(
        "attention_decode.cu", f"attention_decode_split_d{head_dim}_g{group_size}", "attention_decode_split"
    )
    combine_fn, _ = _function("attention_decode.cu", "attention_decode_combine", "attention_decode_combine")
    plan = attention_plan(layers, heads, head_dim, block_tokens, num_blocks, state.num_sms,
                          _blocks_per_sm(split_fn, state, ATTN_THREADS, 4 * block_tokens))
    _check_score_memory(split_fn, plan.shared_bytes, block_tokens)
    return split_fn, combine_fn, plan, state


def key_prefix(dst_ptrs: int, keys: int, ntok: int, regions: int, kd: int, rows: int,
               head_dim: int, stream=None) -> None:
    """Write each region's ``kd`` key values over the start of every key row of its tokens
    (``cuda/kv_fill.cu``: device arrays ``dst_ptrs`` u64, ``keys`` fp16 [regions, kd],
    ``ntok`` i32). One launch for every region of an ingest op."""
    if regions <= 0:
        return
    if not 0 < kd <= head_dim:
        raise ValueError(f"kd must be in 1..head_dim ({head_dim}), got {kd}")
    fn, _ = _function("kv_fill.cu", "kv_key_prefix", "kv_key_prefix")
    _launch("kv key prefix", fn, (int(regions), 8), (256, 1, 1), stream,
            (dst_ptrs, keys, ntok, int(kd), int(rows), int(head_dim)))


def attention_launcher(layers: int, heads: int, head_dim: int, block_tokens: int,
                       group_size: int, num_blocks: int):
    """``attention_decode`` for one shape, checked and planned once: returns
    ``launch(q, ptrs, fmts, n_valid, softmax_scale, out, lse, stream)`` (device addresses,
    the same contract). A scenario issues thousands of decode attentions of a few shapes;
    checking and planning each one cost about 100 us of host time per op on the H200."""
    state = _state()
    key = (layers, heads, head_dim, block_tokens, group_size, num_blocks)
    launch = state.launchers.get(key)
    if launch is not None:
        return launch
    split_fn, combine_fn, plan, state = _attention_kernels(layers, heads, head_dim, block_tokens,
                                                           group_size, num_blocks)
    if state.workspace is None:
        state.workspace = AttentionWorkspace()
    workspace, need = state.workspace, plan.workspace_bytes
    offsets = plan.workspace_offsets(layers, heads)
    split_args, combine_args = (plan.split_grid, plan.split_block), (plan.combine_grid, plan.combine_block)
    split_call, combine_call = split_fn.prepared_async_call, combine_fn.prepared_async_call
    cuda = _driver()

    def launch(q, ptrs, fmts, n_valid, softmax_scale, out, lse, stream):
        ws = workspace.ensure(need)  # per call: a larger shape may have grown it since
        off_m, off_l, off_acc = ws + offsets[0], ws + offsets[1], ws + offsets[2]
        try:
            if plan.num_splits:
                split_call(*split_args, stream, q, ptrs, fmts, n_valid, num_blocks, layers,
                           heads, block_tokens, plan.blocks_per_split, float(softmax_scale),
                           lse, off_m, off_l, off_acc, shared_size=plan.shared_bytes)
            combine_call(*combine_args, stream, off_m, off_l, off_acc, plan.num_splits,
                         head_dim, out)
        except cuda.Error as exc:
            raise KernelError(f"attention decode: launch failed: {exc}") from exc

    with _LOCK:
        state.launchers[key] = launch
    return launch


class SegmentsLauncher:
    """``attention_decode_segments`` for one shape (layers, heads, head_dim, block_tokens,
    group_size), checked once: ``plan(seg_starts)`` cuts a launch into work items (host
    NumPy, ``segment_plan``), ``launch(...)`` enqueues its two kernels. A serving step
    issues one of these for all running requests instead of one launch per request."""

    def __init__(self, layers, heads, head_dim, block_tokens, group_size):
        layers, heads, block_tokens, group_size = _check_attention_shape(
            layers, heads, head_dim, block_tokens, group_size)
        split_fn, state = _function("attention_decode.cu",
                                    f"attention_decode_segments_split_d{head_dim}_g{group_size}",
                                    "attention_decode_segments_split")
        combine_fn, _ = _function("attention_decode.cu", "attention_decode_segments_combine",
                                  "attention_decode_segments_combine")
        self.shared_bytes = 4 * block_tokens
        _check_score_memory(split_fn, self.shared_bytes, block_tokens)
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.block_tokens = block_tokens
        self.num_sms = state.num_sms
        self.ctas_per_sm = _blocks_per_sm(split_fn, state, ATTN_THREADS, self.shared_bytes)
        if state.workspace is None:
            state.workspace = AttentionWorkspace()
        self.workspace = state.workspace
        self._split, self._combine = split_fn.prepared_async_call, combine_fn.prepared_async_call

    def plan(self, seg_starts) -> tuple[int, np.ndarray]:
        return segment_plan(self.layers, self.heads, seg_starts, self.num_sms, self.ctas_per_sm)

    def workspace_bytes(self, num_items: int) -> int:
        return max(16, 4 * self.layers * self.heads * num_items * (self.head_dim + 2))

    def launch(self, q, ptrs, fmts, n_valid, seg_starts, item_starts, num_segments: int,
               num_items: int, blocks_per_split: int, softmax_scale: float, out, lse, stream):
        """Device addresses: q f32 [S, L, H, D]; the table (ptrs u64, fmts i32, n_valid
        i32 [nb]); seg_starts and item_starts i32 [S + 1] (``plan``); out f32 [S, L, H, D];
        lse f32 [L*H*nb], segment s's [L, H, nb_s] at element L*H*seg_starts[s]."""
        lh = self.layers * self.heads
        parts = 4 * lh * num_items
        ws = self.workspace.ensure(self.workspace_bytes(num_items))
        try:
            if num_items:
                self._split((lh, num_items), (ATTN_THREADS, 1, 1), stream, q, ptrs, fmts,
                            n_valid, seg_starts, item_starts, num_segments, self.layers,
                            self.heads, self.block_tokens, blocks_per_split,
                            float(softmax_scale), lse, ws, ws + parts, ws + 2 * parts,
                            shared_size=self.shared_bytes)
            if num_segments:
                self._combine((lh, num_segments), (self.head_dim, 1, 1), stream, ws,
                              ws + parts, ws + 2 * parts, item_starts, num_items,
                              self.head_dim, out)
        except _driver().Error as exc:
            raise KernelError(f"attention decode (segments): launch failed: {exc}") from exc


def segments_launcher(layers: int, heads: int, head_dim: int, block_tokens: int,
                      group_size: int) -> SegmentsLauncher:
    """The ``SegmentsLauncher`` of a shape in the current context (built once)."""
    state = _state()
    key = ("segments", layers, heads, head_dim, block_tokens, group_size)
    launcher = state.launchers.get(key)
    if launcher is None:
        launcher = SegmentsLauncher(layers, heads, head_dim, block_tokens, group_size)
        with _LOCK:
            state.launchers[key] = launcher
    return launcher


def attention_decode_segments(q_ptr, table, seg_starts, layers: int, heads: int, head_dim: int,
                              block_tokens: int, group_size: int, softmax_scale: float, out_ptr,
                              lse_ptr, stream=None) -> tuple[int, np.ndarray]:
    """Several requests' decode attention in one launch (semantics: ``attention_ref``, once
    per segment). ``table``: a ``DeviceBlockTable`` of every segment's blocks back to back;
    ``seg_starts`` (host ints, [S + 1]): segment s owns blocks ``seg_starts[s]:seg_starts[s+1]``.
    ``q``: f32 [S, L, H, D]; ``out``: f32 [S, L, H, D]; ``lse``: f32, segment s's
    [L, H, nb_s] at element ``L*H*seg_starts[s]`` (each segment's out and lse as a
    one-request ``attention_decode`` of its blocks writes them). Uploads the segment and
    item tables synchronously (this wrapper is for tests and one-off calls; the cuda
    backend stages them with the block table). Returns ``(blocks_per_split, item_starts)``.
    """
    if not isinstance(table, DeviceBlockTable):
        table = DeviceBlockTable(*table)
    cuda = _driver()
    launcher = segments_launcher(layers, heads, head_dim, block_tokens, group_size)
    seg = np.asarray(seg_starts, np.int64)
    if len(seg) < 2 or int(seg[-1]) != int(table.num_blocks):
        raise ValueError(f"seg_starts must end at the table's {table.num_blocks} blocks, got "
                         f"{seg.tolist()[-1:]}")
    bps, items = launcher.plan(seg)
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    q, out = _ptr(q_ptr, "q_ptr", 16), _ptr(out_ptr, "out_ptr", 4)
    lse = _ptr(lse_ptr, "lse_ptr", 4) if table.num_blocks else 0
    tables = np.concatenate([seg.astype(np.int32), items])
    try:
        dev = cuda.mem_alloc(tables.nbytes)
        cuda.memcpy_htod(dev, tables)
    except cuda.Error as exc:
        raise KernelError(f"uploading segment table: {exc}") from exc
    n = len(seg)
    ptrs = _ptr(table.ptrs, "table.ptrs", 8) if table.num_blocks else 0
    fmts = _ptr(table.fmts, "table.fmts", 4) if table.num_blocks else 0
    nvalid = _ptr(table.n_valid, "table.n_valid", 4) if table.num_blocks else 0
    launcher.launch(q, ptrs, fmts, nvalid, int(dev), int(dev) + 4 * n, n - 1,
                    int(items[-1]), bps, scale, out, lse, stream)
    cuda.Context.synchronize()  # the tables are freed on return
    dev.free()
    return bps, items


__all__ = [
    "AttentionPlan",
    "AttentionWorkspace",
    "DeviceBlockTable",
    "FMT_FP16",
    "FMT_INT4",
    "SegmentsLauncher",
    "attention_decode",
    "attention_decode_segments",
    "attention_launcher",
    "attention_plan",
    "compile_cubin",
    "dequantize_int4",
    "dequantize_kv_block_int4",
    "forget_context",
    "int4_grid",
    "int4_kernel",
    "key_prefix",
    "kv_block_grid",
    "kv_quantize_layer_rows_launcher",
    "layer_rows_grid",
    "quantize_int4",
    "quantize_kv_block_int4",
    "quantize_layer_rows_int4",
    "resident_blocks_per_sm",
    "segment_plan",
    "segments_launcher",
    "upload_block_table",
]
