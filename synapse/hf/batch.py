"""A batch of sequences in one ``TieredCache``: one KV stack per sequence, one padded view.

Entered when a forward pass has more than one sequence or its attention mask has a zero
(left padding). Each sequence is a single-sequence ``TieredCache`` of its own (its own
block table, policy and a 1/B share of the budgets), and it never stores a pad token:
a pad is dropped before it reaches the sequence's arena, so no policy keeps, scores or
protects one (the sinks of a left-padded prompt are its first real tokens).

The sequences' L1 planes are one tensor (``synapse.hf.planes``): where the rows' layouts
allow it, a layer costs the torch ops of one sequence whatever the batch; otherwise the
batch loops over its sequences. What attention sees per layer: ``[B, kv_heads, N,
head_dim]`` with sequence ``b``'s keys (in its own order: compacted L1, L2 read through,
this step's last) in ``[0, n_b)`` and masked slots after (finite: zeros, or on the
shared planes whatever that row's arena holds there), and a 4D mask built here, once
per forward pass, replacing the one
transformers built from the 2D mask (whose positions assume keys in position order): a
real query of rank ``r`` among the step's real tokens sees keys ``j < n_b - q_b + r + 1``;
a pad query sees key slot 0 only (its output is never used; a row with no key at all
would be NaN). The mask is set on each attention module by a forward pre-hook, as a
bool mask for ``sdpa`` and an additive one for ``eager``; other attention
implementations are refused before the first token.

Beam search and the batch verbs reorder the sequences; a sequence chosen twice is
copied (``copy.deepcopy`` of its stack, its L1 bytes gathered with the others').
"""

from __future__ import annotations

import copy

import torch

from ..errors import CapacityError
from .errors import UnsupportedModel
from .planes import SharedL1, SharedPlanes
from .scores import decode_mass

MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def attention_implementation(model) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def check_implementation(model, model_type: str) -> str:
    """The mask format the model's attention takes: ``sdpa`` (bool) or ``eager``
    (additive), else a clear error. An attention module with its own ``_attn`` (GPT-J
    before transformers 5.24) adds the mask to its logits whatever the config says."""
    from .scores import attention_modules
    if any(hasattr(m, "_attn") for m in attention_modules(model)):
        return "eager"
    impl = attention_implementation(model)
    if impl not in MASK_IMPLEMENTATIONS:
        raise UnsupportedModel(
            f"model type {model_type!r} with attn_implementation={impl!r}: TieredCache serves a "
            f"batch or a padded prompt by giving each attention layer a 4D mask laid out like its "
            f"compacted keys, which only 'sdpa' and 'eager' accept; load the model with "
            f"attn_implementation='sdpa' (or generate one unpadded sequence at a time)")
    return impl


