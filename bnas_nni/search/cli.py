"""``bnas-nni search``: run a BNAS cell search from a YAML preset in ``experiments/``.

Configuration is one flat mapping: the defaults below (the paper's CIFAR-10 search), then the
``--config`` file, then command-line flags (``--epochs`` ..., ``--set KEY=VALUE`` for any other key).
The resolved mapping is written to ``<run dir>/config.yaml``; ``--resume`` continues from the run
directory's last completed epoch with that saved config (a Ctrl-C leaves it resumable).

Outputs: the run directory (``config.yaml``, ``checkpoint.pt``, ``alpha_history.json``,
``genotype.yaml``, ``genotype_imagenet.yaml``, ``log.txt``, ``tb/``), and with ``--save NAME`` the two
genotype files ``NAME.yaml`` and ``NAME_imagenet.yaml`` in ``search_spaces/genotypes/`` (or ``--out``),
never Python sources.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from ..errors import ConfigError
from ..io import parse_set_items

__all__ = ['DEFAULTS', 'STRATEGY_NAMES', 'resolve_search_config', 'build_search_data', 'build_space',
           'default_run_dir', 'save_named_genotypes', 'run_search', 'register']

#: the paper's CIFAR-10 search (official search.py), see experiments/search_cifar10_paper.yaml
DEFAULTS: Dict[str, Any] = {
    'description': None,
    'strategy': 'binary-darts',
    # space: a search_spaces/*.yaml name or path; the keys below override it when set
    'space': 'bnas',
    'init_channels': None,
    'layers': None,
    'num_nodes': None,
    'ops': None,
    # data: the training split is cut into a weight half and an architecture half
    'dataset': 'cifar10',          # cifar10 | fashion-mnist
    'data': None,                  # dataset folder; None: the dataset's default location
    'download': False,             # CIFAR-10: download with torchvision when missing
    'train_subset': None,          # use only the first N training images (before the split)
    'train_portion': 0.5,          # fraction that trains the weights; the rest trains alpha
    'image_size': None,            # resize images to this side (quick CPU runs); None: native size
    # weights
    'epochs': 50,
    'batch_size': 64,
    'lr': 0.025,
    'lr_min': 0.001,
    'momentum': 0.9,
    'weight_decay': 3e-4,
    'grad_clip': None,
    # architecture
    'arc_lr': 3e-4,
    'arc_betas': [0.5, 0.999],
    'arc_weight_decay': 1e-3,
    'lamda': 1.0,                  # diversity weight
    'tau': 7.7,                    # diversity decay, epochs
    'gamma': 3.0,                  # Zeroise transfer for the ImageNet genotype
    'gamma_rule': 'zeroise',       # zeroise (intended) | official (divides edge 0's row: no effect)
    'select': 'best',              # best (alphas after the best epoch) | official (before it) | last
    'mixed_cell': 'binary',        # binary | fast
    # execution
    'seed': 2,
    'workers': 0,
    'device': 'auto',
    'threads': None,
    'channels_last': False,        # channels-last memory format (much faster dilated convs on CPU)
    'max_train_batches': None,     # cap on iterations per epoch (smoke runs)
    'max_eval_batches': None,      # cap on evaluation batches per epoch
    'progress': 'auto',            # auto (only on a terminal) | always | never
    'tensorboard': True,
    'log_prob_every': 10,          # steps between per-edge probability logs
    # outputs
    'name': None,
    'run_dir': None,
    'save': None,
    'out': None,
}

STRATEGY_NAMES = ('binary-darts', 'darts', 'gumbel-darts', 'random-one-shot')

_INT = {'image_size', 'init_channels', 'layers', 'num_nodes', 'train_subset', 'epochs', 'batch_size', 'seed',
        'workers', 'threads', 'max_train_batches', 'max_eval_batches', 'log_prob_every'}
_FLOAT = {'train_portion', 'lr', 'lr_min', 'momentum', 'weight_decay', 'grad_clip', 'arc_lr', 'arc_weight_decay',
          'lamda', 'tau', 'gamma'}
_BOOL = {'download', 'tensorboard', 'channels_last'}
_CHOICES = {'dataset': ('cifar10', 'fashion-mnist'), 'gamma_rule': ('zeroise', 'official'),
            'select': ('best', 'official', 'last'), 'mixed_cell': ('binary', 'fast'),
            'progress': ('auto', 'always', 'never')}
# keys that may differ between a run and its resumption
_RESUME_FREE = {'save', 'out', 'run_dir', 'progress', 'threads', 'device', 'workers', 'description', 'tensorboard',
                'channels_last'}


def _coerce(key: str, value: Any, source: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ('none', 'null', '~')):
        return None
    try:
        if key in _INT:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if key in _FLOAT:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if key in _BOOL:
            if isinstance(value, str):
                if value.lower() in ('1', 'true', 'yes', 'on'):
                    return True
                if value.lower() in ('0', 'false', 'no', 'off'):
                    return False
                raise ValueError
            return bool(value)
    except (TypeError, ValueError):
        kind = 'integer' if key in _INT else 'finite number' if key in _FLOAT else 'boolean'
        raise ConfigError(f'{source}: {key}={value!r} is not a valid {kind}') from None
    if key == 'strategy':
        value = str(value).strip().lower().replace('_', '-')
        if value not in STRATEGY_NAMES:
            raise ConfigError(f'{source}: unknown strategy {value!r}; choose one of {", ".join(STRATEGY_NAMES)}')
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f'{source}: {key}={value!r}; choose one of {", ".join(_CHOICES[key])}')
    if key == 'arc_betas':
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(0 <= float(b) < 1 for b in value)):
            raise ConfigError(f'{source}: arc_betas must be two numbers in [0, 1), got {value!r}')
        value = [float(b) for b in value]
    if key == 'ops':
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f'{source}: ops must be a non-empty list of op names')
        from ..ops import check_ops

        value = list(check_ops([str(v) for v in value], where=source))
    return value


def _merge(cfg: Dict[str, Any], data: Optional[Mapping[str, Any]], source: str) -> None:
    for raw, value in (data or {}).items():
        key = str(raw).replace('-', '_')
        if key not in cfg:
            raise ConfigError(f'{source}: unknown key {raw!r}; known keys: {", ".join(sorted(DEFAULTS))}')
        cfg[key] = _coerce(key, value, source)


def _validate(cfg: Dict[str, Any]) -> None:
    from .binary_darts import check_hparams

    check_hparams(cfg['lamda'], cfg['tau'], cfg['gamma'], cfg['select'])
    if cfg['epochs'] < 1 or cfg['batch_size'] < 1:
        raise ConfigError(f'epochs and batch_size must be >= 1, got {cfg["epochs"]} and {cfg["batch_size"]}')
    if not 0 < cfg['train_portion'] < 1:
        raise ConfigError(f'train_portion must be in (0, 1), got {cfg["train_portion"]}')
    if not (cfg['lr'] > 0 and 0 <= cfg['lr_min'] <= cfg['lr']):
        raise ConfigError(f'need lr > 0 and 0 <= lr_min <= lr, got lr={cfg["lr"]}, lr_min={cfg["lr_min"]}')
    if cfg['arc_lr'] <= 0:
        raise ConfigError(f'arc_lr must be > 0, got {cfg["arc_lr"]}')
    if cfg['image_size'] is not None and cfg['image_size'] < 8:
        raise ConfigError(f'image_size must be at least 8, got {cfg["image_size"]}')
    if cfg['train_subset'] is not None and cfg['train_subset'] < 2:
        raise ConfigError('train_subset must be at least 2 (one image per half)')
    save = cfg['save']
    if save is not None and (not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', str(save)) or str(save).endswith('.py')):
        raise ConfigError(f'--save {cfg["save"]!r}: use a plain name (letters, digits, _ . -), e.g. my_cell')
    from ..space import load_space_config

    load_space_config(cfg['space'], **_space_overrides(cfg))  # unknown space or op -> one line


def resolve_search_config(path: Optional[str | os.PathLike] = None,
                          overrides: Optional[Mapping[str, Any]] = None,
                          nni_params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults <- YAML file <- overrides <- NNI trial parameters, type-checked and validated."""
    from ..io import load_yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        data = load_yaml(path)
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f'{path}: a search config must be a mapping of keys to values')
        _merge(cfg, data, str(path))
        if cfg['name'] is None:
            cfg['name'] = Path(path).stem
    _merge(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, 'command line')
    _merge(cfg, nni_params, 'NNI parameters')
    _validate(cfg)
    return cfg


