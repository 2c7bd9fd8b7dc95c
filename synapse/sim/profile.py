"""Hardware profiles: the numbers the simulator turns into time.

A profile is a YAML file (``synapse/profiles/*.yaml`` ship with the package; ``synapse
calibrate`` writes new ones from a real GPU). Each rate is in GB/s (1e9 bytes/s) and each
fixed cost in microseconds. An operation takes ``fixed_us + bytes / rate`` (and, for
kernels that also do arithmetic, the larger of the byte time and ``flops / tflops``, a
roofline). Profiles are looked up by name in ``./profiles`` first, then in the package.

How durations are computed is the predictor's business (``sim/predictor.py``): the
``predictor`` field picks the rates above (``profile``) or a table fitted to a real run's
op records (``table``, with ``op_table`` naming its file, relative to the profile's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import build, checked, load_yaml, one_of, within
from ..units import MAX_BYTES
from ..errors import ScenarioError


# Bounds with their reasons: far outside any real hardware, so that only typos hit them.
_US = "a second per call is beyond any launch or copy latency"
_GBS = "from 1 MB/s to 1 PB/s, beyond any link or memory at both ends"
_BYTES = "1 EiB is more memory than any machine has"


@dataclass(frozen=True)
class Rate:
    """A fixed cost per call plus a transfer rate (and an optional arithmetic ceiling)."""

    fixed_us: float = checked(5.0, within(0.0, 1e6), "fixed cost per call, microseconds", _US)
    gb_per_s: float = checked(1000.0, within(1e-3, 1e6), "bytes moved per second, in GB/s (1e9)",
                              _GBS)
    tflops: float = checked(0.0, within(0.0, 1e6), "arithmetic ceiling, TFLOP/s (0: bytes only)",
                            "an exaflop per second is beyond any device")

    def seconds(self, nbytes: float, calls: int = 1, flops: float = 0.0) -> float:
        t = nbytes / (self.gb_per_s * 1e9)
        if self.tflops > 0 and flops > 0:
            t = max(t, flops / (self.tflops * 1e12))
        return calls * self.fixed_us * 1e-6 + t


@dataclass(frozen=True)
class Link:
    """The host link (PCIe) as two directions with a shared cap when both are busy."""

    h2d_gb_per_s: float = checked(55.0, within(1e-3, 1e6), "pinned host-to-device bandwidth, GB/s",
                                  _GBS)
    d2h_gb_per_s: float = checked(55.0, within(1e-3, 1e6), "pinned device-to-host bandwidth, GB/s",
                                  _GBS)
    duplex_gb_per_s: float = checked(83.0, within(1e-3, 1e6),
                                     "both directions at once, together, GB/s", _GBS)
    copy_latency_us: float = checked(4.0, within(0.0, 1e6), "fixed cost of one copy, microseconds",
                                     _US)
    copy_engines: int = checked(2, within(1, 64), "copies that can be in flight at once",
                                "GPUs have 1 to 8 copy engines")


@dataclass(frozen=True)
class Kernels:
    attention: Rate = field(default_factory=Rate)
    int4_quantize: Rate = field(default_factory=Rate)
    int4_dequantize: Rate = field(default_factory=Rate)
    memset: Rate = field(default_factory=Rate)
    gemm: Rate = field(default_factory=Rate)
    copy: Rate = field(default_factory=Rate)  # device to device, bytes read + written


def _us_per_kind(v: dict):
    bad = [k for k, us in v.items() if not 0.0 <= us <= 1e6]
    return f"microseconds within [0, 1e6] per op kind ({_US}); {bad[0]!r} is not" if bad else None


@dataclass(frozen=True)
class Host:
    submit_us: float = checked(8.0, within(0.0, 1e6),
                               "host time to enqueue one op (Python + driver)", _US)
    memset_gb_per_s: float = checked(10.0, within(1e-3, 1e6), "host memset of pinned memory, GB/s",
                                     _GBS)
    per_item_us: float = checked(
        0.0, within(0.0, 1e6), "host time per further row of a batched copy, ingest, memset or "
        "quantize op (one driver call each on the hardware); 0: not modelled", _US)
    step_us: float = checked(
        0.0, within(0.0, 1e7), "host time per driver step outside its submits (planning, "
        "bookkeeping: the Python around the ops); calibrate fits it from driver runs; "
        "0: not modelled", "ten seconds of host work per step is beyond any driver")
    runs_ops: bool = checked(
        False, doc="the backend runs each op on the host inside submit (the NumPy cpu "
        "backend): an op's duration is host time, not overlapped with the host")
    stage_gb_per_s: float = checked(
        0.0, within(0.0, 1e6), "host copy of an ingested payload into pinned staging, GB/s "
        "(0: not modelled; calibrate measures it)", _GBS)
    ingest_dma: bool = checked(
        False, doc="ingests are copied by DMA straight from a pinned payload pool (the cuda "
        "backend, `Backend.dma_ingest`): the host copies nothing into staging, so "
        "stage_gb_per_s is not charged for them")

    submit_us_by_kind: dict[str, float] = checked(
        check=_us_per_kind, default_factory=dict,
        doc="host time to enqueue one op of a kind (attention, copy_h2d, ...), where it "
        "differs from submit_us: the Python that builds the op differs by kind (calibrate "
        "measures attention's from back-to-back submits)")
    request_us: float = checked(
        0.0, within(0.0, 1e6), "host time per request an attention op serves (a serving "
        "step's batched attention carries one segment per running request: the driver's "
        "Python per request around it); calibrate fits it from driver runs; 0: not "
        "modelled", _US)
    decision_us: float = checked(
        0.0, within(0.0, 1e6), "host time of one planning call of the tier manager (the "
        "policy choosing victims, fetches, prefetches; calibrate fits it from driver runs); "
        "0: not modelled", _US)
    page_bytes: int = checked(
        0, within(0, 1 << 40), "L1 is a virtual-memory arena that maps pages of this size "
        "as its live prefix grows and unmaps them at the step's safe point (the cuda "
        "backend where the driver supports it: `synapse.kv.vmm`); 0: one allocation, "
        "nothing mapped", "a page of 1 TiB is beyond any allocation granularity")
    page_map_us: float = checked(
        0.0, within(0.0, 1e6), "host time to map one L1 page (cuMemMap and its access "
        "grant; calibrate fits it from driver runs); 0: not modelled", _US)
    page_unmap_us: float = checked(
        0.0, within(0.0, 1e6), "host time to unmap one L1 page at a safe point; 0: not "
        "modelled", _US)

    def memcpy_seconds(self, nbytes: int) -> float:
        """A host copy between pinned buffers (a compacting L2), at the staging rate."""
        return nbytes / (self.stage_gb_per_s * 1e9) if self.stage_gb_per_s else 0.0


def _disk_read() -> Rate:
    return Rate(100.0, 3.0)


def _disk_write() -> Rate:
    return Rate(100.0, 2.0)


@dataclass(frozen=True)
class Disk:
    """The local disk under L3: one chunk file read or written takes ``fixed_us +
    bytes / rate`` (open, first I/O, then sequential transfer). The defaults (3 GB/s read,
    2 GB/s write, 100 us per file) are a placeholder of the PCIe Gen4 NVMe class, not a
    measurement: shipped profiles cite a drive, ``synapse calibrate`` measures yours.
    Reads and writes run on streams of their own and do not slow each other down in the
    model, which is optimistic: a real device shares its bandwidth between them."""

    device: str = checked("default placeholder (not measured)", doc="what was measured or cited")
    read: Rate = field(default_factory=_disk_read)
    write: Rate = field(default_factory=_disk_write)


@dataclass(frozen=True)
class Profile:
    name: str = checked(doc="profile name, as scenarios refer to it")
    device: str = checked("", doc="what it describes")
    hbm_bytes: int = checked(80 * 10**9, within(1, MAX_BYTES), "device memory, bytes", _BYTES)
    host_pinned_bytes: int = checked(512 * 2**30, within(1, MAX_BYTES),
                                     "pinned host memory available, bytes", _BYTES)
    link: Link = field(default_factory=Link)
    kernels: Kernels = field(default_factory=Kernels)
    host: Host = field(default_factory=Host)
    disk: Disk = field(default_factory=Disk)
    predictor: str = checked("profile", one_of("profile", "table"),
                             "what the simulator's durations come from: these rates "
                             "(profile) or a table fitted to op records (table)")
    op_table: str = checked("", doc="predictor table: the op table file (JSON from synapse "
                            "calibrate), relative to this profile's directory")
    measured: dict = field(default_factory=dict)  # calibrate: device, driver, versions, date


def profile_dirs() -> list[Path]:
    dirs = [Path.cwd() / "profiles"]
    dirs.append(Path(str(resources.files("synapse") / "profiles")))
    return dirs


def available_profiles() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in reversed(profile_dirs()):  # the working directory wins
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found[p.stem] = p
    return dict(sorted(found.items()))


def _load(path: Path) -> Profile:
    prof = build(Profile, load_yaml(path), str(path))
    if prof.predictor == "table" and not prof.op_table:
        raise ScenarioError(f"{path}: op_table: missing, expected the op table file that "
                            f"predictor 'table' reads (synapse calibrate writes one)")
    if prof.op_table:  # resolved now: a run's working directory is not the profile's
        from dataclasses import replace
        table = Path(prof.op_table)
        if not table.is_absolute():
            table = path.parent / table
        if not table.is_file():
            raise ScenarioError(f"{path}: op_table: got {prof.op_table!r}, expected an op "
                                f"table file (none at {table})")
        prof = replace(prof, op_table=str(table.resolve()))
    return prof


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (``h100-sxm``) or by path (``profiles/mine.yaml``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return _load(p)
    profiles = available_profiles()
    if name_or_path not in profiles:
        import difflib
        close = difflib.get_close_matches(name_or_path, profiles, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ScenarioError(f"profile: unknown hardware profile {name_or_path!r}{hint} "
                            f"(available: {', '.join(profiles) or 'none'})")
    return _load(profiles[name_or_path])
