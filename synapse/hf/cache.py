"""``TieredCache``: a transformers ``Cache`` whose KV blocks Synapse's tier manager places.

    cache = TieredCache(model.config, policy="h2o", l1_budget_tokens=4096, demote="int4",
                        model=model)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
    cache.telemetry(); cache.dump("runs/hf-h2o")

Blocks of ``block_tokens`` tokens (K and V of every layer) are the unit of placement;
``synapse.hf.plan.BlockPlanner`` runs the tier manager and the policy (the same code the
simulator runs on a replayed trace). Where a block's bytes are:

- **L1** (the device: CUDA, or CPU tensors with ``backend="cpu"``): full precision, or
  INT4 for a block the policy brought back from L2 in INT4 (dequantized when read);
- **L2** (host memory, pinned on CUDA): full precision (``demote="l2"``) or INT4
  (``demote="int4"``, quantized on the device, then copied: a quarter of the bytes);
- **dropped** (``demote="drop"``): gone, as in H2O and StreamingLLM as published.

Attention stays dense over what is kept: each layer's ``update`` returns the keys and
values of every live block in position order, L2 blocks read through (copied in for the
layer, INT4 dequantized; the next layer's L2 blocks are copied on a separate CUDA stream
while this layer computes). The L1 budget bounds what the cache keeps on the device
between and during steps; the transient per-layer inputs of attention (one layer's K/V,
as with any cache that concatenates) are not part of it. With a budget of at least the
context and no eviction, the returned tensors equal ``DynamicCache``'s bit for bit.

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
from ..monitor.cache_probe import publish_cache_step
from ..telemetry import Recorder
from .errors import UnsupportedModel
from .int4 import QTensor, dequantize, dequantize_blocks, quantize
from .plan import DEMOTE_NAMES, BlockPlanner, build_manager
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
    device, accounting enforced) or ``cuda``.
    """

    def __init__(self, config_or_model, policy: str = "h2o", l1_budget_tokens: int = 4096,
                 demote: str = "int4", block_tokens: int = 16, backend: str = "cpu", *,
                 model=None, l2_budget_tokens: int | None = None, int4_group: int | None = None,
                 heavy_ratio: float = 0.5, sink_blocks: int = 1, high_watermark: float = 0.95,
                 low_watermark: float = 0.85, eviction_ratio: float = 0.25,
                 prefetch_blocks: int = 8, access_factor: float = 4.0,
                 record_masses: bool = False):
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
        self.seen_tokens = 0
        self._begun = False
        self.step = -1
        self.planner: BlockPlanner | None = None
        self._kv: list[dict[int, tuple]] = [dict() for _ in range(self.num_layers)]
        self._live = np.zeros(0, np.int64)
        self._index: torch.Tensor | None = None
        self._step_mass: torch.Tensor | None = None
        self._staged: tuple | None = None
        self.device = None
        self.dtype = None
        self.rec = Recorder()
        self.bytes = {"demote_d2h": 0, "fetch_h2d": 0, "prefetch_h2d": 0, "read_h2d": 0}
        self.q_err_sq = 0.0
        self.q_ref_sq = 0.0
        self.q_count = 0
        self.stall_s = 0.0
        self.l1_peak_bytes = 0
        self.step_l1_bytes: list[int] = []
        self.masses: list[np.ndarray] = []          # per step, aggregated (record_masses)
        self.layer_masses: list[np.ndarray] = []    # per step, [layers, blocks]
        self._layer_mass_rows: list[torch.Tensor] = []
        self._copy_stream = None
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
        self.device, self.dtype = key_states.device, key_states.dtype
        if self.backend == "cuda" and self.device.type != "cuda":
            raise UnsupportedModel(f"backend='cuda' but the model's keys are on {self.device}")
        if self.backend == "cpu" and self.device.type != "cpu":
            raise UnsupportedModel(f"backend='cpu' but the model's keys are on {self.device}; "
                                   f"use backend='cuda'")
        if self.device.type == "cuda":
            self._copy_stream = torch.cuda.Stream(device=self.device)
        itemsize = key_states.element_size()
        n = 2 * self.num_layers * self.kv_heads * self.block_tokens * self.head_dim
        full = n * itemsize
        int4_bytes = n // 2 + 4 * (n // self.int4_group)
        token_bytes = full // self.block_tokens
        self.token_bytes = token_bytes
        self.l1_budget_bytes = self.l1_budget_tokens * token_bytes
        mgr = build_manager(full, int4_bytes, self.l1_budget_bytes,
                            self.l2_budget_tokens * token_bytes, **self._policy_kw)
        self.planner = BlockPlanner(mgr, self.block_tokens, self.access_factor)

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
        """Bytes of KV the cache holds in L1 now, measured on the tensors themselves."""
        total = 0
        for layer in self._kv:
            for tier, k, v in layer.values():
                if tier == Tier.L1:
                    total += _nbytes(k) + _nbytes(v)
        return total

    # -- the Cache API ---------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.planner is None:
            self._start(key_states)
        if not self._begun:
            self._begin_step(key_states.shape[-2])
        q_len = key_states.shape[-2]
        self._append(layer_idx, key_states, value_states)
        keys, values = self._gather(layer_idx)
        if self.needs_scores:
            q = self.tap.query(layer_idx)
            tok = token_mass(q, keys, self.tap.scaling(layer_idx), keys.shape[-2] - q_len)
            m = block_mass(tok, self._index, len(self._live))
            self._step_mass = m if self._step_mass is None else self._step_mass + m
            if self.record_masses:
                self._layer_mass_rows.append(m)
        self._prefetch_layer(layer_idx + 1)
        self._track_peak()
        if layer_idx == self.num_layers - 1:
            self._end_step()
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.mask_sizes(query_length)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    # -- a step --------------------------------------------------------------------------
    def _begin_step(self, q_len: int) -> None:
        self.step += 1
        self._begun = True
        t, pl = self.step, self.planner
        pl.begin(t)
        for moves in pl.admit(t, q_len):
            self._apply(moves)
            pl.mgr.commit(moves, t)
        self._live = pl.live_ids()
        ntok = np.minimum(self.block_tokens, pl.tokens - self._live * self.block_tokens)
        self._index = torch.repeat_interleave(torch.arange(len(self._live), device=self.device),
                                              torch.as_tensor(ntok, device=self.device))
        self._step_mass = None
        self._layer_mass_rows = []
        self._staged = None

    def _end_step(self) -> None:
        t, pl = self.step, self.planner
        moves = []
        if self._step_mass is not None:
            mass32 = (self._step_mass / self.num_layers).cpu().numpy()
            if self.record_masses:
                self.masses.append(mass32.copy())
                self.layer_masses.append(torch.stack(self._layer_mass_rows).cpu().numpy())
            moves = pl.observe(t, self._live, mass32.astype(np.float64))
        elif self.policy_name not in NEEDS_SCORES:
            moves = pl.observe(t, self._live[:0], np.zeros(0))
        self._apply(moves)
        pl.mgr.commit(moves, t)
        self.seen_tokens = pl.tokens
        self._begun = False
        self._track_peak()
        c, table = pl.mgr.counters, pl.mgr.table
        l1 = self.device_kv_bytes()
        self.step_l1_bytes.append(l1)
        self.rec.step(t, time.perf_counter() - self._t0, l1_bytes=table.bytes_in(Tier.L1),
                      l2_bytes=table.bytes_in(Tier.L2), l1_tensor_bytes=l1,
                      resident_blocks=len(table.ids_in(Tier.L1)), tokens=self.seen_tokens,
                      l1_hits=c.l1_hits, l2_hits=c.l2_hits, misses=c.misses)
        publish_cache_step(self)  # /metrics: this step's counter deltas

    # -- data ------------------------------------------------------------------------------
    def _append(self, l: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put this step's new tokens of layer ``l`` into their blocks (all in L1)."""
        bt, store = self.block_tokens, self._kv[l]
        start = self.seen_tokens
        pos, i = start, 0
        while i < k.shape[-2]:
            b = pos // bt
            n = min(bt - pos % bt, k.shape[-2] - i)
            kp = k[:, :, i:i + n].clone(memory_format=torch.contiguous_format)
            vp = v[:, :, i:i + n].clone(memory_format=torch.contiguous_format)
            if pos % bt:
                tier, k0, v0 = store[b]
                assert tier == Tier.L1 and not isinstance(k0, QTensor), "the tail is L1, full precision"
                kp, vp = torch.cat([k0, kp], dim=-2), torch.cat([v0, vp], dim=-2)
            store[b] = (Tier.L1, kp, vp)
            pos += n
            i += n

    def _gather(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        store = self._kv[l]
        staged = self._staged[1] if self._staged is not None and self._staged[0] == l else {}
        if staged and self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._staged[2])
        ks, vs = [], []
        qk, qv = [], []  # a run of INT4 blocks, dequantized together

        def flush():
            if qk:
                ks.append(dequantize_blocks(qk, -2, self.dtype))
                vs.append(dequantize_blocks(qv, -2, self.dtype))
                qk.clear()
                qv.clear()

        for b in self._live.tolist():
            tier, k, v = store[b]
            if tier == Tier.L2:
                if b in staged:
                    k, v = staged[b]
                else:
                    t0 = time.perf_counter()
                    k, v = self._to_device(k), self._to_device(v)
                    self.stall_s += time.perf_counter() - t0
                self.bytes["read_h2d"] += _nbytes(k) + _nbytes(v)
            if isinstance(k, QTensor):
                if qk and qk[0].shape != k.shape:
                    flush()
                qk.append(k)
                qv.append(v)
                continue
            flush()
            ks.append(k)
            vs.append(v)
        flush()
        if len(ks) == 1:
            return ks[0], vs[0]
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def _prefetch_layer(self, l: int) -> None:
        """Copy layer ``l``'s L2 blocks in ahead of its update (a side stream on CUDA)."""
        if l >= self.num_layers or self._copy_stream is None:
            return  # on CPU the read in _gather is the (synchronous) fetch
        store = self._kv[l]
        # during a prefill chunk, layer l has not stored this chunk's new blocks yet
        l2 = [b for b in self._live.tolist() if b in store and store[b][0] == Tier.L2]
        if not l2:
            return
        cs = self._copy_stream
        staged = {}
        with torch.cuda.stream(cs):
            for b in l2:
                _, k, v = store[b]
                staged[b] = (_to(k, self.device, non_blocking=True), _to(v, self.device, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(cs)
        cur = torch.cuda.current_stream(self.device)
        for k, v in staged.values():
            _record(k, cur)
            _record(v, cur)
        self._staged = (l, staged, ev)

    def _to_device(self, x):
        return _to(x, self.device, non_blocking=False)

    def _to_host(self, x):
        """Device -> host (pinned, on the copy stream, after the compute that wrote ``x``)."""
        if self._copy_stream is None:
            return x.clone()
        cs = self._copy_stream
        cs.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(cs):
            if isinstance(x, QTensor):
                out = x.to("cpu", non_blocking=True, pin=True)
                x.record_stream(cs)
            else:
                out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
                out.copy_(x, non_blocking=True)
                x.record_stream(cs)
        return out

    def _apply(self, moves) -> None:
        """Carry out the manager's moves on the tensors of every layer."""
        for m in moves:
            b = m.block
            if m.purpose == "drop":
                for store in self._kv:
                    store.pop(b, None)
                continue
            for store in self._kv:
                tier, k, v = store[b]
                if m.dst_tier == Tier.L2:
                    if m.dst_fmt == Fmt.INT4 and not isinstance(k, QTensor):
                        k, v = self._quantize(k), self._quantize(v)
                    k, v = self._to_host(k), self._to_host(v)
                    self.bytes["demote_d2h"] += _nbytes(k) + _nbytes(v)
                    store[b] = (Tier.L2, k, v)
                else:
                    t0 = time.perf_counter()
                    k, v = self._to_device(k), self._to_device(v)
                    self.stall_s += time.perf_counter() - t0
                    self.bytes[f"{m.purpose}_h2d"] += _nbytes(k) + _nbytes(v)
                    store[b] = (Tier.L1, k, v)

    def _quantize(self, x: torch.Tensor) -> QTensor:
        qt = quantize(x, self.int4_group)
        err = (dequantize(qt, torch.float32) - x.to(torch.float32))
        self.q_err_sq += float((err * err).sum())
        self.q_ref_sq += float((x.to(torch.float32) ** 2).sum())
        self.q_count += x.numel()
        return qt

    def _track_peak(self) -> None:
        self.l1_peak_bytes = max(self.l1_peak_bytes, self.device_kv_bytes())

    # -- telemetry -------------------------------------------------------------------------
    def decisions(self) -> list:
        return [] if self.planner is None else list(self.planner.mgr.log.entries)

    def telemetry(self) -> dict:
        """The fields of ``synapse run``'s metrics, plus the cache's own measurements."""
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
        b = self.bytes
        out["bytes_h2d"] = b["fetch_h2d"] + b["prefetch_h2d"] + b["read_h2d"]
        out["bytes_d2h"] = b["demote_d2h"]
        out["bytes_by_purpose"] = dict(sorted(b.items()))
        out["int4_rmse"] = math.sqrt(self.q_err_sq / self.q_count) if self.q_count else None
        out["int4_rel_rmse"] = math.sqrt(self.q_err_sq / self.q_ref_sq) if self.q_ref_sq else None
        out["run_time_s"] = time.perf_counter() - self._t0
        out["latency"] = {}
        return out

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


def _nbytes(x) -> int:
    if isinstance(x, QTensor):
        return x.nbytes
    return x.numel() * x.element_size()


def _to(x, device, non_blocking: bool):
    return x.to(device, non_blocking=non_blocking)  # a tensor or a QTensor: the same call


def _record(x, stream) -> None:
    x.record_stream(stream)  # a tensor or a QTensor: the same call
