"""Attention scores without eager attention: queries observed by hooks, scored in the cache.

A forward hook on each attention module's ``q_proj`` keeps its output, and a forward
pre-hook on the attention module keeps the rotary ``position_embeddings`` it is called
with. When the layer then calls ``cache.update``, the cache rebuilds the query states
exactly as the module does (view, optional ``q_norm``, transpose, the modeling file's own
``apply_rotary_pos_emb``) and scores them against the keys it is about to return:
``softmax(q k^T * module.scaling)`` with the causal mask, in float32. The model keeps its
attention implementation (sdpa, flash, ...); the scores cost one extra q.K^T per layer,
no extra projection. Supported: attention modules with ``q_proj``, ``head_dim``,
``scaling`` and rotary position embeddings (Llama, Qwen2, Qwen3, Mistral, ...); anything
else is refused by name when the cache is attached.
"""

from __future__ import annotations

import inspect
import sys

import torch

from .errors import UnsupportedModel

FUSED_FROM_QUERIES = 64  # CUDA: from this many queries a step (prefill), the fused path
# where the fused path serves: CUDA (the CPU's direct path is exact and cheap there; tests
# and benchmarks/profile_hf_step.py --fused-scores add "cpu" to run the fused arithmetic)
FUSED_DEVICES = {"cuda"}


def fused_for(queries: int, keys: torch.Tensor) -> bool:
    """Whether ``token_mass_fused`` scores a step of ``queries`` queries over ``keys``."""
    return queries >= FUSED_FROM_QUERIES and keys.device.type in FUSED_DEVICES


def attention_modules(model) -> list:
    """The self-attention module of every decoder layer, in layer order."""
    mods = []
    for name, m in model.named_modules():
        if hasattr(m, "q_proj") and hasattr(m, "layer_idx") and hasattr(m, "head_dim"):
            mods.append(m)
    mods.sort(key=lambda m: m.layer_idx)
    return mods


class _RopeWatch:
    """The modeling module's ``apply_rotary_pos_emb``, wrapped to keep the rotated query
    it returns: the attention module calls it right before ``cache.update``, so the cache
    scores the very query the model attends with, without computing it again. One per
    modeling module, shared by every tap on it; the original is put back with the last."""

    _active: dict = {}

    def __init__(self, module):
        self.module, self.orig = module, module.apply_rotary_pos_emb
        self.last: torch.Tensor | None = None
        self.users = 0
        watch = self

        def apply_rotary_pos_emb(*args, **kwargs):
            out = watch.orig(*args, **kwargs)
            if isinstance(out, tuple):  # (q, k): the query is taken as is
                watch.last = out[0]
            return out
        apply_rotary_pos_emb.__wrapped__ = self.orig
        module.apply_rotary_pos_emb = apply_rotary_pos_emb

    @classmethod
    def on(cls, module) -> "_RopeWatch":
        w = cls._active.get(module.__name__)
        if w is None:
            w = cls._active[module.__name__] = cls(module)
        w.users += 1
        return w

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.module.apply_rotary_pos_emb = self.orig
            del _RopeWatch._active[self.module.__name__]

    def take(self) -> torch.Tensor | None:
        q, self.last = self.last, None
        return q


