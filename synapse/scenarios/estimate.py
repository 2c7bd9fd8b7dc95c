"""What a scenario needs before it runs, and whether this machine has it.

``estimate_scenario(s, backend)`` returns a ``Needs``: host memory (NumPy and Python state;
on the ``cpu`` backend also every space, which are host arrays there), pinned host memory
and device memory (the ``cuda`` backend), an upper bound on the steps the driver runs, an
upper bound on the ops it submits, and an estimate of the wall time. ``check_needs``
refuses, in one line naming the field that drives the figure, a scenario that needs more
memory than this machine has available, or more time than ``MAX_RUN_S``; and a serving
scenario whose largest request could never start or come back from L2 (it would wait
for ever). ``runner.run_scenario`` calls both before it builds anything, and holds the
run to its step bound while it runs.

How the figures are made, from the drivers' code (``synapse/drivers``):

- steps: needle, the prompt's chunks plus the decode steps (exact); streaming, passes x
  layers (exact); serving, the last arrival + 2 + every request's decode tokens (a step
  in which any request runs gives each running request a token, and a step in which none
  runs can only follow an arrival gap, given that every request fits below the high
  watermark on its own, which ``check_needs`` requires).
- ops: every ``submit`` flushes at most two queued zero-on-free ops (L1, staging), so
  ops <= 3 x submits; submits per step are counted from the driver's phases, with one
  round of forced demotion per ``memory.staging_blocks`` blocks in INT4 mode.
- host memory: the needle trace's [steps x blocks] attention matrix (float32 logits and
  two boolean masks; Belady adds an int32 next-use matrix), per block, per step and per op
  costs measured with tracemalloc on the shipped scenarios (``benchmarks/fuzz_inputs.py``
  checks the estimate against the peak), and on ``cpu`` the spaces themselves.
- time: per step, per block-step (NumPy over the live blocks' columns) and per op costs
  measured on the simulator on a shared, loaded 2-vCPU machine, times ``MARGIN``; on
  ``cpu`` also the bytes its NumPy reference works through (fp16 conversions, reference
  attention and MLPs, payloads: about 20-60 MB/s measured there). Not estimated on
  ``cuda`` (no GPU measurement here), where memory and steps are still checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ScenarioError
from ..hw.pinned_pool import host_available_bytes
from ..units import fmt_bytes, fmt_seconds, parse_budget
from .schema import Scenario

MAX_RUN_S = 24 * 3600  # a single run of more than a day is a typo more often than a plan

# Costs measured on the simulator (see the module docstring), before MARGIN.
BASE_HOST_BYTES = 32 << 20     # transient NumPy/Python state of any run
PER_BLOCK_BYTES = 1024         # page-table row, policy columns, slab bookkeeping, decisions
PER_STEP_BYTES = 2048          # timeline row, recorder, per-step decisions
PER_OP_BYTES = 640             # an OpRecord and its row in ops.json
MATRIX_BYTES_PER_CELL = 6      # needle: float32 logits + two bool masks per (step, block)
FIXED_S = 1.5                  # loading, set-up, writing the result files
STEP_S = 1e-3                  # Python per step of a driver
BLOCK_STEP_S = 0.3e-6          # NumPy per live block per step
OP_S = 120e-6                  # the simulator per op (SimPy events, records)
TYPICAL_OPS_PER_STEP = 8       # time and memory use this; the bound uses the worst case
CPU_FIXED_S = 3.0              # cpu backend: payload pool and kernels' warm-up
CPU_BYTES_PER_S = 20e6         # cpu backend: bytes its NumPy reference converts and reads
MARGIN = 3.0


def _seconds(backend: str, steps: int, block_steps: int, ops: int, cpu_bytes: int) -> float | None:
    """Wall time: the simulator's per-step, per-block-step and per-op costs, and on cpu
    the bytes its reference path works through; None on cuda (not measured here)."""
    if backend == "cuda":
        return None
    t = FIXED_S + MARGIN * (steps * STEP_S + block_steps * BLOCK_STEP_S + ops * OP_S)
    if backend == "cpu":
        t += CPU_FIXED_S + MARGIN * cpu_bytes / CPU_BYTES_PER_S
    return t


@dataclass(frozen=True)
class Needs:
    host_bytes: int
    pinned_bytes: int
    device_bytes: int
    steps: int                 # at most; enforced while the scenario runs
    ops: int                   # at most
    seconds: float | None      # estimated wall time (with MARGIN); None where not modelled
    # what drives the largest host figure: (field path, its value as shown, what it sizes)
    blame: tuple[str, str, str] = ("", "", "")

    def describe(self, backend: str) -> str:
        parts = [f"host {fmt_bytes(self.host_bytes)}"]
        if self.pinned_bytes:
            parts.append(f"pinned {fmt_bytes(self.pinned_bytes)}")
        if self.device_bytes:
            parts.append(f"device {fmt_bytes(self.device_bytes)}")
        parts.append(f"at most {self.steps:,} steps and {self.ops:,} ops")
        if self.seconds is not None:
            parts.append(f"up to about {fmt_seconds(self.seconds)} on {backend}")
        return ", ".join(parts)


def device_free_bytes() -> int | None:
    """Free memory of the current CUDA context's device (after the cuda backend has made
    its context current), None where PyCUDA or a context is missing."""
    try:
        import pycuda.driver as cuda
        return int(cuda.mem_get_info()[0])
    except Exception:  # noqa: BLE001 - no PyCUDA, no context: nothing to check against
        return None


# -- per kind ---------------------------------------------------------------------------------
def _sizes(s: Scenario):
    from ..drivers.kv_common import shape_of
    return shape_of(s)


def _budget(value, whole: int, path: str, source: str) -> int:
    try:
        return parse_budget(value, whole)
    except ValueError as e:
        raise ScenarioError(f"{source}: {path}: {e}") from None


def _kv_spaces(s: Scenario, sizes, working: int, source: str) -> tuple[int, int, int, int]:
    """L1, L2 and staging bytes as ``build_kv`` sizes them, and L1's usable capacity (whole
    blocks: the L1 slot arena, ``synapse.kv.slots``)."""
    from ..kv.stack import page_bytes_for
    l1 = _budget(s.memory.l1_budget, working, "memory.l1_budget", source)
    l2 = _budget(s.memory.l2_budget, working, "memory.l2_budget", source)
    page = page_bytes_for(sizes.fp16_bytes, max(l1, sizes.fp16_bytes))
    l2 = max(min(l2, working + page), page)
    stage = max(page_bytes_for(sizes.int4_bytes, s.memory.staging_blocks * sizes.int4_bytes) + 256,
                s.memory.staging_blocks * sizes.int4_bytes)
    return l1, l2, stage, (l1 // sizes.fp16_bytes) * sizes.fp16_bytes


def _rounds(s: Scenario, blocks: int) -> int:
    """Rounds of forced demotion to move ``blocks`` blocks: INT4 staging takes
    ``staging_blocks`` a round; other demotions take them all in one."""
    if s.policy.demote == "l2_int4":
        return 1 + math.ceil(blocks / s.memory.staging_blocks)
    return 1


def _needle(s: Scenario, backend: str, source: str) -> Needs:
    w, bt = s.workload, s.memory.block_tokens
    sizes = _sizes(s)
    chunk = max(1, w.prefill_chunk_tokens // bt)
    ctx_blocks = math.ceil(w.context_tokens / bt)
    steps = math.ceil(ctx_blocks / chunk) + w.decode_steps
    n = math.ceil((w.context_tokens + w.decode_steps) / bt)
    working = n * sizes.fp16_bytes
    l1, l2, stage, _ = _kv_spaces(s, sizes, working, source)
    # blocks used in a step have mass >= access_factor / live, so there are at most
    # live / access_factor of them (the fetches of a step)
    fetch = n if w.access_factor <= 1 else math.ceil(n / w.access_factor)
    submits = 6 + 2 * _rounds(s, chunk + fetch)
    ops = 3 * submits * steps
    cells = steps * n * (MATRIX_BYTES_PER_CELL + (4 if s.policy.eviction == "belady" else 0))
    vectors = (n + steps) * (3 + w.noise_rank) * 24
    typical_ops = TYPICAL_OPS_PER_STEP * steps
    host = (BASE_HOST_BYTES + cells + vectors + n * PER_BLOCK_BYTES + steps * PER_STEP_BYTES
            + typical_ops * PER_OP_BYTES)
    blame = ("workload.context_tokens", str(w.context_tokens),
             f"the [steps x blocks] attention matrix of {steps:,} x {n:,}")
    pinned = device = 0
    l1_resident = min(l1, working)
    chunk_bytes = chunk * bt * sizes.token_bytes
    if backend == "cpu":
        host += l1 + l2 + stage + 3 * l1_resident + chunk_bytes
    elif backend == "cuda":
        device = l1 + stage
        pinned = l2 + 4 * chunk_bytes  # L2 and the staging ring (twice an op, mirrored)
    seconds = _seconds(backend, steps, steps * n, typical_ops,
                       steps * l1_resident + n * sizes.fp16_bytes)
    return Needs(host, pinned, device, steps, ops, seconds, blame)


def _streaming(s: Scenario, backend: str, source: str) -> Needs:
    w = s.workload
    layer = 2 * w.hidden * (w.hidden * w.ffn_mult) * 2
    model = layer * w.layers
    ring = _budget(w.vram_budget, model, "workload.vram_budget", source)
    steps = w.passes * w.layers
    ops = 3 * (2 * steps + w.layers + w.passes)  # copy + compute a layer; the reference's
    act = w.batch_tokens * w.hidden * 4 * 4
    host = BASE_HOST_BYTES + steps * (PER_STEP_BYTES + 2 * PER_OP_BYTES) + w.layers * PER_BLOCK_BYTES
    blame = ("workload.layers", str(w.layers), f"{w.layers} layers of {fmt_bytes(layer)}")
    pinned = device = 0
    reference = model if s.checks.data else 0
    if backend == "cpu":
        host += model + ring + reference + 2 * layer + 2 * act * w.passes
        blame = ("workload.hidden", str(w.hidden),
                 f"the weights, {w.layers} layers of {fmt_bytes(layer)}")
    elif backend == "cuda":
        device = ring + reference + 4 * act
        pinned = model + 4 * layer
    # the timed passes, the reference's passes, and the weights generated twice
    cpu_bytes = (steps * (2 if s.checks.data else 1) + 2 * w.layers) * layer \
        + 2 * steps * w.batch_tokens * w.hidden * w.ffn_mult * 4
    seconds = _seconds(backend, steps, 0, 2 * steps, cpu_bytes)
    return Needs(host, pinned, device, steps, ops, seconds, blame)


def _requests(s: Scenario) -> tuple[list[tuple[int, int]], int, str]:
    """(prompt, decode) of every request, the last arrival step, and the field naming them."""
    w = s.workload
    if s.kind == "tsunami":
        return [(w.prompt_tokens, w.decode_tokens)] * w.requests, w.arrival_steps - 1, \
            "workload.prompt_tokens"
    reqs = [(t.prompt_tokens, t.decode_tokens) for t in w.tenants for _ in range(t.requests)]
    return reqs, 7, "workload.tenants"  # the serving driver draws tenants' arrivals in [0, 8)


def _serving(s: Scenario, backend: str, source: str) -> Needs:
    w, bt = s.workload, s.memory.block_tokens
    sizes = _sizes(s)
    reqs, last_arrival, req_field = _requests(s)
    blocks = [math.ceil((p + d) / bt) for p, d in reqs]
    working = sum(blocks) * sizes.fp16_bytes
    l1, l2, stage, l1_cap = _kv_spaces(s, sizes, working, source)
    biggest = max(blocks)
    high = s.policy.high_watermark
    if biggest * sizes.fp16_bytes > high * l1_cap:
        p, d = reqs[blocks.index(biggest)]
        raise ScenarioError(
            f"{source}: {req_field}: a request of {p} + {d} tokens grows to {biggest} blocks = "
            f"{fmt_bytes(biggest * sizes.fp16_bytes)}, expected at most policy.high_watermark x "
            f"memory.l1_budget = {fmt_bytes(high * l1_cap)} (it could never start, or come "
            f"back once swapped out)")
    steps = last_arrival + 2 + sum(d for _, d in reqs)
    m = w.max_running
    # phases: swap-in fetches (<= 2 submits), prompt ingest, token ingest, one attention
    # per running request, then forced and background swap-outs of up to m requests
    submits = 4 + m + 2 * 2 * m * _rounds(s, biggest)
    ops = 3 * submits * steps
    typical_ops = TYPICAL_OPS_PER_STEP * steps
    host = (BASE_HOST_BYTES + sum(blocks) * PER_BLOCK_BYTES + steps * PER_STEP_BYTES
            + typical_ops * PER_OP_BYTES + len(reqs) * PER_BLOCK_BYTES)
    blame = (("workload.requests", str(w.requests)) if s.kind == "tsunami" else
             ("workload.tenants", f"{len(w.tenants)} tenants")) + \
        (f"{len(reqs):,} requests over up to {steps:,} steps",)
    pinned = device = 0
    prompt = sum(sorted((p for p, _ in reqs), reverse=True)[:m]) * sizes.token_bytes
    l1_resident = min(l1, working)
    if backend == "cpu":
        host += l1 + l2 + stage + prompt + 3 * l1_resident
    elif backend == "cuda":
        device = l1 + stage
        pinned = l2 + 4 * prompt
    seconds = _seconds(backend, steps, steps * min(sum(blocks), l1_cap // sizes.fp16_bytes + 1),
                       typical_ops, steps * l1_resident + working)
    return Needs(host, pinned, device, steps, ops, seconds, blame)


def _trace(s: Scenario, backend: str, source: str) -> Needs:
    """A captured trace: steps and blocks from its token counts, host memory from the
    arrays' sizes in the file (read from the zip directory, nothing decompressed but the
    token counts)."""
    import zipfile

    import numpy as np

    from ..drivers.trace import _resolve
    path = _resolve(s.workload.trace, source)
    try:
        with np.load(path, allow_pickle=False) as z:
            tokens = z["tokens"]
            arrays = sum(z.zip.getinfo(name).file_size for name in z.zip.namelist())
    except FileNotFoundError:
        raise ScenarioError(f"{source}: workload.trace: {path}: no such trace file") from None
    except (KeyError, ValueError, OSError, EOFError, AttributeError, zipfile.BadZipFile) as e:
        raise ScenarioError(f"{source}: workload.trace: {path}: not a Synapse trace file "
                            f"({e})") from None
    bt = s.memory.block_tokens
    steps = len(tokens)
    n = math.ceil(int(tokens[-1]) / bt) if steps else 0
    sizes = _sizes(s)
    working = max(1, n) * sizes.fp16_bytes
    l1, l2, stage, _ = _kv_spaces(s, sizes, working, source)
    w = s.workload
    fetch = n if w.access_factor <= 1 else math.ceil(n / w.access_factor)
    ops = 3 * (6 + 2 * _rounds(s, fetch + n)) * steps
    typical_ops = TYPICAL_OPS_PER_STEP * steps
    host = (BASE_HOST_BYTES + arrays + steps * n * MATRIX_BYTES_PER_CELL + n * PER_BLOCK_BYTES
            + steps * PER_STEP_BYTES + typical_ops * PER_OP_BYTES)
    pinned = device = 0
    if backend == "cpu":
        host += l1 + l2 + stage + 3 * min(l1, working)
    elif backend == "cuda":
        device, pinned = l1 + stage, l2
    seconds = _seconds(backend, steps, steps * n, typical_ops, steps * min(l1, working) + working)
    return Needs(host, pinned, device, steps, ops, seconds,
                 ("workload.trace", repr(w.trace), f"a trace of {steps:,} steps x {n:,} blocks"))


def _prefix_reuse(s: Scenario, backend: str, source: str) -> Needs:
    """One step per request; per step at most every chunk of the longest prompt is looked
    up, loaded (L3 -> L2 -> L1, a copy or file read each) or computed and saved (three
    copies or writes each), so ops per step are bounded by 6 x its chunks + 2."""
    w, m = s.workload, s.model
    steps = w.requests
    longest = max(w.max_context_tokens, w.document_tokens + w.question_tokens,
                  w.system_tokens + w.turn_tokens)
    chunks = math.ceil(longest / w.chunk_tokens)
    chunk_bytes = 2 * m.layers * m.kv_heads * m.head_dim * w.chunk_tokens * 2
    working = steps * chunks * chunk_bytes
    l1 = _budget(s.memory.l1_budget, working, "memory.l1_budget", source)
    l2 = _budget(s.memory.l2_budget, working, "memory.l2_budget", source)
    ops = steps * (6 * chunks + 2)
    typical_ops = steps * (2 * chunks + 2)
    host = (BASE_HOST_BYTES + steps * chunks * PER_BLOCK_BYTES + steps * PER_STEP_BYTES
            + typical_ops * PER_OP_BYTES)
    pinned = device = 0
    if backend == "cpu":
        host += l1 + l2
    elif backend == "cuda":
        device, pinned = l1, l2
    seconds = _seconds(backend, steps, steps * chunks, typical_ops, steps * chunks * chunk_bytes)
    return Needs(host, pinned, device, steps, ops, seconds,
                 ("workload.requests", str(w.requests), f"{steps:,} requests of up to "
                                                        f"{chunks:,} chunks"))


_KINDS = {"needle": _needle, "streaming": _streaming, "tsunami": _serving,
          "tenants": _serving, "trace": _trace, "prefix_reuse": _prefix_reuse}


def estimate_scenario(s: Scenario, backend: str = "sim", source: str = "scenario") -> Needs:
    """What ``s`` needs on ``backend`` (see the module docstring); a ScenarioError for a
    serving scenario that could never finish."""
    return _KINDS[s.kind](s, backend, source)


def check_device(needs: Needs, free_bytes: int | None, source: str = "scenario") -> None:
    """On the GPU itself: refuse before allocating when the device has less free memory
    than the scenario needs (the profile's HBM was checked already)."""
    if free_bytes is not None and needs.device_bytes > free_bytes:
        path, value, what = needs.blame
        field_part = f"{path}: got {value}, " if path else ""
        raise ScenarioError(f"{source}: {field_part}needs {fmt_bytes(needs.device_bytes)} of "
                            f"device memory, expected at most what this GPU has free "
                            f"({fmt_bytes(free_bytes)})")


def check_needs(s: Scenario, needs: Needs, backend: str, profile, source: str = "scenario",
                host_available: int | None = -1) -> None:
    """Refuse what this machine cannot hold, or what would run longer than MAX_RUN_S."""
    path, value, what = needs.blame
    field_part = f"{path}: got {value}, " if path else ""
    avail = host_available_bytes() if host_available == -1 else host_available
    host = needs.host_bytes + (needs.pinned_bytes if backend == "cuda" else 0)
    if avail is not None and host > avail:
        raise ScenarioError(
            f"{source}: {field_part}needs about {fmt_bytes(host)} of host memory ({what}) on "
            f"--backend {backend}, expected at most what this machine has available "
            f"({fmt_bytes(avail)})")
    if backend == "cuda" and needs.pinned_bytes > profile.host_pinned_bytes:
        raise ScenarioError(
            f"{source}: {field_part}needs {fmt_bytes(needs.pinned_bytes)} of pinned host "
            f"memory, expected at most the pinned memory of profile {profile.name} "
            f"({fmt_bytes(profile.host_pinned_bytes)})")
    if backend == "cuda" and needs.device_bytes > profile.hbm_bytes:
        raise ScenarioError(
            f"{source}: {field_part}needs {fmt_bytes(needs.device_bytes)} of device memory, "
            f"expected at most the HBM of profile {profile.name} "
            f"({fmt_bytes(profile.hbm_bytes)})")
    if needs.seconds is not None and needs.seconds > MAX_RUN_S:
        raise ScenarioError(
            f"{source}: {field_part}estimated to run for {needs.seconds / 3600:,.0f} hours on "
            f"--backend {backend} ({needs.steps:,} steps), expected at most "
            f"{MAX_RUN_S / 3600:.0f} (split it into a sweep, or shrink it)")


class StepGuard:
    """Counts a driver's steps (its recorder's ``on_step``) and stops a run that goes past
    its estimated bound: a driver waiting for ever is stopped with one line, not left
    running."""

    def __init__(self, limit: int, source: str, then=None):
        self.limit, self.source, self.then, self.steps = limit, source, then, 0

    def __call__(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limit:
            raise ScenarioError(f"{self.source}: stopped after {self.limit:,} steps, the most "
                                f"this scenario was estimated to need (the driver is not "
                                f"making progress: a bug, please report it)")
        if self.then is not None:
            self.then(n)
