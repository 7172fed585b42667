"""Checkpoints: the official BNAS layout and our own, with one-line errors when they do not fit.

Two layouts are read:

* **official** (``gistvision/bnas``): ``train.py`` saves a bare ``model.state_dict()`` (with a
  ``module.`` prefix when it ran under ``DataParallel``); ``train_imagenet.py`` saves
  ``{'state_dict': ..., 'amp': ..., ...}`` from an apex-DDP model (``module.`` prefix too). The
  module names equal ours except ``_ops`` -> ``ops`` and, in ImageNet reduction cells,
  ``preprocess0_red``/``preprocess1_red`` -> ``preprocess0``/``preprocess1``.
* **bnas-nni**: :func:`save_checkpoint` writes ``{'format': 'bnas-nni', 'version': 1, 'kind': ...,
  'state_dict': ..., 'model': <architecture description>, ...extra}``. The description holds only
  plain Python types, so every file loads with ``torch.load(..., weights_only=True)``; it lets
  :func:`load_checkpoint_into` say "this checkpoint is genotype X with C=36, L=20" instead of
  listing hundreds of mis-shaped tensors. ``kind`` says what else the file holds:

  - ``'model'``: weights only (:func:`save_checkpoint` with no training state);
  - ``'train'``: a trainer's state after ``epoch`` finished epochs: ``optimizer``, ``scheduler``,
    ``scaler``, ``rng`` (:mod:`bnas_nni.seeding`), ``config`` (the resolved config), ``metrics``,
    ``best_top1``;
  - ``'search'``: a search's state (the supernet's weights and alphas, both optimizers, ``rng``,
    ``history``, ``best``, ``config``).

  A run directory holds its latest one as ``checkpoint.pt`` (:func:`resolve_checkpoint_path`).

Both hold the *latent* real-valued weights; the binarizers derive the binary weights in the forward
pass, so a loaded model evaluates exactly as the official ``binarization()`` + forward does.
"""
from __future__ import annotations

import os
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import CheckpointError
from .genotypes import Genotype
from .io import atomic_torch_save
from .networks import BNASNetwork
from .quant import BinaryConv2d

__all__ = ['FORMAT', 'FORMAT_VERSION', 'LAYOUTS', 'KINDS', 'CHECKPOINT_NAME', 'official_to_ours', 'ours_to_official',
           'detect_layout', 'describe_model', 'unwrap', 'load_checkpoint_file', 'read_checkpoint',
           'resolve_checkpoint_path', 'load_checkpoint_into', 'load_run_checkpoint', 'save_checkpoint',
           'model_from_checkpoint']

FORMAT = 'bnas-nni'
FORMAT_VERSION = 1
LAYOUTS = ('auto', 'official', 'bnas-nni')
KINDS = ('model', 'train', 'search')
CHECKPOINT_NAME = 'checkpoint.pt'
FAMILIES = ('cifar', 'imagenet')

#: at most this many names per category in an error line; the rest become "(+N more)"
MAX_LISTED = 6

#: wrapper prefixes: DataParallel / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``)
_PREFIXES = ('module.', '_orig_mod.')
_RED_RE = re.compile(r'^(cells\.\d+\.)preprocess([01])_red\.')
_CELL_RE = re.compile(r'^cells\.(\d+)\.')


# --------------------------------------------------------------------------- key mapping


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                changed = True
    return key


