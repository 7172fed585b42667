r"""Measuring a :class:`~bnas_nni.latency.model.LatencyModel` with the packed engine on this CPU.

The engine does not run ops one by one at batch > 1: an all-binary cell is one C++ program that runs every op
of the cell on one image before the next, and at batch 1 each op is a Python call around a kernel. An op's cost
therefore depends on where it sits, and the cheapest honest measurement is *in context*: whole derived networks
that differ in one kind of choice. For each cell type and each candidate op, a probe network puts that op on
every edge of one input class (normal cells; reduction cells fed by the cell inputs, stride 2; reduction cells
fed by an earlier node, stride 1) and zeroise everywhere else; the base network has zeroise on every edge.

.. math::

   T^{t}_{e,k} = \frac{\mathrm{ms}(\text{probe}_{t,c(e),k}) - \mathrm{ms}(\text{base})}{n_{t,c(e)}},
   \qquad T_{fixed} = \mathrm{ms}(\text{base})

where :math:`n_{t,c}` is the number of edges the probe changed (summed over every cell of type :math:`t`, as the
model wants). The network's stem, preprocess convs, residual convs, concatenations, head and classifier are in
:math:`T_{fixed}`. What is left out of an additive model (a node whose two ops are zeroise is zero-filled, cache
reuse between ops of one program) is fitted on a few seeded random genotypes measured whole,
:math:`\mathrm{ms}(g) \approx T_{fixed} + b + \sum_t a_t \sum_{e \in g} T^t_e` by least squares on the relative
error: no correction, one common scale (:math:`a_t = a`, :math:`b = 0`) or a scale per cell type plus an offset,
whichever has the smallest leave-one-out error; the scales and the offset are folded into the tables and
reported in ``meta['fit']``.

Every network is timed ``repeats`` times, round-robin so that a burst of load from other processes hits all of
them alike, and the minimum is kept. Models are cached per machine key (CPU model, instruction set, threads,
batch), network and engine version in :func:`cache_dir`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..deploy import format as packed_format
from ..deploy import kernels
from ..deploy.export import describe_network, packed_description
from ..deploy.runtime import PackedNetwork
from ..errors import ConfigError
from ..genotypes import CELL_TYPES, Genotype
from ..networks import FAMILIES, BNASNetwork, reduction_indices
from ..ops import PRIMITIVES, canonical_op
from .model import LatencyModel, edge_nodes, num_edges

__all__ = ['measure_latency_model', 'machine_key', 'engine_version', 'cache_dir', 'cache_path', 'cached_model',
           'measure_genotypes', 'random_genotype', 'CACHE_ENV', 'DEFAULT_REPEATS', 'DEFAULT_CALIBRATION']

#: overrides the cache folder (default ``$XDG_CACHE_HOME/bnas-nni/latency`` or ``~/.cache/bnas-nni/latency``)
CACHE_ENV = 'BNAS_NNI_LATENCY_CACHE'
#: timed runs per network (the minimum is kept)
DEFAULT_REPEATS = 7
#: separately built copies of the base network (its fastest is the reference of every probe)
BASE_COPIES = 3
#: seeded random genotypes measured whole to fit the per-cell-type correction
DEFAULT_CALIBRATION = 8
#: extra rounds for fast networks: while a round takes less than ROUND_BUDGET_S / rounds, up to this factor
MAX_ROUNDS_FACTOR = 4
ROUND_BUDGET_S = 20.0
_DATASET = {'cifar': 'cifar10', 'imagenet': 'imagenet'}
_CLASSES = ('normal', 'reduce_s2', 'reduce_s1')


# --------------------------------------------------------------------------- keys and the cache

def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return ' '.join(line.split(':', 1)[1].split())
    return platform.processor() or platform.machine() or 'unknown cpu'


def machine_key(threads: int, batch: int) -> Dict[str, Any]:
    """What a latency table is valid for: CPU model, the engine's instruction-set path, threads and batch."""
    return {'cpu': _cpu_model(), 'isa': kernels.resolve_isa(), 'threads': int(threads), 'batch': int(batch)}


