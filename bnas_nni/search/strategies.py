"""The strategy registry: every search strategy bnas-nni can run, by name, in one table.

=========================  ===========  ================================================================
name                       kind         strategy
=========================  ===========  ================================================================
``binary-darts``           one-shot     :class:`~bnas_nni.search.binary_darts.BinaryDARTS` (the paper)
``darts``                  one-shot     NNI ``DARTS`` (its mixed cell, with a hidden zero logit per edge)
``gumbel-darts``           one-shot     NNI ``GumbelDARTS``
``random-one-shot``        one-shot     NNI ``RandomOneShot`` (SPOS; its export is a random sample)
``random``                 multi-trial  NNI ``Random``
``regularized-evolution``  multi-trial  NNI ``RegularizedEvolution``
``tpe``                    multi-trial  :class:`CellTPE` (NNI ``TPE`` made to work on ``Cell`` spaces)
=========================  ===========  ================================================================

A factory takes the resolved search config (the shared keys: ``arc_lr``, ``grad_clip``, ``seed`` ...)
and the strategy's own keyword options from ``strategy_options``; a wrong name or option is a one-line
:class:`~bnas_nni.errors.ConfigError`. Registering a strategy is one call::

    from bnas_nni.search.strategies import register_strategy
    register_strategy('my-darts', lambda cfg, **opts: MyDARTS(...), kind='one-shot', runner='driver')

after which ``bnas-nni search --set imports=[my_module] --set strategy=my-darts`` and search trials run
it. What a strategy can do is declared here, never inferred from its class: ``runner='driver'`` (its
one-shot module is a :class:`~bnas_nni.search.binary_darts.BinaryDartsModule`) runs on the resumable
:class:`~bnas_nni.search.driver.SearchDriver` and so gets exact ``--resume``, the ImageNet gamma variant
and data-parallel search; ``runner='nni'`` (the default) runs through ``NasExperiment`` (one-shot in this
process, multi-trial with the NNI manager on 127.0.0.1), which NNI restarts rather than resumes, and whose
ImageNet genotype repeats the searched cell.

The stock one-shot strategies keep NNI's differentiable cell, which appends a hidden zero logit to
every edge; BNAS's Zeroise is an explicit candidate on top of it, so an exported architecture may
legitimately pick ``zeroise`` (a BNAS genotype allows it). ``binary-darts`` is the BNAS-faithful search.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Set

from ..config import SearchConfig
from ..errors import ConfigError
from ..registry import Registry

__all__ = ['StrategySpec', 'STRATEGIES', 'KINDS', 'RUNNERS', 'register_strategy', 'get_strategy_spec',
           'check_strategy_options', 'build_strategy', 'strategy_kind', 'CellTPE']  # noqa: F822 - CellTPE is built on first access (module __getattr__)

KINDS = ('one-shot', 'multi-trial')
RUNNERS = ('driver', 'nni')
Factory = Callable[..., Any]


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: ``factory(cfg, **options)``, its kind, what runs it, and its options."""

    name: str
    factory: Factory
    kind: str
    description: str = ''
    runner: str = 'nni'

    @property
    def resumable(self) -> bool:
        """``--resume`` continues an interrupted search exactly (the driver's checkpoint)."""
        return self.runner == 'driver'

    @property
    def gamma_variant(self) -> bool:
        """The ImageNet genotype is derived with the Zeroise transfer (``gamma``); else it repeats the cell."""
        return self.runner == 'driver'

    def options(self) -> Dict[str, Any]:
        """The factory's keyword options with their defaults (``strategy_options`` in a config)."""
        sig = inspect.signature(self.factory)
        return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in sig.parameters.items()
                if p.kind is p.KEYWORD_ONLY}


#: name -> StrategySpec
STRATEGIES: Registry = Registry('strategy')


def register_strategy(name: str, factory: Factory, *, kind: str, description: str = '', runner: str = 'nni',
                      replace: bool = False) -> StrategySpec:
    """Make ``factory(cfg, **options) -> nni.nas.strategy.Strategy`` runnable as ``strategy: name``.

    ``runner='driver'`` declares that the strategy's one-shot module is a ``BinaryDartsModule`` (as
    :class:`~bnas_nni.search.binary_darts.BinaryDARTS` and its subclasses build): it then runs on the
    resumable driver (exact resume, gamma variant). ``'nni'``: through NNI's ``NasExperiment``."""
    if kind not in KINDS:
        raise ConfigError(f'strategy kind must be one of {", ".join(KINDS)}, got {kind!r}')
    if runner not in RUNNERS:
        raise ConfigError(f'strategy runner must be one of {", ".join(RUNNERS)}, got {runner!r}')
    if runner == 'driver' and kind != 'one-shot':
        raise ConfigError(f'strategy {name!r}: the driver runs one-shot strategies only (kind multi-trial given)')
    spec = StrategySpec(name=STRATEGIES._normalize(name), factory=factory, kind=kind, description=description,
                        runner=runner)
    STRATEGIES.register(name, spec, replace=replace)
    return spec


def get_strategy_spec(name: str) -> StrategySpec:
    return STRATEGIES.get(name)


def strategy_kind(name: str) -> str:
    return get_strategy_spec(name).kind


