"""Needle in a haystack: a generated long-context attention workload.

The model is stated in vectors so the hardware can realise it byte for byte. Block ``b``
has a small structured key ``k_b`` (r = 3 + noise_rank numbers, rounded to fp16 as it
will be stored) and step ``t`` a query ``q_t`` (float32):

    k_b = [ -alpha*ln(rank_b) (+ sink_nats for block 0),  b / num_blocks,  z_b,  needle_b ]
    q_t = [ 1,  recency_nats,  noise_std/sqrt(m) * g_t,  needle_nats_t ]

so the logit of every token of block b at step t is ``q_t . k_b``: Zipf heavy hitters
(ranks a random permutation), a recency slope, rank-m noise, and a needle term that is
non-zero only at a few "echo" steps after the needle was read and, strongly, at the
question step. Every token of a block shares the structured key (the hardware pads the
rest of head_dim with random values that the zero tail of the query ignores), so a
block's attention mass is exactly ``n_valid_b * exp(q_t . k_b)`` normalised. That is the
ground truth: a block is *used* at step t when its mass over all blocks is at least
``access_factor / num_blocks_t``; the policies see masses over what is resident.

Steps: the prompt arrives in chunks (one step each, a representative query per chunk),
then one token per decode step. Everything is seeded; nothing depends on the backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..scenarios.schema import NeedleWorkload


@dataclass
class Step:
    index: int
    phase: str                 # "prefill" | "decode"
    new_blocks: np.ndarray     # block positions that start at this step
    tokens: int                # tokens present after this step's input
    append: tuple | None       # decode: (block position, token offset in it)
    is_question: bool


class NeedleTrace:
    def __init__(self, cfg: NeedleWorkload, block_tokens: int, seed: int):
        self.cfg = cfg
        self.bt = block_tokens
        self.ctx = cfg.context_tokens
        self.num_ctx_blocks = math.ceil(self.ctx / block_tokens)
        self.chunk_blocks = cfg.prefill_chunk_tokens // block_tokens
        self.num_prefill = math.ceil(self.num_ctx_blocks / self.chunk_blocks)
        self.num_decode = cfg.decode_steps
        self.num_steps = self.num_prefill + self.num_decode
        total_tokens = self.ctx + self.num_decode
        self.num_blocks = math.ceil(total_tokens / block_tokens)
        self.needle = min(int(cfg.needle_position * self.num_ctx_blocks), self.num_ctx_blocks - 1)
        q = cfg.question_step % self.num_decode
        self.question_step = self.num_prefill + q
        self.seed = seed
        rng = np.random.default_rng([seed, 0x6E656564])  # "need"
        self._build_keys(rng)
        self._build_queries(rng)
        self._tokens = np.array([self._tokens_at(t) for t in range(self.num_steps)], np.int64)
        self._needed = None
        self._next_use = None
        self._pool = None
        self._logits, self._logits_t = None, -1  # every block's logit at one step

    # -- the model ------------------------------------------------------------------
    def _build_keys(self, rng) -> None:
        c, n, m = self.cfg, self.num_blocks, self.cfg.noise_rank
        ranks = rng.permutation(n) + 1
        k = np.zeros((n, 3 + m))
        k[:, 0] = -c.zipf_alpha * np.log(ranks)
        k[0, 0] += c.sink_nats
        k[:, 1] = np.arange(n) / n
        k[:, 2:2 + m] = rng.standard_normal((n, m))
        k[self.needle, -1] = 1.0
        self.keys = k.astype(np.float16).astype(np.float64)  # as the hardware stores them

    def _build_queries(self, rng) -> None:
        c, m = self.cfg, self.cfg.noise_rank
        q = np.zeros((self.num_steps, 3 + m))
        q[:, 0] = 1.0
        q[:, 1] = c.recency_nats
        q[:, 2:2 + m] = c.noise_std / math.sqrt(m) * rng.standard_normal((self.num_steps, m))
        # Echoes: prompt chunks after the needle's that attend back to it.
        first = self.needle // self.chunk_blocks + 1
        span = max(1, int(round(c.needle_echo_span * self.num_ctx_blocks / self.chunk_blocks)))
        window = np.arange(first, min(self.num_prefill, first + span))
        if c.needle_echoes and len(window):
            picks = rng.choice(window, size=min(c.needle_echoes, len(window)), replace=False)
            q[picks, -1] = c.needle_echo_nats
            self.echo_steps = np.sort(picks)
        else:
            self.echo_steps = np.zeros(0, np.int64)
        q[self.question_step, -1] = c.question_nats
        self.queries = q.astype(np.float32).astype(np.float64)

    @property
    def key_dims(self) -> int:
        return self.keys.shape[1]

    def _tokens_at(self, t: int) -> int:
        if t < self.num_prefill:
            return min((t + 1) * self.chunk_blocks * self.bt, self.ctx)
        return self.ctx + (t - self.num_prefill) + 1

    def step(self, t: int) -> Step:
        tokens = int(self._tokens[t])
        prev = int(self._tokens[t - 1]) if t else 0
        first_new = math.ceil(prev / self.bt)
        last = math.ceil(tokens / self.bt)
        new = np.arange(first_new, last, dtype=np.int64)
        append = None
        if t >= self.num_prefill:
            pos = tokens - 1
            append = (pos // self.bt, pos % self.bt)
        return Step(t, "prefill" if t < self.num_prefill else "decode", new, tokens, append,
                    t == self.question_step)

    def n_valid(self, t: int, blocks: np.ndarray) -> np.ndarray:
        tokens = int(self._tokens[t])
        # np.clip, cheaper; in place: one new array, not four (a fresh array of thousands
        # of blocks costs more in cache misses than the arithmetic)
        out = np.multiply(blocks, self.bt)
        np.subtract(tokens, out, out=out)
        np.maximum(out, 0, out=out)
        return np.minimum(out, self.bt, out=out)

    def logits(self, t: int, blocks: np.ndarray) -> np.ndarray:
        """Per-token logit of each block at step t (the same for every token of a block).

        A block's logit is its key row times the step's query, whatever other blocks are
        asked for (the BLAS product gives each row the same value in any batch of rows:
        checked on random subsets, and by check_sim_parity); so for many blocks (every
        resident one, each step) it is one product over all keys, kept for the step, and
        a gather: the rows of thousands of blocks were most of the cost."""
        if len(blocks) * 4 < len(self.keys):  # a few blocks: their rows (take: cheaper)
            return self.keys.take(blocks, axis=0) @ self.queries[t]
        if self._logits_t != t:
            self._logits = self.keys @ self.queries[t]
            self._logits_t = t
        return self._logits.take(blocks)  # (a new array: callers change it in place)

    def masses(self, t: int, blocks: np.ndarray, n_valid: np.ndarray | None = None) -> np.ndarray:
        """Attention mass of each block at step t, normalised over ``blocks`` only
        (``n_valid``: ``n_valid(t, blocks)`` when the caller has it already)."""
        blocks = np.asarray(blocks, np.int64)
        if len(blocks) == 0:
            return np.zeros(0)
        nv = self.n_valid(t, blocks) if n_valid is None else n_valid
        with np.errstate(divide="ignore"):
            z = self.logits(t, blocks)
            z += np.log(nv)
        z -= z.max()
        w = np.exp(z, out=z)
        w /= w.sum()
        return w

    # -- ground truth over all blocks -------------------------------------------------
    _ROWS = 64  # steps per pass of the ground truth (a small buffer, reused)

    def _compute_needed(self) -> None:
        """Mass >= access_factor / live, over a [steps, blocks] logit matrix computed
        a few steps at a time into one reused buffer (row by row the same numbers as the
        whole matrix at once; a fresh 35 MB matrix costs more in page faults than the
        arithmetic on a shared VM). Kept per step as the positions used, ascending.

        Full blocks all hold ``block_tokens`` tokens, a constant factor that softmax
        cancels; only each step's last (partial) block needs its token count.
        """
        n = self.num_blocks
        live = -(-self._tokens // self.bt)                                 # [T]
        q = self.queries.astype(np.float32)
        k = self.keys.T.astype(np.float32)
        partial = np.log((self._tokens - (live - 1) * self.bt) / self.bt).astype(np.float32)
        bound = (self.cfg.access_factor / live).astype(np.float32)
        rows = min(self._ROWS, self.num_steps)
        buf = np.empty((rows, n), np.float32)
        peak = np.empty((rows, 1), np.float32)
        used = np.empty((rows, n), bool)
        needed: list[np.ndarray] = []
        for lo in range(0, self.num_steps, rows):
            hi = min(lo + rows, self.num_steps)
            z, m = buf[: hi - lo], peak[: hi - lo]
            np.matmul(q[lo:hi], k, out=z)
            for t in range(lo, hi):
                if live[t] < n:  # blocks not written yet (row slices)
                    z[t - lo, live[t]:] = -np.inf
            z[np.arange(hi - lo), live[lo:hi] - 1] += partial[lo:hi]
            np.max(z, axis=1, keepdims=True, out=m)
            z -= m
            np.exp(z, out=z)
            np.sum(z, axis=1, keepdims=True, out=m)
            z /= m
            u = used[: hi - lo]
            np.greater_equal(z, bound[lo:hi, None], out=u)
            for row in u:
                ids = np.flatnonzero(row)
                ids.flags.writeable = False  # shared: needed() hands it out
                needed.append(ids)
        self._needed = needed

    def needed(self, t: int) -> np.ndarray:
        """Block positions used at step t (policy-independent ground truth; read-only)."""
        if self._needed is None:
            self._compute_needed()
        return self._needed[t]

    def needed_matrix(self) -> np.ndarray:
        """[steps, blocks]: whether step t uses block b."""
        if self._needed is None:
            self._compute_needed()
        out = np.zeros((self.num_steps, self.num_blocks), bool)
        for t, ids in enumerate(self._needed):
            out[t, ids] = True
        return out

    def next_use(self, blocks: np.ndarray, t: int) -> np.ndarray:
        """First step after t at which each block is used (a large number if never)."""
        return self._next_use_row(t)[blocks]

    def _next_use_row(self, t: int) -> np.ndarray:
        """Every block's next use after step t, kept from the last call's step and moved
        on from it: only the blocks used between the two steps change. Not a [steps,
        blocks] table (35 MB at 128k: its page faults cost more than a run's updates)."""
        if self._next_use is None:
            if self._needed is None:
                self._compute_needed()
            # every (block, step) use as one sorted key, block-major: the first key past
            # (block, s) is the block's next use after s, if it is still that block's
            span = self.num_steps + 1
            steps = np.repeat(np.arange(self.num_steps, dtype=np.int64),
                              [len(ids) for ids in self._needed])
            keys = np.sort(np.concatenate(self._needed).astype(np.int64) * span + steps)
            self._next_use = [span, np.append(keys, self.num_blocks * span), -1, None]
        span, keys, at, row = self._next_use
        if row is None or t < at:  # first call, or back in time: every block's, searched
            at, row = -1, self._next_after(np.arange(self.num_blocks, dtype=np.int64), -1)
        for s in range(at + 1, t + 1):
            used = self._needed[s]
            row[used] = self._next_after(used, s)
        self._next_use[2:] = [max(at, t), row]
        return row

    def _next_after(self, blocks: np.ndarray, s: int) -> np.ndarray:
        span, keys = self._next_use[0], self._next_use[1]
        base = blocks.astype(np.int64) * span
        hit = keys[np.searchsorted(keys, base + s, side="right")] - base
        return np.where(hit < span, hit, 2**30).astype(np.int32)

    # -- data for the hardware ---------------------------------------------------------
    def query_vector(self, t: int, layers: int, heads: int, head_dim: int) -> np.ndarray:
        """q for every layer and head: the structured query, zeros beyond it (float32)."""
        q = np.zeros((layers, heads, head_dim), np.float32)
        q[:, :, : self.key_dims] = self.queries[t].astype(np.float32)
        return q

    def block_payload(self, b: int, layers: int, heads: int, head_dim: int) -> np.ndarray:
        """Block b's KV as stored, token-major [block_tokens, 2, layers, heads, head_dim]
        fp16: K carries the structured key then random padding; V is random."""
        kv = np.empty((self.bt, 2, layers, heads, head_dim), np.float16)
        self.write_block_payload(b, kv)
        return kv

    def payload_pool(self, backend=None):
        """The pool payloads are windows of (``PayloadPool.for_backend`` on first use)."""
        if self._pool is None:
            from .payload import PayloadPool
            self._pool = PayloadPool.for_backend(self.seed, backend)
        return self._pool

    def _payload_key(self, b: int) -> tuple:
        return (self.seed, 0x6B76, int(b))

    def block_window(self, b: int, block_numel: int) -> int | None:
        """Where block b's payload starts in the pool (elements; None if not one window)."""
        return self.payload_pool().window_start(self._payload_key(b), block_numel)

    def write_block_payload(self, b: int, out: np.ndarray, tok_lo: int = 0) -> None:
        """Tokens ``tok_lo`` to ``tok_lo + len(out)`` of ``block_payload(b, ...)`` into
        ``out`` ([n, 2, layers, heads, head_dim] fp16), e.g. a pinned staging slice: one
        copy, where building the block and then staging it took two."""
        shape = (self.bt,) + out.shape[1:]
        window = self.payload_pool().take(self._payload_key(b), int(np.prod(shape)),
                                          copy=False).reshape(shape)
        n = out.shape[0]
        out[:] = window[tok_lo:tok_lo + n]
        out[:, 0, :, :, : self.key_dims] = self.keys[b].astype(np.float16)
