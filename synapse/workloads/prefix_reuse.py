"""Requests that share prefixes, generated from a stated reuse distribution.

Two kinds, drawn per request (probability ``chat_share`` for a chat turn):

- chat turn: one of the tenant's ``sessions`` conversations, picked uniformly; its prompt
  is the tenant's system prompt, every earlier turn of that conversation and
  ``turn_tokens`` new ones (the last reply and the new message), so its prefix is the
  previous turn's whole prompt. A conversation longer than ``max_context_tokens`` starts
  over from the system prompt.
- document question: one of ``documents`` shared documents, picked with Zipf popularity
  P(rank r) ~ r^-``document_zipf``, followed by ``question_tokens`` new tokens.

Tenants take turns (request i belongs to tenant i mod ``tenants``). Documents have the
same tokens for every tenant, which the per-tenant key salt must keep apart. Tokens are
uniform ids below 32000 from seeded generators, so every run and backend sees the same
requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VOCAB = 32000


@dataclass
class PrefixRequest:
    rid: int
    tenant: str
    kind: str            # "chat" or "document"
    source: int          # session or document index
    tokens: np.ndarray


def _tokens(seed: int, tag: int, *ids: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, tag, *ids]).integers(0, VOCAB, n, dtype=np.int64)


def prefix_requests(w, seed: int) -> list[PrefixRequest]:
    """The request stream of a ``PrefixReuseWorkload`` ``w``."""
    rng = np.random.default_rng([seed, 0x7072])
    tenants = [f"tenant{i}" for i in range(w.tenants)]
    system = {t: _tokens(seed, 0x7379, i, n=w.system_tokens) for i, t in enumerate(tenants)}
    docs = [_tokens(seed, 0x646F, d, n=w.document_tokens) for d in range(w.documents)]
    ranks = np.arange(1, w.documents + 1, dtype=np.float64)
    popularity = ranks ** -w.document_zipf
    popularity /= popularity.sum()
    history: dict[tuple[str, int], np.ndarray] = {}
    turns: dict[tuple[str, int], int] = {}
    out = []
    for rid in range(w.requests):
        tenant = tenants[rid % len(tenants)]
        if rng.random() < w.chat_share:
            session = int(rng.integers(0, w.sessions))
            key = (tenant, session)
            past = history.get(key, system[tenant])
            if len(past) + w.turn_tokens > w.max_context_tokens:
                past = system[tenant]
            turn = turns.get(key, 0)
            turns[key] = turn + 1
            tokens = np.concatenate([past, _tokens(seed, 0x7475, rid, turn, n=w.turn_tokens)])
            history[key] = tokens
            out.append(PrefixRequest(rid, tenant, "chat", session, tokens))
        else:
            d = int(rng.choice(w.documents, p=popularity))
            question = _tokens(seed, 0x7175, rid, n=w.question_tokens)
            out.append(PrefixRequest(rid, tenant, "document", d,
                                     np.concatenate([docs[d], question])))
    return out
