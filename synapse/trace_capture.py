"""Capture an attention trace from a transformers model the user has locally.

    from synapse.trace_capture import capture
    trace = capture(model, input_ids, decode_steps=64, block_tokens=16, prefill_chunk=512)
    trace.save("trace.npz")

The model runs with a ``synapse.hf.TieredCache`` large enough to hold everything (nothing
is evicted, so attention is the model's own) that records, every step, the attention mass
per KV block that its policy would see; decode tokens are chosen greedily. The file
format is described in ``synapse.workloads.trace``; ``synapse trace capture`` is the CLI.
"""

from __future__ import annotations

import math

import numpy as np

from .workloads.trace import AGGREGATION, FORMAT, VERSION, Trace


def capture(model, input_ids, decode_steps: int = 64, block_tokens: int = 16,
            prefill_chunk: int | None = None) -> Trace:
    """Run ``input_ids`` (prompt, in chunks of ``prefill_chunk``) then ``decode_steps``
    greedy tokens through ``model``; return the per-step, per-block attention trace."""
    import torch

    from .hf import check_transformers
    check_transformers()
    from .hf.cache import TieredCache
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, tokens], got shape {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    chunk = prefill_chunk or n
    total = n + decode_steps
    budget = (math.ceil(total / block_tokens) + 2) * block_tokens
    cache = TieredCache(model.config, policy="fifo", l1_budget_tokens=budget, demote="l2",
                        block_tokens=block_tokens, model=model, record_masses=True)
    ids = [input_ids[0]]
    try:
        with torch.no_grad():
            logits = None
            for i in range(0, n, chunk):
                logits = model(input_ids[:, i:i + chunk], past_key_values=cache, use_cache=True).logits
            for _ in range(decode_steps):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids.append(nxt[0])
                logits = model(nxt, past_key_values=cache, use_cache=True).logits
        cache.settle()  # the last step's bookkeeping (it waits for a next step otherwise)
    finally:
        cache.detach()
    steps = len(cache.masses)
    nb = math.ceil(cache.seen_tokens / block_tokens)
    mass = np.zeros((steps, nb), np.float32)
    layer_mass = np.zeros((steps, cache.num_layers, nb), np.float16)
    for t, (m, lm) in enumerate(zip(cache.masses, cache.layer_masses)):
        mass[t, : len(m)] = m
        layer_mass[t, :, : lm.shape[1]] = lm
    tokens = np.asarray(cache.rec.rows["tokens"], np.int64)  # after each step
    header = {
        "format": FORMAT, "version": VERSION,
        "model": {"model_type": cache.model_type, "layers": cache.num_layers,
                  "kv_heads": cache.kv_heads, "head_dim": cache.head_dim,
                  "dtype": str(cache.dtype).replace("torch.", "")},
        "block_tokens": block_tokens, "steps": steps, "prompt_tokens": n,
        "prefill_chunk": chunk, "decode_steps": decode_steps, "aggregation": AGGREGATION,
    }
    token_ids = torch.cat([x.reshape(-1) for x in ids]).cpu().numpy().astype(np.int64)
    return Trace(header, tokens, mass, layer_mass, token_ids)
