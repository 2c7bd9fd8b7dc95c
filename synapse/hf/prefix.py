"""Prefix reuse for transformers: ``generate()`` that loads the KV of a prompt's cached
prefix from a ``PrefixStore`` instead of computing it, and saves what its prefill computed.

    from synapse.hf.prefix import generate_with_prefix, prefix_fingerprint
    store = PrefixStore(prefix_fingerprint(model), l2_bytes=8 << 30,
                        l3_dir="/nvme/kv", l3_bytes=1 << 40)          # one per process
    out = generate_with_prefix(model, input_ids, store=store, max_new_tokens=64)
    cache = TieredCache(model, policy="h2o", l1_budget_tokens=4096)
    out = generate_with_prefix(model, input_ids, store=store, cache=cache, max_new_tokens=64)
    cache.telemetry()["prefix"]        # restored / computed tokens, hits per tier, saves

One call, for a batch of one sequence:

1. **load**: the longest cached prefix of the prompt (whole chunks, at most all tokens but
   the last, which the model must compute to give the first token's logits);
2. **to the device, layer by layer, overlapped with the forward** (``prefix_load``): on
   CUDA each layer's prefix KV is copied from the pinned chunks on a side stream, with
   an event per layer, while the forward over the new tokens starts at once; layer i's
   attention waits on the device (``wait_event``) for layer i. A ``DynamicCache`` holds
   the prefix as its layers' tensors before the forward (its own update in the forward
   joins prefix and new tokens); a ``TieredCache`` takes it through its own update path,
   ``cache.update(keys, values, layer)`` per layer, in steps that fit its L1 budget,
   each admitted and placed by its policy like any prefill step, so a reused prefix is
   evicted, demoted or dropped like computed KV (these steps carry no attention scores:
   no queries were computed for them; h2o and lru score the prefix from the next step
   on). The new tokens attend to the prefix on SDPA's fused kernels with a bottom-right
   causal bias where the model uses ``sdpa`` and the mask is exactly causal
   (``prefix_attention``);
3. **generate over the rest**: transformers' own prefix-cache path (the full
   ``input_ids`` and a cache already holding ``n`` tokens: ``generate`` computes
   ``input_ids[:, n:]`` only);
4. **save**: the full-precision KV of the prompt tokens the model computed, taken as
   they reach the cache (``TieredCache.on_update``, before its policy can demote
   anything; a ``DynamicCache`` keeps everything, so it is read there), and the whole
   chunks the store lacks are saved once the prefill's last forward pass ends (copies
   to L1/L2 then, L3 writes in the background). Until then the computed prompt KV is held
   on the device, as a ``DynamicCache`` would hold it.

With a ``DynamicCache`` (the default) or a ``TieredCache`` whose budget holds the context
(or ``demote="l2"``: read-through at full precision), greedy tokens equal those of
``DynamicCache`` without reuse.

A chunk is one tensor ``[layers, 2, kv_heads, chunk_tokens, head_dim]`` (keys, then
values, after RoPE) in the model's dtype: ``LAYOUT``. ``prefix_fingerprint(model)`` binds
a store to the model's config, dtype and that layout; the helpers refuse a store bound to
another, and the store itself never serves a chunk across fingerprints or tenants. The
config hash does not cover the weights: name them in ``model_id`` (a repo id and
revision), or two fine-tunes of one architecture share keys.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..prefix import Fingerprint, config_digest
from .errors import UnsupportedModel
from .prefix_attention import prefix_sdpa
from .prefix_load import LayerwiseLoad, plain_dynamic

LAYOUT = "hf [layers, 2, kv_heads, tokens, head_dim] post-rope"
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash")


@dataclass
class PrefixReuse:
    """What one call did with the store."""

    prompt_tokens: int
    restored_tokens: int = 0                       # loaded instead of computed
    hit_tokens: dict = field(default_factory=dict)  # tier -> restored tokens found there
    chunks_saved: int = 0
    phases_s: dict = field(default_factory=dict)    # store_load, to_device, into_cache, save
    copy_path: str | None = None                   # how the restored chunks were copied
    loaded: list = field(default_factory=list, repr=False)  # the restored chunks (host)

    def summary(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "restored_tokens": self.restored_tokens,
                "computed_tokens": self.computed_tokens, "hit_tokens": dict(self.hit_tokens),
                "chunks_saved": self.chunks_saved, "phases_s": dict(self.phases_s),
                "copy_path": self.copy_path}

    @property
    def computed_tokens(self) -> int:
        return self.prompt_tokens - self.restored_tokens


def prefix_fingerprint(model, chunk_tokens: int = 256, model_id: str | None = None,
                       dtype: torch.dtype | None = None) -> Fingerprint:
    """The fingerprint of ``model``'s KV: its config (minus the path and library version),
    its dtype (or ``dtype``), ``chunk_tokens`` and ``LAYOUT``. ``model_id`` defaults to
    the config's ``name_or_path`` or model type; name the weights there."""
    cfg = model.config
    conf = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_CONFIG}
    name = model_id or getattr(cfg, "name_or_path", "") or getattr(cfg, "model_type", "model")
    return Fingerprint(name, config_digest(conf), _dtype_name(dtype or _model_dtype(model)),
                       chunk_tokens, LAYOUT)


