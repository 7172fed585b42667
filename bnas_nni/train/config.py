"""Trainer configuration: one flat mapping, resolved once and saved in the run directory.

Resolution order (later wins): the recipe defaults of the task (``cifar`` or ``imagenet``), the YAML
file given with ``--config``, command-line overrides, then NNI trial parameters. Keys are flat so an
NNI search space can name them directly (``lr``, ``weight_decay``, ``epochs``, ``model`` ...). A few
spellings of the official scripts are accepted as aliases (``learning_rate``, ``model_config``,
``arch`` ...). Unknown keys are an error, never silently ignored.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..errors import ConfigError
from ..io import load_yaml

__all__ = ['TASKS', 'DEFAULTS', 'ALIASES', 'default_config', 'apply_overrides', 'load_config',
           'resolve_config', 'task_for', 'default_run_dir']

TASKS = ('cifar', 'imagenet')

# Keys shared by both trainers; the per-task tables below override the recipe values.
_COMMON: Dict[str, Any] = {
    'task': 'cifar',              # which trainer: cifar (32x32 data) or imagenet (ImageFolder data)
    'name': None,                 # run name; default run_dir is runs/<name>
    'run_dir': None,              # where config.yaml, log.txt, metrics.csv, tb/ and checkpoint.pt go
    # model (see search_spaces/models.yaml); None keeps the model config's value
    'model': 'bnas-a',
    'genotype': None,
    'init_channels': None,
    'layers': None,
    'num_classes': None,
    'precision_rule': None,
    'binarizer': None,
    # data
    'dataset': 'cifar10',         # cifar10 | fashion-mnist | imagenet
    'data': None,                 # dataset root; None: the dataset's default location
    'download': True,             # CIFAR-10 only: download with torchvision if missing
    'train_subset': None,         # use only the first N training images (quick runs)
    'val_subset': None,           # use only the first N validation images
    'workers': 2,
    # optimisation
    'epochs': 600,
    'batch_size': 256,            # per process
    'lr': 0.05,
    'momentum': 0.9,
    'weight_decay': 3e-6,
    'schedule': 'onecycle',       # onecycle (CIFAR, per iteration) | cosine_restarts (ImageNet, per iteration)
    'onecycle_min_factor': 0.05,  # one-cycle starts and ends the cycle at lr * this factor
    'onecycle_momentum': [0.85, 0.95],
    'onecycle_annihilation': 0.1,
    'onecycle_reduce_factor': 0.01,
    'restart_epochs': 50,         # cosine warm restarts period T_0, in epochs
    'label_smoothing': 0.0,
    'grad_clip': None,            # max gradient norm; None disables clipping
    'grad_clip_mode': 'binary',   # binary: norm of the gradient w.r.t. the binary weights (official); latent
    'drop_path_prob': 0.2,        # final value; the trainer uses drop_path_prob * epoch / epochs
    # image sizes (ImageNet trainer)
    'image_size': 224,
    'val_resize': 256,
    'color_jitter': [0.4, 0.4, 0.4, 0.2],
    # execution
    'seed': 0,
    'device': 'auto',             # auto | cpu | cuda | cuda:N
    'amp': None,                  # None | bf16 | fp16
    'channels_last': False,
    'threads': None,              # torch.set_num_threads on CPU
    'report_freq': 50,
    'max_train_batches': None,    # cap per epoch, for smoke runs
    'max_val_batches': None,
    'progress': 'auto',           # auto (only on a terminal) | always | never
    'tensorboard': True,
}

DEFAULTS: Dict[str, Dict[str, Any]] = {
    # BNAS-A CIFAR-10 recipe (official train.py with --learning_rate 0.05)
    'cifar': {**_COMMON},
    # BNAS-D..H ImageNet recipe (official train_imagenet.py)
    'imagenet': {**_COMMON, 'task': 'imagenet', 'model': 'bnas-d', 'dataset': 'imagenet', 'epochs': 250,
                 'weight_decay': 3e-5, 'schedule': 'cosine_restarts', 'label_smoothing': 0.1, 'grad_clip': 5.0,
                 'drop_path_prob': 0.0, 'workers': 4, 'report_freq': 100},
}

ALIASES = {
    'learning_rate': 'lr', 'wd': 'weight_decay', 'model_config': 'model', 'arch': 'genotype',
    'C': 'init_channels', 'init_channel': 'init_channels', 'batch': 'batch_size', 'label_smooth': 'label_smoothing',
    'data_root': 'data', 'num_workers': 'workers',
}

_CHOICES = {
    'task': TASKS,
    'dataset': ('cifar10', 'fashion-mnist', 'imagenet'),
    'schedule': ('onecycle', 'cosine_restarts', 'constant'),
    'grad_clip_mode': ('binary', 'latent'),
    'amp': (None, 'bf16', 'fp16'),
    'progress': ('auto', 'always', 'never'),
}
_INT_KEYS = {'init_channels', 'layers', 'num_classes', 'train_subset', 'val_subset', 'workers', 'epochs',
             'batch_size', 'restart_epochs', 'image_size', 'val_resize', 'seed', 'threads', 'report_freq',
             'max_train_batches', 'max_val_batches'}
_FLOAT_KEYS = {'lr', 'momentum', 'weight_decay', 'onecycle_min_factor', 'onecycle_annihilation',
               'onecycle_reduce_factor', 'label_smoothing', 'grad_clip', 'drop_path_prob'}
_BOOL_KEYS = {'download', 'channels_last', 'tensorboard'}


def task_for(mapping: Mapping[str, Any]) -> str:
    """The trainer a config asks for: its ``task`` key, else ImageNet data means the ImageNet trainer."""
    task = mapping.get('task')
    if task is None:
        task = 'imagenet' if mapping.get('dataset') == 'imagenet' else 'cifar'
    if task not in TASKS:
        raise ConfigError(f'unknown task {task!r}; choose one of {", ".join(TASKS)}')
    return task


def default_config(task: str) -> Dict[str, Any]:
    if task not in DEFAULTS:
        raise ConfigError(f'unknown task {task!r}; choose one of {", ".join(TASKS)}')
    return copy.deepcopy(DEFAULTS[task])


def _coerce(key: str, value: Any, source: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ('none', 'null', '~')):
        return None
    try:
        if key in _INT_KEYS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if key in _FLOAT_KEYS:
            return float(value)
        if key in _BOOL_KEYS:
            if isinstance(value, str):
                if value.lower() in ('1', 'true', 'yes', 'on'):
                    return True
                if value.lower() in ('0', 'false', 'no', 'off'):
                    return False
                raise ValueError
            return bool(value)
    except (TypeError, ValueError):
        raise ConfigError(f'{source}: {key}={value!r} is not a valid {_kind(key)}') from None
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f'{source}: {key}={value!r}; choose one of {", ".join(map(str, _CHOICES[key]))}')
    return value


def _kind(key: str) -> str:
    return 'integer' if key in _INT_KEYS else 'number' if key in _FLOAT_KEYS else 'boolean'


def apply_overrides(cfg: Dict[str, Any], overrides: Optional[Mapping[str, Any]], source: str) -> Dict[str, Any]:
    """Merge ``overrides`` into ``cfg`` in place, mapping aliases and checking names and types."""
    for raw_key, value in (overrides or {}).items():
        key = ALIASES.get(str(raw_key), str(raw_key)).replace('-', '_')
        key = ALIASES.get(key, key)
        if key not in cfg:
            raise ConfigError(f'{source}: unknown config key {raw_key!r}; known keys: {", ".join(sorted(cfg))}')
        cfg[key] = _coerce(key, value, source)
    return cfg


def load_config(path: str | os.PathLike) -> Dict[str, Any]:
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: a trainer config must be a mapping of keys to values')
    return data


def resolve_config(path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
                   task: Optional[str] = None, nni_params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Recipe defaults <- YAML file <- overrides <- NNI parameters, type-checked."""
    file_cfg = load_config(path) if path else {}
    merged_view = {**file_cfg, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    task = task or task_for(merged_view)
    cfg = default_config(task)
    apply_overrides(cfg, file_cfg, str(path) if path else 'config')
    apply_overrides(cfg, {k: v for k, v in (overrides or {}).items() if v is not None}, 'command line')
    apply_overrides(cfg, nni_params, 'NNI parameters')
    cfg['task'] = task
    if cfg['epochs'] is None or cfg['epochs'] < 1:
        raise ConfigError('epochs must be at least 1')
    if cfg['batch_size'] is None or cfg['batch_size'] < 1:
        raise ConfigError('batch_size must be at least 1')
    return cfg


def default_run_dir(cfg: Mapping[str, Any]) -> Path:
    """``runs/<name>`` (or the NNI trial's output folder when running as a trial)."""
    if cfg.get('run_dir'):
        return Path(cfg['run_dir'])
    nni_out = os.environ.get('NNI_OUTPUT_DIR')
    if nni_out:
        return Path(nni_out) / 'run'
    name = cfg.get('name') or f"{cfg['task']}-{cfg['model']}"
    return Path('runs') / name
