"""The pinned L2 pool: fixed-size chunks over one host memory, reused without pinning,
tenant tags and zero-on-free as the slab allocator, and clear refusals (memlock limit,
free RAM, wrong memory kind) that name both numbers."""

import resource

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse.errors import AccessDenied, AllocatorError, CapacityError, ScenarioError
from synapse.hw import pinned_pool
from synapse.hw.memory import HostMemory
from synapse.hw.pinned_pool import PinnedPool, check_pinnable

CHUNK = 4096


def test_create_without_pin_is_plain_host_memory_and_cleared():
    pool = PinnedPool.create(16 * CHUNK, (CHUNK,), page_bytes=CHUNK)
    assert pool.memory.kind == "host" and not pool.is_pinned
    assert pool.capacity_bytes == 16 * CHUNK
    assert not pool.memory.view(0, pool.capacity_bytes).any()


def test_create_with_pin_pins_once_and_checks_the_kind():
    calls = []

    def pin(nbytes):
        calls.append(nbytes)
        return HostMemory(nbytes, kind="pinned_host")

    pool = PinnedPool.create(8 * CHUNK, (CHUNK,), pin=pin, page_bytes=CHUNK,
                             enforce_memlock=False)
    assert calls == [8 * CHUNK] and pool.is_pinned
    for _ in range(50):  # transfers reuse chunks: no further pin
        pool.free(pool.allocate(CHUNK, "a"))
    assert calls == [8 * CHUNK]
    with pytest.raises(ScenarioError, match="returned memory of kind 'host', expected 'pinned_host'"):
        PinnedPool.create(CHUNK, (CHUNK,), pin=lambda n: HostMemory(n), page_bytes=CHUNK,
                          enforce_memlock=False)


def test_device_memory_is_refused():
    class Device:
        nbytes, kind = 4 * CHUNK, "device"

        def zero(self, offset, nbytes):
            pass

        def address(self, offset):
            return offset

    with pytest.raises(ScenarioError, match="needs host memory, got kind 'device'"):
        PinnedPool(Device(), (CHUNK,), CHUNK)


def test_memlock_limit_is_named_with_both_numbers(monkeypatch):
    monkeypatch.setattr(pinned_pool, "memlock_limit_bytes", lambda: 64 << 20)
    monkeypatch.setattr(pinned_pool, "host_available_bytes", lambda: None)
    with pytest.raises(CapacityError, match=r"pinned pool of 1\.00 GiB \(1073741824 bytes\) exceeds "
                                            r"the memlock limit of 0\.06 GiB \(67108864 bytes\)"):
        check_pinnable(1 << 30)
    check_pinnable(1 << 30, enforce_memlock=False)  # allocators that pin outside RLIMIT_MEMLOCK
    check_pinnable(32 << 20)
    with pytest.raises(CapacityError, match="memlock limit"):  # create checks before pinning
        PinnedPool.create(1 << 30, (CHUNK,), pin=lambda n: pytest.fail("pinned anyway"))


def test_available_memory_is_named(monkeypatch):
    monkeypatch.setattr(pinned_pool, "memlock_limit_bytes", lambda: None)
    monkeypatch.setattr(pinned_pool, "host_available_bytes", lambda: 1 << 30)
    with pytest.raises(CapacityError, match=r"exceeds the available host memory of 1\.00 GiB"):
        check_pinnable(2 << 30)
    with pytest.raises(CapacityError, match="positive size, got 0 bytes"):
        check_pinnable(0)


def test_the_real_limits_are_read():
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = pinned_pool.memlock_limit_bytes()
    assert limit is None if soft == resource.RLIM_INFINITY else limit == soft
    avail = pinned_pool.host_available_bytes()
    assert avail is None or avail > 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from("ab"), st.integers(0, 10**6)),
                min_size=1, max_size=60))
def test_random_chunk_traffic_reuses_chunks_and_never_leaks_bytes(ops):
    """Allocate (True) or free the oldest live chunk (False): chunks never overlap, stay
    within the pool, read zero when handed out, and the other tenant is always refused."""
    pool = PinnedPool.create(6 * CHUNK, (CHUNK,), page_bytes=CHUNK)
    mem = pool.memory
    live, offsets_seen = [], set()
    for alloc, tenant, seed in ops:
        if alloc and pool.can_allocate(CHUNK):
            chunk = pool.allocate(CHUNK, tenant)
            view = mem.view(chunk.offset, CHUNK)
            assert not view.any(), "a reused chunk still holds its last owner's bytes"
            view[:] = np.random.default_rng(seed).integers(1, 256, CHUNK, dtype=np.uint8)
            live.append(chunk)
            offsets_seen.add(chunk.offset)
            other = "b" if tenant == "a" else "a"
            with pytest.raises(AccessDenied):
                pool.check_access(other, chunk)
        elif alloc:
            with pytest.raises(CapacityError, match="arena full"):
                pool.allocate(CHUNK, tenant)
        elif live:
            chunk = live.pop(0)
            pool.free(chunk)
            assert not mem.view(chunk.offset, CHUNK).any()
            with pytest.raises(AllocatorError):
                pool.free(chunk)
        starts = sorted(c.offset for c in live)
        assert all(b - a >= CHUNK for a, b in zip(starts, starts[1:]))
        assert pool.stats().used_bytes == CHUNK * len(live)
        pool.audit()
    assert len(offsets_seen) <= 6  # six chunks, reused


# -- the memory provider under both --------------------------------------------------------

@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 4096), st.integers(-10, 5000), st.integers(-10, 5000))
def test_host_memory_bounds_are_checked_and_zero_clears_only_its_range(size, offset, nbytes):
    mem = HostMemory(size)
    mem.view(0, size)[:] = 1
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        with pytest.raises(CapacityError, match=rf"range \[{offset}, {offset + nbytes}\) of "
                                                rf"{nbytes} bytes is outside a memory of {size}"):
            mem.zero(offset, nbytes)
        return
    mem.zero(offset, nbytes)
    data = mem.view(0, size)
    assert not data[offset:offset + nbytes].any()
    assert data[:offset].all() and data[offset + nbytes:].all()
    assert mem.address(offset) == mem.address(0) + offset


def test_host_memory_kinds_and_wrapping():
    with pytest.raises(ScenarioError, match="NumPy memory is never 'device'"):
        HostMemory(16, kind="device")
    with pytest.raises(CapacityError, match="positive size, got 0 bytes"):
        HostMemory(0)
    arr = np.zeros(64, np.uint8)
    mem = HostMemory.wrap(arr, kind="pinned_host")
    mem.view(0, 8)[:] = 5
    assert arr[:8].tolist() == [5] * 8 and mem.kind == "pinned_host"
    with pytest.raises(ScenarioError, match="contiguous 1-D uint8 array, got dtype float32"):
        HostMemory.wrap(np.zeros(8, np.float32))