def _space_overrides(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: cfg[k] for k in ('init_channels', 'layers', 'num_nodes', 'ops') if cfg.get(k) is not None}


def build_space(cfg: Mapping[str, Any]):
    from ..space import BNASSpace

    return BNASSpace.from_config(cfg['space'], **_space_overrides(cfg))


def build_search_data(cfg: Mapping[str, Any]) -> Tuple[Any, Any, Any]:
    """``(weight half, architecture half, architecture half without augmentation)`` of the training
    split (the official search never touches the test split)."""
    import torch.utils.data as tud

    from .. import data as D

    if cfg['dataset'] == 'fashion-mnist':
        plain = D.FashionMNIST32(cfg['data'], train=True, subset=cfg['train_subset'], augment=False)
        aug = copy.copy(plain)
        aug.augment = True
    else:
        root = cfg['data'] or 'data/cifar10'
        aug = D.cifar10(root, train=True, download=cfg['download'], transform=D.cifar_transforms(True),
                        subset=cfg['train_subset'])
        plain = D.cifar10(root, train=True, download=False, transform=D.cifar_transforms(False),
                          subset=cfg['train_subset'])
    if cfg.get('image_size'):
        aug, plain = Resized(aug, cfg['image_size']), Resized(plain, cfg['image_size'])
    n = len(aug)
    split = int(math.floor(n * cfg['train_portion']))
    if split < 1 or split >= n:
        raise ConfigError(f'train_portion {cfg["train_portion"]} leaves an empty half of {n} images')
    return (tud.Subset(aug, range(0, split)), tud.Subset(aug, range(split, n)), tud.Subset(plain, range(split, n)))