def check_store(store, model) -> None:
    """UnsupportedModel unless ``store``'s fingerprint fits ``model`` (config, dtype, layout)."""
    fp, want = store.fingerprint, prefix_fingerprint(model, store.chunk_tokens, "-")
    for name in ("config_hash", "dtype", "kv_layout"):
        got, exp = getattr(fp, name), getattr(want, name)
        if got != exp:
            raise UnsupportedModel(f"prefix store fingerprint: {name} is {got!r}, but this model "
                                   f"needs {exp!r} (build the store with prefix_fingerprint(model))")


def load_prefix(model, input_ids, store, cache=None, *, tenant: str = "default",
                step_tokens: int | None = None):
    """Put the longest cached prefix of ``input_ids`` (at most all tokens but the last) into
    ``cache`` (default: a new ``DynamicCache``), a ``TieredCache`` through ``cache.update``
    in steps of ``step_tokens`` (default and at most what its L1 budget admits in one
    step). Returns ``(cache, PrefixReuse)``; the cache must be empty. The cache is ready
    for any use when this returns (the device's work on it queued before the caller's);
    ``prefill_with_prefix`` and ``generate_with_prefix`` instead overlap the load with
    the forward pass."""
    cache, reuse, load = _start_load(model, input_ids, store, cache, tenant, step_tokens,
                                     room_for_rest=False)
    if load is not None:
        load.wait_all()
        reuse.phases_s.update(load.finish())
    return cache, reuse


