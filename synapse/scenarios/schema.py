"""The scenario schema: a tree of frozen dataclasses, one per YAML section.

Every field has a default, a check and a one-line description; ``synapse validate``
prints the resolved tree. The ``workload`` section's fields depend on ``kind``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import budget_check, checked, fraction, non_negative, one_of, positive

POLICY_NAMES = ("lru", "fifo", "h2o", "sinks", "belady")
KINDS = ("needle", "streaming", "tsunami", "tenants", "trace", "prefix_reuse")


@dataclass(frozen=True)
class ModelShape:
    layers: int = checked(32, positive, "transformer layers holding KV")
    kv_heads: int = checked(8, positive, "KV heads per layer")
    head_dim: int = checked(128, one_of(64, 128), "head dimension (64 or 128)")


@dataclass(frozen=True)
class MemoryConfig:
    l1_budget: str | int = checked("20%", budget_check,
                                   "L1 (HBM) budget: a size ('4GiB') or a % of the working set")
    l2_budget: str | int = checked("64GiB", budget_check, "L2 (pinned host) pool size")
    block_tokens: int = checked(16, positive, "tokens per KV block")
    int4_group: int = checked(64, one_of(32, 64, 128), "INT4 quantisation group size")
    staging_blocks: int = checked(64, positive, "INT4 staging slots on the device for demotion")
    zero_on_free: bool = checked(True, doc="clear freed slabs before reuse (tenant isolation)")


@dataclass(frozen=True)
class PolicyConfig:
    eviction: str = checked("h2o", one_of(*POLICY_NAMES), "eviction policy")
    demote: str = checked("l2_int4", one_of("l2", "l2_int4", "drop"),
                          "where evicted KV goes: l2, l2_int4 (compressed) or drop")
    heavy_ratio: float = checked(0.5, fraction, "H2O: share of the L1 budget for heavy hitters")
    sink_blocks: int = checked(1, non_negative, "sinks: leading blocks always kept")
    high_watermark: float = checked(0.95, fraction, "start background demotion above this")
    low_watermark: float = checked(0.85, fraction, "demote down to this")
    eviction_ratio: float = checked(0.25, fraction, "most of L1 demoted in one step")
    prefetch: bool = checked(True, doc="prefetch (KV into headroom; layers ahead for weights)")
    prefetch_blocks: int = checked(8, non_negative, "KV blocks prefetched per step at most")
    prefetch_depth: int = checked(2, non_negative, "weight streaming: layers in flight ahead")
    fetch_quantum_us: float = checked(0.0, non_negative,
                                      "timing protection: a protected tenant's swap-in completes "
                                      "at a multiple of this (0: off)")


@dataclass(frozen=True)
class NeedleWorkload:
    """A long context with Zipf heavy hitters and one needle, then decode steps."""

    context_tokens: int = checked(32768, positive, "prompt length in tokens")
    decode_steps: int = checked(256, positive, "decode steps after the prompt")
    prefill_chunk_tokens: int = checked(2048, positive, "prompt tokens ingested per step")
    needle_position: float = checked(0.5, fraction, "where the needle sits, as a fraction")
    question_step: int = checked(-1, doc="decode step of the question (-1: the last)")
    zipf_alpha: float = checked(1.1, positive, "heavy hitters: block weight ~ rank^-alpha")
    recency_nats: float = checked(2.0, non_negative, "logit bonus of the newest block over the oldest")
    noise_std: float = checked(1.0, non_negative, "std of the per-step logit noise")
    noise_rank: int = checked(8, positive, "rank of the noise (dimensions of the query)")
    sink_nats: float = checked(4.0, non_negative, "extra logit of the first block (a sink)")
    needle_echoes: int = checked(6, non_negative, "steps after the needle that attend to it")
    needle_echo_span: float = checked(0.25, fraction,
                                      "echoes fall within this fraction of the context after it")
    needle_echo_nats: float = checked(7.0, non_negative, "needle's logit bonus at an echo")
    question_nats: float = checked(14.0, non_negative, "needle's logit bonus at the question")
    access_factor: float = checked(4.0, positive,
                                   "a block is used in a step if its attention is >= this x uniform")
    check_every: int = checked(0, non_negative,
                               "also compare with dense attention every N steps (0: question only)")


@dataclass(frozen=True)
class StreamingWorkload:
    """A model larger than the VRAM budget, streamed layer by layer through the ring."""

    layers: int = checked(32, positive, "layers to stream")
    hidden: int = checked(4096, positive, "hidden size")
    ffn_mult: int = checked(4, positive, "MLP width as a multiple of hidden")
    batch_tokens: int = checked(1, positive, "tokens per forward pass")
    passes: int = checked(4, positive, "forward passes")
    vram_budget: str | int = checked("25%", budget_check, "ring size: a size or % of the model")


@dataclass(frozen=True)
class TsunamiWorkload:
    """A burst of requests beyond capacity: backpressure, swapping and refusals."""

    requests: int = checked(64, positive, "requests in the burst")
    arrival_steps: int = checked(8, positive, "the burst arrives over this many steps")
    prompt_tokens: int = checked(2048, positive, "prompt length of each request")
    decode_tokens: int = checked(128, positive, "tokens each request generates")
    max_running: int = checked(16, positive, "requests decoding at once at most")


@dataclass(frozen=True)
class TenantSpec:
    name: str = checked(doc="tenant name")
    share: float = checked(0.5, fraction, "guaranteed share of L1")
    requests: int = checked(8, positive, "requests of this tenant")
    prompt_tokens: int = checked(1024, positive, "prompt length")
    decode_tokens: int = checked(64, positive, "tokens each request generates")
    protected: bool = checked(False, doc="timing protection: pad this tenant's L2 -> L1 "
                                         "fetches to policy.fetch_quantum_us")


@dataclass(frozen=True)
class TenantsWorkload:
    """Several tenants sharing L1 with shares; cross-tenant reads must be refused."""

    tenants: tuple[TenantSpec, ...] = checked(
        (TenantSpec("a", 0.5, 8, 1024, 64), TenantSpec("b", 0.3, 8, 1024, 64),
         TenantSpec("c", 0.2, 8, 1024, 64)), doc="the tenants")
    max_running: int = checked(12, positive, "requests decoding at once at most")
    probe_every: int = checked(8, non_negative,
                               "every N steps a tenant tries to read another's block (0: never)")


@dataclass(frozen=True)
class TraceWorkload:
    """Attention captured from a transformers model (``synapse trace capture``), replayed."""

    trace: str = checked(doc="trace file (.npz) from synapse trace capture; relative paths are "
                             "tried from the scenario file's folder too")
    access_factor: float = checked(4.0, positive,
                                   "a block is used in a step if its attention is >= this x uniform")


@dataclass(frozen=True)
class PrefixReuseWorkload:
    """Chat turns and shared-document questions whose prompts share prefixes; each
    request's chunks are looked up, loaded from the tier holding them, the rest computed
    and saved (synapse.workloads.prefix_reuse states the reuse distribution)."""

    requests: int = checked(48, positive, "requests, served one after another")
    chunk_tokens: int = checked(256, positive, "tokens per cached chunk (a multiple of 4)")
    chat_share: float = checked(0.5, fraction, "probability that a request is a chat turn "
                                               "(else a question about a document)")
    sessions: int = checked(4, positive, "chat sessions per tenant, picked uniformly")
    system_tokens: int = checked(1024, non_negative, "system prompt opening every chat")
    turn_tokens: int = checked(512, positive, "tokens a chat turn adds (reply + new message)")
    max_context_tokens: int = checked(16384, positive, "a longer conversation starts over")
    documents: int = checked(8, positive, "shared documents")
    document_tokens: int = checked(8192, positive, "tokens per document")
    document_zipf: float = checked(1.0, non_negative,
                                   "document popularity: P(rank r) ~ r^-zipf (0: uniform)")
    question_tokens: int = checked(128, positive, "tokens of a question after its document")
    tenants: int = checked(1, positive, "tenants taking turns; keys are salted per tenant")
    l3_budget: str | int = checked("256GiB", budget_check,
                                   "L3 disk capacity: a size or a % of the working set")
    l3_dir: str = checked("", doc="hardware backends: the L3 directory (default: a temporary "
                                  "one, removed after the run)")
    write_through: bool = checked(True, doc="a saved chunk also goes to L2 and L3 at once")
    reuse: bool = checked(True, doc="look up and save prefixes (false: recompute all, the "
                                    "baseline)")
    params: float = checked(8.0e9, positive, "model parameters: prefill costs 2 x params "
                                             "FLOPs per token (simulator)")
    q_per_kv: int = checked(4, positive, "query heads per KV head (prefill attention FLOPs)")


WORKLOADS = {
    "trace": TraceWorkload,
    "needle": NeedleWorkload,
    "streaming": StreamingWorkload,
    "tsunami": TsunamiWorkload,
    "tenants": TenantsWorkload,
    "prefix_reuse": PrefixReuseWorkload,
}


@dataclass(frozen=True)
class Checks:
    invariants: bool = checked(False, doc="check page table and allocator invariants every step")
    residency: bool = checked(False, doc="cuda: verify L1 is device memory and L2 pinned, every step")
    data: bool = checked(True, doc="hardware backends: check moved bytes and attention outputs "
                                   "against references during the run (host work and device "
                                   "synchronisation: turn off to time a run)")


@dataclass(frozen=True)
class Scenario:
    name: str = checked(doc="scenario name")
    kind: str = checked("needle", one_of(*KINDS), "workload kind: " + ", ".join(KINDS))
    description: str = checked("", doc="one line on what it shows")
    seed: int = checked(0, non_negative, "seed for every random draw")
    profile: str = checked("h100-sxm", doc="hardware profile (simulator and budget checks)")
    model: ModelShape = field(default_factory=ModelShape)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    workload: object = None  # one of WORKLOADS[kind], resolved by the loader
    checks: Checks = field(default_factory=Checks)
