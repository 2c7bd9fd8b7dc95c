"""What both environments of ``kv_quality.py`` share: the models, the prompts, the key probe.

``kv_quality.py`` runs in the project's venv (transformers >= 5.17); its kvpress runs go
through ``kv_quality_kvpress.py`` in a venv of their own (kvpress 0.5.5 needs transformers
< 5.3). Both import this file, so it needs torch and transformers only, never synapse
and never kvpress, and must work on either transformers.
"""

from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2")
# initializer_range: transformers' default, and a peakier one. At 0.2 the q.k logits of
# these models are ~100x larger: measured on the 512-token prompts, the top key takes
# ~0.79 of a query's attention (entropy 0.6 nats) against ~0.003 (6.2 nats, uniform) at 0.02.
INITS = {"default": 0.02, "peaky": 0.2}


def config_kwargs(family: str, init_range: float, max_positions: int) -> dict:
    """The model's config as plain keyword arguments (rebuilt in the other venv)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    # No eos/bos/pad: a random model may emit any id and every run must make the same
    # number of tokens. Eager attention: kvpress's ObservedAttentionPress reads its weights,
    # and one implementation everywhere keeps the references comparable.
    kw = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
              tie_word_embeddings=False, initializer_range=init_range, eos_token_id=None,
              bos_token_id=None, pad_token_id=None)
    if family == "llama":
        kw["head_dim"] = 64
    return kw  # qwen2: head_dim = hidden_size / heads = 64


def build_model(family: str, kwargs: dict, seed: int | None = None, state_dict=None):
    """The model in fp32 eval mode: seeded random weights, or ``state_dict`` (strict)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "eager"
    if seed is not None:
        torch.manual_seed(seed)
    model = model_cls(cfg)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model = model.to(torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def make_prompts(vocab: int, prompt_tokens: int, question_tokens: int, random_prompts: int,
                 needle_tokens: int, seed: int) -> dict:
    """name -> {"ids": [...], "context_tokens": C, "needle": [lo, hi) or None}.

    ``random-i``: uniform random ids. ``needle``: a haystack of random ids from which the
    ``needle_tokens`` needle ids are excluded, the needle inserted at half depth of the
    context, and as the question (the last ``question_tokens`` ids) the needle's first
    ``question_tokens`` ids again, so that its continuation would be the rest of the
    needle. A random model has learned no retrieval: the prompt tests which caches keep
    the needle's keys, and ``needle_attention_share`` says how much attention the
    reference model pays to them.
    """
    g = torch.Generator().manual_seed(seed)
    context = prompt_tokens - question_tokens
    out = {}
    for i in range(random_prompts):
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=g)
        out[f"random-{i}"] = {"ids": ids.tolist(), "context_tokens": context, "needle": None}
    perm = torch.randperm(vocab, generator=g)
    needle, rest = perm[:needle_tokens], perm[needle_tokens:]
    hay = rest[torch.randint(0, len(rest), (context - needle_tokens,), generator=g)]
    lo = (context - needle_tokens) // 2
    ids = torch.cat([hay[:lo], needle, hay[lo:], needle[:question_tokens]])
    out["needle"] = {"ids": ids.tolist(), "context_tokens": context,
                     "needle": [lo, lo + needle_tokens]}
    return out


class KeyProbe:
    """Wraps ``cache.update`` (the call every attention layer makes) to see what attention
    is given: the number of keys per step and layer 0's keys at the last step. Works for
    any transformers ``Cache``, whatever it keeps inside."""

    def __init__(self, cache) -> None:
        self.keys_seen: list[int] = []   # layer 0's key count, per forward pass
        self.last_keys: torch.Tensor | None = None
        inner = cache.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            k, v = inner(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx == 0:
                self.keys_seen.append(int(k.shape[-2]))
                self.last_keys = k[0].detach().float().clone()
            return k, v

        cache.update = update


def needle_retention(ref_keys: torch.Tensor, got_keys: torch.Tensor, lo: int, hi: int,
                     rel_tol: float = 0.25) -> float:
    """Fraction of (needle position, KV head) pairs whose layer-0 key is among the keys
    attention saw: within ``rel_tol`` of the reference key's norm in L2 distance. Measured
    on layer 0 of these models: a key dequantized from TieredCache's INT4 is within 0.13,
    the nearest other position's key at least 0.32 away (median 1.07)."""
    ref = ref_keys[:, lo:hi]                       # [heads, needle, dim]
    d = torch.cdist(ref, got_keys)                 # [heads, needle, kept]
    near = d.min(dim=-1).values <= rel_tol * ref.norm(dim=-1)
    return float(near.float().mean())
