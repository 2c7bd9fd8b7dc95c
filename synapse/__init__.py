"""Synapse: tiered GPU memory (HBM + pinned host) for LLM inference.

One policy layer, two kinds of backend: a SimPy model of the hardware (``synapse.sim``)
and real execution (``synapse.hw``: NumPy host mode and PyCUDA on an NVIDIA GPU).
"""

__version__ = "0.1.0"
