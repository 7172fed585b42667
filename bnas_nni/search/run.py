"""One entry for every search: :func:`run_search` (the CLI, search trials, benches and tests call it).

It prepares the run directory (numbered defaults ``runs/<name>``, ``runs/<name>-2`` ...; the resolved
config saved as ``config.yaml`` and compared on ``--resume``), seeds, builds the space and the strategy
from the registry (:mod:`bnas_nni.search.strategies`), and dispatches on what the strategy declared
when it was registered:

* registered with ``runner='driver'`` (BinaryDARTS and its variants): the resumable
  :class:`~bnas_nni.search.driver.SearchDriver`, exact resume, CIFAR and ImageNet (gamma) genotypes;
* ``runner='nni'``: :func:`bnas_nni.search.experiment.run_nni_experiment` (one-shot or multi-trial by the
  strategy's registered kind); NNI restarts such experiments, so ``--resume`` is refused, and the
  ImageNet genotype repeats the searched cell (said in the log).

Outputs: the run directory, and with ``save: NAME`` the two genotype files ``NAME.yaml`` and
``NAME_imagenet.yaml`` in ``search_spaces/genotypes/`` (or ``out``), never Python sources.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls :func:`run_search`: the process group starts
with a ``dist_timeout`` on every collective, the ranks check that they resolved the same config and
datasets, rank 0 alone picks and locks the run directory and writes every output, and a user mistake
that one rank meets (a missing dataset, a bad checkpoint) becomes the same one-line error on all ranks,
printed by rank 0 (:func:`bnas_nni.distributed.collective_errors`). BinaryDARTS then runs data-parallel
on the driver; NNI's one-shot strategies under Lightning's DDP strategy (each rank exports, the exports
and supernets are compared); multi-trial strategies are refused (their trials are the parallelism).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from nni.nas.strategy import RandomOneShot

from ..config import MAX_NAME_LENGTH, SEARCH, SearchConfig, resolve
from ..console import log as console_log
from ..data import dataset_info, describe_dataset, record_dataset, search_splits
from ..distributed import broadcast_object, cleanup, collective_errors, init_distributed
from ..errors import ConfigError
from ..genotypes import Genotype, save_genotype
from ..io import check_output_dir, load_yaml, save_yaml
from ..paths import genotypes_dir
from ..rundir import RunDir
from ..seeding import seed_everything
from ..space import BNASSpace, load_space_config
from .data_parallel import (
    RANK_LOCAL_KEYS,
    check_same_config,
    check_same_export,
    lightning_ddp_options,
    oneshot_fingerprint,
    peer_failures,
    quiet_off_main,
)
from .driver import SearchDriver
from .evaluators import evaluate_derived, train_options
from .experiment import run_nni_experiment
from .reporter import SearchReporter
from .strategies import build_strategy, check_strategy_options, get_strategy_spec

__all__ = ['resolve_search_config', 'run_search', 'default_run_dir', 'save_named_genotypes', 'build_space']


def resolve_search_config(path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
                          nni_params: Optional[Mapping[str, Any]] = None, *,
                          base: Optional[Mapping[str, Any]] = None) -> SearchConfig:
    """Defaults <- YAML file (or ``base``, a resolved config) <- overrides <- NNI trial parameters (see
    :mod:`bnas_nni.config`), with the strategy, space and ops checked; the run name defaults to the
    config file's stem."""
    cfg = resolve(SEARCH, path, overrides, nni_params, base=base)
    if cfg.name is None and path:     # a plain name (see config.check_plain_name), whatever the file is called
        cfg.name = re.sub(r'[^A-Za-z0-9_.-]', '_', Path(path).stem).lstrip('_.-')[:MAX_NAME_LENGTH] or 'search'
    check_strategy_options(cfg)                               # unknown strategy or option -> one line
    load_space_config(cfg.space, **_space_overrides(cfg))  # unknown space or op -> one line
    return cfg


def _space_overrides(cfg: SearchConfig) -> Dict[str, Any]:
    keys = ('init_channels', 'layers', 'num_nodes', 'ops', 'binarizer', 'activation', 'op_set', 'nonlinearity',
            'shortcut')
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def build_space(cfg: SearchConfig):
    """The supernet of ``cfg.space``, its classifier sized to the dataset's classes (the registry's, or those
    read from a folder)."""
    overrides = _space_overrides(cfg)
    classes = dataset_info(cfg).num_classes
    if classes is not None:
        overrides['num_classes'] = classes
    return BNASSpace.from_config(cfg.space, **overrides)


