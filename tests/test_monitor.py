"""Operating Synapse: the allocation tracker, the residency monitor and /health, /metrics.

CPU tests inject the memory-type function; the cuda-marked ones ask the driver about
real cuMemAlloc, cuMemHostAlloc and cuMemAllocManaged pointers.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from synapse.errors import AllocatorError
from synapse.monitor import AllocationTracker, ResidencyMonitor, serve
from synapse.monitor.metrics import REGISTRY


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _sample(name: str, **labels) -> float:
    v = REGISTRY.get_sample_value(name, labels or None)
    return 0.0 if v is None else v


# -- tracker -------------------------------------------------------------------------------
def test_the_tracker_records_every_allocation_with_its_purpose_and_forgets_released_ones():
    t = AllocationTracker()
    a = t.track(0x1000, 4096, "device", "l1_arena", owner="test", tenant="a")
    b = t.track(0x9000, 1024, "pinned_host", "l2_pool", owner="test")
    c = t.track(0x20000, 512, "device", "l1_arena", owner="test", tenant="b")
    assert t.totals() == {("l1_arena", "device"): 4608, ("l2_pool", "pinned_host"): 1024}
    assert t.device_bytes() == 4608
    t.release(c)
    t.release(c)  # a second release is a no-op (error paths free twice)
    assert [r.handle for r in t.records()] == [a, b]
    assert t.export()["vram_bytes"] == 4096
    assert t.export()["allocations"][0]["tenant"] == "a"


@pytest.mark.parametrize("kind,ptr,nbytes", [("vram", 0x1000, 16), ("device", 0, 16),
                                             ("device", 0x1000, 0)])
def test_the_tracker_refuses_unknown_kinds_and_empty_ranges(kind, ptr, nbytes):
    with pytest.raises(AllocatorError):
        AllocationTracker().track(ptr, nbytes, kind, "l1_arena")


def test_allocations_are_counted_per_purpose_on_metrics():
    from synapse.monitor import release, track
    before = _sample("synapse_allocated_bytes_total", purpose="test_purpose", kind="device")
    freed = _sample("synapse_released_bytes_total", purpose="test_purpose", kind="device")
    h = track(0x5000, 777, "device", "test_purpose", owner="test")
    release(h)
    assert _sample("synapse_allocated_bytes_total", purpose="test_purpose",
                   kind="device") == before + 777
    assert _sample("synapse_released_bytes_total", purpose="test_purpose",
                   kind="device") == freed + 777


def test_the_cpu_backend_tracks_its_spaces_and_releases_them_on_close():
    from synapse.hw.host_backend import HostBackend
    from synapse.monitor import TRACKER
    be = HostBackend()
    l1 = be.memory("l1", 1 << 16, "device")
    be.memory("l2", 1 << 17, "pinned_host")
    mine = [r for r in TRACKER.records() if r.owner == "host_backend" and r.ptr == l1.address(0)]
    assert len(mine) == 1 and mine[0].purpose == "l1_arena" and mine[0].kind == "host"
    be.close()
    assert not [r for r in TRACKER.records() if r.ptr == l1.address(0)]


def test_a_streamed_model_tracks_its_ring_host_copies_and_resident_weights():
    torch = pytest.importorskip("torch")
    import synapse
    from synapse.monitor import TRACKER
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(16, 32)  # stays resident
    model.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(4))
    with synapse.stream(model, vram_budget=0.7, prefetch_depth=1, device="cpu") as handle:
        purposes = {r.purpose for r in TRACKER.records() if r.owner == "synapse.stream"}
        ring = [r for r in TRACKER.records() if r.purpose == "ring"
                and r.ptr == handle.ring_buf.data_ptr()]
        assert ring and ring[0].nbytes == handle.ring.capacity_bytes
    assert purposes == {"ring", "stream_host_weights", "stream_resident_weights"}
    assert not [r for r in TRACKER.records() if r.owner == "synapse.stream"]


# -- residency monitor ---------------------------------------------------------------------
def _tracker_with_l1_and_l2():
    t = AllocationTracker()
    t.track(0x10000, 4096, "device", "l1_arena", owner="test")
    t.track(0x90000, 8192, "pinned_host", "l2_pool", owner="test")
    return t


def _truthful(ptr):
    return "device" if ptr < 0x90000 else "pinned_host"


def test_a_pass_over_correctly_placed_memory_is_healthy():
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(), memory_type=_truthful)
    assert mon.check() == []
    h = mon.health()
    assert (h["status"], h["resident"], h["vram_bytes_used"]) == ("healthy", True, 4096)
    assert h["checked_allocations"] == 2 and h["last_check_secs"] >= 0


def test_managed_memory_flips_health_with_the_pointer_purpose_and_what_was_found():
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(), memory_type=lambda ptr: "managed")
    found = mon.check()
    assert len(found) == 2
    h = mon.health()
    assert h["status"] == "unhealthy" and h["resident"] is False
    v = h["violation"]  # the first one found is the one reported
    assert (v["ptr"], v["purpose"], v["kind"], v["found"]) == ("0x10000", "l1_arena", "device",
                                                              "managed")
    assert "l1_arena" in v["message"] and "managed" in v["message"]


def test_a_violation_in_the_last_byte_only_is_found():
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(),
                           memory_type=lambda p: "unregistered" if p == 0x10000 + 4095
                           else _truthful(p))
    (v,) = mon.check()
    assert v.ptr == 0x10000 + 4095 and v.found == "unregistered"


def test_health_stays_unhealthy_until_acknowledged_and_flips_again_if_still_wrong():
    wrong = {"now": True}
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(),
                           memory_type=lambda p: "managed" if wrong["now"] else _truthful(p))
    mon.check()
    wrong["now"] = False
    mon.check()  # the memory is fine now, but recovering is not silent
    assert mon.health()["status"] == "unhealthy"
    assert mon.acknowledge("fixed the arena").purpose == "l1_arena"
    assert mon.health()["status"] == "healthy" and mon.health()["acknowledged"] == 1
    wrong["now"] = True
    mon.acknowledge()
    mon.check()
    assert mon.health()["status"] == "unhealthy"


def test_managed_kind_is_never_accepted_and_pageable_l2_is_refused():
    t = AllocationTracker()
    t.track(0x1000, 64, "managed", "kv_pages")
    t.track(0x9000, 64, "pinned_host", "l2_pool")
    found = ResidencyMonitor(t, memory_type=lambda p: "managed" if p < 0x9000
                             else "unregistered").check()
    assert [(v.purpose, v.found) for v in found] == [("kv_pages", "managed"),
                                                      ("l2_pool", "unregistered")]


def test_without_a_driver_residency_is_unverified_not_assumed():
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(), memory_type=None)
    assert mon.check() == []
    h = mon.health()
    assert (h["status"], h["resident"], h["checker"]) == ("unverified", None, "none")


def test_a_released_allocation_is_not_a_violation():
    t = AllocationTracker()
    h = t.track(0x1000, 64, "device", "l1_arena")

    def freed_while_checking(ptr):
        t.release(h)
        return "unregistered"
    assert ResidencyMonitor(t, memory_type=freed_while_checking).check() == []


def test_the_background_thread_rechecks_at_its_interval():
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(), memory_type=_truthful, interval_s=0.05)
    with mon:
        deadline = time.monotonic() + 5
        while mon.passes < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mon.passes >= 3


def test_a_memory_type_function_that_raises_is_reported_not_hidden():
    def broken(ptr):
        raise RuntimeError("driver gone")
    mon = ResidencyMonitor(_tracker_with_l1_and_l2(), memory_type=broken, interval_s=0.05)
    with mon:
        deadline = time.monotonic() + 5
        while mon.error is None and time.monotonic() < deadline:
            time.sleep(0.01)
    h = mon.health()
    assert h["status"] == "unverified" and "driver gone" in h["error"]


# -- the endpoint --------------------------------------------------------------------------
def test_health_goes_unhealthy_on_the_cpu_backend_when_memory_is_reported_managed():
    """The cpu backend's spaces are tracked; an injected function calling them managed
    must turn /health to 503 with the pointer, until acknowledged."""
    from synapse.hw.host_backend import HostBackend
    be = HostBackend()
    l1 = be.memory("l1", 1 << 16, "device")
    mon = ResidencyMonitor(memory_type=lambda ptr: "managed", interval_s=0.05)
    try:
        with serve(port=0, monitor=mon) as srv:
            deadline = time.monotonic() + 5
            while mon.passes == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            code, body = _get(srv.url + "/health")
            h = json.loads(body)
            assert code == 503 and h["status"] == "unhealthy" and h["resident"] is False
            assert set(h) >= {"status", "resident", "vram_bytes_used", "last_check_secs"}
            assert h["violation"]["found"] == "managed"
            mon.stop()  # no further passes: the acknowledgement must stick
            flagged = [(v.allocation.ptr, v.purpose) for v in mon.check()]
            assert (l1.address(0), "l1_arena") in flagged
            mon.acknowledge("test")
            code, body = _get(srv.url + "/health")
            assert code == 200 and json.loads(body)["status"] == "healthy"
    finally:
        be.close()


def test_metrics_are_served_in_the_prometheus_text_format():
    from prometheus_client.parser import text_string_to_metric_families
    with serve(port=0, memory_type=None) as srv:
        code, body = _get(srv.url + "/metrics")
        assert code == 200
        families = {f.name: f.type for f in text_string_to_metric_families(body)}
        assert _get(srv.url + "/nothing")[0] == 404
    assert families["synapse_block_hits"] == "counter"
    assert families["synapse_migration_seconds"] == "histogram"
    assert families["synapse_int4_squared_error"] == "counter"
    assert "gauge" not in families.values()
    assert srv.host == "127.0.0.1"


def test_a_busy_port_is_one_clear_error():
    from synapse.errors import ScenarioError
    with serve(port=0, memory_type=None) as srv:
        with pytest.raises(ScenarioError, match=f"cannot serve metrics on 127.0.0.1:{srv.port}"):
            serve(port=srv.port, memory_type=None)


def test_the_prefix_store_hook_counts_hits_per_tier():
    import synapse.monitor as monitor
    before = _sample("synapse_prefix_lookups_total", result="hit", tier="l2")
    monitor.prefix_lookup("l2", chunks=3)
    monitor.prefix_lookup(None)
    assert _sample("synapse_prefix_lookups_total", result="hit", tier="l2") == before + 3


def test_a_tiered_cache_step_publishes_its_counters():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_models import tiny_model
    from synapse.hf import TieredCache
    m = tiny_model()
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0))
    names = [("synapse_block_hits_total", {"tier": "l1"}), ("synapse_block_hits_total",
             {"tier": "l2"}), ("synapse_demotions_total", {}), ("synapse_int4_elements_total", {})]
    before = [_sample(n, **lab) for n, lab in names]
    cache = TieredCache(m.config, policy="h2o", l1_budget_tokens=32, demote="int4",
                        block_tokens=8, model=m)
    with torch.no_grad():
        m.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache,
                   prefill_chunk_size=16)
    t = cache.telemetry()
    after = [_sample(n, **lab) for n, lab in names]
    assert [a - b for a, b in zip(after, before)] == [t["l1_hits"], t["l2_hits"],
                                                      t["demotions"], cache.metric_totals()["int4_n"]]
    assert t["l2_hits"] > 0 and t["demotions"] > 0


# -- on the GPU ----------------------------------------------------------------------------
def _driver_or_skip():
    from synapse.monitor.pointer_kinds import driver_memory_type
    mt = driver_memory_type()
    if mt is None:
        pytest.skip("needs cuda-bindings and an NVIDIA driver")
    from synapse.hw import driver_api
    release = driver_api.bind_primary_context(0)
    return mt, driver_api, release


@pytest.mark.cuda
def test_a_managed_allocation_registered_as_l1_flips_health_on_the_gpu():
    mt, drv, unbind = _driver_or_skip()
    t = AllocationTracker()
    dev = drv.mem_alloc(1 << 20)
    host = drv.mem_host_alloc(1 << 20)
    managed = drv.mem_alloc_managed(1 << 20)
    try:
        t.track(dev, 1 << 20, "device", "l1_arena", owner="test")
        t.track(host, 1 << 20, "pinned_host", "l2_pool", owner="test")
        mon = ResidencyMonitor(t, memory_type=mt, interval_s=0.05)
        with mon:
            deadline = time.monotonic() + 10
            while mon.passes < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert mon.health()["status"] == "healthy", mon.health()
        t.track(managed, 1 << 20, "device", "l1_arena", owner="test (UVM)")
        found = mon.check()
        assert [(v.purpose, v.found) for v in found] == [("l1_arena", "managed")]
        h = mon.health()
        assert h["status"] == "unhealthy" and h["violation"]["ptr"] == hex(managed)
    finally:
        drv.mem_free(managed)
        drv.mem_free(dev)
        drv.mem_free_host(host)
        unbind()


@pytest.mark.cuda
def test_the_driver_tells_device_pinned_and_pageable_memory_apart():
    mt, drv, unbind = _driver_or_skip()
    dev = drv.mem_alloc(4096)
    host = drv.mem_host_alloc(4096)
    pageable = np.zeros(4096, np.uint8)
    try:
        assert mt(dev) == "device" and mt(dev + 4095) == "device"
        assert mt(host) == "pinned_host"
        assert mt(int(pageable.ctypes.data)) == "unregistered"
    finally:
        drv.mem_free(dev)
        drv.mem_free_host(host)
        unbind()


@pytest.mark.cuda
def test_the_cuda_backend_spaces_pass_the_monitor():
    mt, drv, unbind = _driver_or_skip()
    unbind()
    try:
        from synapse.hw.cuda_backend import CudaBackend
        be = CudaBackend()
    except Exception as e:
        pytest.skip(f"needs PyCUDA and an NVIDIA GPU: {e}")
    try:
        be.memory("l1", 1 << 20, "device")
        be.memory("l2", 1 << 20, "pinned_host")
        mon = ResidencyMonitor(memory_type=mt)
        mine = [r for r in mon.tracker.records() if r.owner == "cuda_backend"]
        assert {r.purpose for r in mine} >= {"l1_arena", "l2_pool", "staging"}
        assert [v for v in mon.check() if v.allocation.owner == "cuda_backend"] == []
    finally:
        be.close()


# -- scenario runs -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sim", "cpu"])
def test_a_scenario_run_publishes_what_its_result_reports(backend):
    from synapse.monitor.run_probe import RunProbe
    from synapse.runner import run_scenario
    from synapse.scenarios.loader import load_scenario
    from synapse.scenarios.tiny import TINY_TSUNAMI
    names = [("synapse_block_hits_total", {"tier": "l1"}), ("synapse_block_hits_total",
             {"tier": "l2"}), ("synapse_transfer_bytes_total", {"direction": "h2d"}),
             ("synapse_transfer_bytes_total", {"direction": "d2h"}),
             ("synapse_refusals_total", {}),
             ("synapse_step_seconds_count", {"clock": "simulated" if backend == "sim" else "wall"})]
    before = [_sample(n, **lab) for n, lab in names]
    res = run_scenario(load_scenario("tsunami", TINY_TSUNAMI), backend, observe=RunProbe)
    m = res.metrics
    after = [_sample(n, **lab) for n, lab in names]
    assert [a - b for a, b in zip(after, before)] == [
        m["l1_hits"], m["l2_hits"], m["bytes_h2d"], m["bytes_d2h"], m["refusals"],
        len(res.result["timeline"]["step"])]


@pytest.mark.parametrize("command", [["run", "needle", "--serve-metrics", "0"],
                                     ["serve-metrics", "needle", "--port", "0"]],
                         ids=["run --serve-metrics", "serve-metrics"])
def test_a_scenario_run_serves_metrics_while_it_runs(tmp_path, command):
    from click.testing import CliRunner
    from synapse.cli import main
    from synapse.scenarios.tiny import TINY_NEEDLE
    before = _sample("synapse_block_hits_total", tier="l1")
    args = command + ["--backend", "sim", "-q", "--out", str(tmp_path / "r")]
    for o in TINY_NEEDLE:
        args += ["--set", o]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "serving http://127.0.0.1:" in r.output
    hits = json.loads((tmp_path / "r" / "result.json").read_text())["metrics"]["l1_hits"]
    assert _sample("synapse_block_hits_total", tier="l1") == before + hits