class Resized:
    """A dataset whose images are resized (bilinear, antialiased) to ``size`` x ``size``."""

    def __init__(self, dataset: Any, size: int) -> None:
        self.dataset, self.size = dataset, int(size)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch.nn.functional as F

        x, y = self.dataset[index]
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x[None], size=(self.size, self.size), mode='bilinear', antialias=True,
                              align_corners=False)[0]
        return x, y


def default_run_dir(cfg: Mapping[str, Any]) -> Path:
    if cfg.get('run_dir'):
        return Path(cfg['run_dir'])
    if os.environ.get('NNI_OUTPUT_DIR'):
        return Path(os.environ['NNI_OUTPUT_DIR']) / 'search'
    if cfg.get('save'):
        return Path('runs') / f'search-{cfg["save"]}'
    return Path('runs') / str(cfg.get('name') or 'search')


def save_named_genotypes(cifar: Any, imagenet: Any, name: str, out: Optional[str | os.PathLike] = None,
                         **meta: Any) -> Tuple[Path, Path]:
    """Write ``NAME.yaml`` and ``NAME_imagenet.yaml`` (into ``out`` or ``search_spaces/genotypes``).

    An existing file is replaced only if an earlier ``bnas-nni search`` wrote it; hand-written and
    shipped genotypes are never overwritten.
    """
    from ..genotypes import save_genotype
    from ..io import load_yaml
    from ..paths import genotypes_dir

    folder = Path(out) if out else genotypes_dir()
    paths = (folder / f'{name}.yaml', folder / f'{name}_imagenet.yaml')
    for p in paths:
        if p.exists():
            try:
                data = load_yaml(p)
            except ConfigError:
                data = None
            source = (data or {}).get('meta', {}).get('source') if isinstance(data, dict) else None
            if source != 'bnas-nni search':
                raise ConfigError(f'{p} exists and was not written by bnas-nni search; choose another --save name')
    g1 = type(cifar)(normal=cifar.normal, reduce=cifar.reduce, normal_concat=cifar.normal_concat,
                     reduce_concat=cifar.reduce_concat, name=name)
    g2 = type(imagenet)(normal=imagenet.normal, reduce=imagenet.reduce, normal_concat=imagenet.normal_concat,
                        reduce_concat=imagenet.reduce_concat, name=f'{name}_imagenet')
    save_genotype(g1, paths[0], **meta)
    save_genotype(g2, paths[1], **meta)
    return paths


def _device(spec: str):
    import torch

    if spec in (None, 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f'unknown device {spec!r}; use auto, cpu, cuda or cuda:N') from None
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'device {spec!r} requested but CUDA is not available')
    return dev


def _progress(cfg: Mapping[str, Any]) -> bool:
    return cfg['progress'] == 'always' or (cfg['progress'] == 'auto' and sys.stderr.isatty())