def _start_load(model, input_ids, store, cache, tenant: str, step_tokens: int | None,
                room_for_rest: bool = True):
    """The lookup, then the copies issued layer by layer (``LayerwiseLoad``) and the prefix
    put into the cache (deferred for a ``DynamicCache``). Returns ``(cache, reuse, load)``,
    ``load`` None when nothing was restored. ``room_for_rest``: the call runs the prompt's
    rest through the cache next (the load leaves room for it behind the prefix)."""
    tokens = _prompt(input_ids)
    cache = _cache(model, cache)
    reuse = PrefixReuse(len(tokens))
    if store is None:  # reuse off: the same call computes everything
        return cache, reuse, None
    check_store(store, model)
    if cache.get_seq_length() or getattr(cache, "planner", None) is not None:
        raise UnsupportedModel("load_prefix needs an empty cache (a new one, or after reset())")
    t0 = time.perf_counter()
    got = store.load(tokens, tenant=tenant, max_tokens=len(tokens) - 1)
    reuse.phases_s["store_load"] = time.perf_counter() - t0
    reuse.restored_tokens = got.tokens
    for tier in got.tiers:
        reuse.hit_tokens[tier] = reuse.hit_tokens.get(tier, 0) + store.chunk_tokens
    _publish_lookups(got.tiers, len(tokens) // store.chunk_tokens)
    if not got.tokens:
        return cache, reuse, None
    # a plain DynamicCache's forward writes the prompt's rest behind the prefix (no
    # concatenation of the whole cache); chunks of a chunked prefill do too
    room = (len(tokens) - got.tokens
            if room_for_rest and plain_dynamic(cache, got.chunks[0].shape[0]) else 0)
    load = LayerwiseLoad(got.chunks, model.device, _model_dtype(model), room=room)
    reuse.copy_path = load.copy_path
    load.into(cache, step_tokens)
    reuse.loaded = got.chunks  # what save may be asked for if the store evicted it since
    return cache, reuse, load


def generate_with_prefix(model, input_ids, *, store, cache=None, tenant: str = "default",
                         save: bool = True, fused_attention: bool = True, **generate_kwargs):
    """``model.generate(input_ids, past_key_values=cache, **generate_kwargs)``, with the
    prompt's cached prefix loaded from ``store`` instead of computed (layer by layer,
    overlapped with the first forward pass) and (``save``) the prompt's new whole chunks
    saved to it. With ``prefill_chunk_size``, the prefix goes into a ``TieredCache`` in
    steps of that size too, as the prefill without reuse would. ``fused_attention``: the
    new tokens attend to the prefix through ``synapse.hf.prefix_attention`` (SDPA's fused
    kernels, a bottom-right causal bias) where the model uses ``sdpa``.
    Returns what ``generate`` returns; the call's ``PrefixReuse`` is added to ``cache.prefix_telemetry`` (a running total; in
    ``TieredCache.telemetry()["prefix"]`` too)."""
    cache, reuse, load = _start_load(model, input_ids, store, cache, tenant,
                                     generate_kwargs.get("prefill_chunk_size"))
    with _Saver(model, cache, store, _prompt(input_ids), reuse, tenant, save), _renamed_kwarg(), \
            prefix_sdpa(model, fused_attention), _waits(load, model):
        out = model.generate(input_ids, past_key_values=cache, **generate_kwargs)
    if load is not None:
        reuse.phases_s.update(load.finish())
        reuse.phases_s.pop("forward", None)  # that was the whole generate
    _record(cache, reuse)
    return out


def prefill_with_prefix(model, input_ids, *, store, cache=None, tenant: str = "default",
                        save: bool = True, fused_attention: bool = True, **forward_kwargs):
    """The prefill alone (time to first token): look the prefix up, start its copy to the
    device layer by layer, run one forward pass over the rest of ``input_ids`` at once
    (layer i waits on the device for layer i's copy). Returns ``(model output, cache,
    PrefixReuse)``; ``reuse.phases_s``: ``store_load`` (host seconds), ``copy_issue``
    (host, CUDA), ``to_device`` and ``into_cache`` (device time on CUDA), ``forward``
    (device time on CUDA, its waits for copies included; it overlaps ``to_device``).
    Returns once the device has finished. ``fused_attention`` as in
    ``generate_with_prefix``."""
    cache, reuse, load = _start_load(model, input_ids, store, cache, tenant, None)
    n = reuse.restored_tokens
    with _Saver(model, cache, store, _prompt(input_ids), reuse, tenant, save), torch.no_grad(), \
            _renamed_kwarg(), prefix_sdpa(model, fused_attention), _waits(load, model):
        out = model(input_ids=input_ids[:, n:], past_key_values=cache, use_cache=True,
                    **forward_kwargs)
    if load is not None:
        reuse.phases_s.update(load.finish())
    _record(cache, reuse)
    return out, cache, reuse


def _waits(load, model):
    return load.waits(model) if load is not None else contextlib.nullcontext()


# -- saving what the prefill computed ---------------------------------------------------------
class _Saver:
    """Collects the prompt's computed KV while the model runs and saves the store's missing
    whole chunks when the cache has seen the whole prompt (the end of the prefill, chunked
    or not)."""

    def __init__(self, model, cache, store, tokens, reuse: PrefixReuse, tenant: str, on: bool):
        self.model, self.cache, self.store, self.tokens = model, cache, store, tokens
        self.reuse, self.tenant = reuse, tenant
        self.start = reuse.restored_tokens
        c = store.chunk_tokens if store is not None else 0
        self.on = on and c > 0 and len(tokens) // c > self.start // c  # a new whole chunk
        self.tiered = hasattr(cache, "on_update")
        self.keys: dict[int, list] = {}
        self.values: dict[int, list] = {}
        self.hook = None

    def __enter__(self):
        if self.on:
            if self.tiered:
                self.cache.on_update = self.capture
            self.hook = self.model.register_forward_hook(self.after_forward)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if self.tiered and self.cache.on_update == self.capture:
            self.cache.on_update = None
        self.keys, self.values = {}, {}

    def capture(self, layer: int, keys, values) -> None:
        self.keys.setdefault(layer, []).append(keys[0])
        self.values.setdefault(layer, []).append(values[0])

    def after_forward(self, module, args, output) -> None:
        if self.cache.get_seq_length() < len(self.tokens):
            return  # a chunked prefill: more of the prompt to come
        t0 = time.perf_counter()
        if self.tiered:
            k = [torch.cat(self.keys[i], dim=1) for i in sorted(self.keys)]
            v = [torch.cat(self.values[i], dim=1) for i in sorted(self.values)]
        else:  # a DynamicCache keeps every token: positions start..end of each layer
            k = [layer.keys[0, :, self.start:] for layer in self.cache.layers]
            v = [layer.values[0, :, self.start:] for layer in self.cache.layers]
        c, start, loaded = self.store.chunk_tokens, self.start, self.reuse.loaded

        def chunk(i: int):
            if i * c < start:  # loaded by this call, evicted from the store since
                return loaded[i]
            a, b = i * c - start, (i + 1) * c - start
            return torch.stack([torch.stack((ki[:, a:b], vi[:, a:b])) for ki, vi in zip(k, v)])

        got = self.store.save(self.tokens, chunk, tenant=self.tenant)
        self.reuse.chunks_saved = got.saved
        self.reuse.phases_s["save"] = time.perf_counter() - t0
        self.stop()


# -- small things -------------------------------------------------------------------------------
def _record(cache, reuse: PrefixReuse) -> None:
    tel = getattr(cache, "prefix_telemetry", None) or {
        "calls": 0, "prompt_tokens": 0, "restored_tokens": 0, "computed_tokens": 0,
        "hit_tokens": {}, "chunks_saved": 0}
    tel["calls"] += 1
    tel["prompt_tokens"] += reuse.prompt_tokens
    tel["restored_tokens"] += reuse.restored_tokens
    tel["computed_tokens"] += reuse.computed_tokens
    tel["chunks_saved"] += reuse.chunks_saved
    for tier, n in reuse.hit_tokens.items():
        tel["hit_tokens"][tier] = tel["hit_tokens"].get(tier, 0) + n
    tel["last"] = reuse.summary()
    cache.prefix_telemetry = tel


def _publish_lookups(tiers, chunks: int) -> None:
    """``synapse_prefix_lookups_total``: the chunks found per tier, the rest as misses."""
    from .. import monitor
    for tier in set(tiers):
        monitor.prefix_lookup(tier, tiers.count(tier))
    if chunks > len(tiers):
        monitor.prefix_lookup(None, chunks - len(tiers))


@contextlib.contextmanager
def _renamed_kwarg():
    """transformers 5.2x renames ``past_key_values`` to ``cache``; 5.17 knows only the
    former, so it is passed and the rename's FutureWarning is not the caller's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        yield


def _prompt(input_ids):
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise UnsupportedModel(f"prefix reuse serves one sequence: input_ids of shape "
                               f"{tuple(input_ids.shape)}, expected (1, tokens)")
    if input_ids.shape[1] < 1:
        raise UnsupportedModel("prefix reuse: input_ids is empty")
    return input_ids[0].detach().cpu()


def _cache(model, cache):
    if cache is None:
        from transformers import DynamicCache
        return DynamicCache(config=model.config)
    return cache


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
