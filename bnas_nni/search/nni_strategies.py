"""NNI's own search strategies on the BNAS space, by name.

:data:`STRATEGIES` maps a name to a factory ``f(**kwargs) -> nni.nas.strategy.Strategy``;
:func:`get_strategy` builds one and turns a wrong name or keyword into a one-line
:class:`~bnas_nni.errors.ConfigError`.

=====================  ===========  =====================================================================
name                   kind         NNI strategy
=====================  ===========  =====================================================================
``darts``              one-shot     ``DARTS`` (NNI's mixed cell, with its hidden zero logit per edge)
``gumbel-darts``       one-shot     ``GumbelDARTS``
``random-one-shot``    one-shot     ``RandomOneShot`` (SPOS; its export is a random sample)
``random``             multi-trial  ``Random``
``regularized-evolution`` multi-trial ``RegularizedEvolution``
``tpe``                multi-trial  :class:`CellTPE` (``TPE`` made to work on ``Cell`` spaces)
=====================  ===========  =====================================================================

The stock one-shot strategies keep NNI's differentiable cell, which appends a hidden zero logit to
every edge; BNAS's Zeroise is an explicit candidate on top of it, so an exported architecture may
legitimately pick ``zeroise`` (a BNAS genotype allows it). :class:`~bnas_nni.search.binary_darts.BinaryDARTS`
is the BNAS-faithful alternative.

Other modules may add entries with :func:`register_strategy`.
"""
from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Dict, Set

from ..errors import ConfigError

__all__ = ['STRATEGIES', 'ONE_SHOT', 'MULTI_TRIAL', 'CellTPE', 'get_strategy', 'register_strategy',
           'strategy_kind', 'strategy_kwargs']

Factory = Callable[..., Any]


# --------------------------------------------------------------------------- TPE on Cell spaces

def _cell_tpe_class():
    """Defined lazily so that importing this module does not import NNI."""
    import nni
    from nni.mutable import CategoricalMultiple
    from nni.nas.strategy import TPE

    class _CellTPE(TPE):
        """``TPE`` for spaces with ``InputChoice``/``Cell`` inputs.

        NNI's ``TPE`` asks every mutable for ``as_legacy_dict()``, which ``CategoricalMultiple`` (a cell
        input choice, ``n_chosen=1``) does not implement. Such a label is handed to the tuner as a plain
        ``choice`` over the candidate inputs, and the tuner's scalar answer is wrapped back into the
        one-element list the space expects (and unwrapped again when the result is reported).
        """

        def _legacy_space(self) -> Dict[str, Any]:
            space = self.model_space.simplify()
            self._multi: Set[str] = set()
            legacy: Dict[str, Any] = {}
            for label, mutable in space.items():
                if isinstance(mutable, CategoricalMultiple):
                    if mutable.n_chosen != 1:
                        raise ConfigError(f'tpe: {label} chooses {mutable.n_chosen} inputs; only single-input '
                                          'choices can be mapped onto a TPE choice')
                    self._multi.add(label)
                    legacy[label] = {'_type': 'choice', '_value': list(mutable.values)}
                else:
                    legacy[label] = mutable.as_legacy_dict()
            return legacy

        def _to_sample(self, param: Dict[str, Any]) -> Dict[str, Any]:
            return {k: [v] if k in self._multi else v for k, v in param.items()}

        def _to_param(self, sample: Dict[str, Any]) -> Dict[str, Any]:
            return {k: (v[0] if isinstance(v, (list, tuple)) else v) if k in self._multi else v
                    for k, v in sample.items()}

        def _run(self) -> None:
            legacy = self._legacy_space()
            with self._thread_lock:
                self.tuner.update_search_space(legacy)
            while self.engine.budget_available():
                if self.engine.idle_worker_available():
                    with self._thread_lock:
                        try:
                            param = self.tuner.generate_parameters(self._model_count)
                        except nni.NoMoreTrialError:
                            break
                        model = self.model_space.freeze(self._to_sample(param))
                        self._model_to_id[model] = self._model_count
                        self._model_count += 1
                    self.engine.submit_models(model)
                time.sleep(1.0)

        def on_metric(self, event) -> None:
            with self._thread_lock:
                model_id = self._model_to_id.get(event.model)
                if model_id is None or event.model.sample is None:
                    return
                self.tuner.receive_trial_result(model_id, self._to_param(event.model.sample), event.metric)

    _CellTPE.__name__ = _CellTPE.__qualname__ = 'CellTPE'
    _CellTPE.__module__ = __name__
    return _CellTPE


_CELL_TPE = None


def __getattr__(name: str):
    # ``from bnas_nni.search.nni_strategies import CellTPE`` builds the class on first use
    global _CELL_TPE
    if name == 'CellTPE':
        if _CELL_TPE is None:
            _CELL_TPE = _cell_tpe_class()
        return _CELL_TPE
    raise AttributeError(name)