def official_to_ours(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Rename the keys of an official state dict to ours.

    Strips (nested) ``module.`` prefixes of DataParallel/DDP (and ``_orig_mod.`` of ``torch.compile``),
    ``._ops.`` -> ``.ops.`` and
    ``preprocessK_red`` -> ``preprocessK``. Keys already in our layout pass through unchanged, so
    the mapping is safe on either layout. Two keys mapping to the same name is an error.
    """
    out: Dict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        new = _strip_prefixes(str(key))
        new = new.replace('._ops.', '.ops.')
        new = _RED_RE.sub(r'\1preprocess\2.', new)
        if new in out:
            raise CheckpointError(f'checkpoint keys collide after mapping to the bnas-nni layout: {key!r} -> {new!r}; '
                                  'the file mixes two layouts')
        out[new] = value
    return out


def ours_to_official(state_dict: Mapping[str, Any], family: str, *, prefix: str = '') -> Dict[str, Any]:
    """Rename our keys to the official layout of ``family`` (``'cifar'`` or ``'imagenet'``).

    Reduction cells are recognised by their ``preprocess_res`` weights; in the ImageNet family
    their preprocess layers get the official ``_red`` suffix. ``prefix`` (e.g. ``'module.'``)
    reproduces a file saved from a DataParallel/DDP wrapper.
    """
    if family not in FAMILIES:
        raise CheckpointError(f'unknown network family {family!r}; choose one of {", ".join(FAMILIES)}')
    keys = [str(k) for k in state_dict]
    reduction_cells = {m.group(1) for k in keys if '.preprocess_res.' in k and (m := _CELL_RE.match(k))}
    out: Dict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        new = str(key).replace('.ops.', '._ops.') if str(key).startswith('cells.') else str(key)
        m = _CELL_RE.match(new)
        if family == 'imagenet' and m and m.group(1) in reduction_cells:
            new = re.sub(r'^(cells\.\d+\.)preprocess([01])\.', r'\1preprocess\2_red.', new)
        out[prefix + new] = value
    return out


def detect_layout(obj: Any) -> str:
    """``'bnas-nni'`` for a file written by :func:`save_checkpoint`, else ``'official'``.

    A bare state dict of our own model is read as "official": the official mapping leaves our key
    names unchanged, so it loads either way.
    """
    if isinstance(obj, Mapping) and obj.get('format') == FORMAT:
        return 'bnas-nni'
    return 'official'


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside DataParallel / DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, 'module', None) or getattr(model, '_orig_mod', None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------- model description


def _genotype_dict(model: nn.Module) -> Optional[Dict[str, Any]]:
    genotype = getattr(model, 'genotype', None)
    if genotype is None or not hasattr(genotype, 'to_dict'):
        return None
    return genotype.to_dict()


def describe_model(model: nn.Module) -> Dict[str, Any]:
    """A plain-types description of ``model``'s architecture, stored in our checkpoints.

    Works for :class:`bnas_nni.networks.BNASNetwork` and anything with ``cells``/``classifier``;
    unknown fields are simply left out.
    """
    model = unwrap(model)
    desc: Dict[str, Any] = {'class': type(model).__name__}
    family = getattr(model, 'family', None)
    if family is None:
        family = 'imagenet' if hasattr(model, 'stem0') else ('cifar' if hasattr(model, 'stem') else None)
    if family is not None:
        desc['family'] = str(family)
    cells = getattr(model, 'cells', None)
    if cells is not None:
        desc['layers'] = len(cells)
        desc['reduction_cells'] = [i for i, c in enumerate(cells) if getattr(c, 'reduction', False)]
        first = cells[0] if len(cells) else None
        conv = (getattr(getattr(getattr(first, 'preprocess1', None), 'op', None), '0', None) if first is not None
                else None)
        if isinstance(conv, nn.Conv2d):
            desc['init_channels'] = int(conv.out_channels)
    classifier = getattr(model, 'classifier', None)
    if isinstance(classifier, nn.Linear):
        desc['num_classes'] = int(classifier.out_features)
    genotype = _genotype_dict(model)
    if genotype is not None:
        desc['genotype'] = genotype
    config = getattr(model, 'config', None)
    if isinstance(config, Mapping):
        desc['config'] = dict(config)      # rebuilds the network (BNASNetwork.from_config)
    desc['parameters'] = int(sum(p.numel() for p in model.parameters()))
    desc['binarizers'] = {n: m.binarizer for n, m in model.named_modules()
                          if isinstance(m, BinaryConv2d) and m.binarizer is not None}
    desc['full_precision_convs'] = [n for n, m in model.named_modules()
                                    if isinstance(m, nn.Conv2d) and getattr(m, 'binarizer', None) is None]
    return desc


def _short(desc: Mapping[str, Any]) -> str:
    g = desc.get('genotype') or {}
    parts = [f"genotype {g.get('name') or '<unnamed>'}"]
    for key, label in (('family', 'family'), ('init_channels', 'C'), ('layers', 'L'), ('num_classes', 'classes')):
        if key in desc:
            parts.append(f'{label}={desc[key]}')
    return ' '.join(parts)


def _check_architecture(saved: Mapping[str, Any], model: nn.Module, source: str) -> None:
    """Raise a one-line error when our checkpoint describes another architecture than ``model``."""
    current = describe_model(model)
    mismatches = []
    for key in ('family', 'init_channels', 'layers', 'num_classes'):
        if key in saved and key in current and saved[key] != current[key]:
            mismatches.append(f'{key} {saved[key]} vs {current[key]}')
    sg, cg = saved.get('genotype'), current.get('genotype')
    if sg and cg:
        strip = lambda g: {k: v for k, v in g.items() if k != 'name'}
        if strip(sg) != strip(cg):
            mismatches.append(f"genotype {sg.get('name') or '<unnamed>'} vs {cg.get('name') or '<unnamed>'} "
                              '(different cells)')
    if mismatches:
        raise CheckpointError(f'{source} holds a different architecture ({_short(saved)}) than the model '
                              f'({_short(current)}): {"; ".join(mismatches)}; build the model with the '
                              'checkpoint\'s settings')
    if saved.get('binarizers') is not None and saved.get('binarizers') != current.get('binarizers'):
        warnings.warn(f'{source} was saved with a different binarization (precision rule or binarizer) than the '
                      'model; the latent weights load, but evaluation results will differ', stacklevel=3)


# --------------------------------------------------------------------------- loading


def _listing(label: str, names: List[str]) -> str:
    shown = ', '.join(names[:MAX_LISTED])
    more = f' (+{len(names) - MAX_LISTED} more)' if len(names) > MAX_LISTED else ''
    return f'{len(names)} {label}: {shown}{more}'


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` on CPU; unreadable files raise :class:`CheckpointError`.

    A damaged file (truncated copy, interrupted download, not a torch file at all) and a sound file
    that pickles objects other than tensors and plain containers need different fixes, so they get
    different one-line messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint not found: {path}; check the path')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad input file
        foreign = _foreign_global(str(exc))
        if foreign:
            raise CheckpointError(f'refused to load {path}: it pickles {foreign}, not only tensors and plain '
                                  'containers, and loading it could run code; if you trust the file, load it once with '
                                  'weights_only=False and re-save only its state_dict (and plain types)') from None
        text = str(exc)
        damage = _damage(path) or (f'{path.stat().st_size:,} bytes, the data stops early'
                                   if re.search(r'EOF|corrupt|truncat|invalid load key|stack underflow', text, re.I)
                                   else '')
        if damage:
            raise CheckpointError(f'checkpoint {path} is truncated or not a torch checkpoint ({damage}); '
                                  're-copy it or re-run the job that wrote it') from None
        raise CheckpointError(f'cannot read checkpoint {path} with torch.load(weights_only=True): '
                              f'{_reason(text, type(exc).__name__)}; re-save only its state_dict '
                              '(and plain types)') from None


#: how torch's weights-only unpickler names what it refused, one pattern per message it has
_FOREIGN_PATTERNS = (r'GLOBAL (\S+?)(?: was not| whose module|\s|$)',
                     r'unrecognized function (.+?)(?: which belongs|$)', r"but got <class '([^']+)'>")


def _foreign_global(text: str) -> str:
    """The class or function a weights-only load refused ('' for other failures)."""
    for pattern in _FOREIGN_PATTERNS:
        m = re.search(pattern, text, re.M)
        if m:
            return m.group(1).rstrip('.')
    return ''


def _reason(text: str, fallback: str) -> str:
    """torch's own reason in a few words: the unpickler's line if there is one, cut at a word boundary."""
    m = re.search(r'WeightsUnpickler error: (.+)', text)
    line = (m.group(1) if m else next((ln for ln in text.splitlines() if ln.strip()), fallback)).strip()
    line = re.sub(r'\x1b\[[0-9;]*m', '', line)
    return line if len(line) <= 100 else line[:100].rsplit(' ', 1)[0] + ' ...'


def _damage(path: Path) -> str:
    """Why ``path`` is not an intact torch file ('' when it looks like one): torch.save writes a zip
    archive (or, before torch 1.6, a pickle stream starting with torch's magic number)."""
    size = path.stat().st_size
    if size == 0:
        return 'the file is empty'
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            return f'{size:,} bytes, damaged zip archive ({type(exc).__name__})'
        if bad is not None:
            return f'{size:,} bytes, damaged zip member {bad}'
        if not any(n.endswith('data.pkl') for n in names):
            return f'{size:,} bytes, a zip archive without data.pkl'
        return ''
    with open(path, 'rb') as f:
        head = f.read(64)
    if head.startswith(b'PK\x03\x04'):
        return f'{size:,} bytes, a zip archive whose end is missing'
    try:
        first = next(pickletools.genops(head))   # the legacy format pickles a magic number first
        legacy = first[0].name == 'PROTO' or first[0].name.startswith(('LONG', 'BININT'))
    except Exception:  # noqa: BLE001 - not a pickle stream at all
        legacy = False
    if legacy and size > 64:
        return ''
    return f'{size:,} bytes, not a file torch.save writes'


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _split_state(obj: Any, source: str) -> Tuple[Mapping[str, torch.Tensor], Dict[str, Any]]:
    """Split a loaded object into (state dict, the other top-level entries)."""
    if isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
        return obj['state_dict'], {k: v for k, v in obj.items() if k != 'state_dict'}
    if _is_tensor_mapping(obj):
        return obj, {}
    if isinstance(obj, nn.Module):
        return obj.state_dict(), {}
    kind = type(obj).__name__
    keys = f' with keys {sorted(map(str, obj))[:MAX_LISTED]}' if isinstance(obj, Mapping) else ''
    raise CheckpointError(f'{source} is neither a state dict nor a {{"state_dict": ...}} checkpoint (got {kind}{keys})')


def _describe_source(path_or_state_dict: Any) -> str:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return f'checkpoint {path_or_state_dict}'
    return 'checkpoint'


def load_checkpoint_into(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
                         layout: str = 'auto') -> Dict[str, Any]:
    """Load an official or bnas-nni checkpoint into ``model`` (strictly).

    ``path_or_state_dict`` is a file, a loaded checkpoint (``{'state_dict': ...}``) or a bare state
    dict. ``layout='auto'`` recognises our own files and maps everything else from the official
    layout. Any missing, unexpected or mis-shaped key raises :class:`CheckpointError` with one line
    that lists them (``num_batches_tracked`` may be absent: it does not affect evaluation).

    Returns the checkpoint's other top-level entries (``epoch``, ``optimizer``, ``amp``, our
    ``model`` description, extras given to :func:`save_checkpoint`) plus ``'layout'``, the layout
    that was used.
    """
    if layout not in LAYOUTS:
        raise CheckpointError(f'unknown checkpoint layout {layout!r}; choose one of {", ".join(LAYOUTS)}')
    model = unwrap(model)
    source = _describe_source(path_or_state_dict)
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        obj = load_checkpoint_file(path_or_state_dict)
    else:
        obj = path_or_state_dict
    found = detect_layout(obj)
    if layout == 'auto':
        layout = found
    elif layout == 'bnas-nni' and found != 'bnas-nni' and isinstance(obj, Mapping) and 'format' in obj:
        raise CheckpointError(f'{source} has format {obj.get("format")!r}, not {FORMAT!r}')
    state_dict, info = _split_state(obj, source)
    if layout == 'bnas-nni' and found == 'bnas-nni':
        version = info.get('version')
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f'{source} has bnas-nni format version {version!r}; this bnas-nni reads up to '
                                  f'{FORMAT_VERSION}; upgrade bnas-nni')
        if isinstance(info.get('model'), Mapping):
            _check_architecture(info['model'], model, source)
    mapped = official_to_ours(state_dict) if layout == 'official' else dict(state_dict)

    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in mapped if k not in expected]
    misshaped = [f'{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
                 if k in mapped and isinstance(mapped[k], torch.Tensor) and tuple(mapped[k].shape) != tuple(v.shape)]
    not_tensors = [k for k in mapped if k in expected and not isinstance(mapped[k], torch.Tensor)]
    if missing or unexpected or misshaped or not_tensors:
        parts = []
        if missing:
            parts.append(_listing('missing', missing))
        if unexpected:
            parts.append(_listing('unexpected', unexpected))
        if misshaped:
            parts.append(_listing('mis-shaped (checkpoint vs model)', misshaped))
        if not_tensors:
            parts.append(_listing('not tensors', not_tensors))
        raise CheckpointError(f'{source} ({layout} layout) does not fit the model: {"; ".join(parts)}')
    # missing num_batches_tracked keep the model's value
    for k, v in expected.items():
        if k not in mapped:
            mapped[k] = v
    model.load_state_dict(mapped, strict=True)
    info = dict(info)
    info['layout'] = layout
    return info


