"""``bnas-nni train`` and ``bnas-nni eval`` (thin: the work is in :mod:`bnas_nni.train.runner`).

``train`` resolves ``--config`` plus the flags below once (see :mod:`bnas_nni.config`), saves the
result in the run directory and trains with the config's recipe; under ``torchrun`` every rank runs
it. ``eval`` scores a checkpoint (ours, or an official one with ``--official``) and prints top-1/top-5.
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from ..cli import quiet_warnings, run_guarded
from ..config import TRAIN, add_config_flags, flag_overrides
from ..errors import ConfigError
from ..io import parse_set_items

__all__ = ['register', 'add_common_arguments', 'overrides_from_args', 'train_main']

# config keys with a flag of their own, help from their declaration in bnas_nni.config (--set reaches the rest)
_FLAGS = ('recipe', 'model', ('--arch', 'genotype'), 'layers', 'init_channels', 'num_classes', 'precision_rule',
          'dataset', 'data', 'batch_size', 'workers', 'device', 'amp', 'threads', 'max_val_batches', 'val_subset',
          'channels_last')
_TRAIN_FLAGS = ('epochs', 'lr', 'weight_decay', 'momentum', 'drop_path_prob', 'label_smoothing', 'grad_clip', 'seed',
                'run_dir', 'name', 'train_subset', 'max_train_batches', 'report_freq')


def add_common_arguments(p: argparse.ArgumentParser, train: bool = True) -> None:
    """The flags shared by ``bnas-nni train``, ``trainers/*.py`` and (without training ones) ``eval``."""
    p.add_argument('--config', default=None, help='trainer YAML (experiments/train_*.yaml)')
    add_config_flags(p, TRAIN, _FLAGS + (_TRAIN_FLAGS if train else ()))
    p.add_argument('--set', dest='set_items', action='append', default=[], metavar='KEY=VALUE',
                   help='any other config key, e.g. --set schedule=constant (repeatable; KEY=null unsets it)')


def overrides_from_args(args: argparse.Namespace, train: bool = True) -> Dict[str, Any]:
    keys = [k if isinstance(k, str) else k[1] for k in _FLAGS + (_TRAIN_FLAGS if train else ())]
    out = flag_overrides(args, keys)
    out.update(parse_set_items(args.set_items))
    return {k: v for k, v in out.items() if v is not None}


def _cmd_train(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> int:
    # the training machinery is imported on use: keeps `bnas-nni --help` fast
    from .runner import run_training

    quiet_warnings()
    run_training(args.config, overrides_from_args(args), defaults=defaults, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..checkpoints import read_checkpoint
    from .runner import resolve_train_config, run_evaluation

    overrides = overrides_from_args(args, train=False)
    base_cfg: Optional[Dict[str, Any]] = None
    if not args.official and args.config is None:
        obj = read_checkpoint(args.checkpoint)
        if isinstance(obj, dict) and isinstance(obj.get('config'), dict):
            base_cfg = obj['config']       # our checkpoint: evaluate it as it was trained
    if base_cfg is None:
        if args.official and 'precision_rule' not in overrides:
            overrides['precision_rule'] = 'official-2020-08'
        if 'model' not in overrides and args.config is None:
            raise ConfigError('eval needs --model (or --config) to know which network the checkpoint holds')
    cfg = resolve_train_config(args.config, overrides, base=base_cfg)
    res = run_evaluation(cfg, args.checkpoint, official=args.official)
    print(f"top1 {res['top1']:.4f} top5 {res['top5']:.4f} loss {res['loss']:.6f} "
          f"({res['n']} images, {cfg['dataset']})")
    return 0


def register(subparsers: Any) -> None:
    """Add ``train`` and ``eval`` to the ``bnas-nni`` command line."""
    from .recipes import RECIPES

    t = subparsers.add_parser('train', help='train a derived architecture with a recipe (CIFAR-10 or ImageNet)',
                              description='Train a derived BNAS architecture. Under torchrun every rank runs this. '
                                          f'Recipes: {", ".join(RECIPES.names())}.')
    add_common_arguments(t)
    t.add_argument('--resume', nargs='?', const=True, default=None, metavar='CHECKPOINT',
                   help='continue the run directory\'s checkpoint, or the given checkpoint / run dir')
    t.set_defaults(func=_cmd_train)

    e = subparsers.add_parser('eval', help='top-1/top-5 of a checkpoint (ours or official)',
                              description='Evaluate a checkpoint on the validation set and print top-1/top-5.')
    e.add_argument('--checkpoint', required=True, help='checkpoint file or run directory')
    add_common_arguments(e, train=False)
    e.add_argument('--official', action='store_true',
                   help='the checkpoint comes from gistvision/bnas (maps its key names; precision rule '
                        'official-2020-08 unless --precision-rule says otherwise)')
    e.set_defaults(func=_cmd_eval)


def train_main(argv: Optional[List[str]] = None, *, prog: str = 'train.py',
               defaults: Optional[Dict[str, Any]] = None) -> int:
    """Entry of ``trainers/train_*.py``: the ``train`` flags, with the script's ``defaults`` under the
    config; user mistakes print one line and exit 2, like ``bnas-nni``."""
    quiet_warnings()
    p = argparse.ArgumentParser(prog=prog, description='BNAS trainer (see experiments/train_*.yaml).')
    add_common_arguments(p)
    p.add_argument('--resume', nargs='?', const=True, default=None, metavar='CHECKPOINT')
    args = p.parse_args(argv)
    return run_guarded(lambda: _cmd_train(args, defaults), 'interrupted; continue with --resume')
