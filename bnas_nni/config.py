"""One configuration system for search, training, NNI trials and benches.

Every knob is declared once, as a typed field of a section dataclass below; a command's **schema** is a
list of sections plus its own defaults. A config is a flat mapping (``lr``, ``epochs``, ``dataset`` ...)
so the same key names work in YAML files, ``--set key=value``, and NNI search spaces. It is resolved
once, in this order (later wins)::

    section defaults <- command defaults <- recipe defaults (training) <- YAML file <- command line <- NNI parameters

Rules of the resolver:

* values are coerced to the field's type (``'3e-4'`` -> 0.0003, ``'true'`` -> True) or rejected in one line;
* an explicit ``null`` unsets a key: it goes back to its default (``--set data=null``);
* a key's domain is declared with it (``field(metadata=at_least(1))``, ``plain_name()``): a value outside
  it (``init_channels: -8``, ``layers: 0``, a run name with ``/``) is one line before anything runs;
* unknown keys are an error that lists the allowed ones; a few spellings of the official scripts are
  accepted as aliases (``learning_rate`` -> ``lr`` ...);
* a dataset path follows its dataset: when a later layer changes ``dataset`` without giving ``data``, the
  earlier ``data`` is dropped (``--set dataset=fashion-mnist`` on a CIFAR preset works unchanged);
* dict-valued keys take dotted overrides (``--set strategy_options.temperature=[1, 0.5]``);
* ``imports: [module, ...]`` imports plugin modules first (e.g. one that registers a strategy).

The resolved mapping is what a run saves as ``config.yaml`` in its run directory, and what ``--resume``
compares against (:func:`check_resume`).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

from .errors import ConfigError
from .io import load_yaml

__all__ = ['Schema', 'resolve', 'check_resume', 'load_config_file', 'SEARCH', 'TRAIN', 'EVAL', 'coerce',
           'DATASETS', 'family_of']

DATASETS = ('cifar10', 'fashion-mnist', 'imagenet')
#: the longest run or save name: the names become folder and file names, with affixes (``-999``, ``_imagenet``)
MAX_NAME_LENGTH = 128


def at_least(minimum: int) -> Dict[str, Any]:
    """``field`` metadata: the (integer) value, when set, is ``>= minimum``."""
    return {'min': minimum}


def plain_name() -> Dict[str, Any]:
    """``field`` metadata: the value, when set, is a plain file name (it names a folder or file under runs/ or
    the genotype folder, so it must not climb out of it)."""
    return {'plain_name': True}


def check_plain_name(key: str, value: str) -> None:
    import re

    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', value) or value.endswith('.py') \
            or len(value) > MAX_NAME_LENGTH:
        shown = value if len(value) <= 40 else value[:37] + '...'
        raise ConfigError(f'{key} {shown!r}: use a plain name of at most {MAX_NAME_LENGTH} characters (letters, '
                          'digits, _ . -, no folders), e.g. my_cell')


def family_of(dataset: Optional[str]) -> str:
    """``imagenet`` for ImageNet-style folders, else ``cifar`` (32x32 data)."""
    return 'imagenet' if str(dataset).lower() in ('imagenet', 'imagefolder') else 'cifar'


# --------------------------------------------------------------------------- sections

@dataclass
class Run:
    """Where and how a run executes."""
    description: Optional[str] = None
    name: Optional[str] = field(default=None, metadata=plain_name())   # the default run directory is runs/<name>
    run_dir: Optional[str] = None         # config.yaml, log.txt, metrics.csv, tb/, checkpoint.pt
    seed: int = 0
    device: str = 'auto'                  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None         # torch.set_num_threads on CPU
    workers: int = 0                      # data loader workers per process
    channels_last: bool = False           # channels-last memory format
    progress: Literal['auto', 'always', 'never'] = 'auto'   # auto: only on a terminal
    tensorboard: bool = True
    imports: List[str] = field(default_factory=list)        # plugin modules imported before anything else


@dataclass
class Data:
    """The dataset and how it is read."""
    dataset: Literal['cifar10', 'fashion-mnist', 'imagenet'] = 'cifar10'
    data: Optional[str] = None            # dataset folder; None: the dataset's default location
    download: bool = False                # CIFAR-10: download with torchvision when missing
    train_subset: Optional[int] = field(default=None, metadata=at_least(1))   # only the first N training images
    image_size: Optional[int] = None      # network input side; None: the dataset's own (32, or 224 for ImageNet)
    batch_size: int = 64                  # per process


@dataclass
class SearchData:
    """How a search splits the training set (the test split is never touched)."""
    train_portion: float = 0.5            # fraction that trains the weights; the rest trains alpha


@dataclass
class TrainData:
    """Validation data and ImageNet preprocessing of the trainers."""
    val_subset: Optional[int] = field(default=None, metadata=at_least(1))     # only the first N validation images
    val_resize: int = 256                 # ImageNet: Resize before CenterCrop(image_size)
    color_jitter: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.2])


@dataclass
class Space:
    """The search space: a search_spaces/*.yaml name or path; the other keys override it when set."""
    space: str = 'bnas'
    init_channels: Optional[int] = field(default=None, metadata=at_least(2))
    layers: Optional[int] = field(default=None, metadata=at_least(1))
    num_nodes: Optional[int] = field(default=None, metadata=at_least(1))
    ops: Optional[List[str]] = None
    binarizer: Optional[Any] = None       # a weight binarizer name or {name: ..., option: ...}
    activation: Optional[Any] = None      # an activation quantizer name or mapping
    op_set: Optional[str] = None          # paper | react: the binary block's parts, unless set one by one
    nonlinearity: Optional[Any] = None    # after each binary conv: relu (paper), rprelu, prelu, identity
    shortcut: Optional[bool] = None       # real-valued shortcut around each binary conv where shapes allow


@dataclass
class Model:
    """The network a trainer builds: a model config of search_spaces/models.yaml plus overrides."""
    model: str = 'bnas-a'
    genotype: Optional[str] = None        # a genotype name or YAML path (overrides the model config's)
    init_channels: Optional[int] = field(default=None, metadata=at_least(1))
    layers: Optional[int] = field(default=None, metadata=at_least(1))
    num_classes: Optional[int] = field(default=None, metadata=at_least(1))
    precision_rule: Optional[Literal['standard', 'official-2020-11', 'official-2020-08']] = None
    binarizer: Optional[Any] = None       # None: the model config's (xnor); 'none': full-precision weights
    activation: Optional[Any] = None      # None: the model config's (ste_sign); 'identity': real activations
    op_set: Optional[str] = None          # paper | react (rsign, scaled_sign, rprelu); explicit keys win
    nonlinearity: Optional[Any] = None    # after each binary conv: relu (paper), rprelu, prelu, identity
    shortcut: Optional[bool] = None       # real-valued shortcut around each binary conv where shapes allow


@dataclass
class Optim:
    """Weight optimisation."""
    epochs: int = 50
    optimizer: Literal['sgd', 'adam', 'adamw'] = 'sgd'
    lr: float = 0.025
    lr_min: float = 0.001                 # search: the cosine schedule's floor
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])   # adam/adamw
    weight_decay: float = 3e-4
    grad_clip: Optional[float] = None     # max gradient norm; None: no clipping
    max_train_batches: Optional[int] = None   # cap on iterations per epoch (smoke runs)
    max_val_batches: Optional[int] = None     # cap on evaluation batches


@dataclass
class Training:
    """How a network is trained: the recipe's name (a :class:`bnas_nni.train.recipes.Recipe`, which sets
    the defaults of these knobs and of :class:`Optim`'s) and the knobs themselves."""
    recipe: str = 'paper'                 # paper (the official recipes); see bnas-nni train --help
    schedule: Literal['onecycle', 'cosine_restarts', 'cosine', 'linear', 'constant'] = 'onecycle'
    onecycle_min_factor: float = 0.05     # one-cycle starts and ends the cycle at lr * this factor
    onecycle_momentum: List[float] = field(default_factory=lambda: [0.85, 0.95])
    onecycle_annihilation: float = 0.1
    onecycle_reduce_factor: float = 0.01
    restart_epochs: int = 50              # cosine warm restarts period T_0, in epochs
    weight_decay_binary: Optional[float] = None   # weight decay of binary convs' latent weights; None: weight_decay
    weight_decay_other: Optional[float] = None    # decay of non-conv parameters (BN, biases, classifier,
                                                  # thresholds, slopes); None: weight_decay
    step1_epochs: Optional[int] = None    # two-step recipes (react): epochs of step 1; None: epochs
    step2_weight_decay: float = 0.0       # two-step recipes (react): weight decay of step 2 (step 1: weight_decay)
    label_smoothing: float = 0.0
    bn_recalibration: int = 0             # after a stage's last epoch: re-estimate BN statistics on this many
                                          # training batches (no gradients, drop path off); 0: off
    bn_recalibration_mode: Literal['eval', 'train'] = 'eval'   # eval: layer by layer, each BN the statistics
                                          # of its input with everything upstream in eval mode (the function
                                          # evaluated); train: one pass in training mode (batch statistics upstream)
    bn_freeze_epochs: int = 0             # the last N epochs of each stage train with BN statistics fixed (eval-mode
                                          # BN; re-estimated first when bn_recalibration > 0); 0: off
    bn_renorm_epochs: int = 0             # the last N epochs of each stage train with Batch Renormalization (forward
                                          # with the running statistics, gradient through the batch's; re-estimated
                                          # first when bn_recalibration > 0); 0: off
    grad_clip_mode: Literal['binary', 'latent'] = 'binary'   # binary: norm w.r.t. the binary weights (official)
    drop_path_prob: float = 0.2           # final value; epoch e uses drop_path_prob * e / epochs
    amp: Optional[Literal['bf16', 'fp16']] = None
    teacher: Optional[str] = None         # distillation teacher: a checkpoint or torchvision:NAME=WEIGHTS_FILE
    init_from: Optional[str] = None       # initialise the weights from this checkpoint (warm start)
    report_freq: int = 50                 # a train/valid log line every N steps


@dataclass
class Search:
    """The search algorithm (BinaryDARTS or any registered strategy)."""
    strategy: str = 'binary-darts'
    strategy_options: Dict[str, Any] = field(default_factory=dict)   # strategy-specific keyword arguments
    arc_lr: float = 3e-4                  # Adam for alpha
    arc_betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    arc_weight_decay: float = 1e-3
    lamda: float = 1.0                    # diversity weight
    tau: float = 7.7                      # diversity decay, epochs
    gamma: float = 3.0                    # Zeroise transfer for the ImageNet genotype
    gamma_rule: Literal['zeroise', 'official'] = 'zeroise'
    select: Literal['best', 'official', 'last'] = 'best'
    mixed_cell: Literal['binary', 'fast'] = 'fast'
    warmup_epochs: int = 0                # weight-only epochs before alpha moves
    log_prob_every: int = 10              # steps between per-edge probability logs


@dataclass
class Experiment:
    """NNI strategies: the experiment budget (multi-trial) and the one-shot derived-network check."""
    max_trial_number: int = 10
    trial_concurrency: int = 1            # >1 hits NNI 3.0 mixing up trials (microsoft/nni#5726)
    max_experiment_duration: Optional[str] = None   # e.g. 30m
    port: Optional[int] = None            # NNI manager port on 127.0.0.1; None: a free one
    derived_epochs: int = 0               # one-shot: then train the derived network this long


@dataclass
class Final:
    """The brief training of the derived cell that gives a search trial its final result."""
    final_epochs: int = 1
    final_init_channels: int = field(default=8, metadata=at_least(1))
    final_layers: int = field(default=3, metadata=at_least(1))
    final_batch_size: int = field(default=64, metadata=at_least(1))
    final_lr: float = 0.05
    final_weight_decay: float = 3e-6
    final_train_subset: Optional[int] = field(default=2048, metadata=at_least(1))
    final_test_subset: Optional[int] = field(default=1000, metadata=at_least(1))
    final_image_size: Optional[int] = field(default=None, metadata=at_least(8))   # None: the search's image_size


@dataclass
class Distributed:
    """Data-parallel runs under torchrun (ignored by a single process)."""
    sync_bn: bool = False                 # search: normalise training batches with the statistics over all ranks
    dist_timeout: float = 600.0           # seconds a collective waits for the other ranks before the job stops


@dataclass
class Output:
    """Named genotype files a search writes besides its run directory."""
    save: Optional[str] = field(default=None, metadata=plain_name())   # NAME: NAME.yaml and NAME_imagenet.yaml
    out: Optional[str] = None             # folder for them (default search_spaces/genotypes)


# --------------------------------------------------------------------------- types

def _kind(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _kind(args[0]) if len(args) == 1 else 'value'
    if origin is Literal:
        return 'one of ' + ', '.join(map(str, typing.get_args(hint)))
    if origin in (list, List):
        return 'list'
    if origin in (dict, Dict):
        return 'mapping'
    return {int: 'integer', float: 'finite number', bool: 'boolean', str: 'string'}.get(hint, 'value')


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """``value`` as the type ``hint`` says, or a one-line :class:`ConfigError`.

    The strings ``none``/``null``/``~`` mean null, except for free-form (``Any``) keys such as a quantizer,
    where ``none`` is a value (``binarizer: none`` = full precision) and only YAML's null unsets."""
    free_form = hint is Any or (typing.get_origin(hint) is typing.Union and Any in typing.get_args(hint))
    if isinstance(value, str) and value.strip().lower() in ('none', 'null', '~') and not free_form:
        value = None
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return coerce(value, args[0] if len(args) == 1 else Any, key, source)
    if hint is Any:
        return value
    bad = ConfigError(f'{source}: {key}={value!r} is not a valid {_kind(hint)}')
    if value is None:
        raise bad
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, str) and value.lower() in [str(c).lower() for c in choices]:
            value = next(c for c in choices if str(c).lower() == value.lower())
        if value not in choices:
            raise ConfigError(f'{source}: {key}={value!r}; choose one of {", ".join(map(str, choices))}')
        return value
    if origin in (list, List):
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [coerce(v, item, f'{key}[{i}]', source) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): v for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off'):
            return value.lower() in ('1', 'true', 'yes', 'on')
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if hint in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not math.isfinite(f) or (hint is int and not f.is_integer()):
            raise bad
        return int(f) if hint is int else f
    if hint is str:
        if isinstance(value, (Mapping, list)):
            raise bad
        return str(value)
    return value


# --------------------------------------------------------------------------- schemas

Validator = Callable[[Dict[str, Any]], None]


class Schema:
    """A command's keys: the union of its sections' fields, with the command's own defaults."""

    def __init__(self, name: str, sections: Sequence[type], defaults: Optional[Mapping[str, Any]] = None,
                 aliases: Optional[Mapping[str, str]] = None, validators: Sequence[Validator] = (),
                 resume_free: Sequence[str] = ()) -> None:
        self.name = name
        self.sections = tuple(sections)
        self.hints: Dict[str, Any] = {}
        self.domains: Dict[str, Mapping[str, Any]] = {}
        self.section_of: Dict[str, str] = {}
        base: Dict[str, Any] = {}
        for section in self.sections:
            hints = typing.get_type_hints(section)
            for f in dataclasses.fields(section):
                if f.name in self.hints:
                    raise ValueError(f'schema {name}: key {f.name!r} is declared twice')
                self.hints[f.name] = hints[f.name]
                if f.metadata:
                    self.domains[f.name] = f.metadata
                self.section_of[f.name] = section.__name__.lower()
                base[f.name] = (f.default_factory() if f.default is dataclasses.MISSING else f.default)
        unknown = set(defaults or {}) - set(self.hints)
        if unknown:
            raise ValueError(f'schema {name}: defaults for unknown keys {sorted(unknown)}')
        base.update(copy.deepcopy(dict(defaults or {})))
        self.base = base
        self.aliases = dict(aliases or {})
        self.validators = list(validators)
        self.resume_free = frozenset(resume_free)

    def keys(self) -> List[str]:
        return sorted(self.hints)

    def with_defaults(self, **defaults: Any) -> 'Schema':
        """The same schema with other command defaults (e.g. the ImageNet trainer script)."""
        out = copy.copy(self)
        out.base = {**self.base, **copy.deepcopy(defaults)}
        return out

    def normalize_key(self, raw: Any, source: str) -> Tuple[str, Optional[str]]:
        """``(key, subkey)``: aliases mapped, ``-`` read as ``_``, ``a.b`` split for dict-valued keys."""
        text = str(raw).strip()
        key, _, sub = text.partition('.')
        key = key.replace('-', '_')
        key = self.aliases.get(key, key)
        if key not in self.hints:
            raise ConfigError(f'{source}: unknown config key {text!r}; allowed keys: {", ".join(self.keys())}')
        if sub and _kind(self.hints[key]) != 'mapping':
            raise ConfigError(f'{source}: {key} is not a mapping, so {text!r} cannot set a part of it')
        return key, (sub or None)


def load_config_file(path: str | os.PathLike) -> Dict[str, Any]:
    """A YAML config: a non-empty mapping of keys to values."""
    data = load_yaml(path)
    if data is None:
        raise ConfigError(f'{path} is empty; write key: value lines (see the presets in experiments/) '
                          'or leave out --config for the defaults')
    if not isinstance(data, Mapping):
        raise ConfigError(f'{path}: a config must be a mapping of keys to values (key: value lines), '
                          f'not a {type(data).__name__}')
    return dict(data)


def _layer(schema: Schema, data: Optional[Mapping[str, Any]], source: str) -> List[Tuple[str, Optional[str], Any]]:
    return [(*schema.normalize_key(k, source), v) for k, v in (data or {}).items()]


def _import_plugins(modules: Sequence[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(str(name))
        except ImportError as exc:
            raise ConfigError(f'imports: cannot import {name!r} ({exc}); put it on PYTHONPATH or fix the name') from None


def resolve(schema: Schema, path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
            nni_params: Optional[Mapping[str, Any]] = None, *, base: Optional[Mapping[str, Any]] = None,
            defaults_hook: Optional[Callable[[Callable[..., Any]], Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """Resolve a config (see the module docstring); returns a flat, typed, validated mapping.

    ``base`` replaces the YAML file (a saved ``config.yaml`` when resuming). ``defaults_hook(lookup)``
    returns further defaults (a training recipe's) from the keys given so far: ``lookup(key)`` is the
    value the layers give ``key`` (or its default), ``lookup(key, None)`` is None where no layer sets it.
    """
    layers: List[Tuple[str, List[Tuple[str, Optional[str], Any]]]] = []
    if base is not None:
        layers.append(('saved config', _layer(schema, base, 'saved config')))
    if path:
        layers.append((str(path), _layer(schema, load_config_file(path), str(path))))
    if overrides:
        layers.append(('command line', _layer(schema, overrides, 'command line')))
    if nni_params:
        layers.append(('NNI parameters', _layer(schema, nni_params, 'NNI parameters')))

    defaults = copy.deepcopy(schema.base)
    _unset = object()

    def lookup(key: str, fallback: Any = _unset) -> Any:
        value = defaults[key] if fallback is _unset else fallback
        for source, items in layers:
            for k, sub, v in items:
                if k == key and sub is None:
                    value = (defaults[key] if fallback is _unset else fallback) if v is None else \
                        coerce(v, schema.hints[key], key, source)
        return value

    if 'imports' in schema.hints:
        _import_plugins(lookup('imports'))
    if defaults_hook is not None:
        for k, v in defaults_hook(lookup).items():
            if k not in schema.hints:
                raise ConfigError(f'a recipe sets unknown key {k!r}')
            defaults[k] = copy.deepcopy(v)

    cfg = copy.deepcopy(defaults)
    for source, items in layers:
        keys_here = {k for k, _, _ in items}
        for key, sub, value in items:
            hint = schema.hints[key]
            if sub is not None:
                cfg[key] = dict(cfg[key] or {})
                if value is None:
                    cfg[key].pop(sub, None)
                else:
                    cfg[key][sub] = value
                continue
            new = defaults[key] if value is None else coerce(value, hint, key, source)
            if key == 'dataset' and new != cfg['dataset'] and 'data' in cfg and 'data' not in keys_here:
                cfg['data'] = defaults['data']    # a dataset path follows its dataset
            cfg[key] = new
    check_domains(schema, cfg)
    for check in schema.validators:
        check(cfg)
    return cfg


def check_domains(schema: Schema, cfg: Mapping[str, Any]) -> None:
    """The domains declared with the keys (:func:`at_least`, :func:`plain_name`), in one line each."""
    for key, domain in schema.domains.items():
        value = cfg.get(key)
        if value is None:
            continue
        if 'min' in domain and value < domain['min']:
            raise ConfigError(f'{key} must be >= {domain["min"]}, got {value}')
        if domain.get('plain_name'):
            check_plain_name(key, str(value))


def check_resume(schema: Schema, saved: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """The config to continue a run with: ``saved``, plus only the keys that may change between a run and
    its resumption (threads, progress, device ...). A change of anything else is a one-line error."""
    merged = dict(saved)
    changed = []
    for key, value in wanted.items():
        if key in schema.resume_free:
            merged[key] = value
        elif key in saved and saved[key] != value:
            changed.append(f'{key} ({saved[key]!r} -> {value!r})')
    if changed:
        raise ConfigError(f'{where} was started with another config: {", ".join(changed)}; '
                          'resume without those changes or start a new run directory')
    return merged


# --------------------------------------------------------------------------- validation

def _positive(cfg: Dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key in cfg and cfg[key] is not None and not cfg[key] > 0:
            raise ConfigError(f'{key} must be > 0, got {cfg[key]}')


def _check_common(cfg: Dict[str, Any]) -> None:
    _positive(cfg, 'epochs', 'batch_size', 'lr', 'max_train_batches', 'max_val_batches', 'threads')
    if cfg.get('image_size') is not None and cfg['image_size'] < 8:
        raise ConfigError(f'image_size must be at least 8, got {cfg["image_size"]}')
    if cfg.get('bn_recalibration') is not None and cfg['bn_recalibration'] < 0:
        raise ConfigError(f'bn_recalibration must be >= 0 (training batches; 0: off), got {cfg["bn_recalibration"]}')
    if cfg.get('bn_freeze_epochs') is not None and cfg['bn_freeze_epochs'] < 0:
        raise ConfigError(f'bn_freeze_epochs must be >= 0 (epochs at the end of each stage; 0: off), '
                          f'got {cfg["bn_freeze_epochs"]}')
    if cfg.get('bn_renorm_epochs') is not None and cfg['bn_renorm_epochs'] < 0:
        raise ConfigError(f'bn_renorm_epochs must be >= 0 (epochs at the end of each stage; 0: off), '
                          f'got {cfg["bn_renorm_epochs"]}')
    if (cfg.get('bn_renorm_epochs') or 0) > 0 and (cfg.get('bn_freeze_epochs') or 0) > 0:
        raise ConfigError('bn_freeze_epochs and bn_renorm_epochs exclude each other: set one of them to 0')
    if cfg.get('workers', 0) < 0:
        raise ConfigError(f'workers must be >= 0, got {cfg["workers"]}')
    for key in ('betas', 'arc_betas'):
        if key in cfg and not (len(cfg[key]) == 2 and all(0 <= b < 1 for b in cfg[key])):
            raise ConfigError(f'{key} must be two numbers in [0, 1), got {cfg[key]}')
    if 'lr_min' in cfg and not 0 <= cfg['lr_min'] <= cfg['lr']:
        raise ConfigError(f'need 0 <= lr_min <= lr, got lr={cfg["lr"]}, lr_min={cfg["lr_min"]}')


def _check_search(cfg: Dict[str, Any]) -> None:
    if cfg['dataset'] == 'imagenet':
        raise ConfigError('search datasets are cifar10 and fashion-mnist (the paper searches on CIFAR-10 and '
                          'transfers the cell to ImageNet with gamma)')
    if not 0 < cfg['train_portion'] < 1:
        raise ConfigError(f'train_portion must be in (0, 1), got {cfg["train_portion"]}')
    if cfg['train_subset'] is not None and cfg['train_subset'] < 2:
        raise ConfigError('train_subset must be at least 2 (one image per half)')
    for key, lo, what in (('lamda', 0, 'the diversity weight'), ('tau', None, 'the diversity decay in epochs'),
                          ('gamma', None, 'the Zeroise transfer for ImageNet')):
        ok = cfg[key] >= 0 if lo == 0 else cfg[key] > 0
        if not ok:
            raise ConfigError(f'{key} must be {">= 0" if lo == 0 else "> 0"} ({what}), got {cfg[key]}')
    _positive(cfg, 'arc_lr', 'log_prob_every', 'max_trial_number', 'trial_concurrency', 'final_epochs')
    if cfg['warmup_epochs'] < 0:
        raise ConfigError(f'warmup_epochs must be >= 0, got {cfg["warmup_epochs"]}')
    if cfg['out'] is not None and cfg['save'] is None:
        raise ConfigError('out only says where save writes; set save: NAME too')


def _check_train(cfg: Dict[str, Any]) -> None:
    if cfg['drop_path_prob'] < 0 or cfg['drop_path_prob'] >= 1:
        raise ConfigError(f'drop_path_prob must be in [0, 1), got {cfg["drop_path_prob"]}')
    if not 0 <= cfg['label_smoothing'] < 1:
        raise ConfigError(f'label_smoothing must be in [0, 1), got {cfg["label_smoothing"]}')
    _positive(cfg, 'restart_epochs', 'report_freq', 'val_resize', 'step1_epochs')
    for key in ('weight_decay', 'weight_decay_binary', 'weight_decay_other', 'step2_weight_decay'):
        if cfg.get(key) is not None and cfg[key] < 0:
            raise ConfigError(f'{key} must be >= 0, got {cfg[key]}')


_EXEC_FREE = ('threads', 'device', 'workers', 'progress', 'tensorboard', 'description', 'run_dir', 'imports')

#: ``bnas-nni search``, search trials, and the NNI strategy presets (experiments/search_*.yaml, strategy_*.yaml)
SEARCH = Schema('search', [Run, Data, SearchData, Space, Optim, Search, Experiment, Final, Output, Distributed],
                defaults={'seed': 2},
                aliases={'max_eval_batches': 'max_val_batches', 'learning_rate': 'lr', 'num_threads': 'threads'},
                validators=[_check_common, _check_search],
                resume_free=_EXEC_FREE + ('save', 'out', 'channels_last', 'max_trial_number', 'dist_timeout'))

#: ``bnas-nni train`` and the trainer scripts; recipe presets supply most optimisation defaults
TRAIN = Schema('train', [Run, Data, TrainData, Model, Optim, Training],
               defaults={'workers': 2, 'download': True, 'batch_size': 256},
               aliases={'learning_rate': 'lr', 'wd': 'weight_decay', 'model_config': 'model', 'arch': 'genotype',
                        'C': 'init_channels', 'init_channel': 'init_channels', 'batch': 'batch_size',
                        'label_smooth': 'label_smoothing', 'data_root': 'data', 'num_workers': 'workers'},
               validators=[_check_common, _check_train],
               resume_free=_EXEC_FREE + ('report_freq',))

#: ``bnas-nni eval`` and ``bnas-nni export``: the model and validation data of the training schema
EVAL = TRAIN
