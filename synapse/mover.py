"""Turns the manager's moves into backend ops, and back into page-table updates.

Demotion to INT4 is two ops: ``Quantize`` on the compute stream (L1 slab -> device
staging slab), then a D2H copy (staging -> L2 slab) that waits on it; other demotions and
fetches are single copies on their direction's stream. Every region an op touches is
checked against the owning tenant first (``check_access``), on every backend.
``execute`` is a generator: submit, wait, then ``commit``; a ``KernelError`` while waiting
aborts the moves (every block stays in the tier it was in) and propagates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .backend import Backend
from .blocks import Fmt, Tier
from .errors import KernelError
from .manager import Move, TierManager
from .ops import Copy, Quantize, Region, Stream

SPACE = {Tier.L1: "l1", Tier.L2: "l2"}


class _Cols:
    """Rows of integers gathered per move, handed to an op as NumPy columns."""

    __slots__ = ("rows",)

    def __init__(self):
        self.rows = []

    def add(self, *values):
        self.rows.append(values)

    def __bool__(self):
        return bool(self.rows)

    def col(self, i: int) -> np.ndarray:
        return np.fromiter((r[i] for r in self.rows), np.int64, len(self.rows))


class Mover:
    def __init__(self, backend: Backend, manager: TierManager, group_size: int,
                 numel_per_block: int):
        self.backend = backend
        self.manager = manager
        self.group_size = group_size
        self.numel = numel_per_block

    def region(self, tier: Tier, slab, tenant: str) -> Region:
        self.manager.spaces.of(tier).check_access(tenant, slab)
        return Region(SPACE[tier], slab.offset, slab.nbytes, tenant)

    def _staging_region(self, slab, tenant: str) -> Region:
        self.manager.spaces.staging.check_access(tenant, slab)
        return Region("staging", slab.offset, slab.nbytes, tenant)

    def submit(self, moves: Sequence[Move], after: Sequence = ()) -> list:
        """Enqueue the ops of ``moves``; returns their tickets (none for drops)."""
        table, spaces = self.manager.table, self.manager.spaces
        quant, d2h, h2d = _Cols(), _Cols(), {}
        for m in moves:
            if m.purpose == "drop":
                continue
            tenant = table.tenants[table.tenant[m.block]]
            src_space, dst_space = spaces.of(m.src_tier), spaces.of(m.dst_tier)
            src_space.check_access(tenant, m.src)
            dst_space.check_access(tenant, m.dst)
            if m.dst_tier == Tier.L2:
                if m.staging is not None:
                    spaces.staging.check_access(tenant, m.staging)
                    quant.add(m.src.offset, m.staging.offset, m.src.nbytes, m.staging.nbytes,
                              m.dst.offset)
                else:
                    d2h.add(m.src.offset, m.dst.offset, m.src.nbytes)
            else:
                h2d.setdefault(m.purpose, _Cols()).add(m.src.offset, m.dst.offset, m.src.nbytes)
        be, tickets = self.backend, []
        if quant:
            q = be.submit(Quantize(purpose="demote", src_space="l1", dst_space="staging",
                                   src_offsets=quant.col(0), dst_offsets=quant.col(1),
                                   src_sizes=quant.col(2), dst_sizes=quant.col(3),
                                   numel=self.numel, group_size=self.group_size),
                          Stream.COMPUTE, after)
            tickets.append(be.submit(Copy(purpose="demote", direction="d2h",
                                          src_space="staging", dst_space="l2",
                                          src_offsets=quant.col(1), dst_offsets=quant.col(4),
                                          sizes=quant.col(3)), Stream.D2H, [q]))
        if d2h:
            tickets.append(be.submit(Copy(purpose="demote", direction="d2h", src_space="l1",
                                          dst_space="l2", src_offsets=d2h.col(0),
                                          dst_offsets=d2h.col(1), sizes=d2h.col(2)),
                                     Stream.D2H, after))
        for purpose, cols in h2d.items():
            tickets.append(be.submit(Copy(purpose=purpose, direction="h2d", src_space="l2",
                                          dst_space="l1", src_offsets=cols.col(0),
                                          dst_offsets=cols.col(1), sizes=cols.col(2)),
                                     Stream.H2D, after))
        return tickets

    def execute(self, moves: Sequence[Move], step: int, after: Sequence = ()):
        """Generator: run ``moves`` to completion and commit them (abort on a fault)."""
        if not moves:
            return
        tickets = self.submit(moves, after)
        try:
            yield self.backend.wait(tickets)
        except KernelError:
            self.manager.abort(moves)
            raise
        self.manager.commit(moves, step)

    def finish(self, moves: Sequence[Move], tickets: Sequence, step: int):
        """Generator: wait for already-submitted ``tickets`` then commit ``moves``."""
        try:
            yield self.backend.wait(tickets)
        except KernelError:
            self.manager.abort(moves)
            raise
        self.manager.commit(moves, step)

    def attention(self, ids, n_valid, tenant: str, query, flops: float, layout,
                  softmax_scale: float = 1.0, after=()):
        """Submit one attention step over L1-resident ``ids`` read on behalf of ``tenant``.

        The tenant check is vectorised over the page table's tenant column (which mirrors
        each slab's tag): reading any block of another tenant raises AccessDenied.
        """
        from .errors import AccessDenied
        from .ops import Attention
        table = self.manager.table
        ids = np.asarray(ids, np.int64)
        tid = table.tenant_id(tenant)
        bad = ids[(table.tenant[ids] != tid) | (table.tier[ids] != Tier.L1)]
        if len(bad):
            self.manager.spaces.l1.num_denied += len(bad)
            raise AccessDenied(f"tenant {tenant!r} denied: block {int(bad[0])} is not its own "
                               f"L1-resident block")
        op = Attention(purpose="decode", space="l1", offsets=table.offset[ids],
                       fmts=table.fmt[ids].copy(), n_valid=np.asarray(n_valid, np.int64),
                       sizes=table.nbytes[ids].copy(), query=query, layout=layout,
                       group_size=self.group_size, flops=flops, softmax_scale=softmax_scale)
        return self.backend.submit(op, Stream.COMPUTE, after)

    def block_region(self, block: int) -> tuple[Region, Fmt]:
        """Where an L1-resident block's bytes are, checked for its own tenant."""
        table = self.manager.table
        tenant = table.tenants[table.tenant[block]]
        return self.region(Tier(table.tier[block]), table.handle[block], tenant), Fmt(table.fmt[block])

    def read_as(self, tenant: str, block: int) -> Region:
        """A tenant asks for a block's bytes: AccessDenied unless it owns it."""
        table = self.manager.table
        return self.region(Tier(table.tier[block]), table.handle[block], tenant)