class QueryTap:
    """The query each attention layer attends with, kept until the cache scores it.

    Where the modeling module applies rotary embeddings through its own
    ``apply_rotary_pos_emb`` (Llama, Qwen2, Qwen3, Mistral, ...), the rotated query it
    returns is taken as is (``_RopeWatch``): nothing is recomputed. Otherwise a forward
    hook on ``q_proj`` and a pre-hook on the attention module keep what is needed to
    rebuild it (view, ``q_norm``, transpose, rotary) when the cache asks."""

    def __init__(self, model) -> None:
        mods = attention_modules(model)
        self.model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if not mods:
            raise UnsupportedModel(
                f"{type(model).__name__}: no attention module with q_proj, head_dim and layer_idx "
                f"found; attention scores (policies h2o and lru, trace capture) need a decoder "
                f"whose attention has them (Llama, Qwen2, Qwen3, Mistral, ...). Use policy "
                f"'fifo' or 'sinks', which need no scores")
        self.modules = {m.layer_idx: m for m in mods}
        self.rope = {}
        for m in mods:
            fn = getattr(sys.modules.get(type(m).__module__), "apply_rotary_pos_emb", None)
            if fn is None or not hasattr(m, "scaling"):
                raise UnsupportedModel(
                    f"{type(m).__name__} (layer {m.layer_idx}): its modeling module has no "
                    f"apply_rotary_pos_emb or the module no scaling; TieredCache cannot rebuild "
                    f"its queries. Use policy 'fifo' or 'sinks'")
            self.rope[m.layer_idx] = fn
        # GPT-J's form rotates one tensor, ``(x, sin, cos)``, on the first ``rotary_dim``
        # dims of [B, Q, H, D]: the query is rebuilt that way (never passed two tensors)
        self.one_tensor_rope = {i: list(inspect.signature(fn).parameters)[:2] != ["q", "k"]
                                for i, fn in self.rope.items()}
        self._watches = [_RopeWatch.on(mod) for mod in
                         {sys.modules[type(m).__module__] for m in mods}]
        self._watch_of = {m.layer_idx: _RopeWatch._active[type(m).__module__] for m in mods}
        self._q: dict[int, torch.Tensor] = {}
        self._pos: dict[int, tuple] = {}
        self._handles = []
        for idx, m in self.modules.items():
            self._handles.append(m.q_proj.register_forward_hook(self._q_hook(idx)))
            self._handles.append(m.register_forward_pre_hook(self._pos_hook(idx), with_kwargs=True))

    def _q_hook(self, idx):
        def hook(_mod, _args, out):
            self._q[idx] = out
        return hook

    def _pos_hook(self, idx):
        def hook(_mod, args, kwargs):
            pe = kwargs.get("position_embeddings")
            if pe is None and len(args) > 1:
                pe = args[1]
            self._pos[idx] = pe
        return hook

    def query(self, layer_idx: int) -> torch.Tensor:
        """The layer's query states [batch, heads, q_len, head_dim], as the module builds them."""
        m = self.modules.get(layer_idx)
        out = self._q.pop(layer_idx, None)
        pe = self._pos.pop(layer_idx, None)
        rotated = self._watch_of[layer_idx].take() if m is not None else None
        if rotated is not None and out is not None and rotated.shape[-2] == out.shape[-2]:
            return rotated
        if m is None or out is None:
            raise UnsupportedModel(f"layer {layer_idx}: no query was observed before cache.update; "
                                   f"the attention module does not call q_proj before the cache")
        q = out.view(*out.shape[:-1], -1, m.head_dim)
        if self.one_tensor_rope[layer_idx]:
            return self._one_tensor_query(layer_idx, m, q, pe)
        if getattr(m, "q_norm", None) is not None:
            q = m.q_norm(q)
        q = q.transpose(1, 2)
        if pe is not None:
            cos, sin = pe
            q, _ = self.rope[layer_idx](q, q, cos, sin)
        return q

    def _one_tensor_query(self, layer_idx: int, m, q: torch.Tensor, pe) -> torch.Tensor:
        if pe is None:
            raise UnsupportedModel(
                f"model type {self.model_type!r} (layer {layer_idx}): its attention was called "
                f"without position_embeddings, so TieredCache cannot rebuild the rotated query "
                f"that policies 'h2o' and 'lru' score; use policy 'fifo' or 'sinks'")
        sin, cos = pe
        rope, rd = self.rope[layer_idx], getattr(m, "rotary_dim", None)
        if rd:
            q = torch.cat((rope(q[..., :rd], sin, cos), q[..., rd:]), dim=-1)
        else:
            q = rope(q, sin, cos)
        return q.transpose(1, 2)

    def scaling(self, layer_idx: int) -> float:
        return float(self.modules[layer_idx].scaling)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for w in self._watches:
            w.release()
        self._watches = []


SCORE_TRANSIENT_BYTES = 64 << 20  # bound on the logits a score pass holds at once


