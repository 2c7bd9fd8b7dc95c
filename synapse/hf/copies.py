"""``TieredCache``'s copies and rollbacks: ``copy.deepcopy`` (the same blocks, decisions
and counters, attached to the same model, never a copy of it) and ``crop``."""

from __future__ import annotations

import copy

from ..blocks import Tier
from .errors import UnsupportedModel

# not copied by copy.deepcopy: hooks, the model, streams and buffers made again on demand
_NOT_COPIED = ("tap", "_model", "_hooks", "_attn_hooks", "_cs", "_l2_free", "_l2_buf",
               "_monitor_probe", "_typed", "_l1_source", "_drv", "_asm_buf", "_l2_kept")
# a step's views of the L1 planes: made again by the next step (a batch's are views of
# the batch's shared tensor, which a copy of one sequence must not take along)
_STEP_NOT_COPIED = ("copy_stream", "l2_buf", "l2_views", "l2_ready", "l1", "new", "out", "drv",
                    "asm", "l2_ptrs")


class CopiesAndCrops:
    """Mixed into ``TieredCache`` (see the module docstring)."""

    def __deepcopy__(self, memo):
        """A cache with the same blocks, decisions and counters, attached to the same model
        (not a copy of it: ``copy.deepcopy`` of a cache must not copy the model)."""
        if self._begun:
            raise UnsupportedModel("a TieredCache cannot be copied in the middle of a forward "
                                   "pass; copy it between generate() calls or steps")
        self.settle()
        for c in self.sequences:
            mem = None if c._backend is None else c._backend.space("l1")
            if mem is not None and mem.arena is not None:
                raise UnsupportedModel(
                    "this TieredCache's L1 arena is CUDA virtual memory, which cannot be copied: "
                    "build it with TieredCache(..., vmm=False) to copy it (beam search and the "
                    "batch verbs do so for the sequences of a batch)")
        new = object.__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k in _NOT_COPIED:
                continue
            if k == "_step" and v is not None:
                v = {a: b for a, b in v.items() if a not in _STEP_NOT_COPIED}
            new.__dict__[k] = copy.deepcopy(v, memo)
        new.tap, new._model, new._hooks, new._attn_hooks = None, None, [], []
        new._l2_free, new._l2_buf, new._cs, new._l1_source = {}, None, None, None
        for c in new.sequences:
            c._rekey_arenas()
        if self._model is not None:
            new.attach(self._model)
        return new

    def _rekey_arenas(self) -> None:
        """A copied slot arena's bookkeeping keyed by ``id(slot)`` names the copied slots."""
        if self.stack is None:
            return
        for arena in (self.stack.manager.spaces.l1, self.stack.manager.spaces.l2):
            if hasattr(arena, "rekey"):
                arena.rekey()

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` tokens (negative: drop that many from the end), as
        ``DynamicCache.crop`` (assisted decoding rolls rejected tokens back this way).

        A cut within the last block, while that block is in L1, is carried out (the
        block becomes the partial tail again). A cut that would remove whole blocks is
        refused with the numbers: block ids follow positions in the page table, which
        has no verb to take its last ids back. Nothing changes on a refusal."""
        if self._batch is not None:
            targets = [max_length if max_length >= 0 else c.seen_tokens + max_length
                       for c in self._batch.children]
            for c, t in zip(self._batch.children, targets):
                c._check_crop(t)
            for c, t in zip(self._batch.children, targets):
                c.crop(t)
            self.seen_tokens = max_length if max_length >= 0 else self.seen_tokens + max_length
            return
        self.settle()
        target = max_length if max_length >= 0 else self.seen_tokens + max_length
        if self.planner is None or target >= self.seen_tokens:
            return
        self._check_crop(target)
        from ..kv.planner import follow_tail
        pl, mgr = self.planner, self.planner.mgr
        last = (self.seen_tokens - 1) // self.block_tokens
        mgr.extend(last, target)
        pl.tokens = self.seen_tokens = target
        if pl.tail != last:
            pl.tail = follow_tail(mgr, pl.tail, last, False)
        self._moves([], self.step)  # pinning it last in L1 may have moved it

    def _check_crop(self, target: int) -> None:
        if target < 0:
            raise ValueError(f"crop to {target} tokens: the cache holds {self.seen_tokens}")
        if self.planner is None or target >= self.seen_tokens:
            return
        bt = self.block_tokens
        last = (self.seen_tokens - 1) // bt
        where = None
        if target <= last * bt:
            where = (f"it would remove whole blocks (tokens {target}..{self.seen_tokens} reach "
                     f"below the last block's first token {last * bt}; blocks are "
                     f"block_tokens={bt} tokens)")
        elif self.planner.mgr.table.tier[last] != int(Tier.L1):
            where = f"the last block (tokens {last * bt}..) is no longer in L1"
        if where:
            raise UnsupportedModel(
                f"TieredCache cannot crop to {target} of {self.seen_tokens} tokens: {where}. "
                f"It crops within its last block in L1 only; for assisted decoding use "
                f"num_assistant_tokens < block_tokens, or DynamicCache")