def _prepare_run_dir(cfg: Dict[str, Any], resume: bool) -> Tuple[Dict[str, Any], Path]:
    from ..io import dump_yaml, load_yaml, atomic_write_text

    run_dir = default_run_dir(cfg)
    if not cfg.get('run_dir') and not os.environ.get('NNI_OUTPUT_DIR'):
        # default run dirs are numbered: runs/search-NAME, runs/search-NAME-2, ...; a new search takes
        # the first free one, --resume the last one used
        taken = [run_dir] + [run_dir.with_name(f'{run_dir.name}-{i}') for i in range(2, 1000)]
        used = [d for d in taken if (d / 'config.yaml').exists()]
        if resume:
            run_dir = used[-1] if used else run_dir
        else:
            run_dir = next(d for d in taken if not (d / 'config.yaml').exists())
    saved_path = run_dir / 'config.yaml'
    if resume:
        if not saved_path.is_file():
            raise ConfigError(f'nothing to resume: {saved_path} does not exist (start without --resume)')
        saved = load_yaml(saved_path) or {}
        merged = copy.deepcopy(DEFAULTS)
        _merge(merged, saved, str(saved_path))
        diff = sorted(k for k in DEFAULTS if k not in _RESUME_FREE and k != 'name' and merged.get(k) != cfg.get(k)
                      and cfg.get(k) != DEFAULTS.get(k))
        if diff:
            raise ConfigError(f'--resume: {", ".join(diff)} differ from the run in {run_dir}; '
                              'resume with the same settings or use a new --run-dir')
        for k in _RESUME_FREE:
            if cfg.get(k) is not None and k != 'run_dir':
                merged[k] = cfg[k]
        merged['run_dir'] = str(run_dir)
        return merged, run_dir
    if (run_dir / 'checkpoint.pt').exists():
        raise ConfigError(f'{run_dir} already holds a search; continue it with --resume or pick another --run-dir')
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, run_dir=str(run_dir))
    atomic_write_text(saved_path, dump_yaml(cfg))
    return cfg, run_dir


def run_search(cfg: Dict[str, Any], *, resume: bool = False, epoch_callbacks=(), log=print) -> Dict[str, Any]:
    """Run the search described by a resolved config; returns a summary dict (genotypes, paths, best)."""
    import torch

    cfg, run_dir = _prepare_run_dir(cfg, resume)
    if cfg['threads']:
        torch.set_num_threads(int(cfg['threads']))
    device = _device(cfg['device'])
    train, val, val_eval = build_search_data(cfg)  # missing data fails here, before any heavy work
    torch.manual_seed(cfg['seed'])
    import numpy as np
    import random

    np.random.seed(cfg['seed'])
    random.seed(cfg['seed'])
    space = build_space(cfg)
    if cfg['strategy'] != 'binary-darts':
        return _run_nni_strategy(cfg, space, train, val, run_dir, device, log)

    from .binary_darts import BinaryDARTS, SearchRunner

    strategy = BinaryDARTS(arc_learning_rate=cfg['arc_lr'], arc_betas=tuple(cfg['arc_betas']),
                           arc_weight_decay=cfg['arc_weight_decay'], lamda=cfg['lamda'], tau=cfg['tau'],
                           gamma=cfg['gamma'], gamma_rule=cfg['gamma_rule'], select=cfg['select'],
                           mixed_cell=cfg['mixed_cell'], gradient_clip_val=cfg['grad_clip'])
    name = cfg['save'] or cfg['name'] or 'search'
    runner = SearchRunner(space, strategy, train_data=train, val_data=val, eval_data=val_eval, run_dir=run_dir,
                          epochs=cfg['epochs'], batch_size=cfg['batch_size'], lr=cfg['lr'], lr_min=cfg['lr_min'],
                          momentum=cfg['momentum'], weight_decay=cfg['weight_decay'], grad_clip=cfg['grad_clip'],
                          seed=cfg['seed'], workers=cfg['workers'], max_train_batches=cfg['max_train_batches'],
                          max_eval_batches=cfg['max_eval_batches'], device=device, progress=_progress(cfg),
                          channels_last=cfg['channels_last'],
                          tensorboard=cfg['tensorboard'], log_prob_every=cfg['log_prob_every'], name=name,
                          epoch_callbacks=epoch_callbacks, log=log)
    log(f'search: {cfg["strategy"]} on {cfg["dataset"]} ({len(train)} weight / {len(val)} architecture images), '
        f'space {cfg["space"]}, {cfg["epochs"]} epochs x {runner.batches_per_epoch()} iterations, run dir {run_dir}')
    cifar, imagenet = runner.run(resume=resume)
    summary = {'genotype': cifar, 'genotype_imagenet': imagenet, 'best_epoch': runner.best['epoch'],
               'supernet_val_acc': runner.best['val_acc'], 'run_dir': run_dir, 'runner': runner, 'saved': None}
    _finish(cfg, summary, log)
    return summary


