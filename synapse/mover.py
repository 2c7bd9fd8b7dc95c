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

from .backend import Backend
from .blocks import Fmt, Tier
from .errors import KernelError
from .manager import Move, TierManager
from .ops import Copy, Quantize, Region, Stream

SPACE = {Tier.L1: "l1", Tier.L2: "l2"}


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
        table = self.manager.table
        quant_pairs, quant_moves, d2h_pairs, h2d = [], [], [], {}
        for m in moves:
            if m.purpose == "drop":
                continue
            tenant = table.tenants[table.tenant[m.block]]
            src = self.region(m.src_tier, m.src, tenant)
            dst = self.region(m.dst_tier, m.dst, tenant)
            if m.dst_tier == Tier.L2:
                if m.staging is not None:
                    quant_pairs.append((src, self._staging_region(m.staging, tenant)))
                    quant_moves.append((m, dst))
                else:
                    d2h_pairs.append((src, dst))
            else:
                h2d.setdefault(m.purpose, []).append((src, dst))
        tickets = []
        if quant_pairs:
            q = self.backend.submit(Quantize(purpose="demote", pairs=tuple(quant_pairs),
                                             numel=(self.numel,) * len(quant_pairs),
                                             group_size=self.group_size),
                                    Stream.COMPUTE, after)
            pairs = tuple((stg, dst) for (_, stg), (_, dst) in zip(quant_pairs, quant_moves))
            tickets.append(self.backend.submit(Copy(purpose="demote", direction="d2h",
                                                    pairs=pairs), Stream.D2H, [q]))
        if d2h_pairs:
            tickets.append(self.backend.submit(Copy(purpose="demote", direction="d2h",
                                                    pairs=tuple(d2h_pairs)), Stream.D2H, after))
        for purpose, pairs in h2d.items():
            tickets.append(self.backend.submit(Copy(purpose=purpose, direction="h2d",
                                                    pairs=tuple(pairs)), Stream.H2D, after))
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

    def block_region(self, block: int) -> tuple[Region, Fmt]:
        """Where an L1-resident block's bytes are, checked for its own tenant."""
        table = self.manager.table
        tenant = table.tenants[table.tenant[block]]
        return self.region(Tier(table.tier[block]), table.handle[block], tenant), Fmt(table.fmt[block])

    def read_as(self, tenant: str, block: int) -> Region:
        """A tenant asks for a block's bytes: AccessDenied unless it owns it."""
        table = self.manager.table
        return self.region(Tier(table.tier[block]), table.handle[block], tenant)
