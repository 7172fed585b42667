"""Latency of derived BNAS networks on the packed engine: the additive model (:mod:`.model`), its
measurement (:mod:`.profile`) and the NNI profiler over a space's choices (:mod:`.nni_profiler`)."""
from .model import LatencyModel
from .profile import machine_key, measure_latency_model

__all__ = ['LatencyModel', 'measure_latency_model', 'machine_key', 'PackedLatencyProfiler']


def __getattr__(name: str):
    # NNI is imported only when the profiler is asked for: `bnas-nni --help` imports this package
    if name == 'PackedLatencyProfiler':
        from .nni_profiler import PackedLatencyProfiler
        return PackedLatencyProfiler
    raise AttributeError(name)
