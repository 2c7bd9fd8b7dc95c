"""Skip-end ring: device slots for streaming layer weights, where no tensor ever wraps.

Layers are placed in streaming order, each at the next aligned offset after the previous
one; a layer that would cross the end of the ring goes to offset 0 instead, and every
forward pass starts again with layer 0 at offset 0, so the placement is the same on every
pass and is computed once. A slot is reused by a later layer whose slot intersects it;
the writer of that layer must first wait until the earlier occupants have been read.

Operations (L = layers, k = overlapping pairs):

- construction                        O(L log L + k): offsets, overlap sets, lookahead
- ``slot(i)``, ``overlaps(i)``        O(1), precomputed
- ``mark_read(i, token)``             O(1): remember the completion token of layer i's read
- ``blockers(i)``                     O(|overlaps(i)|): tokens a writer of i must wait for
- ``resident_all``, ``max_lookahead()``  O(1), precomputed
- ``clear_tokens()``                  O(L), after a full synchronisation

Tokens are opaque (CUDA events, SimPy events): the ring only stores and returns them.
"""

from __future__ import annotations

from collections.abc import Sequence

from synapse.errors import CapacityError


class SkipEndRing:
    """Precomputed slot placement and reuse ordering for a cyclic stream of layers."""

    def __init__(self, capacity_bytes: int, layer_bytes: Sequence[int], alignment_bytes: int = 256) -> None:
        if alignment_bytes <= 0:
            raise CapacityError(f"alignment_bytes must be positive, got {alignment_bytes}")
        if not layer_bytes:
            raise CapacityError("a ring needs at least one layer, got none")
        bad = [(i, n) for i, n in enumerate(layer_bytes) if n <= 0]
        if bad:
            raise CapacityError(f"layer sizes must be positive; (layer, bytes) {bad[:5]}")
        largest = max(layer_bytes)
        if largest > capacity_bytes:
            raise CapacityError(f"ring of {capacity_bytes} bytes cannot hold the largest layer of "
                                f"{largest} bytes (layer {list(layer_bytes).index(largest)})")
        self.capacity_bytes = capacity_bytes
        self.layer_bytes = tuple(layer_bytes)
        self.alignment_bytes = alignment_bytes
        self.num_layers = len(self.layer_bytes)
        self.offsets = self._place()
        self._overlaps = self._find_overlaps()
        self.resident_all = all(len(o) == 1 for o in self._overlaps)
        self._max_lookahead = self._find_max_lookahead()
        self._last_read: list[object | None] = [None] * self.num_layers

    # -- placement ---------------------------------------------------------------------

    def slot(self, i: int) -> tuple[int, int]:
        self._check_layer(i)
        return self.offsets[i], self.layer_bytes[i]

    def overlaps(self, i: int) -> tuple[int, ...]:
        """Layers whose slots intersect layer i's, ascending, i itself included."""
        self._check_layer(i)
        return self._overlaps[i]

    def max_lookahead(self) -> int:
        """Largest k such that layers i..i+k (cyclically) never overlap, for every i.

        So layer i can be computing while i+1..i+k are resident or in flight; L-1 when
        the ring holds every layer at once.
        """
        return self._max_lookahead

    # -- reuse ordering ----------------------------------------------------------------

    def mark_read(self, i: int, token: object) -> None:
        """Record ``token`` as the completion of the latest read of layer i's slot;
        call it after the compute that reads layer i has been enqueued."""
        self._check_layer(i)
        self._last_read[i] = token

    def blockers(self, i: int) -> list[object]:
        """Tokens a writer of layer i must wait for: the latest read of every layer whose
        slot intersects i's (i's own previous-pass copy included). Complete only while
        no overlapping layer has a write still unread, which a prefetch depth of at most
        ``max_lookahead()`` guarantees."""
        self._check_layer(i)
        tokens = (self._last_read[j] for j in self._overlaps[i])
        return [t for t in tokens if t is not None]

    def clear_tokens(self) -> None:
        self._last_read = [None] * self.num_layers

    # -- internals ---------------------------------------------------------------------

    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for a ring of {self.num_layers} layers")

    def _place(self) -> tuple[int, ...]:
        offsets = []
        end = 0
        for i, nbytes in enumerate(self.layer_bytes):
            start = -(-end // self.alignment_bytes) * self.alignment_bytes
            if i == 0 or start + nbytes > self.capacity_bytes:
                start = 0  # skip the end: a tensor never wraps around
            offsets.append(start)
            end = start + nbytes
        return tuple(offsets)

    def _find_overlaps(self) -> tuple[tuple[int, ...], ...]:
        # Sweep by start offset: a slot can only meet later-starting slots that begin
        # before it ends, so each intersecting pair is found once.
        found: list[set[int]] = [{i} for i in range(self.num_layers)]
        order = sorted(range(self.num_layers), key=lambda i: self.offsets[i])
        for pos, i in enumerate(order):
            end = self.offsets[i] + self.layer_bytes[i]
            for j in order[pos + 1 :]:
                if self.offsets[j] >= end:
                    break
                found[i].add(j)
                found[j].add(i)
        return tuple(tuple(sorted(s)) for s in found)

    def _find_max_lookahead(self) -> int:
        # Sliding window over the cyclic order: for each start l, extend r while layer r
        # meets nothing already in the window; the shortest such window bounds k.
        n = self.num_layers
        inside = [False] * n
        best = n - 1
        r = 0
        for left in range(n):
            while r < left + n and not any(inside[j] for j in self._overlaps[r % n]):
                inside[r % n] = True
                r += 1
            best = min(best, r - left - 1)
            inside[left] = False
        return best