def check_strategy_options(cfg: SearchConfig) -> StrategySpec:
    """The registered strategy of ``cfg``, with its ``strategy_options`` names checked (one-line errors)."""
    spec = get_strategy_spec(cfg.strategy)
    options = dict(cfg.strategy_options or {})
    sig = inspect.signature(spec.factory)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        unknown = sorted(set(options) - set(spec.options()))
        if unknown:
            raise ConfigError(f'strategy {spec.name!r} does not take strategy_options {", ".join(unknown)}; '
                              f'allowed: {", ".join(spec.options()) or "(none)"}')
    if spec.runner != 'driver' and (cfg.get('latency_target_ms') is not None or cfg.get('latency_table') is not None):
        raise ConfigError(f'latency_target_ms and latency_table steer binary-darts; strategy {spec.name!r} takes a '
                          "latency budget through NNI's own profiler API (bnas_nni.latency with "
                          'ExpectationProfilerPenalty or RangeProfilerFilter); drop the latency_* keys')
    return spec


def build_strategy(cfg: SearchConfig):
    """The strategy named by ``cfg.strategy``, built from the config and ``cfg.strategy_options``."""
    spec = check_strategy_options(cfg)
    return spec.factory(cfg, **dict(cfg.strategy_options or {}))


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
    # ``from bnas_nni.search.strategies import CellTPE`` builds the class on first use
    global _CELL_TPE
    if name == 'CellTPE':
        if _CELL_TPE is None:
            _CELL_TPE = _cell_tpe_class()
        return _CELL_TPE
    raise AttributeError(name)


# --------------------------------------------------------------------------- factories
# Each factory imports its strategy (NNI, BinaryDARTS) when called: `bnas-nni --help` imports this module's
# registry, and importing NNI would make it slow.

def _binary_darts(cfg: SearchConfig):
    from .binary_darts import BinaryDARTS
    from .latency import latency_term

    return BinaryDARTS(arc_learning_rate=cfg.arc_lr, arc_betas=tuple(cfg.arc_betas),
                       arc_weight_decay=cfg.arc_weight_decay, lamda=cfg.lamda, tau=cfg.tau,
                       gamma=cfg.gamma, gamma_rule=cfg.gamma_rule, select=cfg.select,
                       mixed_cell=cfg.mixed_cell, gradient_clip_val=cfg.grad_clip,
                       log_prob_every_n_step=cfg.log_prob_every, warmup_epochs=cfg.warmup_epochs,
                       latency=latency_term(cfg))


def _darts(cfg: SearchConfig):
    from nni.nas.strategy import DARTS

    return DARTS(arc_learning_rate=cfg.arc_lr, gradient_clip_val=cfg.grad_clip,
                 log_prob_every_n_step=cfg.log_prob_every, warmup_epochs=cfg.warmup_epochs)


def _gumbel_darts(cfg: SearchConfig, *, temperature: Any = (1.0, 0.33)):
    from nni.nas.strategy import GumbelDARTS

    if isinstance(temperature, list):  # YAML has no tuples
        temperature = tuple(float(t) for t in temperature)
    if isinstance(temperature, int):
        temperature = float(temperature)
    return GumbelDARTS(temperature=temperature, arc_learning_rate=cfg.arc_lr, gradient_clip_val=cfg.grad_clip,
                       log_prob_every_n_step=cfg.log_prob_every, warmup_epochs=cfg.warmup_epochs)


def _random_one_shot(cfg: SearchConfig):
    from nni.nas.strategy import RandomOneShot

    return RandomOneShot()


def _random(cfg: SearchConfig, *, dedup: bool = True):
    from nni.nas.strategy import Random

    return Random(dedup=dedup, seed=int(cfg.seed))


def _regularized_evolution(cfg: SearchConfig, *, population_size: int = 100, sample_size: int = 25,
                           mutation_prob: float = 0.05, crossover: bool = False, dedup: bool = True):
    from nni.nas.strategy import RegularizedEvolution

    if not 1 <= sample_size <= population_size:
        raise ConfigError(f'regularized-evolution: need 1 <= sample_size ({sample_size}) <= population_size '
                          f'({population_size})')
    if not 0.0 <= mutation_prob <= 1.0:
        raise ConfigError(f'regularized-evolution: mutation_prob must be in [0, 1], got {mutation_prob}')
    return RegularizedEvolution(population_size=population_size, sample_size=sample_size,
                                mutation_prob=mutation_prob, crossover=crossover, dedup=dedup, seed=int(cfg.seed))


def _tpe(cfg: SearchConfig, *, optimize_mode: str = 'maximize', tpe_args: Dict[str, Any] | None = None):
    if optimize_mode not in ('maximize', 'minimize'):
        raise ConfigError(f'tpe: optimize_mode must be maximize or minimize, got {optimize_mode!r}')
    return __getattr__('CellTPE')(optimize_mode=optimize_mode, seed=int(cfg.seed), tpe_args=tpe_args)


register_strategy('binary-darts', _binary_darts, kind='one-shot', runner='driver',
                  description='BinaryDARTS, the BNAS search')
register_strategy('darts', _darts, kind='one-shot', description="NNI's DARTS")
register_strategy('gumbel-darts', _gumbel_darts, kind='one-shot', description="NNI's GumbelDARTS")
register_strategy('random-one-shot', _random_one_shot, kind='one-shot', description="NNI's RandomOneShot (SPOS)")
register_strategy('random', _random, kind='multi-trial', description="NNI's Random")
register_strategy('regularized-evolution', _regularized_evolution, kind='multi-trial',
                  description="NNI's RegularizedEvolution")
register_strategy('tpe', _tpe, kind='multi-trial', description="NNI's TPE on Cell spaces (CellTPE)")