def engine_version() -> str:
    """A digest of the engine's sources (C++ kernels, runtime, packed format) and torch's version: a change to
    any of them makes cached tables stale."""
    deploy = Path(__file__).resolve().parent.parent / 'deploy'
    h = hashlib.sha256(f'format {packed_format.VERSION} torch {torch.__version__}'.encode())
    for path in sorted((deploy / 'csrc').iterdir()) + [deploy / 'runtime.py', deploy / 'fold.py']:
        if path.is_file():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """``$BNAS_NNI_LATENCY_CACHE``, else ``$XDG_CACHE_HOME/bnas-nni/latency``, else ``~/.cache/bnas-nni/latency``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'bnas-nni' / 'latency'


#: the paper's binary block: block options equal to these are left out of cache keys
_BLOCK_DEFAULTS = {'binarizer': 'xnor', 'activation': 'ste_sign', 'nonlinearity': 'relu', 'shortcut': False}


def _network_key(*, ops: Sequence[str], num_nodes: int, init_channels: int, layers: int, image_size: int,
                 num_classes: int, family: str, block: Mapping[str, Any]) -> Dict[str, Any]:
    block = {k: block[k] for k in sorted(block) if k not in _BLOCK_DEFAULTS or block[k] != _BLOCK_DEFAULTS[k]}
    return {'ops': list(ops), 'num_nodes': int(num_nodes), 'init_channels': int(init_channels),
            'layers': int(layers), 'image_size': int(image_size), 'num_classes': int(num_classes),
            'family': family, 'block': block}


def cache_path(machine: Mapping[str, Any], network: Mapping[str, Any], engine: str) -> Path:
    """The cache file of one machine key + network + engine version."""
    digest = hashlib.sha256(json.dumps({'machine': machine, 'network': network, 'engine': engine},
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"{machine['isa']}-t{machine['threads']}-b{machine['batch']}-{digest}.json"


def _check_args(ops: Sequence[str], num_nodes: int, init_channels: int, layers: int, image_size: int,
                num_classes: int, family: str, batch: int, threads: int, repeats: int) -> Tuple[str, ...]:
    ops = tuple(canonical_op(o, where='the latency model') for o in ops)
    if not ops or len(set(ops)) != len(ops):
        raise ConfigError(f'latency model ops {list(ops)} must be a non-empty list without repeats')
    if family not in FAMILIES:
        raise ConfigError(f'unknown network family {family!r}; choose one of {", ".join(FAMILIES)}')
    for name, value, low in (('num_nodes', num_nodes, 1), ('init_channels', init_channels, 2),
                             ('layers', layers, 1), ('image_size', image_size, 8), ('num_classes', num_classes, 1),
                             ('batch', batch, 1), ('threads', threads, 1), ('repeats', repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f'latency model {name} is {value!r}; it must be an integer >= {low}')
    return ops


def cached_model(*, ops: Sequence[str], num_nodes: int, init_channels: int, layers: int, image_size: int,
                 num_classes: int, family: str = 'cifar', batch: int = 1, threads: int = 2,
                 block: Optional[Mapping[str, Any]] = None, cover: bool = False) -> Optional[LatencyModel]:
    """The cached model of this machine, engine and network, or None; nothing is measured.

    With ``cover=True`` any cached model whose ops include ``ops`` will do (a genotype's ops rather than a
    space's: ``bnas-nni summary`` does not know which space a genotype came from)."""
    folder = cache_dir()
    if not folder.is_dir() or not any(folder.glob('*.json')):
        return None            # no table at all: do not even load the engine to learn the machine key
    ops = tuple(canonical_op(o, where='the latency model') for o in ops)
    machine, engine = machine_key(threads, batch), engine_version()
    network = _network_key(ops=ops, num_nodes=num_nodes, init_channels=init_channels, layers=layers,
                           image_size=image_size, num_classes=num_classes, family=family, block=dict(block or {}))
    exact = cache_path(machine, network, engine)
    candidates = [exact] if exact.is_file() else []
    if cover:
        candidates += sorted(p for p in folder.glob(f"{machine['isa']}-t{threads}-b{batch}-*.json") if p != exact)
    for path in candidates:
        try:
            model = LatencyModel.load(path)
        except ConfigError:       # a damaged cache entry is measured again, not an error
            continue
        meta = model.meta
        theirs = dict(meta.get('network') or {})
        wanted = {k: v for k, v in network.items() if k != 'ops'}
        if (meta.get('machine') == machine and meta.get('engine_version') == engine and set(ops) <= set(model.ops)
                and {k: theirs.get(k) for k in wanted} == wanted):
            return model
    return None


# --------------------------------------------------------------------------- networks and timing

@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _packed(genotype: Genotype, *, init_channels: int, layers: int, num_classes: int, family: str,
            block: Mapping[str, Any]):
    """The derived network of ``genotype`` on the packed engine (random weights: the kernels' time does not
    depend on the values)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = BNASNetwork(genotype, init_channels=init_channels, layers=layers, num_classes=num_classes,
                          dataset=_DATASET[family], **dict(block)).eval()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.Conv2d):
                    _no_zero_signs(m.weight)
    return PackedNetwork(packed_description(describe_network(net)), source='latency probe')


def _no_zero_signs(weight: torch.Tensor, tries: int = 8) -> None:
    """Nudge the weights whose sign would be 0 -- exactly 0, or equal to their filter's mean over input
    channels (XNOR centres the latent weights first; in fp32 that cancellation happens in about one network
    of ten at C=16) -- so that every binarized filter is sign(W) times one scale, as the engine needs."""
    for _ in range(tries):
        centred = weight - weight.mean(dim=1, keepdim=True) if weight.dim() == 4 else weight
        zero = (weight == 0) | (centred == 0)
        if not bool(zero.any()):
            return
        weight.add_(zero.to(weight.dtype) * torch.rand_like(weight).add_(0.5) * 1e-3 * (1.0 + weight.abs().max()))


def _time_all(nets: Sequence[Any], x: torch.Tensor, repeats: int) -> List[float]:
    """Minimum ms of each network over round-robin runs after one warm-up run each: ``repeats`` rounds, more
    (up to ``MAX_ROUNDS_FACTOR * repeats``) while the rounds fit in ``ROUND_BUDGET_S`` -- fast networks get more
    chances to run undisturbed on a busy machine."""
    t0 = time.perf_counter()
    for net in nets:
        net(x)
    warm = time.perf_counter() - t0
    rounds = repeats if warm <= 0 else max(repeats, min(MAX_ROUNDS_FACTOR * repeats, int(ROUND_BUDGET_S / warm)))
    best = [float('inf')] * len(nets)
    for _ in range(rounds):
        for i, net in enumerate(nets):
            t0 = time.perf_counter()
            net(x)
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def measure_genotypes(genotypes: Sequence[Genotype], *, init_channels: int, layers: int, image_size: int,
                      num_classes: int = 10, family: str = 'cifar', batch: int = 1, threads: int = 2,
                      repeats: int = DEFAULT_REPEATS, block: Optional[Mapping[str, Any]] = None,
                      seed: int = 0) -> List[float]:
    """Measured ms per batch of each genotype's derived network on the packed engine (min over ``repeats``)."""
    block = dict(block or {})
    nets = [_packed(g, init_channels=init_channels, layers=layers, num_classes=num_classes, family=family,
                    block=block) for g in genotypes]
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    with _threads(threads):
        return _time_all(nets, x, repeats)


def random_genotype(ops: Sequence[str], num_nodes: int, rng: random.Random, name: str = '') -> Genotype:
    """A genotype as derivation makes them: per node two distinct inputs, each with a uniformly drawn op."""
    cells = {}
    for t in CELL_TYPES:
        entries = []
        for i in range(num_nodes):
            for j in sorted(rng.sample(range(i + 2), 2)):
                entries.append((rng.choice(list(ops)), j))
        cells[t] = tuple(entries)
    return Genotype(normal=cells['normal'], reduce=cells['reduce'], name=name)


def _edge_class(cell_type: str, j: int) -> str:
    if cell_type == 'normal':
        return 'normal'
    return 'reduce_s2' if j < 2 else 'reduce_s1'


def _probe(num_nodes: int, edge_class: Optional[str], op: str) -> Tuple[Genotype, int]:
    """A genotype with ``op`` on every slot of ``edge_class`` (zeroise elsewhere) and the number of slots set."""
    base = [('zeroise', j) for i in range(num_nodes) for j in (0, 1)]
    cells = {'normal': list(base), 'reduce': list(base)}
    changed = 0
    if edge_class == 'normal':
        # inputs spread over the cell inputs and the earlier nodes, as derived cells have them
        cells['normal'] = [(op, j) for i in range(num_nodes) for j in (i, i + 1)]
        changed = 2 * num_nodes
    elif edge_class == 'reduce_s2':
        cells['reduce'] = [(op, j) for i in range(num_nodes) for j in (0, 1)]
        changed = 2 * num_nodes
    elif edge_class == 'reduce_s1':
        entries = []
        for i in range(num_nodes):
            if i == 0:
                entries += [('zeroise', 0), ('zeroise', 1)]
            else:
                entries += [(op, max(2, i)), (op, i + 1)]
                changed += 2
        cells['reduce'] = entries
    return Genotype(normal=tuple(cells['normal']), reduce=tuple(cells['reduce'])), changed


def _raw_sums(tables: Mapping[str, np.ndarray], ops: Sequence[str], num_nodes: int,
              genotype: Genotype) -> Dict[str, float]:
    rows = {pair: r for r, pair in enumerate(edge_nodes(num_nodes))}
    return {t: float(sum(tables[t][rows[(idx // 2, j)], ops.index(op)] for idx, (op, j) in
                         enumerate(genotype.cell(t)))) for t in CELL_TYPES}


def _solve(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.linalg.lstsq(X * w[:, None], y * w, rcond=None)[0]


def _fit(base_ms: float, sums: List[Dict[str, float]], measured: List[float],
         present: Mapping[str, bool]) -> Dict[str, Any]:
    """The correction of the additive prediction, chosen by leave-one-out error on the calibration genotypes among
    none, one common scale of the edge costs, and a scale per cell type plus an offset (least squares on the
    relative error); a fit with a scale outside [0.5, 2] or an offset over half the fixed part is not considered
    (it would be chasing noise, not a systematic effect)."""
    types = [t for t in CELL_TYPES if present[t] and any(s[t] > 0 for s in sums)]
    meas = np.array(measured, dtype=np.float64)
    y = meas - base_ms
    w = 1.0 / np.maximum(meas, 1e-9)
    total = np.array([sum(s[t] for t in CELL_TYPES) for s in sums])
    designs = {'common scale': total[:, None],
               'scale per cell type + offset': np.column_stack([np.ones(len(meas))] + [[s[t] for s in sums]
                                                                                      for t in types])}

    def params(name: str, coef: np.ndarray) -> Tuple[Dict[str, float], float]:
        if name == 'common scale':
            return {t: float(coef[0]) for t in CELL_TYPES}, 0.0
        scales = {t: 1.0 for t in CELL_TYPES}
        scales.update({t: float(a) for t, a in zip(types, coef[1:])})
        return scales, float(coef[0])

    def plausible(scales: Mapping[str, float], offset: float) -> bool:
        return all(0.5 <= scales[t] <= 2.0 for t in types) and abs(offset) <= 0.5 * base_ms

    def errors(scales: Mapping[str, float], offset: float, rows) -> np.ndarray:
        pred = np.array([base_ms + offset + sum(scales[t] * sums[i][t] for t in CELL_TYPES) for i in rows])
        return np.abs(pred - meas[rows]) / meas[rows]

    n = len(meas)
    candidates: Dict[str, Any] = {'none': ({t: 1.0 for t in CELL_TYPES}, 0.0, float(np.median(errors(
        {t: 1.0 for t in CELL_TYPES}, 0.0, list(range(n))))))}
    for name, X in designs.items():
        if n < X.shape[1] + 2 or not types:
            continue
        scales, offset = params(name, _solve(X, y, w))
        if not plausible(scales, offset):
            continue
        loo = []
        for i in range(n):
            keep = [j for j in range(n) if j != i]
            sc, off = params(name, _solve(X[keep], y[keep], w[keep]))
            loo.append(float(errors(sc, off, [i])[0]))
        candidates[name] = (scales, offset, float(np.median(loo)))
    chosen = min(candidates, key=lambda k: candidates[k][2])
    scales, offset, _ = candidates[chosen]
    everyone = list(range(n))
    before, after = errors({t: 1.0 for t in CELL_TYPES}, 0.0, everyone), errors(scales, offset, everyone)
    return {'kind': chosen, 'scale': scales, 'offset_ms': offset, 'applied': chosen != 'none',
            'loo_median_error': {k: v[2] for k, v in candidates.items()}, 'calibration_genotypes': n,
            'rel_error_before': {'median': float(np.median(before)), 'worst': float(before.max())},
            'rel_error_after': {'median': float(np.median(after)), 'worst': float(after.max())}}


def measure_latency_model(*, ops: Sequence[str] = PRIMITIVES, num_nodes: int = 4, init_channels: int = 16,
                          layers: int = 8, image_size: int = 32, num_classes: int = 10, family: str = 'cifar',
                          batch: int = 1, threads: int = 2, cache: bool = True, repeats: int = DEFAULT_REPEATS,
                          calibration: int = DEFAULT_CALIBRATION, block: Optional[Mapping[str, Any]] = None,
                          seed: int = 0, holdout: Sequence[Genotype] = (), progress=None) -> LatencyModel:
    """Measure (or read from the cache) the latency model of the derived networks of a space on this machine.

    ``ops``/``num_nodes`` are the space's; ``init_channels``, ``layers``, ``image_size``, ``num_classes`` and
    ``family`` the derived network's; ``block`` the binary block options (``binarizer``, ``activation``,
    ``nonlinearity``, ``shortcut``) when not the paper's. ``calibration`` seeded random genotypes fit the
    correction (0: none). ``holdout`` genotypes are timed in the same round-robin but kept out of the fit: their
    measured and predicted ms land in ``meta['holdout']``, the model's error on networks it has not seen, free of
    the drift of the machine's speed between two timing sessions (on a shared VM, the same batch-32 networks
    timed a minute apart differ by up to 15 %). ``progress`` (a callable taking a line) hears what is being
    measured.
    """
    ops = _check_args(ops, num_nodes, init_channels, layers, image_size, num_classes, family, batch, threads,
                      repeats)
    if isinstance(calibration, bool) or not isinstance(calibration, int) or calibration < 0:
        raise ConfigError(f'latency model calibration is {calibration!r}; it must be an integer >= 0 (0: no fit)')
    block = dict(block or {})
    machine = machine_key(threads, batch)
    network = _network_key(ops=ops, num_nodes=num_nodes, init_channels=init_channels, layers=layers,
                           image_size=image_size, num_classes=num_classes, family=family, block=block)
    engine = engine_version()
    path = cache_path(machine, network, engine)
    holdout = list(holdout)
    if cache and path.is_file() and not holdout:
        with contextlib.suppress(ConfigError):
            return LatencyModel.load(path)
    say = progress or (lambda line: None)
    started = time.perf_counter()
    build = dict(init_channels=init_channels, layers=layers, num_classes=num_classes, family=family, block=block)
    measured_ops = [o for o in ops if o != 'zeroise']
    reductions = set(reduction_indices(layers))
    present = {'normal': any(i not in reductions for i in range(layers)), 'reduce': bool(reductions)}
    probes: List[Tuple[str, str, int]] = []     # (class, op, slots changed)
    # the base network is built BASE_COPIES times and the fastest copy kept: every probe is a difference from it,
    # so one unlucky instance (a run of slow float convs on a busy machine) must not shift the whole table
    genotypes = [_probe(num_nodes, None, 'zeroise')[0]] * BASE_COPIES
    for cls in _CLASSES:
        if not present['normal' if cls == 'normal' else 'reduce'] or (cls == 'reduce_s1' and num_nodes < 2):
            continue
        for op in measured_ops:
            g, changed = _probe(num_nodes, cls, op)
            genotypes.append(g)
            probes.append((cls, op, changed))
    rng = random.Random(seed)
    calib = [random_genotype(ops, num_nodes, rng, name=f'calibration-{i}') for i in range(calibration)]
    say(f'building {len(genotypes) + len(calib) + len(holdout)} networks (C={init_channels}, {layers} cells, '
        f'{image_size}x{image_size}, batch {batch}, {threads} threads)')
    nets = [_packed(g, **build) for g in genotypes + calib + holdout]
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    say(f'timing them {repeats} times each on the {machine["isa"]} path')
    with _threads(threads):
        times = _time_all(nets, x, repeats)
        fixed_parts = _fixed_parts(nets[min(range(BASE_COPIES), key=times.__getitem__)], x)
    base_ms, probe_ms = min(times[:BASE_COPIES]), times[BASE_COPIES:len(genotypes)]
    calib_ms = times[len(genotypes):len(genotypes) + len(calib)]
    holdout_ms = times[len(genotypes) + len(calib):]

    per_slot: Dict[Tuple[str, str], float] = {}
    for (cls, op, changed), ms in zip(probes, probe_ms):
        per_slot[(cls, op)] = max(0.0, (ms - base_ms) / changed)   # below the noise floor: 0
    tables = {t: np.zeros((num_edges(num_nodes), len(ops))) for t in CELL_TYPES}
    for r, (i, j) in enumerate(edge_nodes(num_nodes)):
        for t in CELL_TYPES:
            for k, op in enumerate(ops):
                if op != 'zeroise':
                    tables[t][r, k] = per_slot.get((_edge_class(t, j), op), 0.0)

    fit: Dict[str, Any] = {'scale': {t: 1.0 for t in CELL_TYPES}, 'offset_ms': 0.0, 'applied': False,
                           'calibration_genotypes': 0}
    if calib:
        fit = _fit(base_ms, [_raw_sums(tables, ops, num_nodes, g) for g in calib], calib_ms, present)
    edge_ms = {t: torch.from_numpy(tables[t] * fit['scale'][t]) for t in CELL_TYPES}
    meta = {'machine': machine, 'network': network, 'engine_version': engine, 'repeats': repeats,
            'statistic': 'min', 'base_ms': base_ms, 'per_slot_ms': {f'{c}/{o}': v for (c, o), v in per_slot.items()},
            'fixed_parts_ms': fixed_parts, 'fit': fit, 'measured_s': round(time.perf_counter() - started, 1),
            'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    model = LatencyModel.from_tables(ops, num_nodes, edge_ms, base_ms + fit['offset_ms'], meta)
    if holdout:
        predicted = [model.predict(g) for g in holdout]
        rel = [abs(p - m) / m for p, m in zip(predicted, holdout_ms)]
        model.meta['holdout'] = {'genotypes': [str(g) for g in holdout], 'measured_ms': holdout_ms,
                                 'predicted_ms': predicted,
                                 'rel_error': {'median': float(np.median(rel)), 'worst': float(max(rel))}}
    if cache:
        model.save(path)
    return model


def _fixed_parts(net: Any, x: torch.Tensor) -> Dict[str, float]:
    """The base network's profile grouped into the parts no choice changes (one profiled run, ms)."""
    _, records = net.profile(x)
    parts: Dict[str, float] = {}
    for name, _kind, seconds in records:
        if name in ('stem', 'head'):
            part = name
        elif name.endswith('.residual'):
            part = 'residual'
        elif '.preprocess' in name:
            part = 'preprocess'
        else:
            part = 'cells (zero fill, concat)'
        parts[part] = parts.get(part, 0.0) + seconds * 1e3
    return {k: round(v, 4) for k, v in parts.items()}
