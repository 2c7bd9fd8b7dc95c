"""Errors of the transformers integration, under Synapse's one root."""

from ..errors import SynapseError


class UnsupportedModel(SynapseError):
    """A model (type, layer kind, attention module) the cache or the streamer cannot serve."""
