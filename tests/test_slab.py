"""The slab allocator against a model: random allocate / free / access sequences never
hand out overlapping live ranges, the statistics match a plain dictionary of live
objects, freed bytes read back zero, and misuse (wrong tenant, double free, use after
free, foreign or forged handles) raises the right error and changes nothing else."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from synapse.errors import AccessDenied, AllocatorError, CapacityError
from synapse.hw.memory import HostMemory
from synapse.hw.slab import Slab, SlabAllocator

PAGE = 4096
CLASSES = (256, 768, 1024, 4096)      # 768 = 3 x 256; 4096 = one object per page
TENANTS = ("a", "b", "c")
SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


def class_of(nbytes: int) -> int:
    return next(c for c in CLASSES if c >= nbytes)


class SlabMachine(RuleBasedStateMachine):
    """Model: the live slabs (offset -> (slab, fill byte)), nothing else."""

    def __init__(self):
        super().__init__()
        self.mem = HostMemory(8 * PAGE)
        self.alloc = SlabAllocator(self.mem, CLASSES, PAGE)
        self.other = SlabAllocator(HostMemory(2 * PAGE), CLASSES, PAGE)
        self.live: dict[int, tuple[Slab, int]] = {}
        self.freed: list[Slab] = []
        self.denied = 0
        self.fill = 0

    # -- operations -------------------------------------------------------------------
    @rule(nbytes=st.integers(1, 4096), tenant=st.sampled_from(TENANTS))
    def allocate(self, nbytes, tenant):
        if not self.alloc.can_allocate(nbytes):
            with pytest.raises(CapacityError, match="arena full"):
                self.alloc.allocate(nbytes, tenant)
            return
        slab = self.alloc.allocate(nbytes, tenant)
        assert slab.nbytes == nbytes and slab.class_bytes == class_of(nbytes)
        assert slab.tenant == tenant and slab.offset % 256 == 0
        # a fresh object reads zero, whoever had the range before
        assert not self.mem.view(slab.offset, slab.class_bytes).any()
        self.fill = self.fill % 255 + 1
        self.mem.view(slab.offset, slab.class_bytes)[:] = self.fill
        self.live[slab.offset] = (slab, self.fill)

    @rule(sizes=st.lists(st.integers(1, 4096), min_size=1, max_size=6),
          tenant=st.sampled_from(TENANTS))
    def allocate_prefix(self, sizes, tenant):
        got = self.alloc.allocate_prefix(sizes, [tenant] * len(sizes))
        assert [s.nbytes for s in got] == sizes[: len(got)]
        if len(got) < len(sizes):  # it stopped at the first that did not fit
            assert not self.alloc.can_allocate(sizes[len(got)])
        for slab in got:
            assert not self.mem.view(slab.offset, slab.class_bytes).any()
            self.live[slab.offset] = (slab, 0)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        offset = data.draw(st.sampled_from(sorted(self.live)))
        slab, _ = self.live.pop(offset)
        self.alloc.free(slab)
        assert not self.mem.view(slab.offset, slab.class_bytes).any(), "zero on free"
        self.freed.append(slab)

    @precondition(lambda self: len(self.live) >= 2)
    @rule(data=st.data())
    def free_all(self, data):
        offsets = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1,
                                     max_size=4, unique=True))
        slabs = [self.live.pop(o)[0] for o in offsets]
        self.alloc.free_all(slabs)
        self.freed.extend(slabs)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), tenant=st.sampled_from(TENANTS))
    def access(self, data, tenant):
        slab, _ = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        if slab.tenant == tenant:
            self.alloc.check_access(tenant, slab)
        else:
            with pytest.raises(AccessDenied, match=f"owned by tenant {slab.tenant!r}"):
                self.alloc.check_access(tenant, slab)
            self.denied += 1

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def use_after_free(self, data):
        stale = data.draw(st.sampled_from(self.freed))
        with pytest.raises(AllocatorError, match="double free|stale handle"):
            self.alloc.free(stale)
        with pytest.raises(AccessDenied, match="not a live slab"):
            self.alloc.check_access(stale.tenant, stale)
        self.denied += 1

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def foreign_and_forged_handles(self, data):
        slab, _ = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        foreign = slab._replace(allocator_id=self.other.allocator_id)
        with pytest.raises(AllocatorError, match="foreign handle"):
            self.alloc.free(foreign)
        forged = slab._replace(tenant="mallory")  # a live offset under another name
        with pytest.raises(AllocatorError, match="does not match"):
            self.alloc.free(forged)
        with pytest.raises(AccessDenied):
            self.alloc.check_access("mallory", forged)
        self.denied += 1
        with pytest.raises(AllocatorError, match="expected a Slab"):
            self.alloc.free((slab.offset, slab.nbytes))

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def no_two_live_objects_overlap(self):
        spans = sorted((s.offset, s.offset + s.class_bytes) for s, _ in self.live.values())
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start
        assert all(end <= self.alloc.capacity_bytes for _, end in spans)

    @invariant()
    def live_bytes_keep_their_contents(self):
        for slab, fill in self.live.values():
            if fill:
                assert (self.mem.view(slab.offset, slab.class_bytes) == fill).all()

    @invariant()
    def stats_match_the_model(self):
        st_ = self.alloc.stats()
        slabs = [s for s, _ in self.live.values()]
        used = sum(s.class_bytes for s in slabs)
        requested = sum(s.nbytes for s in slabs)
        assert st_.used_bytes == used == self.alloc.used_bytes
        assert st_.requested_bytes == requested
        assert st_.free_bytes == self.alloc.capacity_bytes - used
        assert st_.internal_fragmentation == pytest.approx(1 - requested / used if used else 0.0)
        pages_used = len({s.offset // PAGE for s in slabs})
        assert st_.pages_used == pages_used
        assert st_.pages_free == 8 - pages_used
        stranded = pages_used * PAGE - used
        free = self.alloc.capacity_bytes - used
        assert st_.external_fragmentation == pytest.approx(stranded / free if free else 0.0)
        assert st_.live_per_class == {c: sum(s.class_bytes == c for s in slabs) for c in CLASSES}
        per_tenant = {}
        for s in slabs:
            per_tenant[s.tenant] = per_tenant.get(s.tenant, 0) + s.class_bytes
        assert st_.bytes_per_tenant == per_tenant
        assert st_.num_allocs - st_.num_frees == len(slabs)
        assert st_.num_denied == self.denied
        assert set(self.alloc.live_slabs()) == set(slabs)
        self.alloc.audit()


TestSlabMachine = SlabMachine.TestCase
TestSlabMachine.settings = SETTINGS


# -- single properties -----------------------------------------------------------------

def test_pages_move_between_classes_and_a_full_arena_names_the_numbers():
    alloc = SlabAllocator(HostMemory(2 * PAGE), CLASSES, PAGE)
    big = [alloc.allocate(4096, "a") for _ in range(2)]
    assert not alloc.can_allocate(1)
    with pytest.raises(CapacityError, match=r"arena full: 8192 of 8192 bytes used.*256 bytes"):
        alloc.allocate(1, "a")
    alloc.free(big[0])
    small = [alloc.allocate(256, "b") for _ in range(16)]  # the freed page, carved into 16
    assert len({s.offset // PAGE for s in small}) == 1
    assert alloc.stats().live_per_class[256] == 16


@pytest.mark.parametrize("nbytes,match", [(0, "must be positive, got 0"),
                                          (-5, "must be positive, got -5"),
                                          (4097, "4097 bytes exceeds the largest size class of 4096")])
def test_bad_sizes_are_refused_with_the_number(nbytes, match):
    alloc = SlabAllocator(HostMemory(PAGE), CLASSES, PAGE)
    assert not alloc.can_allocate(nbytes)
    with pytest.raises(CapacityError, match=match):
        alloc.allocate(nbytes, "a")
    assert alloc.allocate_prefix([64, nbytes, 64], ["a"] * 3)[0].nbytes == 64
    assert alloc.stats().num_allocs == 1  # the prefix stopped at the bad size


@pytest.mark.parametrize("kwargs,match", [
    (dict(size_classes=()), "size classes must be positive"),
    (dict(size_classes=(0, 256)), "size classes must be positive"),
    (dict(page_bytes=512), "page_bytes 512 is smaller than the largest size class of 4096"),
    (dict(page_bytes=4096 + 100), "not a multiple of alignment_bytes 256"),
    (dict(alignment_bytes=0), "alignment_bytes must be positive, got 0"),
])
def test_bad_construction_names_the_numbers(kwargs, match):
    args = dict(size_classes=CLASSES, page_bytes=PAGE) | kwargs
    with pytest.raises(CapacityError, match=match):
        SlabAllocator(HostMemory(4 * PAGE), args.pop("size_classes"), **args)


def test_an_arena_smaller_than_a_page_is_refused():
    with pytest.raises(CapacityError, match="arena of 1000 bytes is smaller than one page of 4096"):
        SlabAllocator(HostMemory(1000), CLASSES, PAGE)


def test_a_dirty_arena_is_cleared_once_at_construction():
    mem = HostMemory(4 * PAGE)
    mem.view(0, mem.nbytes)[:] = 7
    SlabAllocator(mem, CLASSES, PAGE)
    assert not mem.view(0, mem.nbytes).any()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 4096), min_size=1, max_size=40))
def test_allocate_prefix_equals_allocate_one_by_one(sizes):
    """The batch path hands out the same objects, in the same state, as the single one."""
    a = SlabAllocator(HostMemory(6 * PAGE), CLASSES, PAGE)
    b = SlabAllocator(HostMemory(6 * PAGE), CLASSES, PAGE)
    got = a.allocate_prefix(sizes, ["t"] * len(sizes))
    one = []
    for n in sizes:
        if not b.can_allocate(n):
            break
        one.append(b.allocate(n, "t"))
    assert [(s.offset, s.nbytes, s.class_bytes, s.generation) for s in got] == \
           [(s.offset, s.nbytes, s.class_bytes, s.generation) for s in one]
    a.free_all(got[::2])
    for s in one[::2]:
        b.free(s)
    assert a.stats() == b.stats()
    a.audit()
