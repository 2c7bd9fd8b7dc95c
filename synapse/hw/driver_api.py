"""The CUDA driver calls PyCUDA lacks, through NVIDIA's ``cuda-bindings``.

PyCUDA has no stream priorities, no pointer attributes and no raw-pointer async copies on
streams it did not create; ``cuda.bindings.driver`` has all of them and acts on the
current context (the primary context the cuda backend pushed, shared with PyTorch). Every
call goes through ``_check``, which turns a CUresult other than success into
``KernelError`` naming the call. Handles are plain ints on our side.
"""

from __future__ import annotations

from ..errors import BackendUnavailable, KernelError

try:
    from cuda.bindings import driver as cu
except ImportError as e:  # pragma: no cover - exercised where cuda-bindings is absent
    cu = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None


def _cu():
    if cu is None:
        raise BackendUnavailable(f"NVIDIA cuda-bindings is not installed ({_IMPORT_ERROR}); "
                                 f"pip install 'synapse-tiers[cuda]'")
    return cu


def _check(what: str, ret):
    err, rest = (ret[0], ret[1:]) if isinstance(ret, tuple) else (ret, ())
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise KernelError(f"{what} failed: {name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def stream_priority_range() -> tuple[int, int]:
    """(least, greatest) priority; greatest is the numerically lowest (highest priority)."""
    least, greatest = _check("cuCtxGetStreamPriorityRange", _cu().cuCtxGetStreamPriorityRange())
    return int(least), int(greatest)


def stream_create(priority: int = 0) -> int:
    c = _cu()
    flags = c.CUstream_flags.CU_STREAM_NON_BLOCKING
    return int(_check("cuStreamCreateWithPriority", c.cuStreamCreateWithPriority(flags, priority)))


def stream_destroy(stream: int) -> None:
    _check("cuStreamDestroy", _cu().cuStreamDestroy(stream))


def event_create(timing: bool = True) -> object:
    c = _cu()
    flags = c.CUevent_flags.CU_EVENT_DEFAULT if timing else c.CUevent_flags.CU_EVENT_DISABLE_TIMING
    return _check("cuEventCreate", c.cuEventCreate(flags))


def event_record(event, stream: int) -> None:
    _check("cuEventRecord", _cu().cuEventRecord(event, stream))


def event_synchronize(event) -> None:
    _check("cuEventSynchronize", _cu().cuEventSynchronize(event))


def event_elapsed_ms(start, end) -> float:
    return float(_check("cuEventElapsedTime", _cu().cuEventElapsedTime(start, end)))


def event_destroy(event) -> None:
    _check("cuEventDestroy", _cu().cuEventDestroy(event))


def stream_wait_event(stream: int, event) -> None:
    _check("cuStreamWaitEvent", _cu().cuStreamWaitEvent(stream, event, 0))


def stream_synchronize(stream: int) -> None:
    _check("cuStreamSynchronize", _cu().cuStreamSynchronize(stream))


def mem_alloc(nbytes: int) -> int:
    return int(_check(f"cuMemAlloc({nbytes})", _cu().cuMemAlloc(nbytes)))


def mem_free(ptr: int) -> None:
    _check("cuMemFree", _cu().cuMemFree(ptr))


def memcpy_htod_async(dst: int, src_host: int, nbytes: int, stream: int) -> None:
    _check("cuMemcpyHtoDAsync", _cu().cuMemcpyHtoDAsync(dst, src_host, nbytes, stream))


def memcpy_dtoh_async(dst_host: int, src: int, nbytes: int, stream: int) -> None:
    _check("cuMemcpyDtoHAsync", _cu().cuMemcpyDtoHAsync(dst_host, src, nbytes, stream))


def memcpy_dtod_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    _check("cuMemcpyDtoDAsync", _cu().cuMemcpyDtoDAsync(dst, src, nbytes, stream))


def memset_d8_async(dst: int, value: int, nbytes: int, stream: int) -> None:
    _check("cuMemsetD8Async", _cu().cuMemsetD8Async(dst, value, nbytes, stream))


def memory_type(ptr: int) -> str:
    """'device', 'host' (page-locked, registered with the driver) or 'unregistered'."""
    c = _cu()
    attr = c.CUpointer_attribute.CU_POINTER_ATTRIBUTE_MEMORY_TYPE
    err, value = c.cuPointerGetAttribute(attr, ptr)
    if int(err) != 0:
        # Plain pageable host memory is unknown to the driver: not an error for an audit.
        return "unregistered"
    v = int(value)
    if v == int(c.CUmemorytype.CU_MEMORYTYPE_DEVICE):
        return "device"
    if v == int(c.CUmemorytype.CU_MEMORYTYPE_HOST):
        return "host"
    return f"other({v})"


def is_managed(ptr: int) -> bool:
    c = _cu()
    err, value = c.cuPointerGetAttribute(c.CUpointer_attribute.CU_POINTER_ATTRIBUTE_IS_MANAGED, ptr)
    return int(err) == 0 and bool(int(value))


# -- for the residency monitor (synapse.monitor) ------------------------------------------
def init_driver() -> None:
    """cuInit(0); KernelError or BackendUnavailable where there is no usable driver."""
    try:
        ret = _cu().cuInit(0)
    except Exception as e:  # cuda-bindings raises its own error when libcuda is missing
        raise BackendUnavailable(f"no NVIDIA driver: {e}") from None
    _check("cuInit", ret)


def bind_primary_context(device: int = 0):
    """Make the device's primary context current in the calling thread (a monitor thread
    has none); returns the function that restores the thread's previous context and
    releases the primary one."""
    c = _cu()
    dev = _check("cuDeviceGet", c.cuDeviceGet(device))
    prev = _check("cuCtxGetCurrent", c.cuCtxGetCurrent())
    ctx = _check("cuDevicePrimaryCtxRetain", c.cuDevicePrimaryCtxRetain(dev))
    _check("cuCtxSetCurrent", c.cuCtxSetCurrent(ctx))

    def release():
        # put back what was current (a context PyCUDA pushed, or none) before letting go
        c.cuCtxSetCurrent(prev)
        c.cuDevicePrimaryCtxRelease(dev)
    return release


def _as_int(v) -> int:
    if v is None:
        return 0
    try:
        return int(v)
    except TypeError:
        return int(getattr(v, "value", 0) or 0)


def pointer_kind(ptr: int) -> str:
    """What the driver says ``ptr`` is, in one cuPointerGetAttributes call: 'managed',
    'device', 'device_with_host_pointer' (device memory a host pointer maps: zero-copy,
    the VRAM-only seed's "hostPointer != nullptr"), 'pinned_host', 'unregistered'
    (pageable memory the driver does not know) or 'other(N)'."""
    c = _cu()
    a = c.CUpointer_attribute
    attrs = [a.CU_POINTER_ATTRIBUTE_IS_MANAGED, a.CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
             a.CU_POINTER_ATTRIBUTE_HOST_POINTER]
    err, data = c.cuPointerGetAttributes(len(attrs), attrs, ptr)
    if int(err) != 0:
        return "unregistered"  # not allocated, mapped or registered by a UVA context
    managed, mtype, host_ptr = (_as_int(v) for v in data)
    if managed:
        return "managed"
    if mtype == int(c.CUmemorytype.CU_MEMORYTYPE_DEVICE):
        return "device_with_host_pointer" if host_ptr else "device"
    if mtype == int(c.CUmemorytype.CU_MEMORYTYPE_HOST):
        return "pinned_host"
    if mtype == 0:
        return "unregistered"
    return f"other({mtype})"


def mem_alloc_managed(nbytes: int) -> int:
    """cuMemAllocManaged (CU_MEM_ATTACH_GLOBAL): unified memory, for tests that must see
    the residency monitor refuse it."""
    c = _cu()
    flag = int(c.CUmemAttach_flags.CU_MEM_ATTACH_GLOBAL)
    return int(_check(f"cuMemAllocManaged({nbytes})", c.cuMemAllocManaged(nbytes, flag)))


def mem_host_alloc(nbytes: int) -> int:
    """cuMemHostAlloc (page-locked, portable); free with mem_free_host."""
    c = _cu()
    return int(_check(f"cuMemHostAlloc({nbytes})", c.cuMemHostAlloc(nbytes, c.CU_MEMHOSTALLOC_PORTABLE)))


def mem_free_host(ptr: int) -> None:
    _check("cuMemFreeHost", _cu().cuMemFreeHost(ptr))


def batch_copy_unavailable() -> str | None:
    """Why ``memcpy_batch_async`` cannot run here (None when it can): it needs
    cuda-bindings with ``cuMemcpyBatchAsync`` and a driver of CUDA 12.8 or later."""
    if cu is None:
        return f"cuda-bindings is not installed ({_IMPORT_ERROR})"
    if not hasattr(cu, "cuMemcpyBatchAsync"):
        return "this cuda-bindings has no cuMemcpyBatchAsync (it needs 12.8 or later)"
    version = int(_check("cuDriverGetVersion", cu.cuDriverGetVersion()))
    if version < 12080:
        return f"the driver supports CUDA {version // 1000}.{version % 1000 // 10}; batched copies need 12.8"
    return None


# Where a batched copy's sources and destinations live, by direction.
_BATCH_ENDS = {"h2d": ("HOST", "DEVICE"), "d2h": ("DEVICE", "HOST"), "d2d": ("DEVICE", "DEVICE")}
_batch_attrs: dict = {}


def _batch_attr(direction: str, device: int):
    key = (direction, device)
    attr = _batch_attrs.get(key)
    if attr is None:
        c = _cu()
        if direction not in _BATCH_ENDS:
            raise KernelError(f"cuMemcpyBatchAsync: unknown direction {direction!r}")
        src, dst = (getattr(c.CUmemLocationType, f"CU_MEM_LOCATION_TYPE_{end}")
                    for end in _BATCH_ENDS[direction])
        attr = c.CUmemcpyAttributes()
        attr.srcAccessOrder = c.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        attr.flags = c.CUmemcpyFlags.CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE
        attr.srcLocHint.type, attr.dstLocHint.type = src, dst
        if _BATCH_ENDS[direction][0] == "DEVICE":
            attr.srcLocHint.id = device
        if _BATCH_ENDS[direction][1] == "DEVICE":
            attr.dstLocHint.id = device
        _batch_attrs[key] = attr
    return attr


def memcpy_batch_async(dsts, srcs, sizes, stream: int, device: int = 0,
                       direction: str = "h2d") -> None:
    """Copies ``srcs[i] -> dsts[i]`` of ``sizes[i]`` bytes (raw addresses; ``direction``
    h2d, d2h or d2d, host memory page-locked), queued on ``stream`` in one driver call: the
    driver hands the whole list to the copy engines, where a loop of ``cuMemcpy*Async``
    costs a call per copy (about 3-5 us through cuda-bindings, 10-20 us through PyTorch),
    and a copy of many small rows then lasts as long as the host takes to issue them. The
    sources are read in stream order; the copies of one call are not ordered among
    themselves (no destination may overlap another row's source or destination)."""
    c = _cu()
    attr = _batch_attr(direction, device)
    n = len(sizes)
    ret = c.cuMemcpyBatchAsync([c.CUdeviceptr(int(d)) for d in dsts],
                               [c.CUdeviceptr(int(s)) for s in srcs],
                               [int(s) for s in sizes], n, [attr], [0], 1, c.CUstream(stream))
    _check("cuMemcpyBatchAsync", ret)
