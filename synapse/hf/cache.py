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
  (``demote="int4"``: quantized on the device, then copied: about a quarter of the
  bytes), compacted too, so a layer's L2 blocks are one run of bytes.
- **dropped** (``demote="drop"``): gone, as in H2O and StreamingLLM as published.

Attention stays dense over what is kept: with everything in L1 a layer's ``update``
returns views of its planes; blocks in L2 are read through (one copy of the layer's run,
dequantized) and placed between the past L1 tokens and this step's, so the causal mask
stays right (attention over past keys does not depend on their order). A block fetched
back into L1 is dequantized on the way in. With a budget of at least the context and no
eviction, tokens and logits equal ``DynamicCache``'s bit for bit.

Positions stay right after eviction: ``get_seq_length`` is the number of tokens seen,
``get_mask_sizes`` the number of keys returned, with the offset that keeps the causal
mask correct for the new tokens. One sequence (batch size 1).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..blocks import Fmt, Tier
from ..errors import CapacityError
from ..kv.planner import SequencePlanner
from ..kv.shape import KVShape
from ..kv.stack import DEMOTE_NAMES, PolicySettings, build_stack
from ..monitor.cache_probe import publish_cache_step
from ..telemetry import Recorder
from .errors import UnsupportedModel
from .int4 import dequantize_rows
from .scores import QueryTap, block_mass, token_mass

