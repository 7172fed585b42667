"""Inside an NNI trial: parameters, reports, and the trial command channel.

* :func:`under_nni` is true when NNI launched this process (``NNI_PLATFORM`` is set);
* :func:`trial_parameters` lets rank 0 alone call ``nni.get_next_parameter()`` (every torchrun rank
  inherits the NNI variables, but the manager hands out one parameter set per trial) and broadcasts
  the result to the other ranks;
* :class:`TrialReporter` reports one intermediate result per epoch and exactly one final result,
  from rank 0 only, through :class:`RealTrialChannel`: the channel NNI opened for this process,
  captured before anything else runs (NNI's sequential engine, used when a search runs through
  ``NasExperiment``, swaps the global channel for an in-process one whose reports never reach the
  manager).

Nothing here imports NNI at module import time.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, Mapping, Optional

from ...distributed import broadcast_object

__all__ = ['under_nni', 'trial_parameters', 'TrialReporter', 'RealTrialChannel']


def under_nni() -> bool:
    """True when this process is an NNI trial (NNI sets ``NNI_PLATFORM``; standalone runs lack it)."""
    return bool(os.environ.get('NNI_PLATFORM'))


def trial_parameters(ctx: Any = None) -> Dict[str, Any]:
    """This trial's hyperparameters: ``nni.get_next_parameter()`` on rank 0, broadcast to all ranks.

    ``ctx`` is a :class:`bnas_nni.distributed.DistContext` (or None for one process).
    Returns ``{}`` outside NNI. Call it once per trial, before any report.
    """
    is_main = ctx is None or ctx.is_main
    params: Dict[str, Any] = {}
    if is_main and under_nni():
        # nni is imported only under NNI, here and below: a plain `bnas-nni train` never pays for it
        import nni

        params = dict(nni.get_next_parameter() or {})
    if ctx is not None and getattr(ctx, 'distributed', False):
        params = broadcast_object(params, ctx)
    return params


class TrialReporter:
    """Per-epoch and final metrics to NNI from rank 0; does nothing outside NNI or on other ranks."""

    def __init__(self, enabled: Optional[bool] = None, is_main: bool = True) -> None:
        self.enabled = (under_nni() if enabled is None else enabled) and is_main
        self.final_sent = False

    @staticmethod
    def _metric(top1: float, **extra: float) -> Dict[str, float]:
        return {'default': float(top1), **{k: float(v) for k, v in extra.items() if v is not None}}

    def intermediate(self, top1: float, **extra: float) -> None:
        """``nni.report_intermediate_result({'default': top1, **extra})``, e.g. ``top5=…, loss=…``."""
        if self.enabled:
            import nni

            nni.report_intermediate_result(self._metric(top1, **extra))

    def final(self, top1: float, **extra: float) -> None:
        """The trial's one final result; later calls are ignored."""
        if self.enabled and not self.final_sent:
            import nni

            nni.report_final_result(self._metric(top1, **extra))
            self.final_sent = True


class RealTrialChannel:
    """The trial command channel of this process, captured at construction.

    ``with channel.active(): nni.report_...(...)`` sends through it even while an NNI engine has
    swapped the global channel.
    """

    def __init__(self) -> None:
        from nni.runtime.trial_command_channel import get_default_trial_command_channel

        self.channel = get_default_trial_command_channel()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        from nni.runtime.trial_command_channel import (
            get_default_trial_command_channel,
            set_default_trial_command_channel,
        )

        inner = get_default_trial_command_channel()
        set_default_trial_command_channel(self.channel)
        try:
            yield
        finally:
            set_default_trial_command_channel(inner)

    def intermediate(self, metric: Mapping[str, Any]) -> None:
        import nni

        with self.active():
            nni.report_intermediate_result(dict(metric))

    def final(self, metric: Mapping[str, Any]) -> None:
        import nni

        with self.active():
            nni.report_final_result(dict(metric))