class BatchedSequences(SharedPlanes):
    """The sequences of a batch and this forward pass's layout (module docstring)."""

    def __init__(self, owner, children: list, l1: SharedL1 | None = None) -> None:
        self.owner = owner
        self.children = children
        self.l1 = l1
        self.plan = None  # this pass on the shared planes (``_plan``), or None
        self.mass: torch.Tensor | None = None  # a decode step's masses so far, [B, N]
        self.rows: list = []        # per sequence: (selector of its real new tokens, count)
        self.lengths: list[int] = []  # per sequence: keys it returns this pass
        self.mask: torch.Tensor | None = None     # as the attention implementation takes it
        self.allowed: torch.Tensor | None = None  # the same, bool [B, 1, q, N]
        self.q = 0

    @property
    def size(self) -> int:
        return len(self.children)

    # -- a forward pass -------------------------------------------------------------------
    def begin(self, attention_mask, q: int, device, dtype, impl: str) -> None:
        """Split this pass's ``q`` tokens per sequence (pads out), begin each sequence's
        step (admission, evictions) and build the 4D mask."""
        b = self.size
        if attention_mask is None or q == 1:
            # a decode step's token is real: generate extends the mask with ones
            real = torch.ones((b, q), dtype=torch.bool)
        else:
            if attention_mask.ndim != 2:
                raise UnsupportedModel(
                    f"TieredCache takes the 2D attention mask of generate (one row per sequence); "
                    f"got a {attention_mask.ndim}D mask of shape {tuple(attention_mask.shape)}")
            real = attention_mask[:, -q:].to("cpu", torch.bool)
        self.q = q
        rows, lengths = [], []
        counts = [q] * b if attention_mask is None or q == 1 else real.sum(1).tolist()
        for i, child in enumerate(self.children):
            n_real = counts[i]
            if n_real == q:
                sel = slice(None)
            elif n_real == 0 or bool(real[i, q - n_real:].all()):  # left padding: a real suffix
                sel = slice(q - n_real, None)
            else:
                sel = torch.nonzero(real[i]).flatten().to(device)
            rows.append((sel, n_real))
            if n_real:  # every sequence checked before any begins: a refusal changes nothing
                child._ensure_started(device, dtype)
                child.planner.check_step(n_real)
        for child, (_, n_real) in zip(self.children, rows):
            if n_real:
                child._begin_step(n_real)
                st = child._step
                lengths.append(st["l1_tokens"] + st["l2_blocks"] * child.block_tokens)
            else:
                lengths.append(0)
        self.rows, self.lengths = rows, lengths
        self.mass = None
        if self.owner.record_masses:
            self.owner.batch_lengths.append(list(lengths))
        self.mask = self._mask(real, lengths, device, dtype, impl)
        self.plan = self._plan(q, device, dtype)


    def _mask(self, real: torch.Tensor, lengths: list[int], device, dtype, impl: str):
        n = max(1, max(lengths))
        if impl == "sdpa" and min(lengths) == n and (self.q == 1 or n == self.q) \
                and bool(real.all()):
            # every row sees all its keys (a decode step), or a first pass without padding
            # (sdpa's own causal mask): no mask to build
            self.allowed = None
            return None
        counts = real.sum(1)
        past = torch.tensor(lengths, dtype=torch.long) - counts
        limit = (past[:, None] + real.long().cumsum(1)).masked_fill(~real, 0)  # [B, q]
        limit, real = limit.to(device), real.to(device)
        keys = torch.arange(n, device=device)
        allowed = keys[None, None, :] < limit[:, :, None]
        allowed[:, :, 0] |= ~real  # a pad query: key slot 0, its output is unused
        allowed = self.allowed = allowed[:, None]  # [B, 1, q, N]
        if impl == "sdpa":
            return allowed
        out = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)

    def update(self, key_states, value_states, layer: int, query):
        if self.plan is not None:
            return self._update_shared(key_states, value_states, layer, query)
        b, h, _, d = key_states.shape
        scaling = None if query is None else self.owner.tap.scaling(layer)
        n = max(1, max(self.lengths))
        # a decode step (one real query per row) is scored for the whole batch at once,
        # on the padded view; a prefill chunk per sequence (its fused passes, its causality)
        together = query is not None and self.q == 1
        keys = key_states.new_empty((b, h, n, d))
        values = value_states.new_empty((b, h, n, d))
        for i, child in enumerate(self.children):
            sel, n_real = self.rows[i]
            got = 0
            if n_real:
                qi = None if query is None or together else query[i:i + 1, :, sel]
                k, v = child._update(key_states[i:i + 1, :, sel],
                                     value_states[i:i + 1, :, sel], layer, qi, scaling,
                                     end=not together)
                got = k.shape[-2]
                keys[i, :, :got] = k[0]
                values[i, :, :got] = v[0]
            if got < n:  # masked slots: zeros (garbage could be NaN, and 0 * NaN is NaN)
                keys[i, :, got:] = 0
                values[i, :, got:] = 0
        if together:
            last = layer == self.owner.num_layers - 1
            self._decode_mass(decode_mass(query, keys, scaling, self.allowed), last)
            if last:
                for child in self.children:
                    child._end_step()
        return keys, values

    def _decode_mass(self, tok: torch.Tensor, last: bool) -> None:
        """A decode step's token masses of one layer, [B, N]: summed over the layers here,
        then per block for every row at once (one copy to the host) at the last layer,
        each row's handed to its sequence in its live order (``TieredCache._block_masses``
        per row). With ``record_masses`` each sequence keeps its per-layer rows itself."""
        kids = self.children
        if self.owner.record_masses:
            for i, child in enumerate(kids):
                child._add_mass(tok[i, : self.lengths[i]])
            return
        self.mass = tok if self.mass is None else self.mass.add_(tok)
        if not last:
            return
        bt, mass = kids[0].block_tokens, self.mass
        self.mass = None
        pad = (-mass.shape[1]) % bt
        if pad:
            mass = torch.nn.functional.pad(mass, (0, pad))
        blocks = (mass.view(len(kids), -1, bt).sum(-1) / self.owner.num_layers).cpu().numpy()
        for i, child in enumerate(kids):
            child._step_mass = child._live_masses(blocks[i, : -(-self.lengths[i] // bt)])


    # -- reordering -----------------------------------------------------------------------
    def select(self, indices) -> None:
        """Sequences ``indices`` (beam search's ``beam_idx``; repeats copy a sequence)."""
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        for i in idx:
            if not 0 <= i < self.size:
                raise IndexError(f"sequence index {i} out of range for a batch of {self.size}")
        for c in self.children:
            c.settle()
        shared = self.l1 is not None and self.l1.holds(self.children)
        if shared:  # copies take no L1 bytes along: regroup gathers them, in one op
            for c in self.children:
                c._backend.space("l1").t = _NO_BYTES
        used: set[int] = set()
        out = []
        for i in idx:
            out.append(self.children[i] if i not in used else copy.deepcopy(self.children[i]))
            used.add(i)
        if shared:
            big = self.l1.t
            for c, i in zip(out, idx):
                c._backend.space("l1").t = self.l1.views[i]
            del big
        self.children = out
        if self.l1 is None:
            self.l1 = SharedL1(len(out))
        self.l1.regroup(out)

    def repeat_interleave(self, repeats: int) -> None:
        self.select([i for i in range(self.size) for _ in range(repeats)])


_NO_BYTES = torch.zeros(0, dtype=torch.uint8)  # an arena's tensor while its stack is copied

# what one sequence's state is made of: moved to a child when a sequence becomes a batch
_SEQUENCE_STATE = ("seen_tokens", "_begun", "step", "planner", "stack", "_backend", "_step",
                   "_pending", "_l2_free", "_step_mass", "device", "dtype", "rec", "read_h2d",
                   "stall_s", "l1_peak_bytes", "l1_reserved_peak_bytes", "step_l1_bytes",
                   "masses", "layer_masses", "_layer_mass_rows", "_t0", "shape", "token_bytes",
                   "l1_budget_bytes")


def _cache_of(kwargs: dict):
    """The cache a forward call was given: ``cache`` from transformers 5.24 on, else
    ``past_key_values`` (``layer_past`` for GPT-J's attention before 5.24)."""
    for name in ("cache", "past_key_values", "layer_past"):
        c = kwargs.get(name)
        if c is not None:
            return c
    return None


def _input_of(args: tuple, kwargs: dict):
    """A forward call's input (ids or embeddings, batch first), or None."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        x = args[0] if args else None
    return x


class BatchMode:
    """``TieredCache``'s side of a batch: the forward pre-hooks that read the attention
    mask and set each layer's, the per-sequence caches, and the Cache verbs that reorder
    them (``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``)."""

    def _on_forward(self, module, args, kwargs):
        """Before each forward pass of the attached model: read its 2D attention mask; a
        batch or a padded prompt starts batch mode (``synapse.hf.batch``)."""
        if _cache_of(kwargs) is not self:
            return None
        x = _input_of(args, kwargs)
        if x is None:
            return None
        b, q = int(x.shape[0]), int(x.shape[1])
        am = kwargs.get("attention_mask")
        if self._batch is None:
            if self.planner is None:
                padded = am is not None and (am.ndim != 2 or not bool(am.all()))
                if b == 1 and not padded:
                    return None  # one unpadded sequence: the path without per-sequence work
                self._enter_batch(b)
            else:
                if b != 1:
                    raise UnsupportedModel(
                        f"this TieredCache holds one sequence; a forward pass of batch {b} "
                        f"cannot continue it (call cache.reset() first, or "
                        f"cache.batch_repeat_interleave({b}) to copy it)")
                if q > 1 and am is not None and not bool(am.all()):
                    raise UnsupportedModel(
                        "this TieredCache started on an unpadded sequence; a padded attention "
                        "mask cannot continue it (call cache.reset() and start padded)")
                return None
        if self._batch.size != b:
            raise UnsupportedModel(
                f"this TieredCache holds a batch of {self._batch.size} sequences; a forward pass "
                f"of batch {b} cannot continue it (cache.batch_select_indices / "
                f"batch_repeat_interleave change its size, cache.reset() empties it)")
        dtype = next(module.parameters()).dtype
        self._batch.begin(am, q, x.device, dtype, self._impl)
        return None

    def _enter_batch(self, b: int) -> None:
        """Batch mode with ``b`` empty sequences: everything checked before anything
        changes, so an error leaves the cache as it was."""
        self._impl = check_implementation(self._model, self.model_type)
        children = [self._child(b) for _ in range(b)]
        l1 = SharedL1(b)
        for i, c in enumerate(children):
            c._l1_source = l1.source(i)
        self._batch = BatchedSequences(self, children, l1)
        self._hook_attention()

    def _child(self, share: int):
        """An empty single-sequence cache with 1/``share`` of this one's budgets."""
        kw = dict(self._init_args)
        kw["l1_budget_tokens"] = self.l1_budget_tokens // share
        if kw["l2_budget_tokens"]:
            kw["l2_budget_tokens"] = max(1, kw["l2_budget_tokens"] // share)
        if self.vmm is None:
            kw["vmm"] = False  # a sequence's stack may be copied (beams): one allocation
        try:
            child = type(self)(self._config, **kw)
        except CapacityError as e:
            raise CapacityError(f"a batch of {share} sequences gets l1_budget_tokens="
                                f"{self.l1_budget_tokens} // {share} each: {e}") from None
        child.needs_scores = self.needs_scores
        return child

    def _hook_attention(self) -> None:
        from .scores import attention_modules
        if self._model is None:
            return
        for h in self._attn_hooks:
            h.remove()
        mods = attention_modules(self._model)
        if not mods:  # no q_proj: find the modules that call the cache by their layer index
            mods = [m for m in self._model.modules() if hasattr(m, "layer_idx")
                    and type(m).__name__.endswith("Attention")]
        if len(mods) != self.num_layers:
            raise UnsupportedModel(
                f"model type {self.model_type!r}: found {len(mods)} attention modules for "
                f"{self.num_layers} layers; TieredCache cannot set their masks for a batch")

        def set_mask(_mod, args, kwargs):
            if _cache_of(kwargs) is not self:
                return None  # another cache's forward pass on the same model
            if self._batch is not None:  # None: sdpa's own causal mask, or no mask at all
                kwargs["attention_mask"] = self._batch.mask
            return args, kwargs
        self._attn_hooks = [m.register_forward_pre_hook(set_mask, with_kwargs=True) for m in mods]

    @property
    def sequences(self) -> list:
        """The per-sequence caches of a batch (``[self]`` for one unpadded sequence)."""
        return [self] if self._batch is None else list(self._batch.children)

    def reorder_cache(self, beam_idx) -> None:
        """Beam search: row ``i`` continues sequence ``beam_idx[i]`` (copied if chosen twice)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices) -> None:
        idx = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        if self._batch is None:
            if idx == [0] or self.planner is None and not idx:
                return
            self._to_batch()
        self._batch.select(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats == 1:
            return
        if self._batch is None:
            if self.planner is None:
                return  # nothing held yet: the first forward pass sees the batch
            self._to_batch()
        self._batch.repeat_interleave(repeats)

    def _to_batch(self) -> None:
        """The sequence held so far becomes the first of a batch (its stack moves over)."""
        if self._model is None:
            raise UnsupportedModel("a TieredCache serves a batch only with the model attached: "
                                   "pass model=model to TieredCache(...) or call cache.attach(model)")
        self.settle()
        impl = check_implementation(self._model, self.model_type)
        child = self._child(1)
        for k in _SEQUENCE_STATE:
            setattr(child, k, getattr(self, k))
        child.layers = [type(self.layers[0])(child, i) for i in range(self.num_layers)]
        seen = self.seen_tokens
        self._backend = None  # the child owns it now
        self.reset()
        self.seen_tokens = seen
        self._impl = impl
        self._batch = BatchedSequences(self, [child])
        self._hook_attention()

    def _batch_telemetry(self) -> dict:
        """A batch: counters summed over its sequences, each sequence's own under
        ``sequences``."""
        seqs = [c.telemetry() for c in self._batch.children]
        out = {"batch": len(seqs), "tokens": self.seen_tokens,
               "l1_budget_tokens": self.l1_budget_tokens, "sequences": seqs}
        for key in ("steps", "l1_peak_bytes", "stall_s", "l1_hits", "l2_hits", "misses",
                    "evictions", "demotions", "drops", "forced_evictions", "fetches",
                    "prefetches", "refusals", "lost_blocks", "bytes_h2d", "bytes_d2h",
                    "bytes_compacted", "l1_reserved_bytes"):
            vals = [t[key] for t in seqs if t.get(key) is not None]
            out[key] = (max(vals) if key == "steps" else sum(vals)) if vals else None
        accessed = sum((out[k] or 0) for k in ("l1_hits", "l2_hits", "misses"))
        out["l1_hit_rate"] = out["l1_hits"] / accessed if accessed else None
        return out
