"""Turns the manager's moves into backend ops, and back into page-table updates.

Every op carries all the blocks of one kind of move at once (columns of offsets), so a
step costs a few launches whatever the number of blocks:
- demotion to INT4: ``Quantize`` on the compute stream (L1 -> device staging), then one
  D2H copy (staging -> L2) that waits on it;
- fetch of an INT4 block: one H2D copy (L2 -> staging), then ``Dequantize`` (staging ->
  L1, full precision) that waits on it;
- other demotions and fetches: one copy on their direction's stream;
- compaction: the relocations a compacting tier owes after frees, one ``Copy`` per tier
  (device to device on the compute stream for L1), submitted before any other op, which
  then waits on it.
Every region an op touches is checked against the owning tenant first
(``check_access``), on every backend. ``execute`` is a generator: submit, wait, then
``commit``; a ``KernelError`` while waiting aborts the moves (every block stays in the
tier it was in) and propagates.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter
from typing import Sequence

import numpy as np

from .backend import Backend
from .blocks import Fmt, Tier
from .errors import KernelError
from .manager import TierManager
from .moves import Move, MoveBatch
from .ops import Copy, Dequantize, Quantize, Region, Stream, Zero

SPACE = {Tier.L1: "l1", Tier.L2: "l2"}
_L1 = int(Tier.L1)
_T_L1, _T_L2 = Tier.L1, Tier.L2  # members as constants: the enum's attribute lookup is slow
_TIER, _FMT = {int(t): t for t in Tier}, {int(f): f for f in Fmt}  # without the enum call
# which stream carries a compacting tier's relocation copy (ordered before later ops)
_RELOCATE = {Tier.L1: ("d2d", Stream.COMPUTE), Tier.L2: ("h2h", Stream.D2H)}


def _col(values) -> np.ndarray:
    return np.fromiter(values, np.int64)


_offset_of, _nbytes_of = attrgetter("offset"), attrgetter("nbytes")


def _offsets(handles: Sequence) -> np.ndarray:
    return np.fromiter([h.offset for h in handles], np.int64, len(handles))  # (a list
    # comprehension beats map(attrgetter) on Python 3.11)


def _sizes(handles: Sequence) -> np.ndarray:
    return np.fromiter([h.nbytes for h in handles], np.int64, len(handles))


def _group(moves: list) -> tuple | None:
    """(sources, destinations, staging slabs) of these moves as columns; None if none."""
    if not moves:
        return None
    cols = tuple(zip(*moves))
    return cols[6], cols[7], cols[8]


class Mover:
    def __init__(self, backend: Backend, manager: TierManager, shape):
        self.backend = backend
        self.manager = manager
        self.shape = shape
        self.group_size = shape.int4_group
        self.numel = shape.numel
        self._barrier: list = []  # relocation tickets later ops wait on

    @property
    def barrier(self) -> list:
        """Tickets an op writing or reading a compacting tier must wait on (the last
        compaction); pass them as ``after`` when submitting outside the mover."""
        return list(self._barrier)

    def relocate(self) -> list:
        """Submit the copies (then the zero-on-free memsets) that compaction owes, if any;
        later ops wait on them. Returns their tickets."""
        owed = self.manager.take_relocations()
        tickets = []
        for tier, (moves, zero) in owed.items():
            direction, stream = _RELOCATE[tier]
            space = SPACE[tier]
            last = list(self._barrier)
            if moves:
                nbytes = self.manager.spaces.of(tier).slot_bytes
                last = [self.backend.submit(
                    Copy(purpose="compact", direction=direction, src_space=space,
                         dst_space=space, src_offsets=_col(m[1] for m in moves),
                         dst_offsets=_col(m[2] for m in moves),
                         sizes=np.full(len(moves), nbytes, np.int64)), stream, last)]
            if zero:
                last = [self.backend.submit(
                    Zero(purpose="zero_on_free", regions=tuple(Region(space, o, n) for o, n in zero)),
                    stream, last)]
            tickets += last
        if tickets:
            self._barrier = tickets
        return tickets

    def step_done(self) -> None:
        """The driver finished a step: submit what compaction still owes (frees outside a
        move, a request released), then let the backend reach its safe point (the
        virtual-memory L1 unmaps past its live end once those copies have read it)."""
        self.relocate()
        self.backend.step_done()

    def submit_op(self, op, stream: Stream, after: Sequence = ()):
        """Submit an op of the caller's own (an ingest into new L1 blocks) after the
        compaction it may overlap."""
        self.relocate()
        return self.backend.submit(op, stream, list(after) + self._barrier)

    def region(self, tier: Tier, slab, tenant: str) -> Region:
        self.manager.spaces.of(tier).check_access(tenant, slab)
        return Region(SPACE[tier], slab.offset, slab.nbytes, tenant)

    def _staging_region(self, slab, tenant: str) -> Region:
        self.manager.spaces.staging.check_access(tenant, slab)
        return Region("staging", slab.offset, slab.nbytes, tenant)

    def submit(self, moves: Sequence[Move], after: Sequence = ()) -> list:
        """Enqueue the ops of ``moves`` (after any compaction they depend on); returns
        their tickets (none for drops)."""
        table = self.manager.table
        self.relocate()
        if not moves:
            return []
        if moves.__class__ is MoveBatch and (moves.stagings is None or moves.all_staged):
            # the manager's batch of one kind (a round's demotions, a step's fetches): its
            # columns, no Python loop per block
            if moves.dsts is None:
                return []  # drops: no bytes move
            b = moves
            blocks, srcs, dsts = b.blocks, b.srcs, b.dsts
            # the sources' sizes from the page table's column (a block's size there is
            # its handle's: the manager records the size it allocated), not a pass over
            # the handles
            src_sizes = table.nbytes[b.ids]
            stagings = b.stagings or repeat(None)
            purposes, src_tiers, dst_tiers = (b.purpose,), (b.src_tier,), (b.dst_tier,)
            unstaged = 0 if b.stagings else len(blocks)
            uniform = True
            cols = (None, None, src_tiers, dst_tiers, None, None, srcs, dsts,
                    b.stagings or (None,))
        else:
            src_sizes = None
            if moves.__class__ is MoveBatch:  # some staged, some not: as rows
                moves = moves.rows()
            # the moves as columns: one transpose in C, then no Python loop per block for
            # a batch of one kind
            cols = tuple(zip(*moves))
            if "drop" in cols[1]:
                moves = [m for m in moves if m.purpose != "drop"]
                if not moves:
                    return []
                cols = tuple(zip(*moves))
            blocks, purposes, src_tiers, dst_tiers, _, _, srcs, dsts, stagings = cols
            unstaged = stagings.count(None)
            uniform = purposes.count(purposes[0]) == len(moves) \
                and dst_tiers.count(dst_tiers[0]) == len(moves) \
                and src_tiers.count(src_tiers[0]) == len(moves) and unstaged in (0, len(moves))
        n = len(blocks)
        after = list(after) + self._barrier
        names = table.tenants
        tenants = [names[0]] * n if len(names) == 1 else \
            list(map(names.__getitem__, table.tenant[list(blocks)].tolist()))  # (one tenant:
        # every block's, without a gather)
        self._check_access(moves, tenants, cols if uniform else None)
        # column groups (srcs, dsts, stagings) per kind of op, in the order they are submitted
        quant = d2h = None
        h2d: dict[str, tuple] = {}
        dequant: dict[str, tuple] = {}
        if uniform:
            group = (srcs, dsts, stagings)
            if dst_tiers[0] == _T_L2:
                if unstaged:
                    d2h = group
                else:
                    quant = group
            elif unstaged:
                h2d[purposes[0]] = group
            else:
                dequant[purposes[0]] = group
        else:
            q_moves, d_moves, h_moves, dq_moves = [], [], {}, {}
            for m in moves:
                if m.dst_tier == _T_L2:
                    (d_moves if m.staging is None else q_moves).append(m)
                elif m.staging is not None:
                    dq_moves.setdefault(m.purpose, []).append(m)
                else:
                    h_moves.setdefault(m.purpose, []).append(m)
            quant = _group(q_moves)
            d2h = _group(d_moves)
            h2d = {p: _group(g) for p, g in h_moves.items()}
            dequant = {p: _group(g) for p, g in dq_moves.items()}
        be, tickets = self.backend, []
        if quant:
            q_srcs, q_dsts, q_stg = quant
            staging = _offsets(q_stg)
            staged_bytes = _sizes(q_stg)
            q = be.submit(Quantize(purpose="demote", src_space="l1", dst_space="staging",
                                   src_offsets=_offsets(q_srcs),
                                   dst_offsets=staging,
                                   src_sizes=_sizes(q_srcs) if src_sizes is None else src_sizes,
                                   dst_sizes=staged_bytes,
                                   numel=self.numel, group_size=self.group_size,
                                   int4_keys=self.shape.int4_keys,
                                   block_tokens=self.shape.block_tokens),
                          Stream.COMPUTE, after)
            tickets.append(be.submit(Copy(purpose="demote", direction="d2h",
                                          src_space="staging", dst_space="l2",
                                          src_offsets=staging.copy(),
                                          dst_offsets=_offsets(q_dsts),
                                          sizes=staged_bytes.copy()), Stream.D2H, [q]))
        if d2h:
            g_srcs, g_dsts, _ = d2h
            tickets.append(be.submit(Copy(purpose="demote", direction="d2h", src_space="l1",
                                          dst_space="l2",
                                          src_offsets=_offsets(g_srcs),
                                          dst_offsets=_offsets(g_dsts),
                                          sizes=_sizes(g_srcs) if src_sizes is None
                                          else src_sizes),
                                     Stream.D2H, after))
        for purpose, (g_srcs, g_dsts, _) in h2d.items():
            tickets.append(be.submit(Copy(purpose=purpose, direction="h2d", src_space="l2",
                                          dst_space="l1",
                                          src_offsets=_offsets(g_srcs),
                                          dst_offsets=_offsets(g_dsts),
                                          sizes=_sizes(g_srcs) if src_sizes is None
                                          else src_sizes),
                                     Stream.H2D, after))
        for purpose, (g_srcs, g_dsts, g_stg) in dequant.items():
            staging = _offsets(g_stg)
            q_bytes = _sizes(g_srcs) if src_sizes is None else src_sizes
            c = be.submit(Copy(purpose=purpose, direction="h2d", src_space="l2",
                               dst_space="staging", src_offsets=_offsets(g_srcs),
                               dst_offsets=staging, sizes=q_bytes), Stream.H2D, after)
            tickets.append(be.submit(
                Dequantize(purpose=purpose, src_space="staging", dst_space="l1",
                           src_offsets=staging.copy(), dst_offsets=_offsets(g_dsts),
                           src_sizes=q_bytes.copy(), dst_sizes=_sizes(g_dsts),
                           numel=self.numel, group_size=self.group_size,
                           int4_keys=self.shape.int4_keys, block_tokens=self.shape.block_tokens),
                Stream.COMPUTE, [c]))
        return tickets

    def _check_access(self, moves: Sequence[Move], tenants: Sequence[str],
                      cols: tuple | None = None) -> None:
        """Every region a move touches belongs to the block's tenant (AccessDenied).
        ``cols``: the moves as columns when they are all of one kind (same direction,
        all staged or none)."""
        spaces = self.manager.spaces
        l1, l2, staging = spaces.l1, spaces.l2, spaces.staging
        # The handles each allocator must own, in move order (``all_accessible`` only
        # answers yes or no, so the order does not matter), while every move is L1 <-> L2.
        in_l1, in_l2, staged_t, staged_h, between = [], [], [], [], True
        if cols is not None:
            src_tier, dst_tier = cols[2][0], cols[3][0]
            srcs, dsts, stagings = cols[6], cols[7], cols[8]
            if src_tier == _T_L1 and dst_tier == _T_L2:
                in_l1, in_l2 = srcs, dsts
            elif src_tier == _T_L2 and dst_tier == _T_L1:
                in_l1, in_l2 = dsts, srcs
            else:
                between = False
            if stagings[0] is not None:
                staged_t, staged_h = tenants, stagings
        else:
            for m, t in zip(moves, tenants):
                src_tier, dst_tier = m.src_tier, m.dst_tier
                if src_tier == _T_L1 and dst_tier == _T_L2:
                    in_l1.append(m.src)
                    in_l2.append(m.dst)
                elif src_tier == _T_L2 and dst_tier == _T_L1:
                    in_l1.append(m.dst)
                    in_l2.append(m.src)
                else:
                    between = False
                    break
                if m.staging is not None:
                    staged_t.append(t)
                    staged_h.append(m.staging)
        if between and l1.all_accessible(tenants, in_l1) and l2.all_accessible(tenants, in_l2) \
                and (not staged_h or staging.all_accessible(staged_t, staged_h)):
            return  # every check passes (the common case), checked per allocator at once
        # Otherwise one by one, in order, so the same check raises and is counted.
        for m, tenant in zip(moves, tenants):
            (l1 if m.src_tier == Tier.L1 else l2).check_access(tenant, m.src)
            if m.dst_tier == Tier.L2:
                l2.check_access(tenant, m.dst)
            else:
                l1.check_access(tenant, m.dst)
            if m.staging is not None:
                staging.check_access(tenant, m.staging)

    def execute(self, moves: Sequence[Move], step: int, after: Sequence = ()):
        """Generator: run ``moves`` to completion and commit them (abort on a fault)."""
        if not moves:
            return
        tickets = self.submit(moves, after)
        yield from self.finish(moves, tickets, step)

    def finish(self, moves: Sequence[Move], tickets: Sequence, step: int):
        """Generator: wait for already-submitted ``tickets`` then commit ``moves`` (the
        compaction their frees cause is submitted at once; later ops wait on it)."""
        try:
            yield self.backend.wait(tickets)
        except KernelError:
            self.manager.abort(moves)
            raise
        self._barrier = []  # everything submitted so far has completed
        self.manager.commit(moves, step)
        self.relocate()

    def attention(self, ids, n_valid, tenant: str, query, flops: float, layout,
                  softmax_scale: float = 1.0, after=(), readback: bool = True):
        """Submit one attention step over L1-resident ``ids`` read on behalf of ``tenant``.

        The tenant check is vectorised over the page table's tenant column (which mirrors
        each slab's tag): reading any block of another tenant raises AccessDenied.
        """
        return self._attention(ids, n_valid, None, [tenant], query, flops, layout,
                               softmax_scale, after, readback)

    def attention_batch(self, ids, n_valid, seg_starts, tenants, queries, flops: float,
                        layout, softmax_scale: float = 1.0, after=(), readback: bool = True):
        """Submit one attention op for several requests (one launch): request i reads
        the L1-resident ``ids[seg_starts[i]:seg_starts[i + 1]]`` (``n_valid`` tokens of
        each) on behalf of ``tenants[i]`` with ``queries[i]`` (None on the simulator).
        The tenant check is ``attention``'s, per request: AccessDenied names the reader
        of the first block that is not its own."""
        return self._attention(ids, n_valid, np.asarray(seg_starts, np.int64), tenants,
                               queries, flops, layout, softmax_scale, after, readback)

    def _attention(self, ids, n_valid, seg, tenants, query, flops, layout, softmax_scale,
                   after, readback):
        from .errors import AccessDenied
        from .ops import Attention
        table = self.manager.table
        ids = np.asarray(ids, np.int64)
        tids = [table.tenant_id(t) for t in tenants]
        self.relocate()
        reader = tids[0]
        if seg is not None and tids.count(reader) != len(tids):  # several tenants' requests
            reader = np.repeat(np.array(tids, table.tenant.dtype), seg[1:] - seg[:-1])
        if len(table.tenants) == 1 and reader is tids[0] and table.is_ids_in(ids, _T_L1):
            bad = ()  # one tenant, and ids is the page table's own answer of L1's blocks
        else:
            bad = np.flatnonzero((table.tenant[ids] != reader) | (table.tier[ids] != _L1))
        if len(bad):
            self.manager.count_denied(len(bad))
            who = tenants[0 if seg is None else int(np.searchsorted(seg, bad[0], "right")) - 1]
            raise AccessDenied(f"tenant {who!r} denied: block {int(ids[bad[0]])} is not its "
                               f"own L1-resident block")
        op = Attention(purpose="decode", space="l1", offsets=table.offset[ids],
                       fmts=table.fmt[ids], n_valid=np.asarray(n_valid, np.int64),
                       sizes=table.nbytes[ids], query=query, layout=layout,
                       group_size=self.group_size, flops=flops, softmax_scale=softmax_scale,
                       readback=readback, segments=seg)
        return self.backend.submit(op, Stream.COMPUTE, list(after) + self._barrier)

    def block_region(self, block: int) -> tuple[Region, Fmt]:
        """Where an L1-resident block's bytes are, checked for its own tenant."""
        table = self.manager.table
        tenant = table.tenants[table.tenant[block]]
        return (self.region(_TIER[int(table.tier[block])], self.manager.handle(block), tenant),
                _FMT[int(table.fmt[block])])

    def l1_offsets(self, blocks: Sequence[int]) -> list[int]:
        """Byte offsets of L1-resident blocks, each checked for its own tenant: the
        offsets of ``block_region`` of each, with the checks per allocator at once (one
        by one, to raise the same error, when one fails)."""
        table, manager = self.manager.table, self.manager
        blocks = list(blocks)
        handles = list(map(manager.handle, blocks))
        names = table.tenants
        tenants = list(map(names.__getitem__, table.tenant[blocks].tolist()))
        if (table.tier[blocks] == _L1).all() \
                and manager.spaces.l1.all_accessible(tenants, handles):
            return list(map(_offset_of, handles))
        return [self.block_region(b)[0].offset for b in blocks]

    def read_as(self, tenant: str, block: int) -> Region:
        """A tenant asks for a block's bytes: AccessDenied unless it owns it."""
        table = self.manager.table
        return self.region(Tier(table.tier[block]), self.manager.handle(block), tenant)
