"""Content keys for prefix chunks: a hash chain over tokens, salted per tenant and bound to
the model and KV layout.

A prompt is cut into chunks of ``chunk_tokens`` tokens; only whole chunks get a key (a
partial tail is always recomputed). The key of chunk ``i`` is

    root    = blake2b(fingerprint.digest() || tenant, key=secret)            (32 bytes)
    key[0]  = blake2b(tokens[0:C],           key=root)
    key[i]  = blake2b(key[i-1] || tokens[iC:(i+1)C], key=root)

so a key names the whole prefix up to the end of its chunk: changing any earlier token
changes every later key. Tokens are hashed as little-endian int64, so ``[1, 2]`` and
``[258]`` never collide through their encoding.

Why the root: two tenants (or two models, dtypes, chunk sizes, layouts or INT4 format
versions) get disjoint key spaces, so a lookup by one can never hit, or time, another's
entries (the prefix-cache timing side channel of CVE-2025-46570, which vLLM closed with a
per-request ``cache_salt``). With ``secret`` set, keys are also unpredictable to anyone who
knows a tenant's name but not the store's secret (e.g. someone listing an L3 directory).

Operations: ``Fingerprint.digest()`` O(1); ``chunk_keys(tokens, ...)`` O(tokens).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

KEY_BYTES = 32
FORMAT_VERSION = 1   # bump when the chunk file header or the INT4 bit layout changes


@dataclass(frozen=True)
class Fingerprint:
    """What a cached chunk's bytes depend on besides its tokens. Two stores with different
    fingerprints share no keys, and a chunk file carries the digest so a file copied into
    the wrong directory is refused on load."""

    model_id: str                    # e.g. the HF repo id or a path
    config_hash: str = ""            # hash of the model config (see ``config_digest``)
    dtype: str = "float16"           # dtype of the KV as stored
    chunk_tokens: int = 256
    kv_layout: str = ""              # the caller's name for its per-chunk tensor layout
    kv_format: str = "fp16"          # "fp16", "int4-g64", ...
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens: got {self.chunk_tokens}, expected a value > 0")

    def digest(self) -> bytes:
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=KEY_BYTES).digest()

    def short(self) -> str:
        """16 hex characters naming this fingerprint (the L3 subdirectory)."""
        return self.digest().hex()[:16]


def config_digest(config: dict) -> str:
    """A stable hash of a model configuration (e.g. ``PretrainedConfig.to_dict()``)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def tenant_root(fingerprint: Fingerprint, tenant: str, secret: bytes = b"") -> bytes:
    """The hash key every chunk key of ``tenant`` under ``fingerprint`` is made with."""
    if len(secret) > 64:
        raise ValueError(f"secret: got {len(secret)} bytes, expected at most 64 (blake2b key)")
    h = hashlib.blake2b(fingerprint.digest() + b"\0" + tenant.encode(), key=secret,
                        digest_size=KEY_BYTES, person=b"synapse-tenant")
    return h.digest()


def token_array(tokens) -> np.ndarray:
    """Tokens (a list, NumPy array or 1-D torch tensor) as little-endian int64."""
    if hasattr(tokens, "detach"):  # torch, without importing it
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
    return arr.astype("<i8", copy=False)


def chunk_keys(tokens, fingerprint: Fingerprint, tenant: str = "default",
               secret: bytes = b"") -> list[bytes]:
    """The key of every whole chunk of ``tokens``, in order (see the module docstring)."""
    arr = token_array(tokens)
    c = fingerprint.chunk_tokens
    root = tenant_root(fingerprint, tenant, secret)
    raw = arr.tobytes()
    step = 8 * c
    keys, prev = [], b""
    for i in range(len(arr) // c):
        prev = hashlib.blake2b(prev + raw[i * step:(i + 1) * step], key=root,
                               digest_size=KEY_BYTES).digest()
        keys.append(prev)
    return keys
