"""Attention of new tokens over a cached prefix on SDPA's fused causal kernels.

With P tokens in the cache and N > 1 new ones, transformers' ``sdpa`` builds an explicit
``[N, P + N]`` boolean mask, and ``scaled_dot_product_attention`` cannot take its flash or
memory-efficient causal path with an explicit mask. When that mask is exactly causal with
the offset P (no padding, no sliding window or other mask function, the keys positions
0..P+N-1), it equals torch's bottom-right-aligned causal bias
(``torch.nn.attention.bias.causal_lower_right``), which SDPA runs on the fused kernels.

Both halves are registered with transformers under one name, ``PREFIX_SDPA``:

- a mask function (``AttentionMaskInterface``) that returns that bias when the mask is
  exactly causal with an offset, and otherwise whatever ``sdpa``'s own mask function
  returns;
- an attention function (``AttentionInterface``) that runs SDPA with the bias, and hands
  anything else to transformers' own ``sdpa_attention_forward`` unchanged.

How the attention function runs the bias case: as two fused-attention calls whose
results are merged by their log-sum-exp (``split_attention``): the N queries over the P
prefix keys with no mask at all, and over their own N keys with the plain square causal
mask; ``out = o_p * w + o_n * (1 - w)``, ``w = sigmoid(lse_p - lse_n)``, which is exactly
softmax over the union of the two key sets. The kernels are torch's cuDNN attention
(on CUDA) and flash attention, tried in that order. Neither widens a grouped-query
model's prefix keys with ``repeat_kv``: flash takes fewer key heads natively, and for
cuDNN the query heads that share a key head are folded into one longer query sequence
(exact without a mask). torch's lower-right bias itself runs on the memory-efficient
kernel only, which needs as many key heads as query heads (``repeat_kv`` copies every
layer's whole cache) and is slower on Hopper. Where no kernel takes the inputs (fp32 on
CUDA, a head size they lack), the bias goes to SDPA as before.

``prefix_sdpa(model)`` selects it for the duration of a call, through
``model.set_attn_implementation``, and restores the model's own after; it does nothing
unless the model uses ``sdpa``. Decode steps (one query) and a prefill without a prefix
(N = P + N) keep ``sdpa``'s path exactly.
"""

from __future__ import annotations

import contextlib

import torch

PREFIX_SDPA = "synapse_prefix_sdpa"
_registered = False
# callable(layer_idx, lse [B, H, N] float32): where set (synapse.hf.chunk_attention, for a
# TieredCache that scores), each split layer's row log-sum-exp over all its keys goes there
lse_sink = None


