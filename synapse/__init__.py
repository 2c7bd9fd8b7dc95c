"""Synapse: tiered GPU memory (HBM + pinned host) for LLM inference.

One policy layer, two kinds of backend: a SimPy model of the hardware (``synapse.sim``)
and real execution (``synapse.hw``: NumPy host mode and PyCUDA on an NVIDIA GPU).
``synapse.stream(model, vram_budget=...)`` streams a torch module's weights through the
ring; ``synapse.hf.TieredCache`` is a tiered KV cache for transformers.
"""

__version__ = "0.1.0"

from .stream import stream  # noqa: E402  (torch is imported only when it is called)
