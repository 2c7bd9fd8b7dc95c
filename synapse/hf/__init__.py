"""Synapse from PyTorch and Hugging Face transformers.

- ``TieredCache``: a transformers ``Cache`` whose KV blocks are placed by Synapse's tier
  manager and policies (L1 device, L2 host, fp or INT4, drop);
- ``synapse.stream`` (``synapse/stream.py``): weight streaming of any ``nn.Module``;
- ``synapse.trace_capture``: attention traces for the simulator.

Imports are lazy, so importing the package
does not import torch.
"""

from __future__ import annotations

SUPPORTED_TRANSFORMERS = ">=5.17,<6"
_LOWEST = (5, 17)


def check_transformers() -> str:
    """The installed transformers version, or a one-line error if it is missing or outside
    the supported range (the 5.x cache layer API; 5.17 is the lowest tested)."""
    from .errors import UnsupportedModel
    try:
        import transformers
    except ImportError as exc:
        raise UnsupportedModel(f"synapse.hf needs transformers {SUPPORTED_TRANSFORMERS} "
                               f"(pip install 'synapse-tiers[hf]'): {exc}") from None
    version = transformers.__version__
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return version  # a source build with an odd version string: let the API decide
    if major_minor < _LOWEST or major_minor[0] >= 6:
        raise UnsupportedModel(f"synapse.hf needs transformers {SUPPORTED_TRANSFORMERS}; "
                               f"transformers {version} is installed")
    return version


def __getattr__(name):
    if name == "TieredCache":
        check_transformers()
        from .cache import TieredCache
        return TieredCache
    if name == "UnsupportedModel":
        from .errors import UnsupportedModel
        return UnsupportedModel
    raise AttributeError(f"module 'synapse.hf' has no attribute {name!r}")


__all__ = ["TieredCache", "UnsupportedModel", "SUPPORTED_TRANSFORMERS", "check_transformers"]
