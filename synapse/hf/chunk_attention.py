"""A TieredCache's prefill chunks on SDPA's fused bottom-right causal kernels.

A prompt longer than the L1 budget goes in chunks (``prefill_chunk_size``). Each chunk
after the first attends to the kept keys before it and causally to its own, and
transformers' ``sdpa`` builds an explicit ``[chunk, kept + chunk]`` boolean mask for
that, which keeps SDPA off flash attention (on CUDA a kernel that takes a mask reads a
bias of the mask's size every layer, masked tiles included). ``TieredCache``
returns the keys with this chunk's last, and reports the offset that makes the mask
causal from the bottom right (``mask_sizes``), so where nothing was dropped (the offset
is 0: INT4 or fp16 demotion with room in L2) the mask is exactly that bias, and the
chunk can run on ``synapse.hf.prefix_attention``'s ``PREFIX_SDPA`` instead, which
checks that before it takes the fused path and falls back to ``sdpa``'s own mask
otherwise (a dropped block, padding, another mask function).

``ChunkAttention.hook(cache, model)`` switches a forward pass of more than one token
that continues a single, started sequence to ``PREFIX_SDPA`` (through
``prefix_sdpa``) and restores the model's own implementation after it, also when the
pass fails. A decode step (one token) of such a sequence on CUDA goes to
``synapse.hf.decode_attention``'s ``DECODE_SDPA`` the same way (flash: no cuDNN plan to
wait for at a new key length). The first chunk (no past: ``sdpa`` already runs it causal
and fused), batches (their own 4D masks, ``synapse.hf.batch``), CPU decode steps and a
model that does not use ``sdpa`` are left alone.

For a cache that scores (h2o, lru) the pass also hands each layer's row log-sum-exp,
which ``split_attention`` computes anyway, to the cache (``TieredCache.attention_lse``):
pass 1 of its fused scores, not computed again.
"""

from __future__ import annotations

from . import decode_attention, prefix_attention
from .batch import _cache_of, _input_of
from .decode_attention import DECODE_SDPA
from .prefix_attention import PREFIX_SDPA, prefix_sdpa


class ChunkAttention:
    """The hooks of one cache on one model; ``passes`` counts the forward passes that
    ran on ``PREFIX_SDPA``."""

    def __init__(self, cache) -> None:
        self.cache = cache
        self.active = None  # the entered prefix_sdpa context of the running pass
        self.sink = None    # the lse_sink this pass replaced (restored after it)
        self.decode = None  # the config a decode pass switched to DECODE_SDPA
        self.passes = 0

    @classmethod
    def hook(cls, cache, model) -> list:
        """The forward hooks on ``model`` (their handles, for ``remove``)."""
        me = cls(cache)
        cache.chunk_attention = me
        return [model.register_forward_pre_hook(me._before, with_kwargs=True),
                model.register_forward_hook(me._after, with_kwargs=True, always_call=True)]

    def _continues_a_sequence(self, args, kwargs) -> int:
        """The pass's new tokens where it continues this cache's single started sequence
        (0 where it does not)."""
        c = self.cache
        if _cache_of(kwargs) is not c or c._batch is not None or c.planner is None \
                or c.seen_tokens == 0:
            return 0
        x = _input_of(args, kwargs)
        return x.shape[1] if x is not None and x.shape[0] == 1 else 0

    def _before(self, module, args, kwargs):
        if self.active is not None or self.decode is not None:
            return None
        n = self._continues_a_sequence(args, kwargs)
        if n == 1 and decode_attention.takes(self.cache):
            cfg = module.config
            if getattr(cfg, "_attn_implementation", None) == "sdpa":
                decode_attention.register()
                cfg._attn_implementation = DECODE_SDPA
                self.decode = cfg
        elif n > 1:
            ctx = prefix_sdpa(module)
            ctx.__enter__()
            self.active = ctx
            on = getattr(module.config, "_attn_implementation", None) == PREFIX_SDPA
            self.passes += on
            if on and self.cache.needs_scores:
                self.sink, prefix_attention.lse_sink = prefix_attention.lse_sink, \
                    self.cache.attention_lse
        return None

    def _after(self, module, args, kwargs, output):
        cfg, self.decode = self.decode, None
        if cfg is not None:
            cfg._attn_implementation = "sdpa"
        ctx, self.active = self.active, None
        if ctx is not None:
            if prefix_attention.lse_sink == self.cache.attention_lse:
                prefix_attention.lse_sink, self.sink = self.sink, None
            ctx.__exit__(None, None, None)
        if not self.cache._begun:  # the pass ended: its last layer is scored now
            self.cache.score_pending()
        return None