# --------------------------------------------------------------------------- factories

def _darts(*, arc_learning_rate: float = 3e-4, gradient_clip_val: float | None = None, log_prob_every_n_step: int = 10,
           warmup_epochs: int = 0):
    from nni.nas.strategy import DARTS
    return DARTS(arc_learning_rate=arc_learning_rate, gradient_clip_val=gradient_clip_val,
                 log_prob_every_n_step=log_prob_every_n_step, warmup_epochs=warmup_epochs)


def _gumbel_darts(*, temperature: Any = (1.0, 0.33), arc_learning_rate: float = 3e-4,
                  gradient_clip_val: float | None = None, log_prob_every_n_step: int = 10, warmup_epochs: int = 0):
    from nni.nas.strategy import GumbelDARTS
    if isinstance(temperature, list):  # YAML has no tuples
        temperature = tuple(temperature)
    if isinstance(temperature, int):
        temperature = float(temperature)
    return GumbelDARTS(temperature=temperature, arc_learning_rate=arc_learning_rate,
                       gradient_clip_val=gradient_clip_val, log_prob_every_n_step=log_prob_every_n_step,
                       warmup_epochs=warmup_epochs)


def _random_one_shot():
    from nni.nas.strategy import RandomOneShot
    return RandomOneShot()


def _random(*, dedup: bool = True, seed: int | None = None):
    from nni.nas.strategy import Random
    return Random(dedup=dedup, seed=seed)


def _regularized_evolution(*, population_size: int = 100, sample_size: int = 25, mutation_prob: float = 0.05,
                           crossover: bool = False, dedup: bool = True, seed: int | None = None):
    from nni.nas.strategy import RegularizedEvolution
    if not 1 <= sample_size <= population_size:
        raise ConfigError(f'regularized-evolution: need 1 <= sample_size ({sample_size}) <= population_size '
                          f'({population_size})')
    if not 0.0 <= mutation_prob <= 1.0:
        raise ConfigError(f'regularized-evolution: mutation_prob must be in [0, 1], got {mutation_prob}')
    return RegularizedEvolution(population_size=population_size, sample_size=sample_size,
                                mutation_prob=mutation_prob, crossover=crossover, dedup=dedup, seed=seed)


def _tpe(*, optimize_mode: str = 'maximize', seed: int | None = None, tpe_args: Dict[str, Any] | None = None):
    if optimize_mode not in ('maximize', 'minimize'):
        raise ConfigError(f'tpe: optimize_mode must be maximize or minimize, got {optimize_mode!r}')
    return __getattr__('CellTPE')(optimize_mode=optimize_mode, seed=seed, tpe_args=tpe_args)


STRATEGIES: Dict[str, Factory] = {
    'darts': _darts,
    'gumbel-darts': _gumbel_darts,
    'random-one-shot': _random_one_shot,
    'random': _random,
    'regularized-evolution': _regularized_evolution,
    'tpe': _tpe,
}
ONE_SHOT: Set[str] = {'darts', 'gumbel-darts', 'random-one-shot'}
MULTI_TRIAL: Set[str] = {'random', 'regularized-evolution', 'tpe'}


def register_strategy(name: str, factory: Factory, *, one_shot: bool) -> None:
    """Add (or replace) a named strategy, e.g. ``register_strategy('binary-darts', BinaryDARTS, one_shot=True)``."""
    STRATEGIES[name] = factory
    (ONE_SHOT if one_shot else MULTI_TRIAL).add(name)
    (MULTI_TRIAL if one_shot else ONE_SHOT).discard(name)


def _canonical(name: str) -> str:
    return str(name).strip().lower().replace('_', '-')


def _check_name(name: str) -> str:
    key = _canonical(name)
    if key not in STRATEGIES:
        raise ConfigError(f'unknown strategy {name!r}; choose one of {", ".join(sorted(STRATEGIES))}')
    return key


def strategy_kind(name: str) -> str:
    """``'one-shot'`` or ``'multi-trial'``."""
    return 'one-shot' if _check_name(name) in ONE_SHOT else 'multi-trial'


def strategy_kwargs(name: str) -> Dict[str, Any]:
    """The keyword arguments a strategy accepts, with their defaults."""
    sig = inspect.signature(STRATEGIES[_check_name(name)])
    return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in sig.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def get_strategy(name: str, **kwargs: Any):
    """Build the strategy called ``name`` with ``kwargs``; a wrong name or keyword is a ``ConfigError``."""
    key = _check_name(name)
    factory = STRATEGIES[key]
    sig = inspect.signature(factory)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        allowed = strategy_kwargs(key)
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise ConfigError(f'strategy {key!r} does not take {", ".join(unknown)}; '
                              f'allowed: {", ".join(allowed) or "(no options)"}')
    return factory(**kwargs)
