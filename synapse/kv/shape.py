"""A model's KV geometry, and every conversion between tokens, bytes and blocks.

One KV block is ``block_tokens`` tokens of K and V for every layer and KV head. Its bytes
are the same whichever way they are laid out: token-major ``[BT, 2, L, H, D]`` in one
slot (the scenario drivers' attention kernel, ``synapse.hw.kv_layout``), or ``2L``
*planes* of ``[BT, H, D]`` (one per layer and K/V, the layout a transformers model's
attention reads as a view: ``synapse.kv.torch_backend``).

INT4 (``synapse.hw.int4``) has two key formats, ``int4_keys``: ``"token"`` quantizes
keys and values in groups of ``G`` consecutive elements along ``head_dim``;
``"channel"`` (KIVI) quantizes a plane's keys with one group per (head, dim) channel over
the block's ``BT`` tokens, its values per token as before. For one layer of one block,
with ``n = BT*H*D`` elements per plane, the INT4 bytes are a *layer row*: the key row
then the value row,

    key row:   n/2 + 4*H*D (channel)   or   n/2 + 4*n/G (token)
    value row: n/2 + 4*n/G

and a block's INT4 size is ``L`` layer rows, whichever layout holds it (the scenario
drivers' token-major block groups the same elements the same way: ``hw.kv_layout``), so
the manager's accounting (``sizes[Fmt.INT4]``) is exact for both. Every row is a
multiple of 16 bytes when ``BT % 4 == 0`` and ``head_dim % 8 == 0``.

Budgets arrive in tokens (``TieredCache``), in bytes or as a percentage of the working
set (scenarios); ``KVShape`` turns any of them into whole blocks, once, here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from ..hw import int4 as int4_ref
from ..hw.kv_layout import check_key_format


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    int4_group: int = 64
    itemsize: int = 2  # bytes per element in L1 (fp16 / bf16)
    int4_keys: str = int4_ref.DEFAULT_KEY_FORMAT  # "channel" or "token" (module docstring)

    def __post_init__(self) -> None:
        check_key_format(self.int4_keys)

    # -- per block ---------------------------------------------------------------------
    @functools.cached_property  # a frozen shape: computed once (read per block moved)
    def numel(self) -> int:
        """Elements of one block (K and V, every layer and head)."""
        return 2 * self.layers * self.kv_heads * self.block_tokens * self.head_dim

    @functools.cached_property
    def token_bytes(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.itemsize

    @functools.cached_property
    def fp16_bytes(self) -> int:
        """Bytes of one block at full precision (the L1 format)."""
        return self.numel * self.itemsize

    @property
    def int4_bytes(self) -> int:
        """Bytes of one block in INT4: ``L`` layer rows (see the module docstring)."""
        return self.layers * self.layer_int4_bytes

    # -- per plane (one layer's K or V of one block) -------------------------------------
    @property
    def planes(self) -> int:
        return 2 * self.layers

    @property
    def plane_numel(self) -> int:
        return self.block_tokens * self.kv_heads * self.head_dim

    @property
    def plane_fp16_bytes(self) -> int:
        return self.plane_numel * self.itemsize

    def _token_row_bytes(self) -> int:
        n, g = self.plane_numel, self.int4_group
        if n % g:  # no INT4 for this shape (int4_ok); the figure only sizes unused staging
            return n // 2 + 4 * -(-n // g)
        return int4_ref.int4_nbytes(n, g)

    @property
    def key_row_int4_bytes(self) -> int:
        """INT4 bytes of one plane of keys (one layer of one block)."""
        if self.int4_keys == "channel":
            return int4_ref.channel_nbytes(self.block_tokens, self.kv_heads * self.head_dim)
        return self._token_row_bytes()

    @property
    def value_row_int4_bytes(self) -> int:
        """INT4 bytes of one plane of values (always per token)."""
        return self._token_row_bytes()

    @property
    def layer_int4_bytes(self) -> int:
        """A layer row: the key row, then the value row."""
        return self.key_row_int4_bytes + self.value_row_int4_bytes

    @property
    def int4_ok(self) -> bool:
        """Whether INT4 groups fit this shape (they run along head_dim within a token)."""
        return self.int4_group in int4_ref.GROUP_SIZES and self.head_dim % self.int4_group == 0

    @functools.cached_property  # immutable, and drivers ask for it every step
    def layout(self):
        """The token-major block layout the scenario kernels read (``hw.kv_layout``); built
        once (its checks cost 55 us, paid per attention op before)."""
        from ..hw.kv_layout import KVLayout
        return KVLayout(self.layers, self.kv_heads, self.head_dim, self.block_tokens,
                        self.int4_group, self.int4_keys)

    # -- budgets -------------------------------------------------------------------------
    def blocks_for_tokens(self, tokens: int) -> int:
        return math.ceil(max(0, tokens) / self.block_tokens)

    def bytes_for_tokens(self, tokens: int) -> int:
        """Bytes of L1 that hold ``tokens`` tokens, in whole blocks."""
        return self.blocks_for_tokens(tokens) * self.fp16_bytes

    def blocks_in(self, nbytes: int) -> int:
        """Whole full-precision blocks that fit in ``nbytes``."""
        return max(0, int(nbytes)) // self.fp16_bytes
