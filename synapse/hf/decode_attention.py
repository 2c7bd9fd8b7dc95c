"""A TieredCache's decode steps on flash attention: no step waits for a cuDNN plan.

torch's cuDNN attention builds an execution plan per exact key length (and strides), and
SDPA chooses cuDNN for a decode step on Hopper. A decode step's key length is new every
step, so the first layer of a step whose length the process has not run before waits for
a plan: 35-67 ms on the H200 (torch 2.11, ``benchmarks/decode_sdpa_calls.py``), against
a whole step of 12-18 ms. Flash attention has no plans; once cuDNN's plan for a length
exists the two cost the same (``hf_caches.py --sdpa-priority flash``: a ``TieredCache``
at full budget 83.5 against 82.6 tokens/s on cuDNN's warm plans).
``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1`` also avoids the builds for a cache's token-major
arena views, but its varlen path cost 400 us of host time a call against 60-140.

``DECODE_SDPA`` is registered with transformers as an attention function and a mask
function. A single query with no mask (a decode step of one unpadded sequence) on CUDA in
fp16 or bf16 with a head size flash takes runs torch's flash kernel directly (grouped-
query attention natively, no ``repeat_kv``); anything else, and any input flash refuses,
goes to transformers' ``sdpa_attention_forward`` unchanged; the mask is ``sdpa``'s own.

``synapse.hf.chunk_attention`` switches a single-token pass that continues a started
sequence of a CUDA ``TieredCache`` to it, and back after the pass, by setting the
config's ``_attn_implementation`` (``set_attn_implementation`` costs about 0.5 ms of host
time a switch, the attribute 30 us). The CPU is left alone: ``torch.equal`` with
``DynamicCache`` there is the cache's exactness check.
"""

from __future__ import annotations

import torch

from .prefix_attention import HALF, _cuda_takes, register_pair

DECODE_SDPA = "synapse_decode_sdpa"
_registered = False
_refused: set = set()  # (dtype, head size) flash turned down
used: set = set()      # "flash" once a decode step ran on it (tests, benchmarks)


def takes(cache) -> bool:
    """Whether ``cache``'s decode steps may run here: CUDA and a half dtype."""
    return cache.device is not None and cache.device.type == "cuda" and \
        cache.dtype in HALF


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    sig = (query.dtype, query.shape[-1])
    if attention_mask is None and query.shape[-2] == 1 and query.is_cuda and \
            not (dropout and module.training) and kwargs.get("softcap") is None and \
            sig not in _refused and _cuda_takes(query):
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, False, False, scale=scaling)[0]
        except (RuntimeError, NotImplementedError):
            _refused.add(sig)
        else:
            used.add("flash")
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def register() -> None:
    global _registered
    if not _registered:
        from transformers.masking_utils import sdpa_mask
        register_pair(DECODE_SDPA, decode_attention, sdpa_mask)  # the mask is sdpa's own
        _registered = True
