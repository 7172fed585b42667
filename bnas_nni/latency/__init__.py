"""Latency of derived BNAS networks on the packed engine: the additive model (:mod:`.model`) and its
measurement (:mod:`.profile`)."""
from .model import LatencyModel

__all__ = ['LatencyModel']