def _finish(cfg: Mapping[str, Any], summary: Dict[str, Any], log) -> None:
    cifar, imagenet = summary['genotype'], summary['genotype_imagenet']
    acc = summary.get('supernet_val_acc')
    kept = (f'kept epoch {summary["best_epoch"] + 1} (supernet val acc {100 * acc:.2f}%)'
            if acc is not None and acc >= 0 else 'kept the final alphas')
    log(f'genotype (CIFAR):    {cifar}')
    if cfg['strategy'] == 'binary-darts':
        log(f'genotype (ImageNet, gamma={cfg["gamma"]:g}): {imagenet}')
    log(kept)
    if cfg['save']:
        paths = save_named_genotypes(cifar, imagenet, cfg['save'], cfg['out'], source='bnas-nni search',
                                     strategy=cfg['strategy'], run_dir=str(summary['run_dir']),
                                     epoch=summary['best_epoch'] + 1,
                                     supernet_val_acc=None if acc is None else float(acc))
        summary['saved'] = paths
        log(f'saved {paths[0]} and {paths[1]}')
    log(f'run directory: {summary["run_dir"]}')


def _run_nni_strategy(cfg: Dict[str, Any], space: Any, train: Any, val: Any, run_dir: Path, device: Any,
                      log) -> Dict[str, Any]:
    """NNI's stock one-shot strategies through ``NasExperiment`` (Lightning; no exact resume)."""
    from nni.nas.evaluator.pytorch import DataLoader
    from nni.nas.experiment import NasExperiment
    from pytorch_lightning.loggers import TensorBoardLogger

    from ..genotypes import Genotype
    from .evaluators import BinaryClassification
    from .nni_strategies import get_strategy

    import logging
    import warnings

    for name in ('pytorch_lightning', 'lightning.pytorch', 'lightning_fabric'):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in ('.*number of training batches.*', '.*does not have many workers.*', '.*LeafSpec.*',
                    '.*litlogger.*'):
        warnings.filterwarnings('ignore', message=message)
    kwargs = {'arc_learning_rate': cfg['arc_lr']} if cfg['strategy'] in ('darts', 'gumbel-darts') else {}
    strategy = get_strategy(cfg['strategy'], **kwargs)
    trainer_kwargs = dict(max_epochs=cfg['epochs'], accelerator='gpu' if device.type == 'cuda' else 'cpu',
                          logger=TensorBoardLogger(str(run_dir), name='tb', version=''),
                          enable_progress_bar=_progress(cfg), num_sanity_val_steps=0)
    if cfg['max_train_batches']:
        trainer_kwargs['limit_train_batches'] = cfg['max_train_batches']
    evaluator = BinaryClassification(learning_rate=cfg['lr'], weight_decay=cfg['weight_decay'],
                                     momentum=cfg['momentum'], lr_min=cfg['lr_min'],
                                     num_classes=int(space.classifier.out_features),
                                     train_dataloaders=DataLoader(train, batch_size=cfg['batch_size'], shuffle=True),
                                     val_dataloaders=DataLoader(val, batch_size=cfg['batch_size'], shuffle=True),
                                     **trainer_kwargs)
    exp = NasExperiment(space, evaluator, strategy)
    exp.config.experiment_working_directory = str((run_dir / 'nni-experiments').resolve())
    log(f'search: {cfg["strategy"]} (NNI) on {cfg["dataset"]}, {cfg["epochs"]} epochs, run dir {run_dir}')
    try:
        exp.run()
        arch = exp.export_top_models(formatter='dict')[0]
    finally:
        exp.stop()
    genotype = Genotype.from_arch_dict(arch, name=cfg['save'] or cfg['name'] or 'search')
    from ..genotypes import save_genotype

    save_genotype(genotype, run_dir / 'genotype.yaml', source='bnas-nni search', strategy=cfg['strategy'])
    # NNI's strategies have no Zeroise transfer: the ImageNet file repeats the same cell
    save_genotype(genotype, run_dir / 'genotype_imagenet.yaml', source='bnas-nni search', strategy=cfg['strategy'])
    summary = {'genotype': genotype, 'genotype_imagenet': genotype, 'best_epoch': cfg['epochs'] - 1,
               'supernet_val_acc': None, 'run_dir': run_dir, 'runner': None, 'saved': None}
    _finish(cfg, summary, log)
    return summary