def default_run_dir(cfg: SearchConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if os.environ.get('NNI_OUTPUT_DIR'):
        return Path(os.environ['NNI_OUTPUT_DIR']) / 'search'
    if cfg.save:
        return Path('runs') / f'search-{cfg.save}'
    return Path('runs') / str(cfg.name or 'search')


def _prepare_run_dir(cfg: SearchConfig, resume: bool) -> Tuple[SearchConfig, Path]:
    run_dir = default_run_dir(cfg)
    if not cfg.run_dir and not os.environ.get('NNI_OUTPUT_DIR'):
        # default run dirs are numbered: runs/search-NAME, runs/search-NAME-2, ...; a new search takes
        # the first free one, --resume the last one used
        taken = [run_dir] + [run_dir.with_name(f'{run_dir.name}-{i}') for i in range(2, 1000)]
        used = [d for d in taken if (d / 'config.yaml').exists()]
        if resume:
            run_dir = used[-1] if used else run_dir
        else:
            run_dir = next(d for d in taken if not (d / 'config.yaml').exists())
    RunDir(run_dir).check_free()                    # a directory in use: say so before anything else
    saved_path = run_dir / 'config.yaml'
    if resume:
        if not saved_path.is_file():
            raise ConfigError(f'nothing to resume: {saved_path} does not exist (start without --resume)')
        saved = resolve(SEARCH, base=load_yaml(saved_path) or {})
        diff = sorted(k for k in cfg if k not in SEARCH.resume_free and k != 'name' and cfg[k] != saved.get(k)
                      and cfg[k] != SEARCH.base.get(k))
        if diff:
            raise ConfigError(f'--resume: {", ".join(diff)} differ from the run in {run_dir}; '
                              'resume with the same settings or use a new --run-dir')
        merged = saved.replace()
        for k in SEARCH.resume_free:
            if cfg.get(k) is not None and k != 'run_dir':
                merged[k] = cfg[k]
        merged.run_dir = str(run_dir)
        return merged, run_dir
    if (run_dir / 'checkpoint.pt').exists():
        RunDir(run_dir).check_free()            # a live run is named first: --resume would not help
        raise ConfigError(f'{run_dir} already holds a search; continue it with --resume or pick another --run-dir')
    cfg = cfg.replace(run_dir=str(run_dir))
    return cfg, run_dir


def save_named_genotypes(cifar: Any, imagenet: Any, name: str, out: Optional[str | os.PathLike] = None,
                         **meta: Any) -> Tuple[Path, Path]:
    """Write ``NAME.yaml`` and ``NAME_imagenet.yaml`` (into ``out`` or ``search_spaces/genotypes``).

    An existing file is replaced only if an earlier ``bnas-nni search`` wrote it; hand-written and
    shipped genotypes are never overwritten.
    """

    folder = Path(out) if out else genotypes_dir()
    paths = (folder / f'{name}.yaml', folder / f'{name}_imagenet.yaml')
    check_save_target(paths)
    save_genotype(dataclasses.replace(cifar, name=name), paths[0], **meta)
    save_genotype(dataclasses.replace(imagenet, name=f'{name}_imagenet'), paths[1], **meta)
    return paths


def check_save_target(paths: Sequence[Path]) -> None:
    """Refuse, before the search starts, a genotype folder that cannot be written (a file, below a file) and
    genotype files that ``bnas-nni search`` did not write (never overwritten)."""
    for folder in dict.fromkeys(p.parent for p in paths):
        check_output_dir(folder, 'genotype folder', '--out')
    for p in paths:
        if p.exists():
            try:
                data = load_yaml(p)
            except ConfigError:
                data = None
            meta = data.get('meta') if isinstance(data, Mapping) else None
            if not isinstance(meta, Mapping) or meta.get('source') != 'bnas-nni search':
                raise ConfigError(f'{p} exists and was not written by bnas-nni search; choose another save name')


def _show_progress(cfg: SearchConfig) -> bool:
    return cfg.progress == 'always' or (cfg.progress == 'auto' and sys.stderr.isatty())


def search_context(cfg: SearchConfig):
    """The :class:`~bnas_nni.distributed.DistContext` of this process (one process outside torchrun; under
    torchrun the process group, started once, with ``dist_timeout`` on every collective)."""
    return init_distributed(cfg.device, timeout=cfg.dist_timeout)


def run_search(cfg: SearchConfig, *, resume: bool = False, reporter: Optional[SearchReporter] = None,
               epoch_callbacks: Sequence[Callable[[Dict[str, Any], Any], None]] = (),
               on_running: Optional[Callable[[Any, Optional[int]], None]] = None,
               log: Callable[[str], None] = console_log, ctx: Any = None) -> Dict[str, Any]:
    """Run the search a resolved config describes; returns a summary (genotypes, best epoch, paths).

    ``reporter`` (:class:`~bnas_nni.search.reporter.SearchReporter`) is how the search talks to what
    launched it, e.g. :class:`~bnas_nni.search.reporter.SearchTrialReporter` under NNI: its parameters
    are a last config layer, it may continue the run directory's search, and it gets every epoch's
    record and the summary (its final metric is ``summary['trial_metric']``).
    ``epoch_callbacks(record, driver_or_module)`` run after every epoch with the epoch's record
    (``epoch``, ``val_acc`` in percent, ``entropy`` ...); data-parallel, they run on every rank with the
    same record (metrics over all ranks). ``ctx``: a :class:`~bnas_nni.distributed.DistContext` the
    caller started; by default this call starts one from the torchrun environment and ends it when it
    returns. Off rank 0, a user mistake exits with status 2 without printing it.
    """
    own = ctx is None
    ctx = search_context(cfg) if own else ctx
    try:
        with peer_failures(ctx, cfg.dist_timeout), quiet_off_main(ctx):
            log = log if ctx.is_main else (lambda *_: None)
            params: Dict[str, Any] = {}
            if reporter is not None:
                # NNI hands one parameter set per trial, to rank 0; every rank resolves the same config
                params = broadcast_object(reporter.parameters() if ctx.is_main else None, ctx)
                if params:
                    cfg = resolve_search_config(base=cfg, nni_params=params)
                    log(f'trial parameters: {params}')
                resume = resume or bool(broadcast_object(reporter.resumes(cfg) if ctx.is_main else None, ctx))
                if ctx.is_main:
                    epoch_callbacks = [*epoch_callbacks, lambda record, _: reporter.epoch(record)]
            summary = _run_search(cfg, ctx, resume=resume, epoch_callbacks=epoch_callbacks, on_running=on_running,
                                  log=log)
            if reporter is not None and ctx.is_main:
                summary['trial_metric'] = reporter.finish({**summary, 'params': params}, cfg, log=log)
            return summary
    finally:
        if own:
            cleanup(ctx)


def _run_search(cfg: SearchConfig, ctx: Any, *, resume: bool, epoch_callbacks, on_running, log) -> Dict[str, Any]:

    check_same_config(cfg, ctx)                          # a different config file on one node: one line
    with collective_errors(ctx):
        if cfg.save and ctx.is_main:
            folder = Path(cfg.out) if cfg.out else genotypes_dir()
            check_save_target([folder / f'{cfg.save}.yaml', folder / f'{cfg.save}_imagenet.yaml'])
        spec = get_strategy_spec(cfg.strategy)
        if resume and not spec.resumable:
            raise ConfigError(f'--resume is not available for strategy {cfg.strategy!r} (NNI restarts its '
                              'experiments); rerun with a new --run-dir')
        strategy = build_strategy(cfg)
        kind = spec.kind
        if ctx.distributed and kind != 'one-shot':
            raise ConfigError(f'{cfg.strategy} is a multi-trial strategy: its trials run through the NNI manager '
                              'and are the parallelism; start it without torchrun')
        prepared = _prepare_run_dir(cfg, resume) if ctx.is_main else None
    own = cfg
    cfg, run_dir = broadcast_object(prepared, ctx)           # rank 0 picks the run directory
    if not ctx.is_main:                                      # ... each rank keeps its own execution settings
        cfg = cfg.replace(**{k: own[k] for k in RANK_LOCAL_KEYS if k in own and k not in ('run_dir', 'save', 'out')})
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = ctx.device
    with collective_errors(ctx):                             # missing data fails here, on any rank
        train, val, val_eval = search_splits(cfg)
        described = describe_dataset(cfg)
    if described:
        log(described)
    check_same_config(cfg, ctx, extra={'images': [len(train), len(val), len(val_eval)]})
    seed_everything(int(cfg.seed))
    space = build_space(cfg)
    name = cfg.save or cfg.name or 'search'
    if spec.runner == 'driver':
        summary = _run_driver(cfg, strategy, space, train, val, val_eval, run_dir, device, name, resume,
                              epoch_callbacks, log, ctx)
    else:
        summary = _run_experiment(cfg, strategy, kind, space, run_dir, device, name, epoch_callbacks, on_running,
                                  log, ctx)
    if ctx.is_main:
        _finish(cfg, summary, log)
    return summary


def _run_driver(cfg, strategy, space, train, val, val_eval, run_dir, device, name, resume, epoch_callbacks, log,
                ctx):
    with collective_errors(ctx):                 # e.g. more ranks than batches: the same line on every rank
        driver = SearchDriver(space, strategy, train_data=train, val_data=val, eval_data=val_eval, run_dir=run_dir,
                              epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, lr_min=cfg.lr_min,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                              seed=cfg.seed, workers=cfg.workers, max_train_batches=cfg.max_train_batches,
                              max_val_batches=cfg.max_val_batches, device=device,
                              progress=_show_progress(cfg) and ctx.is_main, channels_last=cfg.channels_last,
                              tensorboard=cfg.tensorboard, log_prob_every=cfg.log_prob_every, name=name,
                              epoch_callbacks=epoch_callbacks, log=log, config=cfg, dist=ctx, sync_bn=cfg.sync_bn)
        driver.rundir.acquire()                 # before writing config.yaml: one writer per run directory
    try:
        if not resume:
            driver.rundir.save_config(cfg)
            if ctx.is_main:
                record_dataset(cfg, run_dir)    # dataset.yaml: classes, channels, side, mean/std
        world = (f', {ctx.world_size} processes ({ctx.backend}, batch {cfg.batch_size} per process'
                 + (f', synced BN over {driver.synced_bns} BNs' if driver.sync_bn else '') + ')'
                 if ctx.distributed else '')
        log(f'search: {cfg.strategy} on {cfg.dataset} ({len(train)} weight / {len(val)} architecture images), '
            f'space {cfg.space}, mixed cell {cfg.mixed_cell}, {cfg.epochs} epochs x '
            f'{driver.batches_per_epoch()} iterations{world}, run dir {run_dir}')
        if cfg.sync_bn and not ctx.distributed:
            log('note: sync_bn has no effect in a single process (start the search with torchrun)')
        cifar, imagenet = driver.run(resume=resume)
    finally:
        driver.rundir.close()
    return {'genotype': cifar, 'genotype_imagenet': imagenet, 'best_epoch': driver.best['epoch'],
            'supernet_val_acc': driver.best['val_acc'], 'run_dir': run_dir, 'driver': driver, 'saved': None,
            'predicted_latency_ms': driver.module.predicted_latency_ms(cifar),
            'latency_target_ms': cfg.get('latency_target_ms')}


def _run_experiment(cfg, strategy, kind, space, run_dir, device, name, epoch_callbacks, on_running, log, ctx):

    with collective_errors(ctx):
        run = RunDir(run_dir, is_main=ctx.is_main).acquire()
        if ctx.is_main:
            record_dataset(cfg, run_dir)        # dataset.yaml: classes, channels, side, mean/std
    # off rank 0 the experiment's own files (NNI's HOME and working directory) go to a scratch folder
    scratch = None if ctx.is_main else Path(tempfile.mkdtemp(prefix=f'bnas-rank{ctx.rank}-'))
    trainer_options = lightning_ddp_options(ctx, cfg.dist_timeout) if ctx.distributed else None
    if not ctx.is_main:
        logging.getLogger('nni').setLevel(logging.WARNING)
    trained: Dict[str, Any] = {}

    def running(exp, port):
        module = getattr(exp.strategy, 'oneshot_module', None)
        if module is not None:
            trained.update(oneshot_fingerprint(module))
        if on_running is not None and ctx.is_main:
            on_running(exp, port)

    try:
        run.save_config(cfg)
        result = run_nni_experiment(cfg, strategy, kind, space, scratch or run_dir, device=device,
                                    progress=_show_progress(cfg) and ctx.is_main, epoch_callbacks=epoch_callbacks,
                                    on_running=running, log=log, trainer_options=trainer_options)
        if ctx.distributed:
            if isinstance(strategy, RandomOneShot):
                # its export is an arbitrary sample of the trained supernet (NNI's own warning), drawn from
                # an unseeded generator: rank 0 draws it for everyone
                result['arch'] = broadcast_object(result['arch'], ctx)
            check_same_export(result['arch'], trained, cfg.strategy, ctx)
            log(f'[{cfg.strategy}] {ctx.world_size} processes trained the same supernet and exported the same '
                f'architecture (Lightning DDP, {ctx.backend})')
        genotype = Genotype.from_arch_dict(result['arch'], name=name)
        summary = {'genotype': genotype, 'genotype_imagenet': genotype, 'best_epoch': int(cfg.epochs) - 1,
                   'supernet_val_acc': None, 'run_dir': run_dir, 'driver': None, 'saved': None, 'result': result}
        if ctx.is_main:
            meta = {'source': 'bnas-nni search', 'strategy': cfg.strategy, 'experiment_id': result['experiment_id'],
                    'space': str(cfg.space), 'run_dir': str(run_dir)}
            if ctx.distributed:
                meta['world_size'] = ctx.world_size
            save_genotype(genotype, run_dir / 'genotype.yaml', **meta)
            # a strategy without the gamma variant (NNI's): the ImageNet file repeats the same cell, and says so
            save_genotype(genotype, run_dir / 'genotype_imagenet.yaml', **meta, gamma=None)
            log(f'[{cfg.strategy}] no ImageNet (gamma) variant for this strategy: genotype_imagenet.yaml '
                'repeats the searched cell')
            if kind == 'one-shot' and int(cfg.derived_epochs or 0) > 0:
                train, _, val_plain = search_splits(cfg)
                opts = dict(train_options(cfg), epochs=int(cfg.derived_epochs))
                result['derived'] = evaluate_derived(space.freeze(result['arch']), train_data=train,
                                                     val_data=val_plain, report=False, **opts)
                log(f'[{cfg.strategy}] derived network: val acc {result["derived"]["default"]:.2f}%')
            save_yaml(_plain({k: v for k, v in result.items() if k != 'rest'}), run_dir / 'result.yaml')
    finally:
        run.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return summary


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


def _finish(cfg: SearchConfig, summary: Dict[str, Any], log) -> None:
    cifar, imagenet = summary['genotype'], summary['genotype_imagenet']
    acc = summary.get('supernet_val_acc')
    kept = (f'kept epoch {summary["best_epoch"] + 1} (supernet val acc {acc:.2f}%)'
            if acc is not None and acc >= 0 else 'kept the final alphas')
    log(f'genotype (CIFAR):    {cifar}')
    if summary.get('driver') is not None:
        log(f'genotype (ImageNet, gamma={cfg.gamma:g}): {imagenet}')
    log(kept)
    if summary.get('predicted_latency_ms') is not None:
        target = summary.get('latency_target_ms')
        log(f'predicted latency of the derived network: {summary["predicted_latency_ms"]:.3f} ms per batch'
            + (f' (target {target:g} ms)' if target is not None else ''))
    if cfg.save:
        paths = save_named_genotypes(cifar, imagenet, cfg.save, cfg.out, source='bnas-nni search',
                                     strategy=cfg.strategy, run_dir=str(summary['run_dir']),
                                     epoch=summary['best_epoch'] + 1,
                                     supernet_val_acc=None if acc is None or acc < 0 else float(acc),
                                     **({'predicted_latency_ms': round(summary['predicted_latency_ms'], 4)}
                                        if summary.get('predicted_latency_ms') is not None else {}))
        summary['saved'] = paths
        log(f'saved {paths[0]} and {paths[1]}')
    log(f'run directory: {summary["run_dir"]}')