def _lower_right_or_none(kwargs):
    """The bias when the mask ``kwargs`` describe is causal with an offset and 1 < N <
    kv_length; None when it is anything else (or a case ``sdpa`` already runs fused)."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.masking_utils import causal_mask_function
    if kwargs.get("mask_function", causal_mask_function) is not causal_mask_function:
        return None
    if kwargs.get("local_size") is not None or not kwargs.get("allow_is_causal_skip", True):
        return None
    if kwargs.get("use_vmap") or kwargs.get("batch_size", 1) != 1:
        return None
    q_len, q_off = kwargs.get("q_length"), kwargs.get("q_offset", 0)
    kv_len, kv_off = kwargs.get("kv_length"), kwargs.get("kv_offset", 0)
    if not all(isinstance(x, int) for x in (q_len, q_off, kv_len, kv_off)):
        return None  # another signature, or tensors (static caches, compiling)
    if kv_off != 0 or q_off + q_len != kv_len or not 1 < q_len < kv_len:
        return None
    pad = kwargs.get("attention_mask")
    if pad is not None:
        if pad.ndim != 2 or pad.shape[-1] < kv_len or not bool(pad[:, :kv_len].all()):
            return None
    return causal_lower_right(q_len, kv_len)


def prefix_mask(**kwargs):
    from transformers.masking_utils import sdpa_mask
    bias = _lower_right_or_none(kwargs)
    return bias if bias is not None else sdpa_mask(**kwargs)


def prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    from torch.nn.attention.bias import CausalBias
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    if not isinstance(attention_mask, CausalBias):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if (attention_mask.seq_len_q, attention_mask.seq_len_kv) != (q_len, kv_len) \
            or kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None \
            or kwargs.get("position_bias") is not None:
        mask = attention_mask._materialize(query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    out, sink = None, lse_sink
    if not (dropout and module.training):
        out = split_attention(query, key, value, kv_len - q_len, scaling,
                              with_lse=sink is not None)
        if out is not None and sink is not None:
            out, lse = out
            sink(getattr(module, "layer_idx", None), lse)
    if out is None:
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:  # the lower-right bias kernel takes as many key heads as query heads
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_refused: set = set()  # (kernel, device type, dtype, head size) a kernel turned down
used: set = set()      # the kernels split_attention has run (for tests and benchmarks)


HALF = (torch.float16, torch.bfloat16)


def _cuda_takes(query) -> bool:
    """Whether the CUDA kernels may be asked at all. The aten ops are called directly, past
    SDPA's dispatcher, so nothing else checks their inputs: cuDNN and flash take fp16 and
    bf16 only, head sizes up to 256 in multiples of 8. (On the H200 a test's fp32 pass
    that could reach this path unguarded gave NaN logits without an error; this check was
    added after the session's last GPU call, so it is not yet verified there.)"""
    d = query.shape[-1]
    return query.dtype in HALF and d <= 256 and d % 8 == 0


def _kernels(device) -> tuple:
    # cuDNN first on CUDA: on the H200 it runs the prefix's attention faster than flash
    # (benchmarks/prefix_attention_kernels.py); the CPU has flash only
    return ("cudnn", "flash") if device.type == "cuda" else ("flash",)


def _attend(kernel: str, query, key, value, causal: bool, scale):
    """(out [B, H, N, D], lse [B, H, N] float32) of one fused kernel."""
    b, h, n, d = query.shape
    hk = key.shape[1]
    fold = kernel == "cudnn" and hk != h
    if fold and not causal:
        # no mask: the query heads of a group read the same key head, so they can be
        # one longer query sequence of that head (no copy of the keys)
        query = query.reshape(b, hk, (h // hk) * n, d)
    elif fold:  # causal: the rows of a folded head would see the wrong keys; widen them
        key, value = (t.repeat_interleave(h // hk, dim=1) for t in (key, value))
    if kernel == "cudnn":
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, causal, False, scale=scale)
    elif query.device.type == "cuda":
        r = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, causal, False, scale=scale)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scale)
    out, lse = r[0], r[1]
    rows = out.shape[-2]
    lse = lse.reshape(out.shape[0], out.shape[1], -1)[..., :rows]  # some pad or add a dim
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


def split_attention(query, key, value, prefix: int, scale=None, kernels=None,
                    with_lse: bool = False):
    """Attention of ``query`` [B, H, N, D] over ``key``/``value`` [B, Hk, P + N, D] with
    the bottom-right causal mask (query i sees keys 0..P+i), as one fused kernel over the
    first ``prefix`` = P keys unmasked plus one over the last N keys with the square
    causal mask, merged by log-sum-exp. ``kernels``: the order to try (default: cuDNN
    then flash on CUDA, flash on the CPU). None where every kernel refuses the inputs
    (the caller then uses another). ``with_lse``: (out, each row's log-sum-exp over all
    its keys, float32 [B, H, N])."""
    if prefix <= 0:
        return None
    for kernel in kernels or _kernels(query.device):
        sig = (kernel, query.device.type, query.dtype, query.shape[-1])
        if sig in _refused:
            continue
        if query.device.type == "cuda" and not _cuda_takes(query):
            _refused.add(sig)
            continue
        try:
            o_p, l_p = _attend(kernel, query, key[:, :, :prefix], value[:, :, :prefix],
                               False, scale)
            o_n, l_n = _attend(kernel, query, key[:, :, prefix:], value[:, :, prefix:],
                               True, scale)
        except (RuntimeError, NotImplementedError):
            _refused.add(sig)
            continue
        used.add(kernel)
        w = torch.sigmoid(l_p - l_n).unsqueeze(-1)
        out = torch.lerp(o_n.float(), o_p.float(), w).to(query.dtype)
        return (out, torch.logaddexp(l_p.float(), l_n.float())) if with_lse else out
    return None


def register_pair(name: str, attention, mask) -> None:
    """``attention`` and ``mask`` registered with transformers under ``name``, as an
    ``attn_implementation`` a model's config can name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def register() -> None:
    global _registered
    if not _registered:
        register_pair(PREFIX_SDPA, prefix_attention, prefix_mask)
        _registered = True


@contextlib.contextmanager
def prefix_sdpa(model, on: bool = True):
    """Run the block with ``PREFIX_SDPA`` as ``model``'s attention (when it uses
    ``sdpa``), the model's own restored after."""
    own = getattr(model.config, "_attn_implementation", None)
    if not on or own != "sdpa" or not hasattr(model, "set_attn_implementation"):
        yield
        return
    register()
    model.set_attn_implementation(PREFIX_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(own)
