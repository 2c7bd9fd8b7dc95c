"""The virtual-memory L1 arena (synapse.kv.vmm): the page bookkeeping with a fake driver
on the CPU (the real one runs on the GPU: tests/test_kv_cuda.py), and the fallback when
CUDA virtual memory is unavailable."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from synapse.kv import vmm
from synapse.kv.slots import SlotArena

PAGE = 64


class FakeDriver:
    """cuda-bindings' VMM calls as bookkeeping: which virtual pages are mapped to which
    physical handle, and what each handle's bytes are."""

    page_bytes = PAGE

    def __init__(self):
        self.next_va, self.handles, self.mapped, self.zeroed = 1 << 20, 0, {}, []
        self.zero_streams = []
        self.bytes = {}

    def reserve(self, n):
        va, self.next_va = self.next_va, self.next_va + n + (1 << 20)
        return va

    def free(self, va, n):
        assert not any(va <= v < va + n for v in self.mapped), "freeing a range still mapped"

    def create(self):
        self.handles += 1
        self.bytes[self.handles] = "garbage"
        return self.handles

    def release(self, h):
        del self.bytes[h]

    def map(self, va, h):
        assert va % PAGE == 0 and va not in self.mapped
        self.mapped[va] = h

    def set_access(self, va, n):
        assert all(v in self.mapped for v in range(va, va + n, PAGE))

    def unmap(self, va, n):
        for v in range(va, va + n, PAGE):
            del self.mapped[v]

    def zero(self, ranges, stream=None):
        self.zero_streams.append(stream)
        for va, n in ranges:
            self.zeroed.append(va)
            self.bytes[self.mapped[va]] = "zero"


class ArenaMemory:
    """What the torch backend gives a slot arena over a VMM arena (bookkeeping only)."""

    def __init__(self, arena):
        self.arena, self.nbytes = arena, arena.nbytes

    def zero(self, offset, nbytes):
        pass

    def extent(self, live):
        self.arena.extent(live)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 7)), max_size=40), st.integers(1, 4))
def test_pages_mapped_follow_the_live_prefix_of_every_plane(seq, planes):
    drv = FakeDriver()
    slot = planes * 24  # 24 bytes of every plane: slots straddle pages
    arena = vmm.VmmArena(40 * slot, planes, driver=drv)
    slots = SlotArena(ArenaMemory(arena), slot)
    live = []
    for grow, k in seq:
        if grow:
            live += slots.allocate_prefix([slot] * k, ["t"] * k)
        elif live:
            gone, live = live[:k], live[k:]
            slots.free_all(gone)
        slots.take_relocations()
        slots.take_zero()
        arena.trim()  # the safe point: nothing queued reads past the end
        per_plane = len(live) * slot // planes
        assert arena.pages_mapped == planes * math.ceil(per_plane / PAGE)
        assert len(drv.mapped) == arena.pages_mapped
    arena.close()
    assert drv.mapped == {}


def test_a_page_is_zeroed_before_it_serves_a_new_tenant_and_reused_within_one():
    drv = FakeDriver()
    pool = vmm.PagePool(drv, spare_pages=4)
    a = vmm.VmmArena(4 * PAGE, 1, driver=drv, pool=pool, tenant="a")
    a.extent(2 * PAGE)
    assert len(drv.zeroed) == 2  # new pages: their contents are not promised
    a.extent(PAGE)
    a.trim()
    a.extent(2 * PAGE)           # the same tenant takes its page back: no memset
    assert len(drv.zeroed) == 2 and pool.created == 2
    a.extent(0)
    a.trim()
    b = vmm.VmmArena(4 * PAGE, 1, driver=drv, pool=pool, tenant="b")
    b.extent(2 * PAGE)
    assert len(drv.zeroed) == 4 and pool.created == 2  # a's pages, zeroed for b
    assert all(drv.bytes[h] == "zero" for h in drv.mapped.values())


def test_a_lazy_arena_maps_each_plane_when_asked_and_zeroes_on_the_given_stream():
    drv = FakeDriver()
    arena = vmm.VmmArena(4 * 10 * PAGE, 4, driver=drv)
    arena.lazy, arena.lazy_stream = True, 7
    arena.extent(4 * 3 * PAGE)             # three pages a plane are live: none mapped yet
    assert arena.pages_mapped == 0 and arena.mapped_pages() == 0
    arena.ensure((2, 3))                    # one layer's K and V planes
    assert [len(h) for h in arena.mapped] == [0, 0, 3, 3]
    assert arena.mapped_pages() == 0        # what every plane may touch
    assert drv.zero_streams == [7]          # fresh pages zeroed on the stream, no wait
    arena.ensure()
    assert [len(h) for h in arena.mapped] == [3, 3, 3, 3] and arena.mapped_pages() == 3
    arena.ensure()                          # nothing left to map: no driver call
    assert drv.zero_streams == [7, 7]
    arena.lazy = False                      # not lazy: growth is mapped at once, and waited
    arena.extent(4 * 5 * PAGE)
    assert arena.pages_mapped == 4 * 5 and drv.zero_streams[-1] is None
    arena.extent(4 * 2 * PAGE)
    assert arena.trim_pending and arena.trim() == 4 * 3


def test_unmapping_waits_for_the_safe_point():
    drv = FakeDriver()
    arena = vmm.VmmArena(8 * PAGE, 2, driver=drv)
    arena.extent(8 * PAGE)
    arena.extent(2 * PAGE)
    assert arena.pages_mapped == 8 and arena.trim_pending  # copies may still read them
    assert arena.trim() == 6 and arena.pages_mapped == 2 and not arena.trim_pending


def test_without_cuda_virtual_memory_the_arena_says_why_and_the_backend_falls_back(monkeypatch):
    torch = pytest.importorskip("torch")
    from synapse.kv.shape import KVShape
    from synapse.kv.torch_backend import TorchBackend

    def unavailable(*a, **k):
        raise vmm.VmmUnavailable("device 0 does not support virtual memory management")
    monkeypatch.setattr(vmm, "VmmArena", unavailable)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    be = TorchBackend("cpu", KVShape(2, 2, 32, 8), torch.float32)
    mem = be._vmm_memory("l1", 8 * KVShape(2, 2, 32, 8).fp16_bytes)
    assert mem.arena is None and mem.t.shape[0] == 4
    assert be.vmm_status == ("fallback to one allocation: device 0 does not support virtual "
                             "memory management")
    assert be.environment()["l1_arena"] == be.vmm_status
    be.vmm_requested = True
    with pytest.raises(vmm.VmmUnavailable, match="does not support"):
        be._vmm_memory("l1", 8 * KVShape(2, 2, 32, 8).fp16_bytes)


def test_without_cuda_bindings_the_reason_is_named():
    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        with pytest.raises(vmm.VmmUnavailable, match="cuda-bindings is not installed"):
            vmm.CudaVmm(0)
    else:
        pytest.skip("cuda-bindings is installed here; the GPU test covers the real driver")
