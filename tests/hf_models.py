"""Small randomly initialised transformers models for the hf, stream and trace tests.

No weights are downloaded: every model is built from a config and seeded.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 96


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: torch's thread pool costs more than it saves (3x on a busy machine).
    Autouse in a test module that imports it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(layers: int = 2, **kw):
    """A Llama config: 2 layers, hidden 64, 4 query heads over 2 KV heads of head_dim 32."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, max_position_embeddings=1024, tie_word_embeddings=False, **kw)


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    if family == "llama":
        from transformers import LlamaForCausalLM
        m = LlamaForCausalLM(tiny_config(layers, **kw))
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=192,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=False, **kw)
        m = Qwen2ForCausalLM(cfg)  # head_dim 32
    elif family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM
        cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, sliding_window=None,
                            max_position_embeddings=1024, tie_word_embeddings=False, **kw)
        m = MistralForCausalLM(cfg)
    elif family == "gemma":
        from transformers import GemmaConfig, GemmaForCausalLM
        cfg = GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, max_position_embeddings=1024, **kw)
        m = GemmaForCausalLM(cfg)
    elif family == "gptj":
        from transformers import GPTJConfig, GPTJForCausalLM
        cfg = GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=2, rotary_dim=16,
                         n_positions=1024, tie_word_embeddings=False, **kw)
        m = GPTJForCausalLM(cfg)  # 2 heads of head_dim 32, rotary on the first 16 dims
    else:
        raise ValueError(f"unknown family {family!r}")
    return m.to(dtype).eval()


NEEDLE, ECHO = 1, 2   # token ids with planted roles
FLAG_NEEDLE, FLAG_ECHO = 48, 49   # hidden dimensions that carry the roles
PLANT_DIM = 15        # head dimension carrying the planted q.k (lowest rotary frequency)


def needle_model(layers: int = 2, seed: int = 0, gain: float = 1.5):
    """A tiny Llama whose attention is planted, not learned.

    Embeddings are small noise in hidden dims 0..47, plus a flag of 5.0 in dim 48 for the
    NEEDLE token and in dim 49 for ECHO tokens. In every layer, k_proj maps the needle
    flag and q_proj maps the echo flag onto head dimension 15 (and its rotary partner 31
    gets nothing), so an ECHO query puts a logit of about ``11 * gain**2`` on the NEEDLE
    key and all other query/key pairs see small random logits. rope_theta = 1e9 makes the
    rotation of dimension pair (15, 31) negligible (about 4e-9 rad per position).
    o_proj and the MLP's down_proj are zero, so the residual stream is the embedding in
    every layer and each layer sees the same pattern; the LM head is random (the tests
    feed tokens themselves, they do not rely on what the model would generate).
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=4096, rope_theta=1e9,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        e = m.model.embed_tokens.weight
        e.zero_()
        e[:, :48] = 0.1 * torch.randn(VOCAB, 48)
        e[NEEDLE, FLAG_NEEDLE] = 5.0
        e[ECHO, FLAG_ECHO] = 5.0
        for layer in m.model.layers:
            a = layer.self_attn
            a.q_proj.weight.mul_(0.3)
            a.k_proj.weight.mul_(0.3)
            for h in range(cfg.num_attention_heads):
                a.q_proj.weight[h * 32:(h + 1) * 32, FLAG_ECHO] = 0.0
                a.q_proj.weight[h * 32:(h + 1) * 32, FLAG_NEEDLE] = 0.0
                a.q_proj.weight[h * 32 + PLANT_DIM, :] = 0.0
                a.q_proj.weight[h * 32 + PLANT_DIM + 16, :] = 0.0
                a.q_proj.weight[h * 32 + PLANT_DIM, FLAG_ECHO] = gain
            for h in range(cfg.num_key_value_heads):
                a.k_proj.weight[h * 32:(h + 1) * 32, FLAG_ECHO] = 0.0
                a.k_proj.weight[h * 32:(h + 1) * 32, FLAG_NEEDLE] = 0.0
                a.k_proj.weight[h * 32 + PLANT_DIM, :] = 0.0
                a.k_proj.weight[h * 32 + PLANT_DIM + 16, :] = 0.0
                a.k_proj.weight[h * 32 + PLANT_DIM, FLAG_NEEDLE] = gain
            a.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return m