# --------------------------------------------------------------------------- saving


def _check_plain(value: Any, where: str) -> None:
    """Reject objects ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_plain(k, where)
            _check_plain(v, f'{where}[{k!r}]')
        return
    if isinstance(value, (list, tuple, set)):
        for i, v in enumerate(value):
            _check_plain(v, f'{where}[{i}]')
        return
    raise CheckpointError(f'cannot store {type(value).__name__} at {where} in a checkpoint; use plain types '
                          '(numbers, strings, lists, dicts, tensors) so it loads with weights_only=True')


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, kind: str = 'model', **extra: Any) -> Path:
    """Write ``model``'s state dict in the bnas-nni format, atomically.

    The file records :func:`describe_model` (genotype, C, L, classes, which convs are binary) so
    loading into another architecture fails with a clear message. ``kind`` is one of :data:`KINDS`;
    ``extra`` entries (epoch, optimizer state, metrics, ...) must be plain types or tensors.
    """
    if kind not in KINDS:
        raise CheckpointError(f'unknown checkpoint kind {kind!r}; choose one of {", ".join(KINDS)}')
    model = unwrap(model)
    reserved = {'format', 'version', 'kind', 'state_dict', 'model'} & set(extra)
    if reserved:
        raise CheckpointError(f'save_checkpoint: {sorted(reserved)} are reserved names')
    for k, v in extra.items():
        _check_plain(v, k)
    payload: Dict[str, Any] = {
        'format': FORMAT,
        'version': FORMAT_VERSION,
        'kind': kind,
        'model': describe_model(model),
        # plain str keys: NNI names some submodules with str subclasses that weights_only refuses
        'state_dict': OrderedDict((str(k), v.detach().cpu()) for k, v in model.state_dict().items()),
    }
    payload.update(extra)
    path = Path(path)
    atomic_torch_save(payload, path)
    return path


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def read_checkpoint(path: str | os.PathLike) -> Any:
    """:func:`load_checkpoint_file` of a file or a run directory."""
    return load_checkpoint_file(resolve_checkpoint_path(path))


def load_run_checkpoint(path: str | os.PathLike, model: nn.Module, kind: str) -> Dict[str, Any]:
    """Load the weights of a ``kind`` checkpoint (``'train'`` or ``'search'``) into ``model``, refusing
    another architecture, and return the rest of it (``epoch``, optimizer states, ``rng`` ...)."""
    path = resolve_checkpoint_path(path)
    obj = read_checkpoint(path)
    found = obj.get('kind') if isinstance(obj, Mapping) else None
    if found != kind:
        what = {'train': 'training', 'search': 'search'}[kind]
        hint = ('use it with `bnas-nni eval` instead of --resume' if found in (None, 'model') else
                f'it is a {found} checkpoint')
        raise CheckpointError(f'{path} is not a bnas-nni {what} checkpoint; {hint}')
    try:
        return load_checkpoint_into(unwrap(model), obj, layout='bnas-nni')
    except CheckpointError as exc:
        raise CheckpointError(f'{path}: {exc}') from None


def model_from_checkpoint(obj: Mapping[str, Any]) -> nn.Module:
    """Rebuild and load the network of a bnas-nni checkpoint from its architecture description alone.

    The network's constructor arguments (``BNASNetwork.config``, stored by :func:`describe_model`) rebuild
    it exactly; files written before they were stored are rebuilt from the description (genotype, family,
    C, L, classes, the binarizer of every conv, and a training config's activation quantizer). The
    weights are loaded strictly.
    """
    if not isinstance(obj, Mapping) or obj.get('format') != FORMAT or not isinstance(obj.get('model'), Mapping):
        raise CheckpointError('not a bnas-nni checkpoint with an architecture description; pass --model (and '
                              '--official for a file of the official code)')
    desc = obj['model']
    binarizers = dict(desc.get('binarizers') or {})
    if isinstance(desc.get('config'), Mapping):
        model = BNASNetwork.from_config(desc['config'])
    else:
        missing = [k for k in ('genotype', 'family', 'init_channels', 'layers', 'num_classes') if k not in desc]
        if missing:
            raise CheckpointError(f'the checkpoint\'s architecture description lacks {missing}; pass --model/--arch')
        genotype = Genotype.from_dict(desc['genotype'], name=str(desc['genotype'].get('name') or 'checkpoint'))
        counts: Dict[str, int] = {}
        for b in binarizers.values():
            counts[b] = counts.get(b, 0) + 1
        config = obj.get('config') if isinstance(obj.get('config'), Mapping) else {}
        model = BNASNetwork(genotype, init_channels=int(desc['init_channels']), layers=int(desc['layers']),
                            num_classes=int(desc['num_classes']),
                            dataset='imagenet' if desc['family'] == 'imagenet' else 'cifar10',
                            binarizer=max(counts, key=counts.get) if counts else None,
                            activation=config.get('activation') or 'ste_sign')
    # the per-conv record wins: it also holds binarizers changed after the network was built
    convs = {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    unknown = sorted(set(binarizers) - set(convs))
    if unknown:
        raise CheckpointError(f'the checkpoint lists binarizers for convs the rebuilt network lacks: {unknown[:4]}')
    for name, conv in convs.items():
        if conv.binarizer != binarizers.get(name):
            conv.binarizer = binarizers.get(name)
    load_checkpoint_into(model, obj, layout='bnas-nni')
    return model.eval()
