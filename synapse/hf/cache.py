"""``TieredCache``: a transformers ``Cache`` whose KV blocks Synapse's tier manager places.

    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=4096, demote="int4",
                        model=model)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    cache.telemetry(); cache.dump("runs/hf-h2o")

It runs on Synapse's KV engine (``synapse.kv``), the stack the scenario drivers run on:
blocks of ``block_tokens`` tokens (K and V of every layer) are the unit of placement, the
tier manager and the policy decide (``synapse.kv.planner``, the same calls the simulator
runs on a replayed trace), and the moves go through the mover to a torch backend
(``synapse.kv.torch_backend``) in a few batched ops per step. Where the bytes are:

- **L1**: one arena per layer and K/V (a *plane*) on the device (CUDA, or CPU tensors
  with ``backend="cpu"``), ``[tokens, kv_heads, head_dim]`` in the model's dtype, the
  live blocks compacted at its front (``synapse.kv.slots``), the block still being
  written last. A layer's keys and values are a **view** of its planes: no per-step
  concatenation, no per-block tensors. On CUDA the arena is virtual memory whose 2 MiB
  pages are mapped as the live prefix grows (``synapse.kv.vmm``), so the budget is the
  number of mapped pages; where that is unavailable, one allocation of the budget.
- **L2** (host memory, pinned on CUDA): full precision (``demote="l2"``) or INT4
  (``demote="int4"``: quantized on the device, then copied: a third of the bytes with
  keys per channel, ``int4_keys``), compacted too, so a layer's L2 blocks are one run of
  bytes (INT4: one layer row per block, ``synapse.hf.int4``).
- **dropped** (``demote="drop"``): gone, as in H2O and StreamingLLM as published.

Attention stays dense over what is kept: with everything in L1 a layer's ``update``
returns views of its planes; blocks in L2 are read through (one copy of the layer's run,
dequantized) and placed between the past L1 tokens and this step's, so the causal mask
stays right (attention over past keys does not depend on their order). A block fetched
back into L1 is dequantized on the way in. With a budget of at least the context and no
eviction, tokens and logits equal ``DynamicCache``'s bit for bit. A forward pass longer
than the budget is refused (feed it in chunks that fit), or with
``pass_over_budget="hold"`` taken whole at full precision and stored within the budget
afterwards (``synapse.hf.held_pass``).

Positions stay right after eviction: ``get_seq_length`` is the number of tokens seen,
``get_mask_sizes`` the number of keys returned, with the offset that keeps the causal
mask correct for the new tokens.

Batches (B > 1) and padded prompts run one such stack per sequence, with a 1/B share of
the budgets, pads never stored, and a 4D mask laid out like each sequence's keys
(``synapse.hf.batch``); beam search, ``num_return_sequences`` and the batch verbs
reorder (and where needed copy) those stacks. One unpadded sequence keeps the path
above, with no per-sequence bookkeeping.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..blocks import Tier
from ..errors import CapacityError
from ..hw.int4 import DEFAULT_KEY_FORMAT, KEY_FORMATS
from ..kv.planner import SequencePlanner
from ..kv.shape import KVShape
from ..kv.stack import DEMOTE_NAMES, PolicySettings, build_stack
from ..monitor.cache_probe import publish_cache_step
from ..telemetry import Recorder
from .batch import BatchedSequences, BatchMode
from .chunk_attention import ChunkAttention
from .copies import CopiesAndCrops
from .errors import UnsupportedModel
from .held_pass import HeldPass
from .int4 import dequantize_layer_rows, layer_row_sections
from .scores import DecodeScores, QueryTap, fused_for, token_mass, token_mass_fused

NEEDS_SCORES = ("h2o", "lru")  # h2o: accumulated attention; lru: "used" = mass threshold
_NO_IDS, _NO_MASS = np.zeros(0, np.int64), np.zeros(0)  # a step without scores observes none


class _Layer(CacheLayerMixin):
    """The per-layer view transformers inspects; the data lives in the TieredCache."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: "TieredCache", idx: int):
        super().__init__()
        self.owner, self.idx = owner, idx

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner.update(key_states, value_states, self.idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self.owner.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.owner.reset()

    # the blocks of a layer move with every other layer's: the verbs are the cache's
    def crop(self, max_length: int) -> None:
        raise UnsupportedModel("TieredCache crops all layers at once: call cache.crop(max_length)")

    def reorder_cache(self, beam_idx) -> None:
        raise UnsupportedModel("TieredCache reorders all layers at once: call cache.reorder_cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise UnsupportedModel("call cache.batch_repeat_interleave on the TieredCache")

    def batch_select_indices(self, indices) -> None:
        raise UnsupportedModel("call cache.batch_select_indices on the TieredCache")


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


class TieredCache(BatchMode, CopiesAndCrops, HeldPass, Cache):
    """A transformers ``Cache`` over Synapse's tiers; see the module docstring.

    ``config_or_model``: the model's config (or the model itself). ``model``: the model,
    needed by policies that use attention scores (``h2o``, ``lru``). ``l1_budget_tokens``:
    tokens of KV (all layers) the device may hold; ``l2_budget_tokens``: host tokens.
    ``demote``: ``int4``, ``l2`` or ``drop``. ``backend``: ``cpu`` (CPU tensors play the
    device, accounting enforced) or ``cuda``. ``vmm``: the L1 arena on CUDA virtual memory
    (None: where available, else one allocation; True: required; False: never).
    ``int4_keys``: how ``demote="int4"`` groups the keys: ``"channel"`` (one group per
    (head, dim) channel over a block's tokens, as KIVI does) or ``"token"`` (groups of
    ``int4_group`` along ``head_dim``); values are always per token (docs/hf.md).
    ``prefetch_blocks`` is 0 by default here (8 in the scenarios): attention reads every L2
    block through every step anyway, so bringing one back into L1 saves only its share of
    that read and costs a fetch now and a demotion later (measured on the H200: it made
    the h2o decode slower, not faster).
    ``pass_over_budget``: what a forward pass of more tokens than the L1 budget gets:
    ``"refuse"`` (a CapacityError naming a ``prefill_chunk_size`` that fits) or ``"hold"``
    (taken whole: its tokens attend to their own KV at full precision, held on the device
    for the pass, and are stored within the budget after it; ``synapse.hf.held_pass``).
    """

    def __init__(self, config_or_model, policy: str = "h2o", l1_budget_tokens: int = 4096,
                 demote: str = "int4", block_tokens: int = 16, backend: str = "cpu", *,
                 model=None, l2_budget_tokens: int | None = None, int4_group: int | None = None,
                 heavy_ratio: float = 0.5, sink_blocks: int = 1, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, eviction_ratio: float = 0.25,
                 prefetch_blocks: int = 0, access_factor: float = 4.0,
                 record_masses: bool = False, vmm: bool | None = None,
                 int4_keys: str = DEFAULT_KEY_FORMAT, pass_over_budget: str = "refuse"):
        self._init_args = dict(policy=policy, l1_budget_tokens=l1_budget_tokens, demote=demote,
                               block_tokens=block_tokens, backend=backend,
                               l2_budget_tokens=l2_budget_tokens, int4_group=int4_group,
                               heavy_ratio=heavy_ratio, sink_blocks=sink_blocks,
                               high_watermark=high_watermark, low_watermark=low_watermark,
                               eviction_ratio=eviction_ratio, prefetch_blocks=prefetch_blocks,
                               access_factor=access_factor, record_masses=record_masses,
                               vmm=vmm, int4_keys=int4_keys, pass_over_budget=pass_over_budget)
        if hasattr(config_or_model, "config") and isinstance(config_or_model, torch.nn.Module):
            model = config_or_model if model is None else model
            config = config_or_model.config
        else:
            config = config_or_model
        cfg = _text_config(config)
        self._config = config
        self.model_type = getattr(cfg, "model_type", type(cfg).__name__)
        try:  # the layer kinds DynamicCache would build for this config
            from transformers.cache_utils import get_layer_types_and_kwargs
            layer_types = get_layer_types_and_kwargs(cfg)[0]
        except (ImportError, AttributeError):
            layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        other = sorted(set(layer_types) - {"full_attention"})
        if other:
            raise UnsupportedModel(
                f"model type {self.model_type!r}: TieredCache serves decoders whose every layer is "
                f"full attention; this config has layer types {other} (sliding, linear, hybrid or "
                f"shared-KV layers keep state TieredCache does not manage)")
        self.num_layers = int(cfg.num_hidden_layers)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if policy == "belady":
            raise UnsupportedModel("policy 'belady' is an offline oracle that needs the future: "
                                   "capture a trace (synapse trace capture) and replay it on the "
                                   "simulator instead")
        demote_key = DEMOTE_NAMES.get(demote)
        if demote_key is None:
            raise ValueError(f"demote must be one of int4, l2, drop; got {demote!r}")
        if backend not in ("cpu", "cuda"):
            raise ValueError(f"backend must be 'cpu' or 'cuda', got {backend!r}")
        if backend == "cuda" and not torch.cuda.is_available():
            from ..errors import BackendUnavailable
            raise BackendUnavailable("TieredCache(backend='cuda') needs a CUDA device; torch sees none")
        if block_tokens <= 0 or block_tokens % 4:
            raise ValueError(f"block_tokens must be a positive multiple of 4, got {block_tokens}")
        if l1_budget_tokens < 2 * block_tokens:
            raise CapacityError(
                f"l1_budget_tokens={l1_budget_tokens} is below what one decode step needs: 2 blocks "
                f"of block_tokens={block_tokens} (the partial tail block and the next), "
                f"{2 * block_tokens} tokens")
        if int4_group is None:
            int4_group = next((g for g in (64, 32, 128) if self.head_dim % g == 0), None)
            if int4_group is None and demote_key == "l2_int4":
                raise UnsupportedModel(f"head_dim {self.head_dim} is not a multiple of an INT4 "
                                       f"group size (32, 64, 128); use demote='l2' or 'drop'")
            int4_group = int4_group or 32
        elif self.head_dim % int4_group:
            raise ValueError(f"int4_group {int4_group} must divide head_dim {self.head_dim}")
        self.policy_name, self.demote = policy, demote_key
        self.block_tokens, self.backend = block_tokens, backend
        self.l1_budget_tokens = int(l1_budget_tokens)
        self.l2_budget_tokens = int(l2_budget_tokens) if l2_budget_tokens else 1 << 22
        self.int4_group = int4_group
        if int4_keys not in KEY_FORMATS:
            raise ValueError(f"int4_keys must be one of {', '.join(KEY_FORMATS)}, got {int4_keys!r}")
        self.int4_keys = int4_keys
        if pass_over_budget not in ("refuse", "hold"):
            raise ValueError(f"pass_over_budget must be 'refuse' or 'hold', got {pass_over_budget!r}")
        self.pass_over_budget = pass_over_budget
        self._policy_kw = dict(policy=policy, demote=demote_key, heavy_ratio=heavy_ratio,
                               sink_blocks=sink_blocks, high_watermark=high_watermark,
                               low_watermark=low_watermark, eviction_ratio=eviction_ratio,
                               prefetch_blocks=prefetch_blocks)
        self.access_factor = access_factor
        self.record_masses = record_masses
        self.vmm = vmm  # None: CUDA virtual memory where available; False: one allocation
        self.needs_scores = policy in NEEDS_SCORES or record_masses
        self.tap: QueryTap | None = None
        # synapse.hf.prefix: a callback(layer_idx, keys, values) seeing each update's
        # full-precision KV before the policy moves any, and its counters for telemetry()
        self.on_update = None
        self.prefix_telemetry: dict | None = None
        self._model = None
        self._hooks: list = []       # the model's forward pre-hook (its attention mask)
        self._attn_hooks: list = []  # batch mode: each attention layer's mask
        self.chunk_attention: ChunkAttention | None = None  # set by attach
        self._batch: BatchedSequences | None = None
        self._l1_source = None  # set by a batch on its sequences (synapse.hf.batch)
        super().__init__(layers=[_Layer(self, i) for i in range(self.num_layers)])
        if model is not None:
            self.attach(model)
        self.reset()

    # -- set-up ---------------------------------------------------------------------------
    def attach(self, model) -> "TieredCache":
        """Observe ``model``'s queries (for attention scores); returns self. A policy that
        needs no scores (fifo, sinks) hooks nothing: each hook keeps a layer's query
        projection until the cache reads it (2 GiB for a 32k-token prefill of 16 layers)."""
        self.detach()
        if self.needs_scores:
            self.tap = QueryTap(model)
        self._model = model
        self._hooks.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._hooks += ChunkAttention.hook(self, model)  # prefill chunks on fused kernels
        if self._batch is not None:
            self._hook_attention()
        return self

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None
        for h in self._hooks + self._attn_hooks:
            h.remove()
        self._hooks, self._attn_hooks = [], []
        self._model = None

    def reset(self) -> None:
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
        d = getattr(self, "_drv", None)
        if d:  # a pending event may be destroyed: the driver lets it go once it completes
            for ev in d["ready"] + d["free"]:
                d["api"].event_destroy(ev)
        self._drv = None
        batch = getattr(self, "_batch", None)
        if batch is not None:
            for c in batch.children:
                c.reset()
            self._batch = None
            for h in self._attn_hooks:
                h.remove()
            self._attn_hooks = []
        self.seen_tokens = 0
        self._begun = False
        self.step = -1
        self.planner: SequencePlanner | None = None
        self.stack = None
        self._backend = None
        self._step: dict | None = None
        self._pending = False  # a finished step whose masses the policy has not seen
        self._l2_free: dict = {}  # L2 read buffer -> event after its last reader
        self._step_mass: torch.Tensor | None = None
        self._decode_scores = DecodeScores(self.num_layers)
        self._later: dict | None = None  # a chunk's layer scored after its attention
        self.device = None
        self.dtype = None
        self.rec = Recorder()
        self.read_h2d = 0
        self.stall_s = 0.0
        self.l1_peak_bytes = 0
        self.l1_reserved_peak_bytes = 0
        self.pass_peak_bytes = 0   # L1 plus a held pass's own KV (synapse.hf.held_pass)
        self.held_pass_bytes = 0
        self.step_l1_bytes: list[int] = []
        self.masses: list[np.ndarray] = []          # per step, aggregated (record_masses)
        self.layer_masses: list[np.ndarray] = []    # per step, [layers, blocks]
        self.batch_lengths: list[list[int]] = []    # batch, per pass: keys per sequence
        self._layer_mass_rows: list[torch.Tensor] = []
        self._t0 = time.perf_counter()

    def _start(self, key_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        if b != 1:
            raise UnsupportedModel(
                f"model type {self.model_type!r}: a batch of {b} sequences (batch size > 1, "
                f"num_beams or num_return_sequences > 1) needs the model attached, so the cache "
                f"can read the attention mask and lay each sequence's keys out: pass "
                f"model=model to TieredCache(...) or call cache.attach(model)")
        if key_states.shape[1] != self.kv_heads or key_states.shape[-1] != self.head_dim:
            raise UnsupportedModel(
                f"keys of shape {tuple(key_states.shape)} do not match the config "
                f"({self.kv_heads} KV heads of head_dim {self.head_dim})")
        if self.needs_scores and self.tap is None:
            raise UnsupportedModel(
                f"policy {self.policy_name!r} needs attention scores: pass model=model to "
                f"TieredCache(...) (or call cache.attach(model)) so it can observe the queries; "
                f"policies 'fifo' and 'sinks' need none")
        self._ensure_started(key_states.device, key_states.dtype)

    def _ensure_started(self, device, dtype) -> None:
        """Build the stack for keys on ``device`` of ``dtype`` (once)."""
        if self.planner is not None:
            return
        if self.backend == "cuda" and device.type != "cuda":
            raise UnsupportedModel(f"backend='cuda' but the model's keys are on {device}")
        if self.backend == "cpu" and device.type != "cpu":
            raise UnsupportedModel(f"backend='cpu' but the model's keys are on {device}; "
                                   f"use backend='cuda'")
        from ..kv.torch_backend import TorchBackend
        shape = KVShape(self.num_layers, self.kv_heads, self.head_dim, self.block_tokens,
                        self.int4_group, torch.empty(0, dtype=dtype).element_size(),
                        self.int4_keys)
        self.shape = shape
        self.token_bytes = shape.token_bytes
        self.l1_budget_bytes = shape.blocks_in(self.l1_budget_tokens * shape.token_bytes) \
            * shape.fp16_bytes
        backend = TorchBackend(device, shape, dtype, vmm=self.vmm,
                               l2_int4=self.demote == "l2_int4")
        backend.l1_source = self._l1_source  # a batch's shared L1 planes (synapse.hf.batch)
        k = self._policy_kw
        settings = PolicySettings(k["policy"], k["demote"], k["heavy_ratio"], k["sink_blocks"],
                                  k["high_watermark"], k["low_watermark"], k["eviction_ratio"],
                                  k["prefetch_blocks"])
        self.stack = build_stack(shape, backend, self.l1_budget_bytes,
                                 self.l2_budget_tokens * shape.token_bytes, settings,
                                 l2_compact=True, tail_last=True)
        self.planner = SequencePlanner(self.stack.manager, self.block_tokens, self.access_factor)
        backend.l1_source = None  # used once: a copied stack must not hold the batch's
        self.device, self.dtype, self._backend = device, dtype, backend

    # -- queries ---------------------------------------------------------------------------
    @property
    def manager(self):
        return None if self.planner is None else self.planner.mgr

    def kept_tokens(self) -> int:
        """Tokens seen before the current step that are still live (not dropped)."""
        if self.planner is None:
            return 0
        live = self.planner.live_ids()
        n = np.minimum(self.block_tokens, self.seen_tokens - live * self.block_tokens)
        return int(np.maximum(n, 0).sum())

    def mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys attention will see, offset): admission runs first, so a block dropped to
        make room for this step is already gone from the count."""
        if self._batch is not None:  # replaced by the batch's own mask (synapse.hf.batch)
            return self.seen_tokens + query_length, 0
        if self.planner is not None and not self._begun:
            self._begin_step(query_length, lazy=True)
        st = self._step
        # the step's layout counted them already (a held pass's has no such count)
        kept = st["kept"] if st is not None and "kept" in st else self.kept_tokens()
        return kept + query_length, self.seen_tokens - kept

    def device_kv_bytes(self) -> int:
        """Bytes of KV the cache holds in L1 now: its live slots (whole blocks)."""
        if self._batch is not None:
            return sum(c.device_kv_bytes() for c in self._batch.children)
        if self.stack is None:
            return 0
        return self.stack.manager.spaces.l1.used_bytes

    def device_reserved_bytes(self) -> int:
        """Device bytes the L1 arena holds: mapped pages (virtual-memory arena) or the
        whole arena (one allocation)."""
        if self._backend is None:
            return 0
        mem = self._backend.space("l1")
        return mem.arena.mapped_bytes if mem.arena is not None else mem.nbytes

    def inspect_layer(self, layer: int) -> dict:
        """What layer ``layer`` holds now, for audits and tests: its L1 keys and values
        (live tokens, any order), and for an INT4 L2 the per-group fp16 scales and zeros
        of its keys and values and the dequantized values. Copies, on the CPU."""
        if self._batch is not None:
            raise UnsupportedModel("this TieredCache holds a batch: inspect one sequence, "
                                   "cache.sequences[i].inspect_layer(layer)")
        st, sh = self._step, self.shape
        n = st["l1_tokens"]
        l1 = self._backend.space("l1").typed(self.dtype, self.kv_heads, self.head_dim)
        out = {"l1_keys": l1[2 * layer, :n].cpu(), "l1_values": l1[2 * layer + 1, :n].cpu()}
        l2 = self.stack.manager.spaces.l2
        m = len(l2.slots)
        if m and self.demote == "l2_int4":
            rows = self._backend.space("l2").layer_runs(layer, m, l2.slot_bytes)[0].cpu()
            c = self.kv_heads * self.head_dim
            sec = layer_row_sections(rows, self.block_tokens, c, sh.int4_keys, sh.int4_group)
            _, vals = dequantize_layer_rows(rows, self.block_tokens, c, sh.int4_keys,
                                            sh.int4_group, torch.float32)
            out.update({f"l2_{k}": v for k, v in sec.items()}, l2_values=vals)
        return out

    # -- the Cache API ---------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if torch.is_grad_enabled():  # the arena is written in place: never part of a graph
            with torch.no_grad():
                return self.update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.on_update is not None:
            self.on_update(layer_idx, key_states, value_states)
        if self._batch is not None:
            query = self.tap.query(layer_idx) if self.needs_scores else None
            out = self._batch.update(key_states, value_states, layer_idx, query)
            if layer_idx == self.num_layers - 1:
                self.seen_tokens += key_states.shape[-2]
            return out
        if self.planner is None:
            self._start(key_states)
        return self._update(key_states, value_states, layer_idx,
                            self.tap.query(layer_idx) if self.needs_scores else None)

    def _update(self, key_states, value_states, layer_idx: int, qs, scaling=None,
                end: bool = True):
        """One layer of one sequence: its new keys in, all its kept keys out; ``qs``: the
        layer's queries when the policy scores (None: not scored here; a batch scores
        its decode steps for all sequences at once and ends their steps itself, ``end``)."""
        if not self._begun:
            self._begin_step(key_states.shape[-2], lazy=end)
        st = self._step
        if "held" in st:
            return self._update_held(key_states, value_states, layer_idx, qs)
        q = key_states.shape[-2]
        new = st.get("new")
        if new is None:  # the step's first layer: its views of the planes, made once
            new = self._step_views(st)
        lazy = st.get("lazy")
        if lazy is not None:  # this layer's planes mapped as it comes (_begin_step)
            lazy.ensure((2 * layer_idx, 2 * layer_idx + 1))
        # one dispatch for both copies (each is still its own exact copy_ inside)
        torch._foreach_copy_([new[2 * layer_idx], new[2 * layer_idx + 1]],
                             [key_states, value_states])
        if st["l2_blocks"]:
            keys, values = self._read_through(layer_idx, st["l1"][2 * layer_idx],
                                              st["l1"][2 * layer_idx + 1], st["cut"],
                                              st["l1_tokens"])
        else:
            keys, values = st["out"][2 * layer_idx], st["out"][2 * layer_idx + 1]
        if qs is not None:
            scale = self.tap.scaling(layer_idx) if scaling is None else scaling
            if q > 1 and self._scores_after_attention:
                self._score_later(layer_idx, qs, keys, scale)
            elif q > 1 or not self._decode_scores.add(layer_idx, qs, keys, scale):
                mass = token_mass_fused if fused_for(q, keys) else token_mass
                self._add_mass(mass(qs, keys, scale, keys.shape[-2] - q))
        if end and layer_idx == self.num_layers - 1:
            self._end_step()
        return keys, values

    # A chunk's layer is scored once its attention has run (at the next layer's update,
    # the pass's end or ``settle``), so the fused path can take pass 1's row normalisers
    # from that attention (``attention_lse``) instead of computing them again. The layers
    # are still added in order, with the same inputs: the masses are those of scoring in
    # ``update``. False: scored in ``update`` (tests compare the two).
    _scores_after_attention = True

    def _score_later(self, layer: int, qs, keys, scale: float) -> None:
        self.score_pending()
        self._later = {"layer": layer, "q": qs, "keys": keys, "scale": scale, "rows": None}

    def attention_lse(self, layer, lse: torch.Tensor) -> None:
        """The row log-sum-exp [B, Hq, Q] the model's attention computed for ``layer``
        over the keys ``update`` returned (``synapse.hf.prefix_attention``): pass 1 of
        the layer's fused scores. Ignored where it does not fit the pending layer."""
        p = self._later
        if p is not None and p["layer"] == layer and \
                tuple(lse.shape) == tuple(p["q"].shape[:-1]):
            p["rows"] = lse if lse.dtype == torch.float32 else lse.float()

    def score_pending(self) -> None:
        """Score the layer left for after its attention (if any), in layer order."""
        p, self._later = self._later, None
        if p is None:
            return
        qs, keys = p["q"], p["keys"]
        q, past = qs.shape[-2], keys.shape[-2] - qs.shape[-2]
        if fused_for(q, keys):
            self._add_mass(token_mass_fused(qs, keys, p["scale"], past, rows=p["rows"]))
        else:
            self._add_mass(token_mass(qs, keys, p["scale"], past))
        if self.record_masses and self._pending and not self._begun:  # the step's last layer
            self._record_step_masses()

    def _add_mass(self, tok: torch.Tensor) -> None:
        """One layer's attention mass per key (in this step's key order)."""
        self._step_mass = tok if self._step_mass is None else self._step_mass.add_(tok)
        if self.record_masses:
            self._layer_mass_rows.append(self._slot_masses(tok))

    def _read_through(self, layer: int, kp, vp, cut: int, n: int):
        """Keys and values of L1's full blocks before the tail, then L2's (its run for
        this layer, copied in ahead on a side stream and dequantized), then the tail and
        this step's: dense attention over everything kept, in whole blocks until the
        tail (past keys in any order, this step's last: the causal mask holds)."""
        st, sh = self._step, self.shape
        m = st["l2_blocks"]
        data = self._l2_rows(layer)
        if layer + 1 < self.num_layers:
            self._prefetch_l2(layer + 1)
        if st["l2_int4"] and st["fused"]:
            out = self._assemble(kp, vp, data, cut, n)
            self._l2_consumed(layer)
            return out
        if st["l2_int4"]:  # m layer rows: keys then values of each block
            x = torch.stack(dequantize_layer_rows(data.view(m, -1), self.block_tokens,
                                                  self.kv_heads * self.head_dim, sh.int4_keys,
                                                  sh.int4_group, self.dtype))
        else:
            x = data.view(self.dtype)  # the buffer's bytes, as the model's dtype
        x = x.view(2, m * self.block_tokens, self.kv_heads, self.head_dim)
        keys = torch.cat((kp[:cut], x[0], kp[cut:n]), dim=0).permute(1, 0, 2).unsqueeze(0)
        values = torch.cat((vp[:cut], x[1], vp[cut:n]), dim=0).permute(1, 0, 2).unsqueeze(0)
        self._l2_consumed(layer)
        return keys, values

    # The read-through's copies and events as driver calls on torch's streams (where the
    # fused kernel serves, its context is current): a torch event, a stream switch and a
    # copy cost the host about ten times what cuEventRecord / cuMemcpyHtoDAsync do, and a
    # decode step makes five of them a layer. Two events per buffer, made once and
    # recorded again: a wait is queued before the event is recorded again (the pipeline
    # below is two layers deep), and a wait takes the record before it.
    def _driver(self):
        """``synapse.hw.driver_api`` with this cache's reusable events (None: torch ops)."""
        d = getattr(self, "_drv", None)
        if d is None:
            d = False
            try:
                from ..hw import driver_api as api
                api._cu()
                d = {"api": api, "ready": [api.event_create(timing=False) for _ in range(2)],
                     "free": [api.event_create(timing=False) for _ in range(2)]}
            except Exception as e:  # noqa: BLE001 (no cuda-bindings: torch's events)
                self._drv_reason = f"{type(e).__name__}: {e}"
            self._drv = d
        return d or None

    def _l2_consumed(self, layer: int) -> None:
        """The layer's L2 buffer has been read (the work reading it is queued): the copy
        into it for layer + 2 may start once that work is done, not before."""
        st = self._step
        if st["copy_stream"] is not None:
            d = st["drv"]
            if d is not None:
                ev = d["free"][layer % 2]
                d["api"].event_record(ev, st["compute_stream"])
                self._l2_free[layer % 2] = ("driver", ev)
                return
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._l2_free[layer % 2] = ev  # kept across steps: the next step reuses it

    def _assemble_kernel(self) -> bool:
        """Whether the fused read-through kernel (``kv_assemble_int4`` in cuda/int4.cu)
        serves this cache: CUDA, fp16, PyCUDA present, torch on its default stream (the
        kernel launches there). Otherwise torch ops do the same (more launches and a
        float32 transient of the layer's L2 run)."""
        ok = getattr(self, "_fused", None)
        if ok is None:
            ok = False
            if self.device.type == "cuda" and self.dtype == torch.float16:
                try:
                    from ..hw import kernels
                    kernels.use_primary_context(self.device.index or 0)
                    ok = True
                except Exception as e:  # noqa: BLE001 (no PyCUDA, no driver: torch ops)
                    self._fused_reason = f"{type(e).__name__}: {e}"
            self._fused = ok
        return ok and torch.cuda.current_stream(self.device).cuda_stream == 0

    def _assemble(self, kp, vp, data, cut: int, n: int):
        from ..hw import kernels
        st, sh = self._step, self.shape
        m = st["l2_blocks"]
        total = n + m * self.block_tokens
        out = st.get("asm")
        if out is None:
            keys = torch.empty((total, self.kv_heads, self.head_dim), dtype=self.dtype,
                               device=self.device)
            values = torch.empty_like(keys)
            out = (keys.permute(1, 0, 2).unsqueeze(0), values.permute(1, 0, 2).unsqueeze(0),
                   keys.data_ptr(), values.data_ptr())
        launch = st.get("asm_launch")
        if launch is None:  # every layer of a step has the same shapes: resolved once
            launch = st["asm_launch"] = kernels.kv_assemble_int4_launcher(
                cut, m, self.block_tokens, self.kv_heads * self.head_dim, total, sh.int4_group,
                key_channel=sh.int4_keys == "channel", stream=None)
        launch(kp.data_ptr(), vp.data_ptr(), data.data_ptr(), out[2], out[3])
        return out[0], out[1]

    def _assembly_buffers(self, total: int):
        """A decode step's keys and values for the fused read-through, written by each
        layer in turn into one pair of buffers (kept, grown by 1/64): each layer's
        attention and scores read them before the next layer's kernel, on the same
        stream, and nothing keeps them past that (a prefill chunk's keys are scored after
        its attention, ``_score_later``, and get their own). Views made once a step."""
        buf = getattr(self, "_asm_buf", None)
        if buf is None or buf.shape[1] < total:
            if buf is not None:
                torch.cuda.synchronize(self.device)  # the last step's attention may read it
            # room for 1/64 more (512 steps at 32k), not double: held through the decode,
            # its size adds to the decode's peak
            cap = total + max(self.block_tokens, total // 64)
            buf = self._asm_buf = torch.empty((2, cap, self.kv_heads, self.head_dim),
                                              dtype=self.dtype, device=self.device)
        k, v = buf[0, :total], buf[1, :total]
        return (k.permute(1, 0, 2).unsqueeze(0), v.permute(1, 0, 2).unsqueeze(0),
                k.data_ptr(), v.data_ptr())

    def _prefetch_l2(self, layer: int) -> None:
        """Copy ``layer``'s L2 run (K and V planes, each contiguous; INT4: one run of layer
        rows) to the device: on CUDA on a side stream into one of two buffers, while the
        current layer computes. One copy per run: the views it copies between are made
        once a step (``_l2_views``)."""
        st = self._step
        src, dst, _, nbytes = st.get("l2_views") or self._l2_views()
        k = len(dst[0])
        cs = st["copy_stream"]
        d = st["drv"]
        freed = self._l2_free.pop(layer % 2, None) if cs is not None else None
        if d is not None:
            api, csh = d["api"], st["copy_handle"]
            if freed is not None:
                api.stream_wait_event(csh, freed[1] if isinstance(freed, tuple) else freed.cuda_event)
            ptrs, run = st["l2_ptrs"]
            for i in range(k):
                api.memcpy_htod_async(ptrs[1][layer % 2][i], ptrs[0][k * layer + i], run, csh)
            ev = d["ready"][layer % 2]
            api.event_record(ev, csh)
            st["l2_ready"][layer] = ("driver", ev)
        elif cs is not None:
            if freed is not None:  # whatever read it last is done
                if isinstance(freed, tuple):  # recorded by a driver call: wait the same way
                    self._driver()["api"].stream_wait_event(cs.cuda_stream, freed[1])
                else:
                    cs.wait_event(freed)
            with torch.cuda.stream(cs):
                for i in range(k):
                    dst[layer % 2][i].copy_(src[k * layer + i], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(cs)
            st["l2_ready"][layer] = ev
        else:
            for i in range(k):
                dst[layer % 2][i].copy_(src[k * layer + i])
            # copied already (no event to wait on): _l2_rows must not copy it again
            st["l2_ready"][layer] = None
        self.read_h2d += nbytes

    def _l2_views(self) -> tuple:
        """This step's views for the L2 read-through: each plane's run of the L2 slots
        (``[blocks, bytes]``), the two device buffers cut into one destination per run of
        a layer, the two buffers' used parts (what ``_l2_rows`` returns) and the bytes a
        layer copies; with driver calls, also their addresses. Kept across steps while
        the L2 count and the tensors under them stay (most steps: L2 changes only when a
        block is demoted): some 40 views a step not made again."""
        st = self._step
        m, per = st["l2_blocks"], st["l2_plane_bytes"]
        mem = self._backend.space("l2")
        slot_bytes = self.stack.manager.spaces.l2.slot_bytes
        key = (m, per, slot_bytes, st["drv"] is not None)
        got = getattr(self, "_l2_kept", None)
        if got is not None and got[0] == key and got[1] is mem.t and got[2] is st["l2_buf"]:
            st["l2_views"], ptrs = got[3]
            if ptrs is not None:
                st["l2_ptrs"] = ptrs
            return st["l2_views"]
        k = mem.planes_per_layer
        src = mem.slots(slot_bytes)[:, :m]  # [runs, m, run]
        run = src.shape[-1]  # a run's bytes per block: a K or V plane's, or an INT4 layer row
        used = [b[: 2 * m * per] for b in st["l2_buf"].unbind(0)]
        dst = [u[: k * m * run].view(k, m, run).unbind(0) for u in used]
        src = src.unbind(0)
        st["l2_views"] = views = (src, dst, used, k * m * run)
        ptrs = None
        if st["drv"] is not None:
            st["l2_ptrs"] = ptrs = (([x.data_ptr() for x in src],
                                     [[x.data_ptr() for x in d] for d in dst]), m * run)
        self._l2_kept = (key, mem.t, st["l2_buf"], (views, ptrs))
        return views

    def _l2_rows(self, layer: int) -> torch.Tensor:
        st = self._step
        if layer not in st["l2_ready"] and layer not in st["l2_done"]:
            self._prefetch_l2(layer)  # the first layer of a step: nothing was copied ahead
        ev = st["l2_ready"].pop(layer, None)
        if ev is not None:
            t0 = time.perf_counter()
            if isinstance(ev, tuple):
                st["drv"]["api"].stream_wait_event(st["compute_stream"], ev[1])
            else:
                torch.cuda.current_stream(self.device).wait_event(ev)
            self.stall_s += time.perf_counter() - t0
        st["l2_done"].add(layer)
        return (st.get("l2_views") or self._l2_views())[2][layer % 2]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    # -- a step --------------------------------------------------------------------------
    def _moves(self, moves, t: int) -> None:
        """Carry out the manager's moves through the mover and the torch backend."""
        if moves:
            self.stall_s += self._backend.drive(self.stack.mover.execute(moves, t))
        self.stack.mover.relocate()

    def _begin_step(self, q_len: int, lazy: bool = False) -> None:
        """``lazy``: a single sequence's step, whose layers come one by one through
        ``_update``: the L1 arena's new pages are mapped per layer as it arrives (see
        ``VmmArena.ensure``); every op the backend runs maps all first."""
        self.settle()
        self._decode_scores.reset()  # what a failed pass left
        arena = self._lazy_arena(False)  # a step that failed half-way: all mapped again
        self._later = None
        if self._holds_pass(q_len):
            return self._begin_held(q_len)
        try:  # before anything changes: a refused step leaves no trace
            self.planner.check_step(q_len)
        except CapacityError as e:
            raise CapacityError(f"{e}; or TieredCache(..., pass_over_budget='hold') to take "
                                f"the pass whole (its KV held on the device for the pass)") from None
        self._backend.safe_point()
        self.step += 1
        self._begun = True
        t, pl = self.step, self.planner
        pl.begin(t)
        if lazy and arena is not None:
            arena.lazy, arena.lazy_stream = True, torch.cuda.current_stream(self.device).cuda_stream
        for moves in pl.admit(t, q_len):
            self._moves(moves, t)
        self._moves([], t)
        self._layout(q_len)
        if lazy and arena is not None:
            self._step["lazy"] = arena
        self._step_mass = None
        self._layer_mass_rows = []
        self._track_peak()

    def _layout(self, q: int) -> None:
        """Where this step's keys are: the L1 arena's live slots (this step's tokens at the
        end, the partial tail block last), and the L2 run."""
        mgr, bt = self.stack.manager, self.block_tokens
        l1, l2 = mgr.spaces.l1, mgr.spaces.l2
        tokens = self.planner.tokens  # after this step's
        n = l1.num_live * bt - (-tokens) % bt  # only the tail (last, pinned) is partial
        a = n - q
        cut = a - self.seen_tokens % bt       # where the tail block starts: a block boundary
        m = l2.num_live
        # kept: the keys before this step's, = kept_tokens() (only the tail is partial, and
        # it is in L1), without reading the page table again
        st = {"l1": self._l1_planes(), "new_at": a, "cut": cut, "l1_tokens": n, "l2_blocks": m,
              "kept": n - q + m * bt,
              "l2_int4": self.demote == "l2_int4", "l2_ready": {}, "l2_done": set(),
              "copy_stream": None, "fused": False, "drv": None}
        if m:
            per = l2.slot_bytes // self.shape.planes
            st["l2_plane_bytes"] = per
            buf = getattr(self, "_l2_buf", None)
            if buf is None or buf.shape[-1] < 2 * m * per:  # grown rarely: doubling
                if buf is not None and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the copy stream may still write it
                size = max(2 * m * per, 2 * (buf.shape[-1] if buf is not None else 0))
                buf = self._l2_buf = torch.empty((2, size), dtype=torch.uint8, device=self.device)
            st["l2_buf"] = buf
            cs = st["copy_stream"] = self._copy_stream()
            st["fused"] = fused = st["l2_int4"] and cs is not None and self._assemble_kernel()
            st["drv"] = self._driver() if fused else None
            if st["drv"] is not None:
                st["compute_stream"], st["copy_handle"] = 0, cs.cuda_stream  # fused: stream 0
            if fused and q == 1 and self._batch is None and self._l1_source is None:
                st["asm"] = self._assembly_buffers(n + m * bt)
        self._step = st

    @staticmethod
    def _step_views(st: dict) -> tuple:
        """Head-major views of the L1 planes, one per plane, ``[1, kv_heads, tokens,
        head_dim]`` as attention takes them: ``out`` (the live tokens; None when L2 blocks
        are read through) and ``new`` (this step's, written by two copies a layer)."""
        n = st["l1_tokens"]
        hm = st["l1"][:, :n].permute(0, 2, 1, 3).unsqueeze(1)
        st["new"] = hm[..., st["new_at"]:n, :].unbind(0)
        st["out"] = None if st["l2_blocks"] else hm.unbind(0)
        return st["new"]

    def _l1_planes(self) -> torch.Tensor:
        """The L1 arena as ``[planes, tokens, kv_heads, head_dim]`` of the model's dtype
        (made again only when the arena's tensor changes)."""
        t = self._backend.space("l1").t
        got = getattr(self, "_typed", None)
        if got is None or got[0] is not t:
            view = self._backend.space("l1").typed(self.dtype, self.kv_heads, self.head_dim)
            got = self._typed = (t, view)
        return got[1]

    def _copy_stream(self):
        if self.device.type != "cuda":
            return None
        if getattr(self, "_cs", None) is None:
            self._cs = torch.cuda.Stream(device=self.device, priority=-1)
        return self._cs

    def _slot_order(self) -> np.ndarray:
        """Block ids in the order of this step's keys: L1's slots before the tail, L2's,
        then L1's from the tail on (a block per ``block_tokens`` keys)."""
        mgr, bt = self.stack.manager, self.block_tokens
        l1, l2 = mgr.spaces.l1.blocks(), mgr.spaces.l2.blocks()
        if not len(l2):
            return l1
        k = self._step["cut"] // bt
        return np.concatenate((l1[:k], l2, l1[k:]))

    def _slot_masses(self, tok: torch.Tensor) -> torch.Tensor:
        """Token masses in key order -> per block, in the order of ``_slot_order``."""
        bt = self.block_tokens
        pad = (-tok.shape[0]) % bt
        if pad:
            tok = torch.nn.functional.pad(tok, (0, pad))
        return tok.view(-1, bt).sum(-1)

    def _block_masses(self) -> np.ndarray:
        """The step's mass per live block (mean over layers), in live order: one copy to
        the host, made when the policy needs it (before the arena moves)."""
        return self._live_masses((self._slot_masses(self._step_mass) / self.num_layers).cpu().numpy())

    def _live_masses(self, slot_mass: np.ndarray) -> np.ndarray:
        """Per-block masses in key order -> in the order of ``planner.live_ids()``."""
        order = self._slot_order()
        live = self.planner.live_ids()
        out = np.zeros(int(live.max()) + 1 if len(live) else 0, slot_mass.dtype)
        out[order] = slot_mass
        return out[live]

    def _end_step(self) -> None:
        """The last layer's keys are returned: the step's tokens are in. What the policy
        makes of the step's masses moves blocks, and the last layer's attention still
        reads the arena, so that waits for ``settle`` (the next step, or a query)."""
        if self.record_masses:
            self._finish_scores()
        self._lazy_arena(False)
        self._step.pop("lazy", None)
        self.seen_tokens = self.planner.tokens
        self._begun = False
        self._pending = True
        if self.record_masses and self._later is None:  # else once the last layer is scored
            self._record_step_masses()

    def _record_step_masses(self) -> None:
        if self._step_mass is not None:
            self._step_mass = self._block_masses()
            self.masses.append(self._step_mass.copy())
            rows = torch.stack(self._layer_mass_rows).cpu().numpy()
            self.layer_masses.append(np.stack([self._live_masses(r) for r in rows]))

    def _lazy_arena(self, lazy: bool):
        """The L1 virtual-memory arena (None without one); ``lazy=False`` maps whatever a
        lazy step left unmapped and ends it."""
        mem = self._backend.space("l1") if self.planner is not None else None
        arena = getattr(mem, "arena", None)
        if arena is not None and not lazy and arena.lazy:
            arena.lazy = False
            arena.ensure()
        return arena

    def _finish_scores(self) -> None:
        """A decode step's masses, batched over its layers (``DecodeScores``), added in
        layer order. Run at ``settle``, once the last layer's keys and values are let go,
        so its float32 transient never adds to theirs."""
        for tok in self._decode_scores.finish():
            self._add_mass(tok)

    def settle(self) -> None:
        """Feed the finished step's masses to the policy and carry out its background
        moves (demotion to the low watermark, prefetch), then record the step. The next
        step, ``telemetry``, ``decisions`` and ``dump`` call it; call it yourself to see
        the last step's effect on ``manager``."""
        if self._batch is not None:
            for c in self._batch.children:
                c.settle()
            return
        if not self._pending:
            return
        self.score_pending()
        self._pending = False
        t, pl = self.step, self.planner
        self._finish_scores()
        if self._step_mass is not None:
            mass = self._step_mass if isinstance(self._step_mass, np.ndarray) else self._block_masses()
            moves = pl.observe(t, pl.live_ids(), mass.astype(np.float64))
        else:
            moves = pl.observe(t, _NO_IDS, _NO_MASS)
        self._moves(moves, t)
        self._track_peak()
        c, table = pl.mgr.counters, pl.mgr.table
        l1 = self.device_kv_bytes()
        self.step_l1_bytes.append(l1)
        self.rec.step(t, time.perf_counter() - self._t0, l1_bytes=table.bytes_in(Tier.L1),
                      l2_bytes=table.bytes_in(Tier.L2), l1_tensor_bytes=l1,
                      resident_blocks=len(table.ids_in(Tier.L1)), tokens=self.seen_tokens,
                      l1_hits=c.l1_hits, l2_hits=c.l2_hits, misses=c.misses)
        publish_cache_step(self)  # /metrics: this step's counter deltas

    def _track_peak(self) -> None:
        self.l1_peak_bytes = max(self.l1_peak_bytes, self.device_kv_bytes())
        self.l1_reserved_peak_bytes = max(self.l1_reserved_peak_bytes,
                                          self.device_reserved_bytes())

    def reset_peaks(self) -> None:
        """Start the peaks over (``l1_peak_bytes``, ``l1_reserved_peak_bytes``): a
        benchmark measuring the decode phase alone calls it when the prefill ends."""
        self.l1_peak_bytes = self.pass_peak_bytes = self.device_kv_bytes()
        self.l1_reserved_peak_bytes = self.device_reserved_bytes()

    # -- telemetry -------------------------------------------------------------------------
    def decisions(self) -> list:
        self.settle()
        if self._batch is not None:
            return [dict(e, sequence=i) if isinstance(e, dict) else e
                    for i, c in enumerate(self._batch.children) for e in c.decisions()]
        return [] if self.planner is None else list(self.planner.mgr.log.entries)

    def telemetry(self) -> dict:
        """The fields of ``synapse run``'s metrics, plus the cache's own measurements."""
        self.settle()
        if self._batch is not None:
            return self._batch_telemetry()
        mgr = self.manager
        out = {"steps": self.step + 1, "tokens": self.seen_tokens,
               "l1_budget_tokens": self.l1_budget_tokens,
               "l1_budget_bytes": getattr(self, "l1_budget_bytes", None),
               "l1_peak_bytes": self.l1_peak_bytes, "stall_s": self.stall_s,
               "pass_peak_bytes": max(self.pass_peak_bytes, self.l1_peak_bytes)}
        if self.prefix_telemetry is not None:
            out["prefix"] = dict(self.prefix_telemetry)
        if mgr is None:
            return out
        c = mgr.counters
        out.update({"l1_hits": c.l1_hits, "l2_hits": c.l2_hits, "misses": c.misses,
                    "evictions": c.evictions, "demotions": c.demotions, "drops": c.drops,
                    "forced_evictions": c.forced_evictions, "fetches": c.fetches,
                    "prefetches": c.prefetches, "refusals": c.refusals, "lost_blocks": 0})
        accessed = c.l1_hits + c.l2_hits + c.misses
        out["l1_hit_rate"] = c.l1_hits / accessed if accessed else None
        be = self._backend
        purpose = {"read_h2d": self.read_h2d}
        for r in be.records():
            if r.kind in ("copy_h2d", "copy_d2h"):
                key = f"{r.purpose}_{r.kind[5:]}"
                purpose[key] = purpose.get(key, 0) + r.nbytes
        out["bytes_h2d"] = sum(v for k, v in purpose.items() if k.endswith("_h2d"))
        out["bytes_d2h"] = sum(v for k, v in purpose.items() if k.endswith("_d2h"))
        out["bytes_compacted"] = be.bytes_moved["d2d"] + be.bytes_moved["h2h"]
        out["bytes_by_purpose"] = dict(sorted(purpose.items()))
        err, ref = be.int4_error()
        out["int4_rmse"] = math.sqrt(err / be.q_count) if be.q_count else None
        out["int4_rel_rmse"] = math.sqrt(err / ref) if ref else None
        out["l1_reserved_bytes"] = self.device_reserved_bytes()
        out["l1_reserved_peak_bytes"] = self.l1_reserved_peak_bytes
        mem = be.space("l1")
        if mem.arena is not None:
            out["vmm"] = mem.arena.stats()
        out["l1_arena"] = be.vmm_status
        fused = getattr(self, "_fused", None)
        out["read_through"] = ("fused kernel (kv_assemble_int4)" if fused else
                               f"torch ops ({getattr(self, '_fused_reason', 'not CUDA fp16')})"
                               if fused is not None else "not used")
        out["run_time_s"] = time.perf_counter() - self._t0
        out["latency"] = {}
        return out

    def metric_totals(self) -> dict:
        """Running totals for live metrics (``synapse.monitor``), cheap to read every
        step: bytes per direction (read-through included) and the INT4 error sums."""
        if self._batch is not None:
            tots = [c.metric_totals() for c in self._batch.children if c._backend is not None]
            keys = ("h2d", "d2h", "int4_err", "int4_ref", "int4_n")
            return {k: sum(t[k] for t in tots) for k in keys}
        be = self._backend
        count, err, ref = getattr(self, "_metric_q", (0, 0.0, 0.0))
        if be.q_count != count:  # reading the device-side sums syncs: only when they grew
            err, ref = be.int4_error()
            self._metric_q = (be.q_count, err, ref)
        return {"h2d": be.bytes_moved["h2d"] + self.read_h2d, "d2h": be.bytes_moved["d2h"],
                "int4_err": err, "int4_ref": ref, "int4_n": be.q_count}

    def config_dict(self) -> dict:
        return {"model_type": self.model_type, "layers": self.num_layers,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "block_tokens": self.block_tokens, "l1_budget_tokens": self.l1_budget_tokens,
                "l2_budget_tokens": self.l2_budget_tokens, "int4_group": self.int4_group,
                "int4_keys": self.int4_keys,
                "access_factor": self.access_factor, **self._policy_kw}

    def result(self, name: str = "hf-tiered-cache") -> dict:
        from .result import make_result
        return make_result(name, "hf_cache", self.backend, self.policy_name, self.config_dict(),
                           self.telemetry(), self.rec.timeline())

    def dump(self, path, name: str = "hf-tiered-cache"):
        """Write ``result.json`` (runner format) and ``decisions.jsonl`` into folder ``path``."""
        from .result import dump
        return dump(self.result(name), self.decisions(), path)