def token_mass(q: torch.Tensor, k: torch.Tensor, scaling: float, past: int,
               max_bytes: int = SCORE_TRANSIENT_BYTES) -> torch.Tensor:
    """Attention each key receives, averaged over batch, heads and queries: float32 [keys].

    ``q`` [B, Hq, Q, D], ``k`` [B, Hkv, N, D] (any strides); query i sees keys
    ``j < past + i + 1`` (``past = N - Q``: the keys before this step's). Query heads
    share their KV head's keys without copying them (grouped-query attention), and the
    queries are taken a few rows at a time so the logits held at once stay under
    ``max_bytes`` (about 3 MiB per query row at 32k keys and 16 query heads). Logits are
    computed in the keys' dtype and normalised in float32, as eager attention does.
    """
    b, hq, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    row_bytes = b * hq * n * (k.element_size() + 4)
    rows = max(1, min(nq, max_bytes // max(1, row_bytes)))
    kt = k.transpose(-1, -2)  # [B, Hkv, D, N], a view
    total = None  # the first piece is the total so far (0 + x is x: no zeros to add to)
    for lo in range(0, nq, rows):
        hi = min(nq, lo + rows)
        qc = (q if rows == nq else q[:, :, lo:hi]).to(k.dtype).reshape(b, hk, g * (hi - lo), d)
        logits = torch.matmul(qc, kt).view(b, hk, g, hi - lo, n)
        if hi > lo + 1 or nq > 1:
            r = torch.arange(lo, hi, device=k.device)[:, None]
            c = torch.arange(n, device=k.device)[None, :]
            logits = logits.masked_fill(c > past + r, float("-inf"))
        part = torch.softmax(logits.to(torch.float32) * scaling, dim=-1).sum(dim=(0, 1, 2, 3))
        total = part if total is None else total.add_(part)
    return total / (b * hq * nq)


class DecodeScores:
    """``token_mass`` of a decode step (one query a layer), batched over the layers: per
    layer one matmul writes its logits into the step's buffer (3 torch ops a layer, where
    ``token_mass`` takes 10), and the normalisation and the sum over heads run once a step
    (``finish``), a few layers at a time so the float32 transient stays under
    ``max_bytes``. The buffer holds the keys' dtype: 16 MiB for 16 layers of 16 heads at
    32k keys in fp16. The arithmetic is ``token_mass``'s, operation by operation (logits in
    the keys' dtype, scaled and normalised in float32, summed over heads, divided by the
    heads), so each layer's masses are the same bits on the CPU (tests/test_hf_scores.py).
    Layers come in order from 0; one that does not (or whose scaling or key count
    differs from layer 0's) is refused, ``add`` returns False, and its caller scores it
    with ``token_mass``."""

    def __init__(self, layers: int, max_bytes: int = SCORE_TRANSIENT_BYTES // 2) -> None:
        self.layers, self.max_bytes = layers, max_bytes
        self.buf = self.rows = self.scaling = None
        self.count = 0

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor, scaling: float) -> bool:
        b, hq, _, d = q.shape
        hk, n = k.shape[1], k.shape[2]
        if layer != self.count:
            return False
        if self.buf is None:
            self.buf = torch.empty((self.layers, b, hk, hq // hk, n), dtype=k.dtype,
                                   device=k.device)
            self.rows, self.scaling = self.buf.unbind(0), scaling
        elif scaling != self.scaling or self.buf.shape[1:] != (b, hk, hq // hk, n) \
                or self.buf.dtype != k.dtype:
            return False
        if q.dtype != k.dtype:
            q = q.to(k.dtype)
        torch.matmul(q.reshape(b, hk, hq // hk, d), k.transpose(-1, -2), out=self.rows[layer])
        self.count += 1
        return True

    def reset(self) -> None:
        """Let an unfinished step's buffer go (a pass that failed half-way)."""
        self.buf = self.rows = self.scaling = None
        self.count = 0

    def finish(self) -> list:
        """The step's token masses of layers 0, 1, ...: float32 [keys] each. The buffer
        is let go: the next ``add`` starts a step."""
        buf, count, s = self.buf, self.count, self.scaling
        self.reset()
        if buf is None:
            return []
        _, b, hk, g, n = buf.shape
        # float32 a logit: the widened copy, the scaled one and the softmax's output
        piece = max(1, min(count, self.max_bytes // max(1, b * hk * g * n * 12)))
        out = []
        for lo in range(0, count, piece):
            x = buf if piece >= self.layers == count else buf[lo:min(count, lo + piece)]
            if x.dtype != torch.float32:
                x = x.float()
            out.extend((torch.softmax(x * s, dim=-1).sum(dim=(1, 2, 3)) / (b * hk * g)).unbind(0))
        return out[:count]


def decode_mass(q: torch.Tensor, k: torch.Tensor, scaling: float,
                allowed: torch.Tensor) -> torch.Tensor:
    """``scores.token_mass`` of one query per row for a whole batch: ``q`` [B, Hq, 1, D],
    ``k`` [B, Hkv, N, D], ``allowed`` [B, 1, 1, N] bool (a row's own keys; None: all). Per row the
    attention each key receives, averaged over heads: float32 [B, N] (zero off the row's
    keys). Logits in the keys' dtype, normalised in float32, as ``token_mass``."""
    b, hq, _, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    logits = torch.matmul(q.to(k.dtype).reshape(b, hk, hq // hk, d), k.transpose(-1, -2))
    logits = logits.to(torch.float32) * scaling                # [B, Hkv, g, N]
    if allowed is not None:  # None: every key of every row
        logits = logits.masked_fill(~allowed.view(b, 1, 1, n), float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(1, 2)) / hq


def block_mass(tok: torch.Tensor, block_index: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Sum of ``tok`` per block: ``block_index[j]`` is the (live) block of key j."""
    out = torch.zeros(num_blocks, dtype=torch.float32, device=tok.device)
    return out.index_add_(0, block_index, tok)


def _lse_cpu(q, k, causal: bool, scale: float) -> torch.Tensor:
    """log-sum-exp of each query row's logits (CPU flash attention's own)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, k, 0.0, causal, scale=scale)[1]


_NARROW_V: dict = {}
_DUMMY: dict = {}
_CONTIGUOUS: dict = {}  # (device index, with a bias) -> True once strided inputs were refused
used: set = set()  # how masses were computed ("row lse given", "bias", "widened")


def _zeros_like_keys(k: torch.Tensor) -> torch.Tensor:
    """A zero value tensor of 8 dims for ``k``'s batch, heads and length, cut from one
    buffer kept per device and dtype (allocating one per call made the caching allocator
    the prefill's bottleneck)."""
    b, h, n, _ = k.shape
    key = (k.device, k.dtype)
    buf = _DUMMY.get(key)
    if buf is None or buf.numel() < b * h * n * 8:
        buf = _DUMMY[key] = torch.zeros(max(b * h * n * 8, 1 << 20), dtype=k.dtype, device=k.device)
    return buf[: b * h * n * 8].view(b, h, n, 8)


def _efficient(q, k, v, bias, causal: bool, scale: float):
    """(out, lse) of CUDA's memory-efficient attention kernel. Plane views are passed as
    they are (the kernel reads [B, N, H, D] rows with any aligned strides, which is the
    planes' own layout); made contiguous only where the kernel has refused that."""
    key = (q.device.index, bias is not None)  # a refused bias must not slow the rest
    if _CONTIGUOUS.get(key):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    try:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale)
    except RuntimeError:
        if _CONTIGUOUS.get(key):
            raise
        _CONTIGUOUS[key] = True
        return _efficient(q, k, v, bias, causal, scale)
    return out[0], out[1][..., : q.shape[-2]]


def _lse_cuda(q, k, causal: bool, scale: float) -> torch.Tensor:
    """log-sum-exp of each query row's logits, from CUDA's memory-efficient attention
    kernel (fused: no logits in memory). Its values are a dummy of 8 dims when the kernel
    takes a narrower value than key (it does on sm_80+), else the keys themselves."""
    narrow = _NARROW_V.get(q.device.index, True)
    v = _zeros_like_keys(k) if narrow else k
    try:
        return _efficient(q, k, v, None, causal, scale)[1].float()
    except RuntimeError:
        if not narrow:
            raise
        _NARROW_V[q.device.index] = False
        return _lse_cuda(q, k, causal, scale)


def _grouped(x: torch.Tensor, g: int) -> torch.Tensor:
    """KV heads [B, Hkv, N, D] -> one per query head [B, Hkv * g, N, D] (query head h
    reads KV head h // g)."""
    return x if g == 1 else x.repeat_interleave(g, dim=1)


def row_lse(q: torch.Tensor, k: torch.Tensor, scaling: float, past: int, lse=None) -> torch.Tensor:
    """Each query row's normaliser ``lse_i = log sum_j exp(s q_i . k_j)`` over the keys
    it sees (past keys unmasked, then the chunk's own causally; combined with logaddexp):
    float32 [B, Hq, Q]. Pass 1 of ``token_mass_fused``; the model's attention computes
    the same numbers (``synapse.hf.prefix_attention.split_attention``), and where it has,
    the cache hands them in instead."""
    lse = lse or (_lse_cuda if q.is_cuda else _lse_cpu)
    b, hq, nq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    q = q.to(k.dtype)
    out = lse(q, _grouped(k[:, :, past:], g), True, scaling).reshape(b, hq, nq)
    # the query heads of a group stacked along the sequence: one longer query of their
    # KV head (no mask, so nothing else changes)
    stacked = q.reshape(b, hk, g * nq, d)
    for lo in range(0, past, PAST_PIECE):
        part = lse(stacked, k[:, :, lo:min(past, lo + PAST_PIECE)], False, scaling)
        out = torch.logaddexp(out, part.reshape(b, hq, nq))
    return out


def _columns_cpu(kq, qk, v, bias, causal: bool, scale: float):
    """(log column sum, correction) of ``_columns``, on CPU flash attention (it takes an
    additive mask of any strides; its values must be as wide as its keys)."""
    b, h, m, d = kq.shape
    if v.shape[-1] != d:
        v = torch.nn.functional.pad(v, (0, d - v.shape[-1]))
    mask = bias.unsqueeze(2).expand(b, h, m, bias.shape[-1])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        kq, qk, v, 0.0, causal, attn_mask=mask, scale=scale)[:2]
    return lse, out[..., 0]


def _columns_cuda(kq, qk, v, bias, causal: bool, scale: float):
    """``_columns`` on CUDA's memory-efficient kernel at the vectors' own head_dim: the
    row bias is its ``attn_bias``, broadcast over the kernel's queries by a stride of 0
    (the kernel reads a bias tile per key tile: one row here, from cache)."""
    b, h, m, _ = kq.shape
    mask = bias.unsqueeze(2).expand(b, h, m, bias.shape[-1])
    narrow = _NARROW_V.get((kq.device.index, "bias"), True)
    if not narrow:
        v = torch.nn.functional.pad(v, (0, kq.shape[-1] - v.shape[-1]))
    try:
        out, lse = _efficient(kq, qk, v, mask, causal, scale)
    except RuntimeError:
        if not narrow:
            raise
        _NARROW_V[(kq.device.index, "bias")] = False
        return _columns_cuda(kq, qk, v, bias, causal, scale)
    return lse.float(), out[..., 0]


def _columns_cudnn(kq, qk, v, bias, causal: bool, scale: float):
    """``_columns`` on torch's cuDNN attention (on the H200 it ran the chunks' own
    attention about 4x faster than the memory-efficient kernel runs pass 1: 121 against
    478 ms in a 32k prefill's profile). Values of 8 dims where it takes them, else of the
    keys' width."""
    b, h, m, d = kq.shape
    mask = bias.unsqueeze(2).expand(b, h, m, bias.shape[-1])
    if _NARROW_V.get(("cudnn", kq.device.index)) is False:
        v = torch.nn.functional.pad(v, (0, d - v.shape[-1]))
    try:
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            kq, qk, v, mask, True, 0.0, causal, False, scale=scale)
    except (RuntimeError, NotImplementedError):
        if v.shape[-1] == d:
            raise
        _NARROW_V[("cudnn", kq.device.index)] = False
        return _columns_cudnn(kq, qk, v, bias, causal, scale)
    out, lse = r[0], r[1]
    return lse.reshape(b, h, -1)[..., :m].float(), out[..., 0]


# Pass 2's CUDA kernels, fastest first. A kernel is taken for a (device, causal) only
# after its first call agreed with the memory-efficient kernel's on the same inputs:
# torch calls cuDNN with whatever strides the bias has, and a broadcast it misread would
# give wrong masses without an error.
PASS2_KERNELS = ("cudnn", "efficient")
_PASS2: dict = {}  # (device index, causal) -> the kernel verified for it


def _agree(a, b) -> bool:
    (la, oa), (lb, ob) = a, b
    ca, cb = torch.exp(la) * (1 + oa.float()), torch.exp(lb) * (1 + ob.float())
    return bool(torch.allclose(ca, cb, rtol=1e-2, atol=1e-3 * float(cb.abs().max()) + 1e-30))


def _columns_chosen(kq, qk, v, bias, causal: bool, scale: float):
    key = (kq.device.index, causal)
    # causal: square only (cuDNN's causal is top-left, as the other kernel's; a padded
    # chunk's is not square, and there the two might differ)
    fits = "cudnn" in PASS2_KERNELS and (not causal or qk.shape[-2] == kq.shape[-2])
    kernel = _PASS2.get(key) if fits else "efficient"
    used.add(f"pass 2 on {kernel or 'efficient'}")
    if kernel == "cudnn":
        return _columns_cudnn(kq, qk, v, bias, causal, scale)
    ref = _columns_cuda(kq, qk, v, bias, causal, scale)  # refusing the bias raises here
    if kernel is None:  # the first call that cuDNN could serve: compare the two
        _PASS2[key] = "efficient"
        try:
            got = _columns_cudnn(kq, qk, v, bias, causal, scale)
        except (RuntimeError, NotImplementedError) as e:
            used.add(f"cudnn refused: {type(e).__name__}")
        else:
            if _agree(got, ref):
                _PASS2[key] = "cudnn"
            else:
                used.add("cudnn refused: other masses")
    return ref


_BIAS_REFUSED: set = set()  # devices whose kernel refused the bias: the widened vectors


def _columns(kq, qk, v, bias, causal: bool, scale: float):
    """Pass 2's kernel, keys as its queries ``kq`` [B, H, M, D] and queries as its keys
    ``qk`` [B, H, L, D], with the additive bias ``bias`` [B, H, L] (``-lse_i`` rounded to
    the vectors' dtype) on every row and values ``v`` [B, H, L, 8] whose first column is
    ``exp(-lse_i - bias_i) - 1`` (the rounding the bias dropped). Its log-sum-exp is then
    ``log sum_i exp(s k.q_i + bias_i)`` and its output's first column the average of the
    correction under those weights, so ``exp(lse) * (1 + out)`` is the column sum
    ``sum_i exp(s k.q_i - lse_i)`` to float32 precision. Returns (lse, out) float32 [B, H, M]."""
    fn = _columns_chosen if kq.is_cuda else _columns_cpu
    lse, out = fn(kq, qk, v, bias, causal, scale)
    return lse, out.float()


def token_mass_fused(q: torch.Tensor, k: torch.Tensor, scaling: float, past: int,
                     lse=None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``token_mass`` for many queries (a prefill chunk) without ever holding the logits:
    two passes of a fused attention kernel that reports each row's log-sum-exp.

    1. Each query row's normaliser ``lse_i`` (``row_lse``), or ``rows`` where the
       model's attention already computed them (float32 [B, Hq, Q], over these keys).
    2. Each key's column sum ``sum_i exp(s q_i . k_j - lse_i)``: the same kernel with the
       roles swapped, keys as queries and queries as keys, ``-lse_i`` an additive bias
       on key i (``_columns``: in the vectors' dtype, its rounding carried by the values),
       so the kernel's own log-sum-exp *is* the log of the column sum and it runs at the
       model's head_dim. The chunk's own keys see only later queries: both sequences
       reversed, that is a causal mask; past keys see every query, in any order, so the
       reversed ones serve them too.
    The query heads of a group are stacked along the sequence where nothing is masked
    (the kernel sums over them); for the causal part each query head gets its KV head's
    keys. Past keys are read in place, in pieces of ``PAST_PIECE``. Where the device's
    kernel refuses the bias, the vectors are widened instead (``_token_mass_widened``).
    Equal to ``token_mass`` up to floating-point rounding (tests/test_hf_scores.py).
    """
    b, hq, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    dt = k.dtype
    if rows is None:
        rows = row_lse(q, k, scaling, past, lse)
    else:
        used.add("row lse given")
    if k.device in _BIAS_REFUSED or lse is not None:
        return _token_mass_widened(q, k, scaling, past, rows, lse)
    # the queries reversed and padded to a multiple of 8 (the kernels' alignment of the
    # bias rows): padding queries get a bias of -inf, so no key sees them
    pad = (-nq) % 8
    neg = -rows.flip(-1).contiguous()  # flip keeps its input's strides: plain rows here
    bias = neg.to(dt)
    corr = torch.expm1(neg - bias.float()).to(dt)
    qf = q.to(dt).flip(2).contiguous()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        bias = torch.nn.functional.pad(bias, (0, pad), value=float("-inf"))
        corr = torch.nn.functional.pad(corr, (0, pad))
    v = torch.nn.functional.pad(corr.unsqueeze(-1), (0, 7))   # [B, Hq, L, 8]
    mass = torch.empty(n, dtype=torch.float32, device=k.device)
    try:
        lse_o, c_o = _columns(_grouped(k[:, :, past:].flip(2), g), qf, v, bias, True, scaling)
        mass[past:] = (torch.exp(lse_o) * (1 + c_o)).sum(dim=(0, 1)).flip(0)
        if past:
            nl = nq + pad
            qs, bs = qf.view(b, hk, g * nl, d), bias.view(b, hk, g * nl)
            vs = v.view(b, hk, g * nl, 8)
            for lo in range(0, past, PAST_PIECE):
                hi = min(past, lo + PAST_PIECE)
                lse_p, c_p = _columns(k[:, :, lo:hi], qs, vs, bs, False, scaling)
                mass[lo:hi] = (torch.exp(lse_p) * (1 + c_p)).sum(dim=(0, 1))
    except RuntimeError:
        if not k.is_cuda:
            raise
        _BIAS_REFUSED.add(k.device)
        return _token_mass_widened(q, k, scaling, past, rows, lse)
    used.add("bias")
    return mass / (b * hq * nq)


def _token_mass_widened(q, k, scaling: float, past: int, lse_row, lse=None) -> torch.Tensor:
    """Pass 2 of ``token_mass_fused`` with ``-lse_i`` carried by the vectors themselves:
    queries and keys widened by 8 dims, two of which hold ``-lse_i`` (split into two parts
    of the vectors' dtype for float32 precision) against a 1. For a kernel without an
    additive bias; on CUDA the widened head_dim (136) takes a slower kernel than 128."""
    used.add("widened")
    lse = lse or (_lse_cuda if q.is_cuda else _lse_cpu)
    b, hq, nq, d = q.shape
    hk, n = k.shape[1], k.shape[2]
    g = hq // hk
    dt = k.dtype
    k_past, k_own = k[:, :, :past], k[:, :, past:]
    pad = 8
    qa = torch.empty((b, hq, nq, d + pad), dtype=dt, device=k.device)
    qa[..., :d] = q.to(dt) * scaling
    hi = (-lse_row).to(dt)
    qa[..., d] = hi
    qa[..., d + 1] = (-lse_row - hi.float()).to(dt)
    qa[..., d + 2:] = 0
    piece = min(PAST_PIECE, WIDE_PIECE)
    wide = torch.empty((b, hk, max(nq, min(past, piece)), d + pad), dtype=dt, device=k.device)
    wide[..., d:d + 2] = 1
    wide[..., d + 2:] = 0

    def widen(x):  # [k, 1, 1, 0...] in one buffer reused for every piece
        out = wide[:, :, : x.shape[2]]
        out[..., :d] = x
        return out

    mass = torch.empty(n, dtype=torch.float32, device=k.device)
    ko = widen(k_own).flip(2).contiguous()
    qa_f = qa.flip(2)
    own = torch.zeros(nq, dtype=torch.float32, device=k.device)
    for r in range(g):
        own += torch.exp(lse(ko, qa_f[:, r::g], True, 1.0)).sum(dim=(0, 1))
    mass[past:] = own.flip(0)
    if past:
        qa_stacked = qa.view(b, hk, g * nq, d + pad)
        for lo in range(0, past, piece):
            kp = widen(k_past[:, :, lo:lo + piece])
            mass[lo:lo + kp.shape[2]] = torch.exp(lse(kp, qa_stacked, False, 1.0)).sum(dim=(0, 1))
    return mass / (b * hq * nq)


PAST_PIECE = 32768  # past keys per pass: read in place, only the kernel's outputs grow
WIDE_PIECE = 8192   # the widened fallback copies its past keys: bounds that copy
