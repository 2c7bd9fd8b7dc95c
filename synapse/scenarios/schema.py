"""The scenario schema: a tree of frozen dataclasses, one per YAML section.

Every field has a default, a check and a one-line description, and every number a bound
with its reason (``why``, repeated by the error for a value outside it); ``synapse
validate`` prints the resolved tree. The ``workload`` section's fields depend on ``kind``.
These are the only rules a scenario's values are held to: what the policy layer would
refuse at run time (a watermark of 0, say) is refused here first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import budget_check, checked, fraction, one_of, within
from ..hw.int4 import DEFAULT_KEY_FORMAT, KEY_FORMATS

POLICY_NAMES = ("lru", "fifo", "h2o", "sinks", "belady")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def file_name(v):
    return None if _NAME_RE.fullmatch(v) else ("1 to 64 letters, digits, '.', '_' or '-', not "
                                               "starting with '.'")


def one_line_name(v):
    return None if v and len(v) <= 64 and v.isprintable() else "1 to 64 printable characters"


KINDS = ("needle", "streaming", "tsunami", "tenants", "trace", "prefix_reuse")


# Bounds. Every numeric field has one, with its reason; most are far beyond any real
# model or run, so that a typo (an extra three zeros, 1e308) is refused in one line instead
# of allocating for minutes. What a whole scenario needs (memory, steps, time) is checked
# against this machine by ``synapse.scenarios.estimate`` before it runs.
MAX_LAYERS = 1024          # the deepest published transformers have a few hundred layers
MAX_HEADS = 1024           # KV heads per layer: published models have at most 128
MAX_TOKENS = 2**24         # 16M tokens: beyond the longest context windows published (10M)
MAX_STEPS = 2**20          # decode steps / tokens generated: a million tokens of output
MAX_REQUESTS = 65536       # requests of a serving scenario (each is Python state per step)
MAX_NATS = 1000.0          # a logit bonus: 100 nats already takes all of the mass
WHY_LAYERS = "the deepest published transformers have a few hundred layers"
WHY_HEADS = "published models have at most 128 KV heads"
WHY_TOKENS = "16M tokens is beyond the longest published context windows"
WHY_STEPS = "a million steps or tokens of output"
WHY_REQUESTS = "each request is Python state visited every step"
WHY_NATS = ("a logit in nats: a bonus of 100 already takes all of the attention, and "
            "much larger ones overflow the float32 logits")
WHY_RUNNING = "each running request is one attention op per step"


@dataclass(frozen=True)
class ModelShape:
    layers: int = checked(32, within(1, MAX_LAYERS), "transformer layers holding KV", WHY_LAYERS)
    kv_heads: int = checked(8, within(1, MAX_HEADS), "KV heads per layer", WHY_HEADS)
    head_dim: int = checked(128, one_of(64, 128), "head dimension",
                            "the INT4 and attention kernels are built for 64 and 128")


@dataclass(frozen=True)
class MemoryConfig:
    l1_budget: str | int = checked("20%", budget_check,
                                   "L1 (HBM) budget: a size ('4GiB') or a % of the working set")
    l2_budget: str | int = checked("64GiB", budget_check, "L2 (pinned host) pool size")
    block_tokens: int = checked(16, within(4, 4096), "tokens per KV block",
                                "a multiple of 4 keeps INT4 sections 16-byte aligned; blocks "
                                "of more than 4096 tokens leave a policy nothing to choose")
    int4_group: int = checked(64, one_of(32, 64, 128), "INT4 quantisation group size",
                              "the INT4 kernels are built for groups of 32, 64 and 128")
    int4_keys: str = checked(DEFAULT_KEY_FORMAT, one_of(*KEY_FORMATS),
                             "INT4 keys: channel (a group per channel over a block's tokens, "
                             "KIVI) or token (groups along head_dim); values are per token")
    staging_blocks: int = checked(64, within(1, 4096),
                                  "INT4 staging slots on the device for demotion",
                                  "device memory held for blocks being demoted; a step "
                                  "demotes far fewer")
    zero_on_free: bool = checked(True, doc="clear freed slabs before reuse (tenant isolation)")


_WATERMARK = "a share of the L1 budget; 0 would demote everything"


@dataclass(frozen=True)
class PolicyConfig:
    eviction: str = checked("h2o", one_of(*POLICY_NAMES), "eviction policy")
    demote: str = checked("l2_int4", one_of("l2", "l2_int4", "drop"),
                          "where evicted KV goes: l2, l2_int4 (compressed) or drop")
    heavy_ratio: float = checked(0.5, fraction, "H2O: share of the L1 budget for heavy hitters")
    sink_blocks: int = checked(1, within(0, 65536), "sinks: leading blocks always kept",
                               "StreamingLLM keeps the first 4 tokens")
    high_watermark: float = checked(0.95, within(0.0, 1.0, lo_open=True),
                                    "start background demotion above this", _WATERMARK)
    low_watermark: float = checked(0.85, within(0.0, 1.0, lo_open=True),
                                   "demote down to this (at most high_watermark)", _WATERMARK)
    eviction_ratio: float = checked(0.25, within(0.0, 1.0, lo_open=True),
                                    "most of L1 demoted in one step",
                                    "0 would never demote")
    prefetch: bool = checked(True, doc="prefetch (KV into headroom; layers ahead for weights)")
    prefetch_blocks: int = checked(8, within(0, 65536), "KV blocks prefetched per step at most",
                                   "the headroom below the high watermark caps it anyway")
    prefetch_depth: int = checked(2, within(0, 64), "weight streaming: layers in flight ahead",
                                  "the ring's slots cap it anyway")
    fetch_quantum_us: float = checked(0.0, within(0.0, 1e6),
                                      "timing protection: a protected tenant's swap-in completes "
                                      "at a multiple of this (0: off)",
                                      "a second per fetch is no protection anyone would pay for")


@dataclass(frozen=True)
class NeedleWorkload:
    """A long context with Zipf heavy hitters and one needle, then decode steps."""

    context_tokens: int = checked(32768, within(1, MAX_TOKENS), "prompt length in tokens",
                                  WHY_TOKENS)
    decode_steps: int = checked(256, within(1, MAX_STEPS), "decode steps after the prompt",
                                WHY_STEPS)
    prefill_chunk_tokens: int = checked(2048, within(1, MAX_TOKENS),
                                        "prompt tokens ingested per step", WHY_TOKENS)
    needle_position: float = checked(0.5, fraction, "where the needle sits, as a fraction")
    question_step: int = checked(-1, within(-MAX_STEPS, MAX_STEPS),
                                 "decode step of the question (-1: the last)",
                                 "a decode step: within [-decode_steps, decode_steps - 1]")
    zipf_alpha: float = checked(1.1, within(0.0, 100.0, lo_open=True),
                                "heavy hitters: block weight ~ rank^-alpha",
                                "keys are stored in fp16: alpha x ln(blocks) must stay far "
                                "below its limit of 65504")
    recency_nats: float = checked(2.0, within(0.0, MAX_NATS),
                                  "logit bonus of the newest block over the oldest", WHY_NATS)
    noise_std: float = checked(1.0, within(0.0, MAX_NATS), "std of the per-step logit noise",
                               WHY_NATS)
    noise_rank: int = checked(8, within(1, 125), "rank of the noise (dimensions of the query)",
                              "at most model.head_dim - 3: a block's structured key (3 + "
                              "noise_rank numbers) is stored in its keys")
    sink_nats: float = checked(4.0, within(0.0, MAX_NATS),
                               "extra logit of the first block (a sink)", WHY_NATS)
    needle_echoes: int = checked(6, within(0, MAX_STEPS), "steps after the needle that attend to it",
                                 WHY_STEPS)
    needle_echo_span: float = checked(0.25, fraction,
                                      "echoes fall within this fraction of the context after it")
    needle_echo_nats: float = checked(7.0, within(0.0, MAX_NATS), "needle's logit bonus at an echo",
                                      WHY_NATS)
    question_nats: float = checked(14.0, within(0.0, MAX_NATS),
                                   "needle's logit bonus at the question", WHY_NATS)
    access_factor: float = checked(4.0, within(0.0, 1e6, lo_open=True),
                                   "a block is used in a step if its attention is >= this x uniform",
                                   "above the number of blocks, no block is ever used")
    check_every: int = checked(0, within(0, MAX_STEPS),
                               "also compare with dense attention every N steps (0: question only)",
                               WHY_STEPS)


@dataclass(frozen=True)
class StreamingWorkload:
    """A model larger than the VRAM budget, streamed layer by layer through the ring."""

    layers: int = checked(32, within(1, MAX_LAYERS), "layers to stream", WHY_LAYERS)
    hidden: int = checked(4096, within(1, 65536), "hidden size",
                          "the widest published models use 16-32k")
    ffn_mult: int = checked(4, within(1, 64), "MLP width as a multiple of hidden",
                            "published MLPs are 2.7-8x as wide")
    batch_tokens: int = checked(1, within(1, 65536), "tokens per forward pass",
                                "a prefill batch; activations are batch_tokens x hidden")
    passes: int = checked(4, within(1, 4096), "forward passes",
                          "each pass streams every layer")
    vram_budget: str | int = checked("25%", budget_check, "ring size: a size or % of the model")


@dataclass(frozen=True)
class TsunamiWorkload:
    """A burst of requests beyond capacity: backpressure, swapping and refusals."""

    requests: int = checked(64, within(1, MAX_REQUESTS), "requests in the burst", WHY_REQUESTS)
    arrival_steps: int = checked(8, within(1, MAX_STEPS),
                                 "the burst arrives over this many steps", WHY_STEPS)
    prompt_tokens: int = checked(2048, within(1, MAX_TOKENS), "prompt length of each request",
                                 WHY_TOKENS)
    decode_tokens: int = checked(128, within(1, MAX_STEPS), "tokens each request generates",
                                 WHY_STEPS)
    max_running: int = checked(16, within(1, 4096), "requests decoding at once at most",
                               WHY_RUNNING)


@dataclass(frozen=True)
class TenantSpec:
    name: str = checked(check=one_line_name, doc="tenant name")
    share: float = checked(0.5, fraction, "guaranteed share of L1")
    requests: int = checked(8, within(1, MAX_REQUESTS), "requests of this tenant", WHY_REQUESTS)
    prompt_tokens: int = checked(1024, within(1, MAX_TOKENS), "prompt length", WHY_TOKENS)
    decode_tokens: int = checked(64, within(1, MAX_STEPS), "tokens each request generates",
                                 WHY_STEPS)
    protected: bool = checked(False, doc="timing protection: pad this tenant's L2 -> L1 "
                                         "fetches to policy.fetch_quantum_us")


def _tenant_list(v):
    if not 1 <= len(v) <= 256:
        return (f"a list of 1 to 256 tenants, got {len(v)} (each is a share of L1 and a "
                f"column of every step's statistics)")
    return None


@dataclass(frozen=True)
class TenantsWorkload:
    """Several tenants sharing L1 with shares; cross-tenant reads must be refused."""

    tenants: tuple[TenantSpec, ...] = checked(
        (TenantSpec("a", 0.5, 8, 1024, 64), TenantSpec("b", 0.3, 8, 1024, 64),
         TenantSpec("c", 0.2, 8, 1024, 64)), _tenant_list, doc="the tenants")
    max_running: int = checked(12, within(1, 4096), "requests decoding at once at most",
                               WHY_RUNNING)
    probe_every: int = checked(8, within(0, MAX_STEPS),
                               "every N steps a tenant tries to read another's block (0: never)",
                               WHY_STEPS)


@dataclass(frozen=True)
class TraceWorkload:
    """Attention captured from a transformers model (``synapse trace capture``), replayed."""

    trace: str = checked(doc="trace file (.npz) from synapse trace capture; relative paths are "
                             "tried from the scenario file's folder too")
    access_factor: float = checked(4.0, within(0.0, 1e6, lo_open=True),
                                   "a block is used in a step if its attention is >= this x uniform",
                                   "above the number of blocks, no block is ever used")


@dataclass(frozen=True)
class PrefixReuseWorkload:
    """Chat turns and shared-document questions whose prompts share prefixes; each
    request's chunks are looked up, loaded from the tier holding them, the rest computed
    and saved (synapse.workloads.prefix_reuse states the reuse distribution)."""

    requests: int = checked(48, within(1, MAX_REQUESTS), "requests, served one after another",
                            WHY_REQUESTS)
    chunk_tokens: int = checked(256, within(4, 65536), "tokens per cached chunk (a multiple of 4)",
                                "a chunk is the unit of a lookup: more than 64k tokens is one "
                                "lookup per prompt")
    chat_share: float = checked(0.5, fraction, "probability that a request is a chat turn "
                                               "(else a question about a document)")
    sessions: int = checked(4, within(1, MAX_REQUESTS), "chat sessions per tenant, picked uniformly",
                            WHY_REQUESTS)
    system_tokens: int = checked(1024, within(0, MAX_TOKENS), "system prompt opening every chat",
                                 WHY_TOKENS)
    turn_tokens: int = checked(512, within(1, MAX_TOKENS),
                               "tokens a chat turn adds (reply + new message)", WHY_TOKENS)
    max_context_tokens: int = checked(16384, within(1, MAX_TOKENS),
                                      "a longer conversation starts over", WHY_TOKENS)
    documents: int = checked(8, within(1, MAX_REQUESTS), "shared documents", WHY_REQUESTS)
    document_tokens: int = checked(8192, within(1, MAX_TOKENS), "tokens per document", WHY_TOKENS)
    document_zipf: float = checked(1.0, within(0.0, 100.0),
                                   "document popularity: P(rank r) ~ r^-zipf (0: uniform)",
                                   "beyond 100 every request asks about the first document")
    question_tokens: int = checked(128, within(1, MAX_TOKENS),
                                   "tokens of a question after its document", WHY_TOKENS)
    tenants: int = checked(1, within(1, 256), "tenants taking turns; keys are salted per tenant",
                           "each tenant is a column of every step's statistics")
    l3_budget: str | int = checked("256GiB", budget_check,
                                   "L3 disk capacity: a size or a % of the working set")
    l3_dir: str = checked("", doc="hardware backends: the L3 directory (default: a temporary "
                                  "one, removed after the run)")
    write_through: bool = checked(True, doc="a saved chunk also goes to L2 and L3 at once")
    reuse: bool = checked(True, doc="look up and save prefixes (false: recompute all, the "
                                    "baseline)")
    params: float = checked(8.0e9, within(1.0, 1e15, lo_open=True),
                            "model parameters: prefill costs 2 x params FLOPs per token (simulator)",
                            "a quadrillion parameters is beyond any model")
    q_per_kv: int = checked(4, within(1, MAX_HEADS), "query heads per KV head (prefill attention FLOPs)",
                            "published models have at most 128 query heads per KV head")


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
    name: str = checked(check=file_name, doc="scenario name",
                        why="it names the output folder, runs/<name>-<policy>-<backend>")
    kind: str = checked("needle", one_of(*KINDS), "workload kind: " + ", ".join(KINDS))
    description: str = checked("", doc="one line on what it shows")
    seed: int = checked(0, within(0, 2**63 - 1), "seed for every random draw",
                        "NumPy seeds are 64-bit")
    profile: str = checked("h100-sxm", doc="hardware profile (simulator and budget checks)")
    model: ModelShape = field(default_factory=ModelShape)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    workload: object = None  # one of WORKLOADS[kind], resolved by the loader
    checks: Checks = field(default_factory=Checks)
