"""One configuration system for search, training, NNI trials and benches.

Every knob is declared once, as a typed field of a section dataclass below (:func:`knob`: default and
help text); a command's config class (:class:`SearchConfig`, :class:`TrainConfig`) is the union of its
sections, and its :class:`Schema` adds aliases, validators and the keys a resumed run may change. The
same declaration feeds YAML validation, argparse help and the generated reference (``bnas-nni config
search``). Keys are flat (``lr``, ``epochs``, ``dataset`` ...), so the same names work in YAML files,
``--set key=value`` and NNI search spaces. A config is resolved once, in this order (later wins)::

    section defaults <- command defaults <- recipe defaults (training) <- YAML file <- command line <- NNI parameters

Rules of the resolver:

* values are coerced to the field's type (``'3e-4'`` -> 0.0003, ``'true'`` -> True) or rejected in one line;
* an explicit ``null`` unsets a key: it goes back to its default (``--set data=null``);
* a key's domain is declared with it (``knob(..., min=1)``, ``knob(..., plain_name=True)``): a value outside
  it (``init_channels: -8``, ``layers: 0``, a run name with ``/``) is one line before anything runs;
* unknown keys are an error that lists the allowed ones; a few spellings of the official scripts are
  accepted as aliases (``learning_rate`` -> ``lr`` ...);
* a dataset path follows its dataset: when a later layer changes ``dataset`` without giving ``data``, the
  earlier ``data`` is dropped (``--set dataset=fashion-mnist`` on a CIFAR preset works unchanged);
* dict-valued keys take dotted overrides (``--set strategy_options.temperature=[1, 0.5]``);
* ``imports: [module, ...]`` imports plugin modules first (e.g. one that registers a strategy).

The result is a typed config object (``cfg.lr``) that is also a read-only view as a flat mapping
(``cfg['lr']``, ``dict(cfg)``): what a run saves as ``config.yaml`` in its run directory, and what
``--resume`` compares against.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import importlib
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

from .data.registry import DATASETS as DATASET_REGISTRY
from .data.registry import get_dataset_spec
from .errors import ConfigError
from .io import load_yaml

__all__ = ['Schema', 'ConfigBase', 'SearchConfig', 'TrainConfig', 'knob', 'key_help', 'resolve', 'load_config_file',
           'SEARCH', 'TRAIN', 'SCHEMAS', 'coerce', 'family_of', 'add_config_flags', 'flag_overrides',
           'register']

#: the longest run or save name: the names become folder and file names, with affixes (``-999``, ``_imagenet``)
MAX_NAME_LENGTH = 128


def check_plain_name(key: str, value: str) -> None:
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', value) or value.endswith('.py') \
            or len(value) > MAX_NAME_LENGTH:
        shown = value if len(value) <= 40 else value[:37] + '...'
        raise ConfigError(f'{key} {shown!r}: use a plain name of at most {MAX_NAME_LENGTH} characters (letters, '
                          'digits, _ . -, no folders), e.g. my_cell')


def family_of(dataset: Optional[str]) -> str:
    """The network family of a dataset: its registered one (:mod:`bnas_nni.data.registry`); for a name not
    registered, ``imagenet`` for ImageNet-style folders, else ``cifar`` (small images)."""
    if isinstance(dataset, str) and dataset in DATASET_REGISTRY:
        return get_dataset_spec(dataset).family
    return 'imagenet' if str(dataset).lower() in ('imagenet', 'imagefolder') else 'cifar'


# --------------------------------------------------------------------------- sections

def knob(default: Any = None, help: str = '', *, factory: Optional[Callable[[], Any]] = None,
         min: Optional[int] = None, plain_name: bool = False) -> Any:
    """A config key: its default (or a ``factory`` for a mutable one), the help text that argparse,
    ``bnas-nni config`` and the documentation show, and its domain when set: ``min`` (a number, when not
    None, is ``>= min``) and ``plain_name`` (a plain file name: it names a folder or file under runs/ or the
    genotype folder, so it must not climb out of it); :func:`check_domains` enforces them."""
    metadata: Dict[str, Any] = {'help': help}
    if min is not None:
        metadata['min'] = min
    if plain_name:
        metadata['plain_name'] = True
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Run:
    """Where and how a run executes."""
    description: Optional[str] = knob(None, 'free text kept with the run (config.yaml)')
    name: Optional[str] = knob(None, 'run name, a plain name; the default run directory is runs/<name>',
                               plain_name=True)
    run_dir: Optional[str] = knob(None, 'run directory: config.yaml, log.txt, metrics.csv, tb/, checkpoints')
    seed: int = knob(0, 'random seed (data order, initialisation, augmentation)')
    device: str = knob('auto', 'auto | cpu | cuda | cuda:N')
    threads: Optional[int] = knob(None, 'CPU threads (torch.set_num_threads); None: torch decides')
    workers: int = knob(0, 'data loader worker processes per process')
    channels_last: bool = knob(False, 'channels-last memory format')
    progress: Literal['auto', 'always', 'never'] = knob('auto', 'progress bars: auto shows them on a terminal only')
    tensorboard: bool = knob(True, 'write TensorBoard event files into the run directory (tb/)')
    imports: List[str] = knob(help='plugin modules imported before anything else (e.g. one that registers a '
                                   'strategy, recipe or binarizer)', factory=list)


@dataclass
class Data:
    """The dataset and how it is read."""
    dataset: str = knob('cifar10', 'a name of the dataset registry: cifar10, cifar100, svhn, mnist, fashion-mnist, '
                                   'imagenet, folder (any ImageFolder tree), or one registered with register_dataset')
    data: Optional[str] = knob(None, "dataset folder; None: the dataset's default location (folder: required)")
    download: bool = knob(False, 'CIFAR-10: download with torchvision when missing')
    train_subset: Optional[int] = knob(None, 'use only the first N training images', min=1)
    image_size: Optional[int] = knob(None, "network input side; None: the dataset's own (32, 224 for ImageNet, a "
                                           "folder's image side)")
    val_fraction: float = knob(0.1, 'folder without val/: fraction of each class held out for validation')
    val_seed: int = knob(0, 'folder without val/: seed of the held-out draw and of the image order (apart from '
                            'seed, so a search and its training hold out the same images)', min=0)
    mean: Optional[List[float]] = knob(None, 'folder: per-channel mean (1 or 3 numbers); None: computed over the '
                                             'training images once and cached beside them')
    std: Optional[List[float]] = knob(None, 'folder: per-channel std (1 or 3 numbers); None: computed with mean')
    batch_size: int = knob(64, 'batch size per process')


@dataclass
class SearchData:
    """How a search splits the training set (the test split is never touched)."""
    train_portion: float = knob(0.5, 'fraction of the training set that trains the weights; the rest trains alpha')


@dataclass
class TrainData:
    """Validation data and ImageNet preprocessing of the trainers."""
    val_subset: Optional[int] = knob(None, 'use only the first N validation images', min=1)
    val_resize: int = knob(256, 'ImageNet: Resize to this side before CenterCrop(image_size)')
    color_jitter: List[float] = knob(help='ImageNet training: ColorJitter brightness, contrast, saturation, hue',
                                     factory=lambda: [0.4, 0.4, 0.4, 0.2])


@dataclass
class Space:
    """The search space: a search_spaces/*.yaml name or path; the other keys override it when set."""
    space: str = knob('bnas', 'search space: a name in search_spaces/ or a YAML path')
    init_channels: Optional[int] = knob(None, 'initial channels C (None: the space\'s)', min=2)
    layers: Optional[int] = knob(None, 'number of cells (None: the space\'s)', min=1)
    num_nodes: Optional[int] = knob(None, 'intermediate nodes per cell (None: the space\'s)', min=1)
    ops: Optional[List[str]] = knob(None, 'candidate op names (None: the space\'s seven)')
    binarizer: Optional[Any] = knob(None, "weight binarizer: a name or {name: ..., option: ...}; 'none': "
                                          'full-precision weights')
    activation: Optional[Any] = knob(None, "activation quantizer: a name or mapping; 'identity': real activations")
    op_set: Optional[str] = knob(None, "paper | react: the binary block's parts, unless set one by one")
    nonlinearity: Optional[Any] = knob(None, 'after each binary conv: relu (paper), rprelu, prelu, identity')
    shortcut: Optional[bool] = knob(None, 'real-valued shortcut around each binary conv where shapes allow')


@dataclass
class Model:
    """The network a trainer builds: a model config of search_spaces/models.yaml plus overrides."""
    model: str = knob('bnas-a', 'model config name (search_spaces/models.yaml): bnas-a, bnas-d .. bnas-h')
    genotype: Optional[str] = knob(None, "genotype name or YAML path (overrides the model config's)")
    init_channels: Optional[int] = knob(None, "initial channels C (None: the model config's)", min=1)
    layers: Optional[int] = knob(None, "number of cells (None: the model config's)", min=1)
    num_classes: Optional[int] = knob(None, "classifier outputs (None: the dataset's)", min=1)
    precision_rule: Optional[Literal['standard', 'official-2020-11', 'official-2020-08']] = knob(
        None, 'which parts stay full precision: standard | official-2020-11 | official-2020-08')
    binarizer: Optional[Any] = knob(None, "weight binarizer (None: the model config's, xnor); 'none': "
                                          'full-precision weights')
    activation: Optional[Any] = knob(None, "activation quantizer (None: the model config's, ste_sign); 'identity': "
                                           'real activations')
    op_set: Optional[str] = knob(None, 'paper | react (rsign, scaled_sign, rprelu); explicit keys win')
    nonlinearity: Optional[Any] = knob(None, 'after each binary conv: relu (paper), rprelu, prelu, identity')
    shortcut: Optional[bool] = knob(None, 'real-valued shortcut around each binary conv where shapes allow')


@dataclass
class Optim:
    """Weight optimisation."""
    epochs: int = knob(50, 'training (or search) epochs')
    optimizer: Literal['sgd', 'adam', 'adamw'] = knob('sgd', 'weight optimizer: sgd | adam | adamw')
    lr: float = knob(0.025, 'peak learning rate of the weights')
    lr_min: float = knob(0.001, "search: the cosine schedule's floor")
    momentum: float = knob(0.9, 'SGD momentum (the one-cycle schedule sets it per step)')
    betas: List[float] = knob(help='adam/adamw betas', factory=lambda: [0.9, 0.999])
    weight_decay: float = knob(3e-4, 'weight decay')
    grad_clip: Optional[float] = knob(None, 'max gradient norm; None: no clipping')
    max_train_batches: Optional[int] = knob(None, 'stop each epoch after N batches (smoke runs)')
    max_val_batches: Optional[int] = knob(None, 'stop evaluation after N batches (smoke runs)')


@dataclass
class Training:
    """How a network is trained: the recipe's name (a :class:`bnas_nni.train.recipes.Recipe`, which sets
    the defaults of these knobs and of :class:`Optim`'s) and the knobs themselves."""
    recipe: str = knob('paper', 'training recipe: paper (the official recipes), react (ReActNet-style two steps), '
                                'or a registered one')
    schedule: Literal['onecycle', 'cosine_restarts', 'cosine', 'linear', 'constant'] = knob(
        'onecycle', 'learning-rate schedule: onecycle | cosine_restarts | cosine | linear | constant')
    onecycle_min_factor: float = knob(0.05, 'one-cycle starts and ends the cycle at lr * this factor')
    onecycle_momentum: List[float] = knob(help='one-cycle momentum range [low, high]', factory=lambda: [0.85, 0.95])
    onecycle_annihilation: float = knob(0.1, 'one-cycle: fraction of the iterations in the final annihilation phase')
    onecycle_reduce_factor: float = knob(0.01, 'one-cycle: the annihilation phase ends at lr * min_factor * this')
    restart_epochs: int = knob(50, 'cosine warm restarts: period T_0 in epochs')
    weight_decay_binary: Optional[float] = knob(None,
                                                "weight decay of binary convs' latent weights; None: weight_decay")
    weight_decay_other: Optional[float] = knob(None, 'weight decay of non-conv parameters (BN, biases, classifier, '
                                                     'thresholds, slopes); None: weight_decay')
    step1_epochs: Optional[int] = knob(None, 'two-step recipes (react): epochs of step 1; None: epochs')
    step2_weight_decay: float = knob(0.0, 'two-step recipes (react): weight decay of step 2 (step 1: weight_decay)')
    label_smoothing: float = knob(0.0, 'label smoothing epsilon')
    bn_recalibration: int = knob(0, "after a stage's last epoch: re-estimate BN statistics on this many training "
                                    'batches (no gradients, drop path off); 0: off')
    bn_recalibration_mode: Literal['eval', 'train'] = knob(
        'eval', 'eval: layer by layer, each BN the statistics of its input with everything upstream in eval mode; '
                'train: one pass in training mode')
    bn_freeze_epochs: int = knob(0, 'the last N epochs of each stage train with BN statistics fixed (eval-mode BN; '
                                    're-estimated first when bn_recalibration > 0); 0: off')
    bn_renorm_epochs: int = knob(0, 'the last N epochs of each stage train with Batch Renormalization (forward with '
                                    "the running statistics, gradient through the batch's); 0: off")
    grad_clip_mode: Literal['binary', 'latent'] = knob(
        'binary', 'gradient norm w.r.t. the binary weights (binary, official) or the latent ones (latent)')
    drop_path_prob: float = knob(0.2, 'final drop-path probability; epoch e uses drop_path_prob * e / epochs')
    amp: Optional[Literal['bf16', 'fp16']] = knob(None, 'mixed precision: bf16 | fp16 (default: fp32)')
    teacher: Optional[str] = knob(None, 'distillation teacher: a checkpoint or torchvision:NAME=WEIGHTS_FILE')
    init_from: Optional[str] = knob(None, 'initialise the weights from this checkpoint (warm start)')
    report_freq: int = knob(50, 'log a train/valid line every N steps')


@dataclass
class Search:
    """The search algorithm (BinaryDARTS or any registered strategy)."""
    strategy: str = knob('binary-darts', 'search strategy: a name of the strategy registry (bnas-nni search --help)')
    strategy_options: Dict[str, Any] = knob(help="the strategy's own keyword options", factory=dict)
    arc_lr: float = knob(3e-4, 'Adam learning rate of alpha')
    arc_betas: List[float] = knob(help='Adam betas of alpha', factory=lambda: [0.5, 0.999])
    arc_weight_decay: float = knob(1e-3, 'weight decay of alpha')
    lamda: float = knob(1.0, 'diversity weight lambda >= 0 (paper: 1)')
    tau: float = knob(7.7, 'diversity decay tau > 0, in epochs (paper: 7.7)')
    gamma: float = knob(3.0, 'Zeroise transfer for the ImageNet genotype (paper: 3)')
    gamma_rule: Literal['zeroise', 'official'] = knob(
        'zeroise', "zeroise divides Zeroise's probability by gamma; official divides row 0 (the released code)")
    select: Literal['best', 'official', 'last'] = knob(
        'best', "genotype kept: best (alphas after the best epoch), official (the released code's off-by-one), last")
    mixed_cell: Literal['fast', 'reference', 'binary'] = knob(
        'fast', 'supernet cell: fast, or reference (the straightforward cell the fast one is tested against; '
                'binary is its earlier name)')
    warmup_epochs: int = knob(0, 'weight-only epochs before alpha moves')
    log_prob_every: int = knob(10, 'steps between per-edge probability logs')
    latency_target_ms: Optional[float] = knob(
        None, 'binary-darts: latency target (ms per batch of the derived network on the packed engine); the '
              'architecture loss adds latency_weight * penalty(E[latency] / target - 1). None: the paper\'s search')
    latency_weight: float = knob(1.0, 'weight of the latency penalty in the architecture loss (NNI ProfilerPenalty '
                                      'scale)')
    latency_penalty: Literal['positive', 'absolute', 'linear'] = knob(
        'positive', 'shape of the latency penalty (NNI ProfilerPenalty nonlinear): positive max(0, x) charges only a '
                    'network slower than the target, absolute |x| pulls towards it, linear x')
    latency_estimate: Literal['expected', 'derived'] = knob(
        'expected', "the latency the penalty sees: expected (NNI's expectation under softmax(alpha)) or derived (the "
                    'latency of the network derivation would return now, with the gradient of the expectation)')
    latency_table: Optional[str] = knob(
        None, 'a saved latency model (JSON of bnas-nni latency profile); None: measure it on this machine for the '
              'latency_* network below (cached). Given a table, expected latency is logged even without a target')
    latency_init_channels: int = knob(8, 'latency model: initial channels C of the derived network (the train '
                                         "preset's, not the supernet's)", min=1)
    latency_layers: int = knob(5, 'latency model: cells of the derived network', min=1)
    latency_image_size: Optional[int] = knob(None, "latency model: input side of the derived network; None: the "
                                                   "dataset's own (32 for CIFAR-10 and Fashion-MNIST)", min=8)
    latency_batch: int = knob(1, 'latency model: batch size the latency is measured at', min=1)
    latency_threads: int = knob(2, 'latency model: CPU threads of the packed engine', min=1)


@dataclass
class Experiment:
    """NNI strategies: the experiment budget (multi-trial) and the one-shot derived-network check."""
    max_trial_number: int = knob(10, 'multi-trial strategies: number of trials')
    trial_concurrency: int = knob(1, 'trials at once (>1 hits NNI 3.0 mixing up trials, microsoft/nni#5726)')
    max_experiment_duration: Optional[str] = knob(None, 'time budget of the NNI experiment, e.g. 30m')
    port: Optional[int] = knob(None, 'NNI manager port on 127.0.0.1; None: a free one')
    derived_epochs: int = knob(0, 'one-shot NNI strategies: then train the derived network this long')


@dataclass
class Final:
    """The brief training of the derived cell that gives a search trial its final result."""
    final_epochs: int = knob(1, 'search trial: epochs of the derived network')
    final_init_channels: int = knob(8, 'search trial: initial channels of the derived network', min=1)
    final_layers: int = knob(3, 'search trial: cells of the derived network', min=1)
    final_batch_size: int = knob(64, 'search trial: batch size of the derived network', min=1)
    final_lr: float = knob(0.05, 'search trial: learning rate of the derived network')
    final_weight_decay: float = knob(3e-6, 'search trial: weight decay of the derived network')
    final_train_subset: Optional[int] = knob(2048, 'search trial: training images of the derived network', min=1)
    final_test_subset: Optional[int] = knob(1000, 'search trial: test images of the derived network', min=1)
    final_image_size: Optional[int] = knob(None, "search trial: input side of the derived network; None: the search's",
                                           min=8)


@dataclass
class Distributed:
    """Data-parallel runs under torchrun (ignored by a single process)."""
    sync_bn: bool = knob(False, 'search: normalise training batches with the statistics over all ranks')
    dist_timeout: float = knob(600.0, 'seconds a collective waits for the other ranks before the job stops')


@dataclass
class Output:
    """Named genotype files a search writes besides its run directory."""
    save: Optional[str] = knob(None, 'NAME: write NAME.yaml and NAME_imagenet.yaml genotypes', plain_name=True)
    out: Optional[str] = knob(None, 'folder for the save genotypes (default search_spaces/genotypes)')


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


# --------------------------------------------------------------------------- resolved configs

class ConfigBase(Mapping):
    """A resolved config: typed attributes (``cfg.lr``) for code, and the flat mapping view
    (``cfg['lr']``, ``dict(cfg)``) that YAML files, ``--set``, NNI parameters and ``config.yaml`` use.

    Assigning a key (``cfg.lr = ...`` or ``cfg['lr'] = ...``) coerces the value to the key's type;
    :meth:`replace` returns a changed copy. Unknown keys are refused, as in a YAML file.
    """

    def __getitem__(self, key: str) -> Any:
        if key not in _field_names(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        names = _field_names(type(self))
        if key not in names:
            raise AttributeError(f'{type(self).__name__} has no key {key!r}')
        object.__setattr__(self, key, value if value is None else coerce(value, _hints(type(self))[key], key,
                                                                          'assignment'))

    def __iter__(self) -> Iterator[str]:
        return iter(_field_names(type(self)))

    def __len__(self) -> int:
        return len(_field_names(type(self)))

    def replace(self, **changes: Any) -> 'ConfigBase':
        """A copy with ``changes`` applied (each coerced to its key's type)."""
        out = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(out, key, value)
        return out

    def as_dict(self) -> Dict[str, Any]:
        """A plain ``{key: value}`` copy (for YAML, checkpoints and NNI)."""
        return copy.deepcopy({k: getattr(self, k) for k in self})

    def __repr__(self) -> str:
        return f'{type(self).__name__}({", ".join(f"{k}={getattr(self, k)!r}" for k in self)})'


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_fields(cls: type) -> Dict[type, List[str]]:
    """``{section: [keys]}`` of a config class, in declaration order; a key declared by two sections is a
    bug (one knob, one place)."""
    out: Dict[type, List[str]] = {}
    owner: Dict[str, str] = {}
    for section in cls.__mro__[1:]:
        if '__dataclass_fields__' not in section.__dict__:
            continue
        keys = [f.name for f in dataclasses.fields(section)]
        for key in keys:
            if key in owner:
                raise ValueError(f'{cls.__name__}: key {key!r} is declared by {owner[key]} and {section.__name__}')
            owner[key] = section.__name__
        out[section] = keys
    return out


def key_help(cls: type, key: str) -> str:
    """The help text of ``key``: from the nearest declaration that has one (a command may only change a
    key's default)."""
    for klass in cls.__mro__:
        f = getattr(klass, '__dataclass_fields__', {}).get(key)
        if f is not None and f.metadata.get('help'):
            return str(f.metadata['help'])
    return ''


@dataclass(eq=False)
class SearchConfig(ConfigBase, Run, Data, SearchData, Space, Optim, Search, Experiment, Final, Output, Distributed):
    """``bnas-nni search``, search trials, and the NNI strategy presets (experiments/search_*.yaml,
    strategy_*.yaml)."""
    seed: int = 2


@dataclass(eq=False)
class TrainConfig(ConfigBase, Run, Data, TrainData, Model, Optim, Training):
    """``bnas-nni train``, ``eval``, ``export`` and the trainer scripts; recipes supply most optimisation
    defaults."""
    workers: int = 2
    download: bool = True
    batch_size: int = 256


# --------------------------------------------------------------------------- schemas

Validator = Callable[[Mapping[str, Any]], None]


class Schema:
    """How a command's config is resolved: its config class (the keys, their types, defaults and help),
    aliases, validators, and the keys a resumed run may change."""

    def __init__(self, name: str, config_class: type, defaults: Optional[Mapping[str, Any]] = None,
                 aliases: Optional[Mapping[str, str]] = None, validators: Sequence[Validator] = (),
                 resume_free: Sequence[str] = ()) -> None:
        self.name = name
        self.config_class = config_class
        self.sections = _section_fields(config_class)
        self.hints: Dict[str, Any] = {k: _hints(config_class)[k] for k in _field_names(config_class)}
        self.help: Dict[str, str] = {k: key_help(config_class, k) for k in self.hints}
        self.domains: Dict[str, Mapping[str, Any]] = {
            f.name: {k: v for k, v in f.metadata.items() if k != 'help'} for f in dataclasses.fields(config_class)
            if set(f.metadata) - {'help'}}
        base = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(config_class)}
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

    def build(self, values: Mapping[str, Any]) -> ConfigBase:
        """The typed config of already-coerced ``values`` (every key of the schema)."""
        return self.config_class(**values)

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

    def reference(self) -> str:
        """Every key as Markdown, one table per section: key, type, default, help (``bnas-nni config``)."""
        lines = [f'# `{self.name}` configuration', '',
                 'Keys are set in a YAML file (`--config`), with `--set KEY=VALUE`, or as NNI trial parameters; '
                 '`KEY=null` restores the default.', '']
        for section, keys in self.sections.items():
            keys = [k for k in keys if k in self.hints]
            if not keys:
                continue
            doc = (section.__doc__ or '').strip().splitlines()[0]
            lines += [f'## {section.__name__}', '', doc, '', '| key | type | default | help |', '|---|---|---|---|']
            for key in keys:
                default = json.dumps(self.base[key])
                cells = (f'`{key}`', _kind(self.hints[key]), f'`{default}`', self.help[key])
                lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
            lines.append('')
        return '\n'.join(lines)


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
            raise ConfigError(f'imports: cannot import {name!r} ({exc}); '
                              'put it on PYTHONPATH or fix the name') from None


def resolve(schema: Schema, path: Optional[str | os.PathLike] = None, overrides: Optional[Mapping[str, Any]] = None,
            nni_params: Optional[Mapping[str, Any]] = None, *, base: Optional[Mapping[str, Any]] = None,
            defaults_hook: Optional[Callable[[Callable[..., Any]], Mapping[str, Any]]] = None) -> ConfigBase:
    """Resolve a config (see the module docstring); returns the schema's typed config, validated.

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
    return schema.build(cfg)


def check_domains(schema: Schema, cfg: Mapping[str, Any]) -> None:
    """The domains declared with the keys (``min``, ``plain_name`` of :func:`knob`), in one line each."""
    for key, domain in schema.domains.items():
        value = cfg.get(key)
        if value is None:
            continue
        if 'min' in domain and value < domain['min']:
            raise ConfigError(f'{key} must be >= {domain["min"]}, got {value}')
        if domain.get('plain_name'):
            check_plain_name(key, str(value))


# --------------------------------------------------------------------------- validation

def _positive(cfg: Dict[str, Any], *keys: str) -> None:
    for key in keys:
        if key in cfg and cfg[key] is not None and not cfg[key] > 0:
            raise ConfigError(f'{key} must be > 0, got {cfg[key]}')


def _check_data(cfg: Dict[str, Any]) -> None:
    cfg['dataset'] = get_dataset_spec(str(cfg['dataset'])).name   # unknown: one line listing the registered names
    if not 0 < cfg['val_fraction'] < 1:
        raise ConfigError(f'val_fraction must be in (0, 1), got {cfg["val_fraction"]}')
    for key in ('mean', 'std'):
        if cfg[key] is not None and len(cfg[key]) not in (1, 3):
            raise ConfigError(f'{key} must be one number or three (per RGB channel), got {cfg[key]}')
    if cfg['std'] is not None and min(cfg['std']) <= 0:
        raise ConfigError(f'std must be > 0 per channel, got {cfg["std"]}')


def _check_common(cfg: Dict[str, Any]) -> None:
    _check_data(cfg)
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
    spec = get_dataset_spec(cfg['dataset'])
    if not spec.searchable:
        searchable = [n for n in DATASET_REGISTRY.names() if get_dataset_spec(n).searchable]
        raise ConfigError(f'dataset {spec.name} cannot be searched on'
                          + (f' ({spec.search_refusal})' if spec.search_refusal else '')
                          + f'; search datasets: {", ".join(searchable)}')
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
    _positive(cfg, 'latency_target_ms')
    if not (math.isfinite(cfg['latency_weight']) and cfg['latency_weight'] >= 0):
        raise ConfigError(f'latency_weight must be a finite number >= 0, got {cfg["latency_weight"]}')
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
SEARCH = Schema('search', SearchConfig,
                aliases={'max_eval_batches': 'max_val_batches', 'learning_rate': 'lr', 'num_threads': 'threads'},
                validators=[_check_common, _check_search],
                resume_free=_EXEC_FREE + ('save', 'out', 'channels_last', 'max_trial_number', 'dist_timeout'))

#: ``bnas-nni train`` and the trainer scripts; recipe presets supply most optimisation defaults
TRAIN = Schema('train', TrainConfig,
               aliases={'learning_rate': 'lr', 'wd': 'weight_decay', 'model_config': 'model', 'arch': 'genotype',
                        'C': 'init_channels', 'init_channel': 'init_channels', 'batch': 'batch_size',
                        'label_smooth': 'label_smoothing', 'data_root': 'data', 'num_workers': 'workers'},
               validators=[_check_common, _check_train],
               resume_free=_EXEC_FREE + ('report_freq',))

def add_config_flags(parser: argparse.ArgumentParser, schema: Schema, keys: Sequence[Any]) -> List[str]:
    """A ``--flag`` for each config key (``'lr'`` gives ``--lr``, ``('--arch', 'genotype')`` names the flag),
    its help from the key's declaration; boolean keys are switches. Values stay strings here and are
    coerced by the resolver (one-line errors). Returns the keys, for :func:`flag_overrides`."""
    out = []
    for item in keys:
        flag, key = item if isinstance(item, tuple) else ('--' + item.replace('_', '-'), item)
        if key not in schema.hints:
            raise ValueError(f'{flag}: {key!r} is not a key of the {schema.name} config')
        if schema.hints[key] is bool:
            parser.add_argument(flag, dest=key, action='store_const', const=True, default=None, help=schema.help[key])
        else:
            parser.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=schema.help[key])
        out.append(key)
    return out


def flag_overrides(args: argparse.Namespace, keys: Sequence[str]) -> Dict[str, Any]:
    """The config keys whose flags were given (a flag left out is not an override)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


#: the schemas by command, for ``bnas-nni config`` and the generated reference
SCHEMAS: Dict[str, Schema] = {'search': SEARCH, 'train': TRAIN}


def _cmd_config(args: argparse.Namespace) -> int:
    print(SCHEMAS[args.schema].reference())
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni config``: every key of a command's config with its type, default and help."""
    p = subparsers.add_parser('config', help='list the config keys of search or train (type, default, help)',
                              description='Print every config key of a command as a Markdown reference: type, '
                                          'default and help, one table per section.')
    p.add_argument('schema', choices=sorted(SCHEMAS), help='which command: search or train (eval and export read '
                                                           "train's keys)")
    p.set_defaults(func=_cmd_config)
