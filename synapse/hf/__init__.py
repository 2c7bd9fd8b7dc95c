"""Synapse from PyTorch and Hugging Face transformers.

- ``TieredCache``: a transformers ``Cache`` whose KV blocks are placed by Synapse's tier
  manager and policies (L1 device, L2 host, fp or INT4, drop);
- ``synapse.stream`` (``synapse/stream.py``): weight streaming of any ``nn.Module``;
- ``synapse.trace_capture``: attention traces for the simulator.

Imports are lazy, so ``import synapse.hf.plan`` (used by the simulator's trace replay)
does not import torch.
"""

from __future__ import annotations

SUPPORTED_TRANSFORMERS = ">=5.0,<6"


def __getattr__(name):
    if name == "TieredCache":
        from .cache import TieredCache
        return TieredCache
    if name == "UnsupportedModel":
        from .errors import UnsupportedModel
        return UnsupportedModel
    raise AttributeError(f"module 'synapse.hf' has no attribute {name!r}")


__all__ = ["TieredCache", "UnsupportedModel", "SUPPORTED_TRANSFORMERS"]