# --------------------------------------------------------------------------- CLI


_parse_set = parse_set_items


def _cmd_search(args: argparse.Namespace) -> int:
    from ..cli import quiet_warnings

    quiet_warnings()
    if args.config:
        from .experiment import is_strategy_config

        if is_strategy_config(args.config):  # experiments/strategy_*.yaml: sectioned NNI-strategy preset
            return _cmd_strategy_preset(args)
    overrides = _parse_set(args.set)
    overrides.update({k: v for k, v in {
        'space': args.space, 'epochs': args.epochs, 'batch_size': args.batch_size, 'lamda': args.lamda,
        'tau': args.tau, 'gamma': args.gamma, 'seed': args.seed, 'save': args.save, 'out': args.out,
        'run_dir': args.run_dir, 'strategy': args.strategy, 'data': args.data, 'dataset': args.dataset,
    }.items() if v is not None})
    cfg = resolve_search_config(args.config, overrides)
    run_search(cfg, resume=args.resume)
    return 0


def _cmd_strategy_preset(args: argparse.Namespace) -> int:
    """``--config experiments/strategy_*.yaml``: any NNI strategy (one-shot or multi-trial) on the space."""
    from .experiment import run_nni_strategy

    if args.resume:
        raise ConfigError('--resume is not available for NNI strategy presets; rerun with a new --run-dir')
    flat_only = {'--space': args.space, '--strategy': args.strategy, '--lamda': args.lamda, '--tau': args.tau,
                 '--gamma': args.gamma, '--dataset': args.dataset}
    given = [flag for flag, v in flat_only.items() if v is not None]
    if given:
        raise ConfigError(f'{", ".join(given)}: not used by {args.config}; use --set section.key=VALUE '
                          '(e.g. --set strategy.arc_learning_rate=0.01)')
    overrides = _parse_set(args.set)
    overrides.update({k: v for k, v in {'seed': args.seed, 'save': args.save, 'out': args.out,
                                        'train.epochs': args.epochs, 'data.batch_size': args.batch_size,
                                        'data.root': args.data}.items() if v is not None})
    result = run_nni_strategy(args.config, run_dir=args.run_dir, overrides=overrides)
    derived = (result.get('metrics') or {}).get('derived')
    if derived:
        print(f'derived network: val acc {100 * derived["default"]:.2f}%')
    for path in result.get('saved') or []:
        print(f'saved {path}')
    print(f'genotype: {result["genotype"]}')
    print(f'run directory: {result["run_dir"]}')
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni search``."""
    p = subparsers.add_parser('search', help='search BNAS cells (BinaryDARTS or an NNI one-shot strategy)',
                              description='Search BNAS cells from a YAML preset in experiments/ (default: the '
                                          "paper's CIFAR-10 search); see bnas_nni/strategy/search_cli.py.",
                              epilog='example: bnas-nni search --config experiments/search_quick_fashion.yaml '
                                     '--save quick_fashion')
    p.add_argument('--config', default=None, help='YAML preset (experiments/search_*.yaml or strategy_*.yaml); default: the paper search')
    p.add_argument('--space', default=None, help='search space name in search_spaces/ or a YAML path')
    p.add_argument('--strategy', default=None, help=f'one of {", ".join(STRATEGY_NAMES)} (default binary-darts)')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--batch-size', type=int, default=None)
    p.add_argument('--lamda', type=float, default=None, help='diversity weight lambda >= 0 (paper: 1)')
    p.add_argument('--tau', type=float, default=None, help='diversity decay tau > 0 in epochs (paper: 7.7)')
    p.add_argument('--gamma', type=float, default=None, help='Zeroise transfer for the ImageNet genotype (paper: 3)')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--dataset', default=None, help='cifar10 or fashion-mnist')
    p.add_argument('--data', default=None, help='dataset folder')
    p.add_argument('--save', default=None, metavar='NAME', help='write NAME.yaml and NAME_imagenet.yaml genotypes')
    p.add_argument('--out', default=None, metavar='DIR', help='folder for --save (default search_spaces/genotypes)')
    p.add_argument('--run-dir', default=None, metavar='DIR',
                   help='run directory (default runs/search-NAME with --save, else runs/<config name>; '
                        'numbered -2, -3 ... when taken)')
    p.add_argument('--resume', action='store_true', help='continue the search in the run directory')
    p.add_argument('--set', action='append', metavar='KEY=VALUE', help='override any config key (repeatable)')
    p.set_defaults(func=_cmd_search)
