"""Run the BNAS space under one of NNI's own strategies, from one config mapping.

:func:`run_nni_strategy` builds the space, the evaluator and the strategy from a config (see
:data:`DEFAULTS` for the schema), runs a ``NasExperiment`` and exports the best architecture as a
genotype YAML:

* **one-shot** (``darts``, ``gumbel-darts``, ``random-one-shot``): sequential engine in this process,
  :class:`~bnas_nni.search.evaluators.BinaryClassification` trains the supernet (weights on the
  train half, architecture on the validation half); no NNI manager is started;
* **multi-trial** (``random``, ``regularized-evolution``, ``tpe``): the NNI manager on 127.0.0.1 (a
  ``NODE_OPTIONS`` preload, NNI has no host option) spawns ``python -m nni.nas.execution.training_service
  trial`` processes in the current directory; each trains one frozen derived network with
  :func:`~bnas_nni.search.evaluators.evaluate_derived` and reports per-epoch and final accuracy.
  Trials and metrics are visible in the web UI and over ``http://127.0.0.1:PORT/api/v1/nni/...``
  while the experiment runs; a snapshot of ``trial-jobs`` and ``metric-data`` is kept in the result.

In both cases ``HOME`` is redirected into the run directory for the duration (NNI writes its
experiment manifest under ``~/nni-experiments`` whatever the config says), the experiment working
directory is ``<run_dir>/nni-experiments``, and the experiment is always stopped in ``finally``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

from ..errors import ConfigError
from ..io import load_yaml, save_yaml
from .nni_strategies import get_strategy, strategy_kind, strategy_kwargs

__all__ = ['DEFAULTS', 'SECTIONS', 'resolve_strategy_config', 'is_strategy_config', 'run_nni_strategy',
           'redirected_nni_home', 'free_port']

#: The config schema with its defaults. ``strategy`` holds ``name`` plus the strategy's keyword
#: arguments (see :func:`bnas_nni.search.nni_strategies.strategy_kwargs`); ``space`` holds
#: ``config`` (a ``search_spaces/`` name or path) plus ``BNASSpace`` keyword overrides.
DEFAULTS: Dict[str, Any] = {
    'description': None,
    'name': None,                      # run name; default <strategy>
    'run_dir': None,                   # default runs/<name>
    'seed': 0,
    'save': None,                      # also write <save>.yaml and <save>_imagenet.yaml (same cell: NNI's
                                       # strategies have no Zeroise transfer) into search_spaces/genotypes
    'out': None,                       # ... or into this folder
    'strategy': {'name': 'darts'},
    'space': {'config': 'bnas'},
    'data': {
        'dataset': 'fashion-mnist',
        'root': None,                  # folder of the idx .gz files; default $BNAS_FASHION_MNIST or Debian's
        'train_size': None,            # images in the training part of the training split (default: half)
        'val_size': None,              # images in the validation part (default: the other half)
        'image_size': None,            # resize (e.g. 16 for tiny runs); default native 32
        'batch_size': 64,
    },
    'train': {
        'epochs': 50,                  # supernet epochs (one-shot) or epochs per trial (multi-trial)
        'optimizer': 'sgd',
        'learning_rate': 0.025,
        'momentum': 0.9,
        'weight_decay': 3e-4,
        'lr_min': 0.001,
        'max_train_batches': None,     # cap batches per epoch (quick runs)
        'max_val_batches': None,
        'num_threads': None,           # torch threads (in this process for one-shot, per trial otherwise)
        'derived_epochs': 0,           # one-shot only: then train the derived net this long and report val acc
    },
    'experiment': {
        'max_trial_number': 10,        # multi-trial budget
        'trial_concurrency': 1,
        'max_experiment_duration': None,   # e.g. '30m'
        'port': None,                  # NNI manager port on 127.0.0.1; default: a free one
        'tensorboard': False,          # one-shot: Lightning TensorBoard logs in <run_dir>/tb
    },
}
SECTIONS = ('strategy', 'space', 'data', 'train', 'experiment')


# --------------------------------------------------------------------------- config


def _merge(base: Dict[str, Any], override: Mapping[str, Any], where: str) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise ConfigError(f'{where}: unknown key {key!r}; allowed: {", ".join(out)}')
        if isinstance(out[key], dict) and key not in ('strategy', 'space'):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f'{where}: {key} must be a mapping')
            out[key] = _merge(out[key], value, f'{where}: {key}')
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load(config: Mapping[str, Any] | str | os.PathLike) -> tuple:
    if isinstance(config, Mapping):
        return dict(config), 'strategy config'
    data = load_yaml(config) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f'{config}: expected a mapping with {", ".join(SECTIONS)}')
    return dict(data), str(config)


def is_strategy_config(config: Mapping[str, Any] | str | os.PathLike) -> bool:
    """True for configs in this module's schema (``strategy:`` is a mapping with a ``name``), as
    opposed to the flat BinaryDARTS presets of ``bnas-nni search``."""
    data, _ = _load(config)
    return isinstance(data.get('strategy'), Mapping)


def _apply_overrides(data: Dict[str, Any], overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``{'train.epochs': 2, 'seed': 3, 'strategy.arc_learning_rate': 0.01}`` onto a raw config."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        keys = str(dotted).replace('-', '_').split('.')
        node = data
        for k in keys[:-1]:
            cur = node.get(k)
            if cur is None:
                cur = {}
            elif isinstance(cur, str) and k in ('strategy', 'space'):  # `strategy: darts` shorthands
                cur = {'name' if k == 'strategy' else 'config': cur}
            elif not isinstance(cur, Mapping):
                raise ConfigError(f'override {dotted}: {k} is not a section')
            node[k] = cur = dict(cur)
            node = cur
        node[keys[-1]] = value
    return data


def resolve_strategy_config(config: Mapping[str, Any] | str | os.PathLike,
                            overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults <- ``config`` (a mapping or a YAML path) <- ``overrides`` (dotted keys, e.g.
    ``train.epochs``), checked; unknown keys are an error."""
    config, where = _load(config)
    if overrides:
        config = _apply_overrides(config, overrides)
    cfg = _merge(DEFAULTS, config, where)
    strat = cfg['strategy']
    if isinstance(strat, str):
        strat = {'name': strat}
    if not isinstance(strat, Mapping) or 'name' not in strat:
        raise ConfigError(f'{where}: strategy must be a mapping with a name, e.g. strategy: {{name: darts}}')
    strat = dict(strat)
    strat['name'] = str(strat['name']).strip().lower().replace('_', '-')
    kind = strategy_kind(strat['name'])  # one-line error on an unknown name
    allowed = strategy_kwargs(strat['name'])
    unknown = sorted(set(strat) - {'name'} - set(allowed))
    if unknown:
        raise ConfigError(f'{where}: strategy {strat["name"]!r} does not take {", ".join(unknown)}; '
                          f'allowed: {", ".join(allowed) or "(no options)"}')
    cfg['strategy'] = strat
    space = cfg['space']
    if isinstance(space, str):
        space = {'config': space}
    if not isinstance(space, Mapping):
        raise ConfigError(f'{where}: space must be a search-space name or a mapping')
    cfg['space'] = dict(space)
    cfg['space'].setdefault('config', 'bnas')
    exp = cfg['experiment']
    if kind == 'multi-trial':
        if int(exp['max_trial_number']) < 1 or int(exp['trial_concurrency']) < 1:
            raise ConfigError(f'{where}: experiment.max_trial_number and trial_concurrency must be >= 1')
    if int(cfg['data']['batch_size']) < 1:
        raise ConfigError(f'{where}: data.batch_size must be >= 1')
    if int(cfg['train']['epochs']) < 1:
        raise ConfigError(f'{where}: train.epochs must be >= 1')
    save = cfg['save']
    if save is not None and (not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', str(save)) or str(save).endswith('.py')):
        raise ConfigError(f'{where}: save {save!r}: use a plain name (letters, digits, _ . -), e.g. my_cell')
    if cfg['out'] is not None and save is None:
        raise ConfigError(f'{where}: out only says where save writes; set save: NAME too')
    cfg['name'] = cfg['name'] or strat['name']
    return cfg


# --------------------------------------------------------------------------- NNI process hygiene


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (NNI also uses the next one up for nothing; we only need one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redirected_nni_home(run_dir: Path, manager: bool) -> Iterator[Dict[str, str]]:
    """Point ``HOME`` (and NNI's manifest folder) into ``run_dir`` and, for the NNI manager, preload
    the localhost-only binding; restore everything afterwards."""
    from ..nni.manager import nni_environment
    from nni.tools.nnictl import config_utils

    env = nni_environment(run_dir)
    keys = ['HOME', 'NODE_OPTIONS', 'GLOO_SOCKET_IFNAME'] if manager else ['HOME']
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_defaults = config_utils.Experiments.__init__.__defaults__
    try:
        for k in keys:
            os.environ[k] = env[k]
        # nnictl's manifest path is bound at import time from the HOME of that moment
        config_utils.Experiments.__init__.__defaults__ = (os.path.join(env['HOME'], 'nni-experiments'),)
        yield env
    finally:
        config_utils.Experiments.__init__.__defaults__ = saved_defaults
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rest_snapshot(port: int) -> Dict[str, Any]:
    from ..nni.manager import rest_get

    snap: Dict[str, Any] = {}
    for key, path in (('status', 'check-status'), ('trial_jobs', 'trial-jobs'), ('metric_data', 'metric-data'),
                      ('experiment', 'experiment')):
        try:
            snap[key] = rest_get(port, path)
        except OSError as exc:
            snap[key] = {'error': f'{type(exc).__name__}: {exc}'}
    return snap


# --------------------------------------------------------------------------- building blocks


def _wait_trial_ends(exp, timeout: float = 30.0) -> None:
    """Wait until every submitted model has seen its trial-end event.

    NNI's engine stops waiting as soon as the manager reports DONE, which can come before the
    manager's trial-end commands reach this process; models then still read "training" and
    ``export_top_models`` finds none.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(m.status.completed() for m in exp.strategy.list_models(sort=False)):
            return
        time.sleep(0.5)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build_strategy(cfg: Dict[str, Any]):
    kwargs = {k: v for k, v in cfg['strategy'].items() if k != 'name'}
    if 'seed' in strategy_kwargs(cfg['strategy']['name']) and kwargs.get('seed') is None:
        kwargs['seed'] = int(cfg['seed'])
    return get_strategy(cfg['strategy']['name'], **kwargs)


def _build_space(cfg: Dict[str, Any]):
    from ..space import BNASSpace

    overrides = {k: v for k, v in cfg['space'].items() if k != 'config'}
    return BNASSpace.from_config(cfg['space']['config'], **overrides)


def _one_shot_evaluator(cfg: Dict[str, Any], train_ds, val_ds, run_dir: Path, num_classes: int):
    from .evaluators import BinaryClassification, make_loader

    d, t = cfg['data'], cfg['train']
    trainer_kwargs: Dict[str, Any] = dict(max_epochs=int(t['epochs']), enable_progress_bar=False,
                                          default_root_dir=str(run_dir), log_every_n_steps=1)
    if t['max_train_batches']:
        trainer_kwargs['limit_train_batches'] = int(t['max_train_batches'])
    if t['max_val_batches']:
        trainer_kwargs['limit_val_batches'] = int(t['max_val_batches'])
    if cfg['experiment']['tensorboard']:
        from pytorch_lightning.loggers import TensorBoardLogger
        trainer_kwargs['logger'] = TensorBoardLogger(str(run_dir), name='tb', version='')
    else:
        trainer_kwargs['logger'] = False
    return BinaryClassification(
        learning_rate=float(t['learning_rate']), weight_decay=float(t['weight_decay']), optimizer=t['optimizer'],
        momentum=float(t['momentum']), lr_min=float(t['lr_min']), num_classes=num_classes,
        train_dataloaders=make_loader(train_ds, d['batch_size'], shuffle=True),
        val_dataloaders=make_loader(val_ds, d['batch_size'], shuffle=False), **trainer_kwargs)


def _train_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    t = cfg['train']
    return dict(epochs=int(t['epochs']), batch_size=int(cfg['data']['batch_size']), optimizer=t['optimizer'],
                learning_rate=float(t['learning_rate']), momentum=float(t['momentum']),
                weight_decay=float(t['weight_decay']), lr_min=float(t['lr_min']),
                max_train_batches=t['max_train_batches'], max_val_batches=t['max_val_batches'],
                seed=int(cfg['seed']), num_threads=t['num_threads'])


def _model_record(model) -> Dict[str, Any]:
    metrics = getattr(model, 'metrics', None)
    return {'arch': dict(model.sample or {}),
            'status': getattr(getattr(model, 'status', None), 'value', str(getattr(model, 'status', ''))),
            'metric': model.metric,
            'intermediates': list(getattr(metrics, 'intermediates', []) or [])}


def _plain(obj: Any) -> Any:
    """YAML-safe copy (tensors/numpy scalars to floats, tuples to lists)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, 'item') and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- entry point


def run_nni_strategy(config: Mapping[str, Any] | str | os.PathLike, *, run_dir: Optional[str | os.PathLike] = None,
                     overrides: Optional[Mapping[str, Any]] = None,
                     on_running: Optional[Callable[[Any, Optional[int]], None]] = None,
                     log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Search the BNAS space with the NNI strategy named in ``config`` and export the best architecture.

    ``overrides`` are dotted keys (``{'train.epochs': 2, 'seed': 3}``) applied on top of ``config``.
    ``on_running(experiment, port)`` is called after the search, while the experiment (and, for
    multi-trial, the NNI manager and its REST API) is still up and before it is stopped.

    Returns a dict with ``strategy``, ``kind``, ``experiment_id``, ``run_dir``, ``port``, ``arch`` (the
    top architecture dict), ``genotype`` (str), ``genotype_file``, ``trials`` (multi-trial: one record per
    model with ``arch``, ``status``, ``metric`` and ``intermediates``), ``metrics`` (one-shot: the
    supernet's last logged metrics, ``probs`` for DARTS-style strategies, and ``derived`` when
    ``train.derived_epochs`` > 0), ``rest`` (multi-trial: ``check-status``, ``trial-jobs``,
    ``metric-data`` and ``experiment`` as the REST API returned them before the stop), ``manager_pid``
    and ``seconds``. The same, minus ``rest``, is written to ``<run_dir>/result.yaml``.
    """
    import warnings
    warnings.filterwarnings('ignore', message='.*is found to be not a nn.Module.*')

    cfg = resolve_strategy_config(config, overrides)
    name = cfg['strategy']['name']
    kind = strategy_kind(name)
    if cfg['save']:
        _check_save_target(cfg)  # fail before the search, not after it
    run_path = Path(run_dir or cfg['run_dir'] or Path('runs') / cfg['name']).resolve()
    run_path.mkdir(parents=True, exist_ok=True)
    cfg['run_dir'] = str(run_path)
    save_yaml(_plain(cfg), run_path / 'config.yaml')
    _seed_everything(int(cfg['seed']))

    import torch

    threads_before = torch.get_num_threads()
    try:
        if cfg['train']['num_threads'] and kind == 'one-shot':
            torch.set_num_threads(int(cfg['train']['num_threads']))
        return _run(cfg, name, kind, run_path, on_running, log)
    finally:
        torch.set_num_threads(threads_before)


def _check_save_target(cfg: Dict[str, Any]) -> None:
    from ..paths import genotypes_dir

    folder = Path(cfg['out']) if cfg['out'] else genotypes_dir()
    for path in (folder / f'{cfg["save"]}.yaml', folder / f'{cfg["save"]}_imagenet.yaml'):
        if path.exists():
            try:
                data = load_yaml(path)
            except ConfigError:
                data = None
            meta = data.get('meta') if isinstance(data, Mapping) else None
            if not isinstance(meta, Mapping) or meta.get('source') != 'bnas-nni search':
                raise ConfigError(f'{path} exists and was not written by bnas-nni search; choose another save name')


def _run(cfg: Dict[str, Any], name: str, kind: str, run_path: Path, on_running, log) -> Dict[str, Any]:
    from ..genotypes import Genotype, save_genotype
    from .evaluators import derived_evaluator, evaluate_derived, search_datasets

    space = _build_space(cfg)
    num_classes = int(space.trace_kwargs.get('num_classes', 10))
    train_ds, val_ds = search_datasets(cfg['data'])
    if kind == 'one-shot':
        evaluator = _one_shot_evaluator(cfg, train_ds, val_ds, run_path, num_classes)
    else:
        evaluator = derived_evaluator(train_ds, val_ds, **_train_kwargs(cfg))
    strategy = _build_strategy(cfg)

    from nni.nas.experiment import NasExperiment

    result: Dict[str, Any] = {'strategy': name, 'kind': kind, 'run_dir': str(run_path), 'port': None,
                              'manager_pid': None}
    started = time.perf_counter()
    with redirected_nni_home(run_path, manager=kind == 'multi-trial'):
        exp = NasExperiment(space, evaluator, strategy)
        exp.config.experiment_name = f'bnas-{cfg["name"]}'
        exp.config.experiment_working_directory = str(run_path / 'nni-experiments')
        port: Optional[int] = None
        if kind == 'multi-trial':
            e = cfg['experiment']
            exp.config.max_trial_number = int(e['max_trial_number'])
            exp.config.trial_concurrency = int(e['trial_concurrency'])
            if e['max_experiment_duration']:
                exp.config.max_experiment_duration = str(e['max_experiment_duration'])
            port = int(e['port'] or free_port())
            result['port'] = port
        result['experiment_id'] = exp.id
        try:
            log(f'[{name}] {kind} search, run dir {run_path}' +
                (f', NNI manager on http://127.0.0.1:{port}' if port else ''))
            if port is not None:
                exp.run(port=port)
                proc = getattr(exp, '_proc', None)
                result['manager_pid'] = getattr(proc, 'pid', None)
            else:
                exp.run()
            result['seconds'] = round(time.perf_counter() - started, 2)
            if kind == 'multi-trial':
                _wait_trial_ends(exp)
                result['rest'] = _rest_snapshot(port)
                result['trials'] = [_model_record(m) for m in exp.strategy.list_models(sort=False)]
                trained = [t for t in result['trials'] if t['metric'] is not None]
                if not trained:
                    raise RuntimeError(f'{name}: no trial reported a final metric; see the trial logs under '
                                       f'{run_path / "nni-experiments" / exp.id}')
            else:
                module = exp.strategy.oneshot_module
                metrics: Dict[str, Any] = {k: float(v) for k, v in evaluator.trainer.callback_metrics.items()
                                           if not k.startswith('prob/')}
                probs = module.export_probs() if name != 'random-one-shot' else {}
                if probs:
                    metrics['probs'] = probs
                result['metrics'] = metrics
            arch = exp.export_top_models(formatter='dict')[0]
            result['arch'] = dict(arch)
            if on_running is not None:
                on_running(exp, port)
        finally:
            exp.stop()
    result['seconds_total'] = round(time.perf_counter() - started, 2)

    genotype = Genotype.from_arch_dict(result['arch'], name=cfg['save'] or cfg['name'])
    result['genotype'] = str(genotype)
    meta = {'source': 'bnas-nni search', 'strategy': name, 'experiment_id': result['experiment_id'],
            'space': str(cfg['space']['config']), 'run_dir': str(run_path)}
    result['genotype_file'] = str(save_genotype(genotype, run_path / 'genotype.yaml', **meta))
    if cfg['save']:
        from .cli import save_named_genotypes  # same files and overwrite rules as BinaryDARTS runs

        result['saved'] = [str(p) for p in save_named_genotypes(genotype, genotype, cfg['save'], cfg['out'], **meta)]
    log(f'[{name}] {genotype}')

    if kind == 'one-shot' and int(cfg['train']['derived_epochs'] or 0) > 0:
        derived = space.freeze(result['arch'])
        kw = _train_kwargs(cfg)
        kw['epochs'] = int(cfg['train']['derived_epochs'])
        result['metrics']['derived'] = evaluate_derived(derived, train_data=train_ds, val_data=val_ds,
                                                        report=False, **kw)
        log(f'[{name}] derived network: val acc {result["metrics"]["derived"]["default"]:.4f}')

    save_yaml(_plain({k: v for k, v in result.items() if k != 'rest'}), run_path / 'result.yaml')
    return result


# --------------------------------------------------------------------------- python -m


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bnas_nni.search.experiment CONFIG [--run-dir DIR] [--set section.key=VALUE ...]``."""
    import argparse
    import sys

    import yaml

    from ..errors import BNASError

    p = argparse.ArgumentParser(prog='python -m bnas_nni.search.experiment',
                                description='Run an experiments/strategy_*.yaml preset (any NNI strategy).')
    p.add_argument('config', help='a strategy preset, e.g. experiments/strategy_tpe.yaml')
    p.add_argument('--run-dir', default=None, help='run directory (default runs/<name>)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a key, e.g. --set train.epochs=1 (repeatable)')
    args = p.parse_args(argv)
    try:
        overrides: Dict[str, Any] = {}
        for item in args.set:
            if '=' not in item:
                raise ConfigError(f'--set {item!r}: expected KEY=VALUE')
            key, value = item.split('=', 1)
            overrides[key.strip()] = yaml.safe_load(value)
        result = run_nni_strategy(args.config, run_dir=args.run_dir, overrides=overrides)
    except BNASError as exc:
        print(f'error: {exc}', file=sys.stderr)
        return 2
    derived = (result.get('metrics') or {}).get('derived')
    if derived:
        print(f'derived network: val acc {100 * derived["default"]:.2f}%')
    best = [t['metric'] for t in result.get('trials') or [] if t['metric'] is not None]
    if best:
        print(f'{len(best)} trials, best val acc {100 * max(best):.2f}%')
    print(f'genotype: {result["genotype"]}')
    print(f'run directory: {result["run_dir"]}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
