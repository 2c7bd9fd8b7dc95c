"""What the tier manager plans and the mover carries out: blocks changing tier.

- ``Move``: one block's move, a named tuple (drivers and audits build their own).
- ``MoveBatch``: moves of one kind (one purpose, one source tier, one destination tier
  and size) as columns: the block ids as one array, the handles and formats as lists.
  The manager returns its batches in this form, and the mover and ``TierManager.commit``
  read the columns, so a batch of hundreds of blocks is never transposed into a tuple
  per block and back on the hot path (that cost about a microsecond a block). A batch is
  still a sequence of ``Move``: iterating, indexing or comparing one builds its rows once.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import NamedTuple

import numpy as np

from .blocks import Fmt, Tier


class Move(NamedTuple):
    """One block changing tier (or leaving the tiers, for a drop)."""

    block: int
    purpose: str            # demote | drop | fetch | prefetch
    src_tier: Tier
    dst_tier: Tier
    src_fmt: Fmt
    dst_fmt: Fmt
    src: object             # slab the bytes are in now
    dst: object | None      # slab they go to (None for a drop)
    staging: object | None = None  # INT4 staging slab on the device (quantize on the way
                                   # out, dequantize on the way in)


_new_move = tuple.__new__  # Move(...) without the argument parsing: _new_move(Move, fields)


def moves_of(n: int, *columns) -> list[Move]:
    """``n`` moves from columns (iterables of field values, ``repeat`` for a constant):
    the tuples are built by ``map`` and ``zip`` in C, not by a Python loop per block."""
    return list(map(_new_move, repeat(Move, n), zip(*columns)))


class MoveBatch(Sequence):
    """Moves of one kind, as columns; see the module docstring.

    ``ids``: the blocks (int64, read-only; ``blocks`` the same as ints); ``srcs``: their
    handles now; ``dsts``: the handles they go to, each of ``dst_nbytes`` bytes (None for
    a drop); ``stagings``: the INT4 staging handles (None when no move is staged; a list
    with None where a block is not staged otherwise)."""

    __slots__ = ("purpose", "src_tier", "dst_tier", "ids", "blocks", "src_fmts", "dst_fmts",
                 "srcs", "dsts", "dst_nbytes", "stagings", "_rows")

    def __init__(self, purpose: str, src_tier: Tier, dst_tier: Tier, ids: np.ndarray,
                 blocks: list, src_fmts: list, dst_fmts: list, srcs: list,
                 dsts: list | None, dst_nbytes: int, stagings: list | None):
        self.purpose, self.src_tier, self.dst_tier = purpose, src_tier, dst_tier
        ids.flags.writeable = False  # shared by the busy marks, the page table, the hooks
        self.ids, self.blocks = ids, blocks
        self.src_fmts, self.dst_fmts = src_fmts, dst_fmts
        self.srcs, self.dsts, self.dst_nbytes, self.stagings = srcs, dsts, dst_nbytes, stagings
        self._rows: list[Move] | None = None

    @property
    def all_staged(self) -> bool:
        """Every move of the batch goes through a staging slot."""
        return self.stagings is not None and None not in self.stagings

    def rows(self) -> list[Move]:
        """The batch as ``Move`` tuples (built once)."""
        if self._rows is None:
            n = len(self.blocks)
            self._rows = moves_of(n, self.blocks, repeat(self.purpose), repeat(self.src_tier),
                                  repeat(self.dst_tier), self.src_fmts, self.dst_fmts,
                                  self.srcs, repeat(None) if self.dsts is None else self.dsts,
                                  repeat(None) if self.stagings is None else self.stagings)
        return self._rows

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i):
        return self.rows()[i]

    def __iter__(self):
        return iter(self.rows())

    def __add__(self, other):
        """``demote + prefetch``: the batch itself when the other side is empty (the
        manager never returns both), else a list of moves."""
        if not other:
            return self
        return self.rows() + list(other)

    def __radd__(self, other):
        if not other:
            return self
        return list(other) + self.rows()

    def __eq__(self, other):
        if isinstance(other, (list, tuple, MoveBatch)):
            return self.rows() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (compared by value, as a list)

    def __repr__(self) -> str:
        return (f"MoveBatch({self.purpose}, {self.src_tier.name} -> {self.dst_tier.name}, "
                f"{len(self.blocks)} blocks)")