NEEDS_SCORES = ("h2o", "lru")  # h2o: accumulated attention; lru: "used" = mass threshold


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

    def crop(self, tokens_to_remove: int) -> None:
        raise UnsupportedModel("TieredCache cannot crop (assisted decoding, rollbacks): its blocks "
                               "may have been demoted or dropped")

    def reorder_cache(self, beam_idx) -> None:
        raise UnsupportedModel("TieredCache serves one sequence; beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise UnsupportedModel("TieredCache serves one sequence (batch size 1)")

    def batch_select_indices(self, indices) -> None:
        raise UnsupportedModel("TieredCache serves one sequence (batch size 1)")


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


class TieredCache(Cache):
    """A transformers ``Cache`` over Synapse's tiers; see the module docstring.

    ``config_or_model``: the model's config (or the model itself). ``model``: the model,
    needed by policies that use attention scores (``h2o``, ``lru``). ``l1_budget_tokens``:
    tokens of KV (all layers) the device may hold; ``l2_budget_tokens``: host tokens.
    ``demote``: ``int4``, ``l2`` or ``drop``. ``backend``: ``cpu`` (CPU tensors play the
    device, accounting enforced) or ``cuda``. ``vmm``: the L1 arena on CUDA virtual memory
    (None: where available, else one allocation; True: required; False: never).
    """

    def __init__(self, config_or_model, policy: str = "h2o", l1_budget_tokens: int = 4096,
                 demote: str = "int4", block_tokens: int = 16, backend: str = "cpu", *,
                 model=None, l2_budget_tokens: int | None = None, int4_group: int | None = None,
                 heavy_ratio: float = 0.5, sink_blocks: int = 1, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, eviction_ratio: float = 0.25,
                 prefetch_blocks: int = 8, access_factor: float = 4.0,
                 record_masses: bool = False, vmm: bool | None = None):
        if hasattr(config_or_model, "config") and isinstance(config_or_model, torch.nn.Module):
            model = config_or_model if model is None else model
            config = config_or_model.config
        else:
            config = config_or_model
        cfg = _text_config(config)
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
        self._policy_kw = dict(policy=policy, demote=demote_key, heavy_ratio=heavy_ratio,
                               sink_blocks=sink_blocks, high_watermark=high_watermark,
                               low_watermark=low_watermark, eviction_ratio=eviction_ratio,
                               prefetch_blocks=prefetch_blocks)
        self.access_factor = access_factor
        self.record_masses = record_masses
        self.vmm = vmm  # None: CUDA virtual memory where available; False: one allocation
        self.needs_scores = policy in NEEDS_SCORES or record_masses
        self.tap: QueryTap | None = None
        super().__init__(layers=[_Layer(self, i) for i in range(self.num_layers)])
        if model is not None:
            self.attach(model)
        self.reset()

    # -- set-up ---------------------------------------------------------------------------
    def attach(self, model) -> "TieredCache":
        """Observe ``model``'s queries (for attention scores); returns self."""
        if self.tap is not None:
            self.tap.remove()
        self.tap = QueryTap(model)
        return self

    def detach(self) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def reset(self) -> None:
        if getattr(self, "_backend", None) is not None:
            self._backend.close()
        self.seen_tokens = 0
        self._begun = False
        self.step = -1
        self.planner: SequencePlanner | None = None
        self.stack = None
        self._backend = None
        self._step: dict | None = None
        self._pending = False  # a finished step whose masses the policy has not seen
        self._step_mass: torch.Tensor | None = None
        self.device = None
        self.dtype = None
        self.rec = Recorder()
        self.read_h2d = 0
        self.stall_s = 0.0
        self.l1_peak_bytes = 0
        self.step_l1_bytes: list[int] = []
        self.masses: list[np.ndarray] = []          # per step, aggregated (record_masses)
        self.layer_masses: list[np.ndarray] = []    # per step, [layers, blocks]
        self._layer_mass_rows: list[torch.Tensor] = []
        self._t0 = time.perf_counter()

    def _start(self, key_states: torch.Tensor) -> None:
        b = key_states.shape[0]
        if b != 1:
            raise UnsupportedModel(f"TieredCache serves one sequence (batch size 1), got batch {b}")
        if key_states.shape[1] != self.kv_heads or key_states.shape[-1] != self.head_dim:
            raise UnsupportedModel(
                f"keys of shape {tuple(key_states.shape)} do not match the config "
                f"({self.kv_heads} KV heads of head_dim {self.head_dim})")
        if self.needs_scores and self.tap is None:
            raise UnsupportedModel(
                f"policy {self.policy_name!r} needs attention scores: pass model=model to "
                f"TieredCache(...) (or call cache.attach(model)) so it can observe the queries; "
                f"policies 'fifo' and 'sinks' need none")
        device, dtype = key_states.device, key_states.dtype
        if self.backend == "cuda" and device.type != "cuda":
            raise UnsupportedModel(f"backend='cuda' but the model's keys are on {device}")
        if self.backend == "cpu" and device.type != "cpu":
            raise UnsupportedModel(f"backend='cpu' but the model's keys are on {device}; "
                                   f"use backend='cuda'")
        from ..kv.torch_backend import TorchBackend
        shape = KVShape(self.num_layers, self.kv_heads, self.head_dim, self.block_tokens,
                        self.int4_group, key_states.element_size())
        self.shape = shape
        self.token_bytes = shape.token_bytes
        self.l1_budget_bytes = shape.blocks_in(self.l1_budget_tokens * shape.token_bytes) \
            * shape.fp16_bytes
        backend = TorchBackend(device, shape, dtype, vmm=self.vmm)
        k = self._policy_kw
        settings = PolicySettings(k["policy"], k["demote"], k["heavy_ratio"], k["sink_blocks"],
                                  k["high_watermark"], k["low_watermark"], k["eviction_ratio"],
                                  k["prefetch_blocks"])
        self.stack = build_stack(shape, backend, self.l1_budget_bytes,
                                 self.l2_budget_tokens * shape.token_bytes, settings,
                                 l2_compact=True, tail_last=True)
        self.planner = SequencePlanner(self.stack.manager, self.block_tokens, self.access_factor)
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
        if self.planner is not None and not self._begun:
            self._begin_step(query_length)
        kept = self.kept_tokens()
        return kept + query_length, self.seen_tokens - kept

    def device_kv_bytes(self) -> int:
        """Bytes of KV the cache holds in L1 now: its live slots (whole blocks)."""
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
        st, sh = self._step, self.shape
        n = st["l1_tokens"]
        l1 = self._backend.space("l1").typed(self.dtype, self.kv_heads, self.head_dim)
        out = {"l1_keys": l1[2 * layer, :n].cpu(), "l1_values": l1[2 * layer + 1, :n].cpu()}
        l2 = self.stack.manager.spaces.l2
        m = len(l2.slots)
        if m and self.demote == "l2_int4":
            rows = self._backend.space("l2").slots(l2.slot_bytes)[2 * layer: 2 * layer + 2, :m]
            rows = rows.reshape(2 * m, -1).cpu()
            a, g = sh.plane_numel // 2, sh.plane_numel // sh.int4_group
            sc = rows[:, a:a + 2 * g].contiguous().view(torch.float16).view(2, m * g)
            ze = rows[:, a + 2 * g:].contiguous().view(torch.float16).view(2, m * g)
            vals = dequantize_rows(rows[m:], sh.plane_numel, sh.int4_group, torch.float32)
            out.update(l2_key_scales=sc[0], l2_key_zeros=ze[0], l2_value_scales=sc[1],
                       l2_value_zeros=ze[1], l2_values=vals)
        return out

    # -- the Cache API ---------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.planner is None:
            self._start(key_states)
        if not self._begun:
            self._begin_step(key_states.shape[-2])
        st = self._step
        q = key_states.shape[-2]
        kp, vp = st["l1"][2 * layer_idx], st["l1"][2 * layer_idx + 1]
        a, n = st["new_at"], st["l1_tokens"]
        kp[a:n].copy_(key_states[0].transpose(0, 1))
        vp[a:n].copy_(value_states[0].transpose(0, 1))
        if st["l2_blocks"]:
            keys, values = self._read_through(layer_idx, kp, vp, a, n)
        else:
            keys = kp[:n].permute(1, 0, 2).unsqueeze(0)
            values = vp[:n].permute(1, 0, 2).unsqueeze(0)
        if self.needs_scores:
            qs = self.tap.query(layer_idx)
            tok = token_mass(qs, keys, self.tap.scaling(layer_idx), keys.shape[-2] - q)
            m = block_mass(tok, st["index"], st["num_live"])
            self._step_mass = m if self._step_mass is None else self._step_mass + m
            if self.record_masses:
                self._layer_mass_rows.append(m)
        if layer_idx == self.num_layers - 1:
            self._end_step()
        return keys, values

    def _read_through(self, layer: int, kp, vp, a: int, n: int):
        """Keys and values of L1's past tokens, then L2's (one copy of the layer's run,
        dequantized), then this step's: dense attention over everything kept."""
        st, sh = self._step, self.shape
        l2 = self._backend.space("l2")
        m = st["l2_blocks"]
        slot = self.stack.manager.spaces.l2.slot_bytes
        rows = l2.slots(slot)[2 * layer: 2 * layer + 2, :m]       # [2, m, plane bytes]
        per = rows.shape[-1]
        t0 = time.perf_counter()
        data = torch.empty((2, m * per), dtype=torch.uint8, device=self.device)
        for i in range(2):  # each plane's run is contiguous: one copy each
            data[i].copy_(rows[i].reshape(-1), non_blocking=True)
        self.stall_s += time.perf_counter() - t0
        self.read_h2d += 2 * m * per
        if st["l2_int4"]:
            x = dequantize_rows(data.view(2 * m, per), sh.plane_numel, sh.int4_group, self.dtype)
        else:
            x = data.view(self.dtype)
        x = x.reshape(2, m * self.block_tokens, self.kv_heads, self.head_dim)
        keys = torch.cat((kp[:a], x[0], kp[a:n]), dim=0).permute(1, 0, 2).unsqueeze(0)
        values = torch.cat((vp[:a], x[1], vp[a:n]), dim=0).permute(1, 0, 2).unsqueeze(0)
        return keys, values

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

    def _begin_step(self, q_len: int) -> None:
        self.settle()
        self.step += 1
        self._begun = True
        t, pl = self.step, self.planner
        pl.begin(t)
        for moves in pl.admit(t, q_len):
            self._moves(moves, t)
        self._moves([], t)
        self._layout(q_len)
        self._step_mass = None
        self._layer_mass_rows = []
        self._track_peak()

    def _layout(self, q: int) -> None:
        """Where this step's keys are: the L1 arena's live slots (this step's tokens at the
        end), the L2 run, and which live block each key position belongs to."""
        mgr, bt = self.stack.manager, self.block_tokens
        l1, l2 = mgr.spaces.l1, mgr.spaces.l2
        l1_blocks = np.fromiter((s.block for s in l1.slots), np.int64, len(l1.slots))
        l2_blocks = np.fromiter((s.block for s in l2.slots), np.int64, len(l2.slots))
        tokens = self.planner.tokens  # after this step's
        l1_tok = np.minimum(bt, tokens - l1_blocks * bt)
        n = int(l1_tok.sum())
        a = n - q
        live = self.planner.live_ids()
        st = {"l1": self._backend.space("l1").typed(self.dtype, self.kv_heads, self.head_dim),
              "new_at": a, "l1_tokens": n, "l2_blocks": len(l2_blocks),
              "l2_int4": self.demote == "l2_int4", "num_live": len(live)}
        if self.needs_scores:
            # key positions in order: L1's first ``a`` tokens, L2's, then L1's from ``a``
            owner = np.repeat(l1_blocks, l1_tok)
            order = np.concatenate((owner[:a], np.repeat(l2_blocks, bt), owner[a:]))
            st["index"] = torch.as_tensor(np.searchsorted(live, order), device=self.device)
        self._step = st

    def _end_step(self) -> None:
        """The last layer's keys are returned: the step's tokens are in. What the policy
        makes of the step's masses moves blocks, and the last layer's attention still
        reads the arena, so that waits for ``settle`` (the next step, or a query)."""
        self.seen_tokens = self.planner.tokens
        self._begun = False
        self._pending = True
        if self.record_masses and self._step_mass is not None:
            self.masses.append((self._step_mass / self.num_layers).cpu().numpy())
            self.layer_masses.append(torch.stack(self._layer_mass_rows).cpu().numpy())

    def settle(self) -> None:
        """Feed the finished step's masses to the policy and carry out its background
        moves (demotion to the low watermark, prefetch), then record the step. The next
        step, ``telemetry``, ``decisions`` and ``dump`` call it; call it yourself to see
        the last step's effect on ``manager``."""
        if not self._pending:
            return
        self._pending = False
        t, pl = self.step, self.planner
        if self._step_mass is not None:
            mass32 = (self._step_mass / self.num_layers).cpu().numpy()
            moves = pl.observe(t, pl.live_ids(), mass32.astype(np.float64))
        else:
            moves = pl.observe(t, pl.live_ids()[:0], np.zeros(0))
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

    # -- telemetry -------------------------------------------------------------------------
    def decisions(self) -> list:
        self.settle()
        return [] if self.planner is None else list(self.planner.mgr.log.entries)

    def telemetry(self) -> dict:
        """The fields of ``synapse run``'s metrics, plus the cache's own measurements."""
        self.settle()
        mgr = self.manager
        out = {"steps": self.step + 1, "tokens": self.seen_tokens,
               "l1_budget_tokens": self.l1_budget_tokens,
               "l1_budget_bytes": getattr(self, "l1_budget_bytes", None),
               "l1_peak_bytes": self.l1_peak_bytes, "stall_s": self.stall_s}
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
        out["l1_arena"] = be.vmm_status
        out["run_time_s"] = time.perf_counter() - self._t0
        out["latency"] = {}
        return out

    def metric_totals(self) -> dict:
        """Running totals for live metrics (``synapse.monitor``), cheap to read every
        step: bytes per direction (read-through included) and the INT4 error sums."""
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
                "access_factor": self.access_factor, **self._policy_kw}

    def result(self, name: str = "hf-tiered-cache") -> dict:
        from .result import make_result
        return make_result(name, "hf_cache", self.backend, self.policy_name, self.config_dict(),
                           self.telemetry(), self.rec.timeline())

    def dump(self, path, name: str = "hf-tiered-cache"):
        """Write ``result.json`` (runner format) and ``decisions.jsonl`` into folder ``path``."""
        from .result import dump
        return dump(self.result(name), self.decisions(), path)

